"""Interop with pjsua2, PJSIP's Python binding (PyPI: pjsua2-python).

tests/pjsua2/register.py runs one pjsua2 account in a subprocess, on pjsua2's
defaults (registration interval 300 s, its Contact with ``;ob``, over TCP also
``+sip.instance`` and ``reg-id`` (RFC 5626), Contact rewriting on), with only
its identity sip:alice@127.0.0.1:PORT, the registrar sip:127.0.0.1:PORT
(;transport=tcp for TCP) and, for digest, a credential for any realm.  The
refresh is Account.setRegistration(True) (same Call-ID, next CSeq), the
unregister setRegistration(False).  Between the steps the admin API is asked
for sip:alice@127.0.0.1, without the port.

pjsua2 2.15.1 quirks, seen on the wire: although the account's URI carries the
registrar's port, pjsua2 writes To and From without it (To: <sip:alice@127.0.0.1>);
the Request-URI keeps it.  Each refresh has a new From tag.  It answers a SHA-256
challenge (RFC 8760) as well as an MD5 one.
"""
import os
import sys

import pytest

from conftest import require_client
from interop import HERE, USERS, LineClient, assert_gone, assert_refreshed, fetch_one, serve

pytestmark = pytest.mark.server
DRIVER = os.path.join(HERE, "pjsua2", "register.py")


@pytest.fixture
def pjsua2():
    return require_client("python:pjsua2", "pjsua2-python")


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_pjsua2_register_fetch_refresh_unregister(pjsua2, start, tmp_path, transport, auth):
    srv = serve(start, tmp_path, auth)
    host, port = srv.udp if transport == "udp" else srv.tcp
    cmd = [sys.executable, DRIVER, host, str(port), transport, "alice"]
    if auth:
        cmd.append(USERS["alice"])
    env = dict(os.environ, PJSUA2_LOG=str(tmp_path / "pjsua2-sip.log"))
    with LineClient(cmd, tmp_path / "pjsua2.log", env=env) as phone:
        status, code, expires, contacts = phone.ask("register")
        assert (status, code, expires) == ("done", "200", "300"), contacts
        first = fetch_one(srv, "alice")
        assert f"<{first['contact']}>" in contacts     # the 200 listed what was stored
        assert first["contact"].startswith("sip:alice@127.0.0.1:")
        assert first["transport"] == transport
        assert 290 <= first["expires"] <= 300
        if transport == "tcp":      # RFC 5626 over a connection
            assert first["instance"] and first["reg_id"] == 1

        status, code, expires, contacts = phone.ask("register")
        assert (status, code, expires) == ("done", "200", "300"), contacts
        second = fetch_one(srv, "alice")
        assert_refreshed(first, second)
        assert second["call_id"] == first["call_id"] and second["cseq"] > first["cseq"]

        status, code, expires, contacts = phone.ask("unregister")
        assert (status, code) == ("done", "200"), contacts
        assert_gone(srv, "alice")
        assert phone.close() == 0

    m = srv.metrics()
    assert m['fastsip_replies_total{code="200"}'] >= 3
    if auth:
        assert m['fastsip_replies_total{code="401"}'] >= 1
