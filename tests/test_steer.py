"""The kernel steering program (fastsip.server.steer), run by the kernel itself
(BPF_PROG_TEST_RUN) on the message corpus: it must pick shard_of(aor, n) for
every REGISTER whose To URI is in canonical form, and leave the rest to the
kernel's own hash."""
import os
import re

import pytest

import fastsip
from conftest import VECTORS
from fastsip.server import steer


def _load(by_user):
    try:
        fds = {n: steer.load(n, by_user) for n in (2, 3, 7)}
    except steer.SteerError as exc:
        pytest.skip(f"no kernel steering here: {exc}")
    return fds


@pytest.fixture(scope="module", params=["user@host", "user"])
def by(request):
    """The AOR form the program under test hashes (RegistrarCore.aor_by)."""
    return request.param


@pytest.fixture(scope="module")
def programs(by):
    fds = _load(by == "user")
    yield fds
    for fd in fds.values():
        os.close(fd)


def corpus():
    for path in sorted(VECTORS.rglob("*")):
        if path.is_file() and path.suffix in (".sip", ".dat", ".raw", ""):
            yield path


def test_the_hash_is_one_function_in_c_and_python():
    for aor in (b"", b"sip:alice@example.com", b"sips:\xff@[::1]:5061", b"x" * 300):
        assert fastsip.stable_hash(aor) == steer.stable_hash_py(aor)
    assert fastsip.shard_of("sip:alice@example.com", 7) == \
        steer.stable_hash_py(b"sip:alice@example.com") % 7


def test_every_canonical_register_in_the_corpus_lands_on_its_owner(programs, by):
    checked = differ = 0
    for path in corpus():
        data = path.read_bytes()
        aor = fastsip.aor_key(data, by)
        if aor is None:
            continue
        for n, fd in programs.items():
            got = steer.test_run(fd, data)
            to = re.search(rb"\n(?:to|t)[ \t]*:[^\n]*", data, re.I).group()
            if b"%" in to or b"@[" in to:
                differ += 1         # an escape (the program hashes the raw bytes) or an
                continue            # IPv6 host (its first ':' ends the hash): any answer
            assert got == fastsip.shard_of(aor, n), (path.name, aor, n, got)
            checked += 1
    assert checked >= 150           # the real phones' REGISTERs are all among them
    assert differ <= 6


@pytest.mark.parametrize("to, canonical, by_user", [
    (b"To: <sip:Alice@EXAMPLE.com>", b"sip:Alice@example.com", b"sip:Alice"),
    (b"to:sip:bob@example.com;tag=1", b"sip:bob@example.com", b"sip:bob"),
    (b"t: \"Bob\" <SIP:bob@h.example:5070>", b"sip:bob@h.example", b"sip:bob"),
    (b"To: <sip:bob@H.example:5070;transport=tcp>", b"sip:bob@h.example", b"sip:bob"),
    (b"TO  :\t<sips:carol@example.com?subject=x>", b"sip:carol@example.com", b"sip:carol"),
    (b"To: sip:example.com", b"sip:example.com", b"sip:example.com"),
    (b"To: <sip:example.com:5060>", b"sip:example.com", b"sip:example.com"),
])
def test_to_header_spellings(programs, by, to, canonical, by_user):
    msg = (b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n" + to +
           b"\r\nFrom: <sip:x@example.com>;tag=2\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n"
           b"Content-Length: 0\r\n\r\n")
    if by == "user":
        canonical = by_user
    assert fastsip.aor_key(msg, by) == canonical
    # the program hashes the scheme as written: a sips: To (rare over UDP, the only
    # transport it steers) may land on another worker, which hands it over
    hashed = b"sips:" + canonical[4:] if b"<sips:" in to else canonical
    for n, fd in programs.items():
        assert steer.test_run(fd, msg) == fastsip.shard_of(hashed, n)


@pytest.mark.parametrize("data", [
    b"", b"\r\n\r\n", b"garbage", b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n",
    b"REGISTER sip:h SIP/2.0\r\nTimestamp: 1\r\nTop: <sip:a@h>\r\n\r\n",     # no To header
    b"REGISTER sip:h SIP/2.0\r\nTo: <urn>\r\n\r\n",                          # no scheme end
    b"REGISTER sip:h SIP/2.0\r\nTo: \"<\" <sip:a@h>\r\n\r\n",                   # '<' quoted
    b"REGISTER sip:h SIP/2.0\r\n" + b"X: " + b"y" * 700 + b"\r\nTo: <sip:a@h>\r\n\r\n",
])
def test_no_to_uri_within_reach_leaves_the_choice_to_the_kernel(programs, data):
    for fd in programs.values():
        assert steer.test_run(fd, data) == steer.NO_SOCKET


def test_attach_needs_two_sockets():
    assert steer.attach([]) == "one worker"
