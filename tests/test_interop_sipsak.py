"""Interop with sipsak (Debian package sipsak), the SIP swiss army knife.

Its usrloc mode (``-U``) sends one REGISTER for the user of ``-s`` and exits 0
only on a 200; given ``-a`` it answers one 401 itself (MD5 only).  Each step is
a separate sipsak run, as an admin would type it: register, refresh,
unregister (``-x 0``), with the same Contact (``-C``), and between the steps the
admin API is asked for the AOR sip:alice@127.0.0.1, without the port that
sipsak writes into To.

sipsak 0.9.8.1 quirks, seen on the wire: it writes the URI of ``-s`` into the
Request-URI, From and To, but with a five-digit port it drops the port's last
digit there (``sip:alice@127.0.0.1:1506`` for port 15060; it still sends to
the right port), and the digest username it takes from that URI keeps the
``@`` (``username="alice@"``), so ``-u`` names it.  Its default Expires (15)
is below the registrar's Min-Expires (60) and it does not retry after the
423, so ``-x`` sets it.
"""
import subprocess

import pytest

from conftest import require_client
from interop import USERS, assert_gone, assert_refreshed, fetch_one, serve

pytestmark = pytest.mark.server
CONTACT = "sip:alice@127.0.0.1:5999"


@pytest.fixture
def sipsak():
    return require_client("sipsak", "sipsak")


def run_sipsak(sipsak, addr, transport, expires, auth):
    cmd = [sipsak, "-vv", "-i", "-U", "-E", transport, "-x", str(expires), "-C", CONTACT,
           "-s", "sip:alice@%s:%d" % addr]
    if auth:
        cmd += ["-u", "alice", "-a", USERS["alice"]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"sipsak exit {out.returncode}\n{out.stdout[-3000:]}{out.stderr[-1000:]}"
    return out.stdout


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipsak_register_fetch_refresh_unregister(sipsak, start, tmp_path, transport, auth):
    srv = serve(start, tmp_path, auth)
    addr = srv.udp if transport == "udp" else srv.tcp

    run_sipsak(sipsak, addr, transport, 3600, auth)
    first = fetch_one(srv, "alice")
    assert first["contact"] == CONTACT
    assert first["transport"] == transport
    assert 3590 <= first["expires"] <= 3600
    assert first["user_agent"].startswith("sipsak")

    run_sipsak(sipsak, addr, transport, 1800, auth)
    second = fetch_one(srv, "alice")
    assert_refreshed(first, second)
    assert 1790 <= second["expires"] <= 1800

    run_sipsak(sipsak, addr, transport, 0, auth)
    assert_gone(srv, "alice")

    m = srv.metrics()
    assert m['fastsip_replies_total{code="200"}'] == 3
    assert m['fastsip_received_total{transport="%s"}' % transport] == (6 if auth else 3)
    if auth:
        assert m['fastsip_replies_total{code="401"}'] == 3


def test_sipsak_wrong_password_is_refused(sipsak, start, tmp_path):
    srv = serve(start, tmp_path, True)
    cmd = [sipsak, "-vv", "-i", "-U", "-x", "3600", "-C", CONTACT, "-s",
           "sip:alice@%s:%d" % srv.udp, "-u", "alice", "-a", "not-" + USERS["alice"]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    # refused because the response is wrong, not because sipsak found no digest it can answer
    assert "authorization failed" in out.stdout + out.stderr, out.stdout[-3000:]
    assert srv.metrics()['fastsip_replies_total{code="401"}'] == 2
    assert srv.api("/api/bindings")["bindings"] == []
