"""The Kamailio that bench/bench_server.py --auth --kamailio measures really authenticates.

Kamailio is started with the bench's own command line (``PEERS_AUTH["kamailio"]``:
bench/kamailio/registrar_auth.cfg, ``-x tlsf``, 2 UDP processes) and a phone on a UDP
socket registers the bench's users (user{i}, password pw{i}, realm 127.0.0.1) with
MD5 and qop=auth: the right password is answered 200 with the binding, a wrong one
401, another user's AOR 403, and the same nonce-count sent again 401. Otherwise the
bench would compare fastsip's digest check with a registrar that checks nothing.
Skipped when kamailio (or its auth module) is not installed, except under CI (``CI``
set), where it fails.
"""
import hashlib
import os
import sys
from types import SimpleNamespace

import pytest

from conftest import require_client
from fastsip.server.testing import register

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "bench")
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"     # as the config's mpath


@pytest.fixture
def kamailio():
    """The bench's Kamailio with digest auth: its (host, port); stopped at the end."""
    require_client("kamailio", "kamailio")
    if not os.path.exists(os.path.join(MODULES, "auth.so")):
        pytest.skip(f"no auth module in {MODULES}")
    saved = list(sys.path)
    sys.path.insert(0, BENCH)
    try:
        from bench_e2e import Server
        from bench_server import PEERS_AUTH
    finally:
        sys.path[:] = saved         # bench_server adds its folders when imported
    srv = Server(PEERS_AUTH["kamailio"],
                 SimpleNamespace(host="127.0.0.1", port=None, server_cpus=None), 2)
    try:
        yield (srv.host, srv.port)
    finally:
        srv.stop()


def authorization(challenge, user, password, uri, nc="00000001", realm="127.0.0.1"):
    """The Authorization line answering ``challenge`` (MD5, qop=auth) as ``user``."""
    nonce = challenge.params["nonce"]
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
    resp = hashlib.md5(f"{ha1}:{nonce}:{nc}:c0ffee:auth:{ha2}".encode()).hexdigest()
    return (f'Authorization: Digest username="{user}", realm="{realm}", nonce="{nonce}", '
            f'uri="{uri}", response="{resp}", algorithm=MD5, qop=auth, nc={nc}, '
            f'cnonce="c0ffee"')


def test_the_bench_kamailio_checks_the_digest(kamailio, phone):
    ua = phone(kamailio)
    uri = f"sip:{kamailio[0]}:{kamailio[1]}"
    contact = f"sip:user7@127.0.0.1:{ua.local[1]}"

    def ask(user, cseq, extra=(), aor=None):
        return ua.ask(register(aor or user, "127.0.0.1", contact=contact, call_id=f"{user}-c",
                               cseq=cseq, expires=600, ruri=uri, local=ua.local,
                               extra=list(extra)))

    first = ask("user7", 1)
    assert first.status == 401
    chal = first.www_authenticate[0]
    assert chal.params["realm"] == "127.0.0.1" and chal.params["qop"] == "auth"

    wrong = ask("user7", 2, [authorization(chal, "user7", "pw8", uri)])
    assert wrong.status == 401

    other = ask("user7", 3, [authorization(chal, "user7", "pw7", uri, nc="00000002")],
                aor="user8")
    assert other.status == 403          # user7's password, user8's AOR

    right = ask("user7", 4, [authorization(chal, "user7", "pw7", uri, nc="00000003")])
    assert right.status == 200
    assert [c.uri for c in right.contacts] == [contact]

    again = ask("user7", 5, [authorization(chal, "user7", "pw7", uri, nc="00000003")])
    assert again.status == 401          # a nonce-count used before
