"""Interop over TLS (issue #13): baresip, pjsua2 and linphone against ``fastsip serve``
on its defaults plus only the TLS flags (tests/interop.py: serve_tls: a server
certificate for 127.0.0.1, ::1 and localhost from a test CA made by
fastsip.server.testing.make_test_pki).  Each client is given the test CA and
registers on its first try; the admin API must then find the binding by
sip:alice@127.0.0.1 with transport "tls" and the connection it came on.

What each client checks of the server's certificate (seen on the wire and in their logs):
- pjsua2 2.15.1 (pip pjsua2-python, its own OpenSSL 1.0.2k: TLS 1.2): nothing unless
  TlsConfig.verifyServer is set; tests/pjsua2/register.py sets it and gives the CA
  (a certificate from another CA fails the REGISTER with PJSIP_TLS_ECERTVERIF).
- linphone 5.1 (belle-sip with mbedtls 2.28): the chain against ``root_ca`` and the
  name against the certificate's DNS names only: with the registrar at 127.0.0.1 it
  refuses the certificate ("CN-mismatch") although its subjectAltName holds
  IP:127.0.0.1, so the proxy is ``localhost`` (the certificate's DNS name).
- baresip 1.0 (libre 1.1): loads ``sip_cafile`` but does not verify the server at all:
  it registers as well against a certificate from another CA.  ``sips:`` accounts are
  refused ("Function not implemented"): the account is ``sip:`` with ;transport=tls.
"""
import os
import re
import sys
import time

import pytest

from conftest import require_client
from interop import HERE, USERS, LineClient, assert_gone, assert_refreshed, fetch_one, serve_tls, wait_gone
from test_interop_baresip import Baresip, registers, wait_binding
from test_interop_linphone import LinphoneDaemon, sip_trace

pytestmark = pytest.mark.server
PJSUA2 = os.path.join(HERE, "pjsua2", "register.py")


def assert_tls_binding(binding, contact_re):
    """A binding registered over TLS: its transport, its contact, the connection."""
    assert binding["transport"] == "tls", binding
    assert re.fullmatch(contact_re, binding["contact"]), binding["contact"]
    assert binding["source"][0] == "127.0.0.1" and binding["conn_id"] >= 0, binding


# -- baresip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
def test_baresip_tls_register_fetch_refresh_unregister(start, tmp_path, auth):
    """As tests/test_interop_baresip.py over UDP and TCP: a refresh every 3 s (rwait=5),
    /quit unregisters."""
    exe = require_client("baresip", "baresip-core")
    srv, pki = serve_tls(start, tmp_path, auth)
    host, port = srv.tls
    account = f"<sip:alice@{host}:{port};transport=tls>;regint=60;rwait=5"
    if auth:
        account += f";auth_pass={USERS['alice']}"
    phone = Baresip(exe, tmp_path, account, config=f"sip_cafile\t{pki['ca']}\n")
    try:
        phone.wait_for(r"All 1 useragent registered successfully")
        first = fetch_one(srv, "alice")
        assert_tls_binding(first, r"sip:alice-0x[0-9a-f]+@127\.0\.0\.1:\d+;transport=tls")
        assert first["user_agent"].startswith("baresip v1.0")
        assert 45 <= first["expires"] <= 60     # (60 asked; a loaded machine lags)
        assert re.search(rf"TLS 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{port}\n", phone.log())

        found = wait_binding(srv, lambda b: len(b) != 1 or b[0]["cseq"] != first["cseq"])
        assert len(found) == 1, found
        assert_refreshed(first, found[0])
        assert found[0]["call_id"] == first["call_id"] and found[0]["cseq"] > first["cseq"]

        assert phone.quit() == 0
        assert_gone(srv, "alice")
        assert registers(phone.log(), port)[-1][1].endswith(";expires=0")
    finally:
        phone.kill()
    m = srv.metrics()
    assert m['fastsip_received_total{transport="tls"}'] >= 3
    assert m['fastsip_replies_total{code="200"}'] >= 3
    if auth:
        assert m['fastsip_replies_total{code="401"}'] >= 1


# -- pjsua2 ----------------------------------------------------------------------------------

def pjsua2_phone(tmp_path, srv, pki, password=None):
    require_client("python:pjsua2", "pjsua2-python")
    host, port = srv.tls
    cmd = [sys.executable, PJSUA2, host, str(port), "tls", "alice"]
    if password is not None:
        cmd.append(password)
    env = dict(os.environ, PJSUA2_LOG=str(tmp_path / "pjsua2-sip.log"), PJSUA2_CA=pki["ca"])
    return LineClient(cmd, tmp_path / "pjsua2.log", env=env)


PJSUA2_CONTACT = r"sip:alice@127\.0\.0\.1:\d+;transport=TLS;ob"


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
def test_pjsua2_tls_register_fetch_refresh_unregister(start, tmp_path, auth):
    srv, pki = serve_tls(start, tmp_path, auth)
    with pjsua2_phone(tmp_path, srv, pki, USERS["alice"] if auth else None) as phone:
        status, code, expires, contacts = phone.ask("register")
        assert (status, code, expires) == ("done", "200", "300"), (contacts, phone.log())
        first = fetch_one(srv, "alice")
        assert_tls_binding(first, PJSUA2_CONTACT)
        assert f"<{first['contact']}>" in contacts
        assert first["instance"] and first["reg_id"] == 1      # RFC 5626 over a connection
        assert 290 <= first["expires"] <= 300

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
    assert m['fastsip_received_total{transport="tls"}'] >= 3
    if auth:
        assert m['fastsip_replies_total{code="401"}'] >= 1


def test_pjsua2_tls_flow_ends_with_its_connection(start, tmp_path):
    """pjsua2 registers with +sip.instance and reg-id (an RFC 5626 flow); killed, it
    never unregisters, and its binding (granted 300 s) goes when the TLS connection
    closes."""
    srv, pki = serve_tls(start, tmp_path)
    with pjsua2_phone(tmp_path, srv, pki) as phone:
        status, code, expires, contacts = phone.ask("register")
        assert (status, code, expires) == ("done", "200", "300"), (contacts, phone.log())
        first = fetch_one(srv, "alice")
        assert_tls_binding(first, PJSUA2_CONTACT)
        assert first["instance"] and first["reg_id"] == 1
        assert phone.kill() == -9
    wait_gone(srv, "alice")


# -- linphone --------------------------------------------------------------------------------

def linphone_tls_rc(port, ca):
    """linphone's TLS account: the CA, the name checked (``localhost``: see the module's
    docstring), identity sip:alice@127.0.0.1:PORT, expires 60 (Min-Expires)."""
    return (
        "[sip]\n"
        "bind_address=127.0.0.1\n"
        "sip_port=0\n"                 # 0: off
        "sip_tcp_port=0\n"
        "sip_tls_port=-1\n"            # -1: a random port
        "ipv6=0\n"
        "default_proxy=0\n"
        f"root_ca={ca}\n"
        "verify_server_certs=1\n"
        "verify_server_cn=1\n"
        "\n[proxy_0]\n"
        f"reg_proxy=<sip:localhost:{port};transport=tls>\n"
        f"reg_identity=sip:alice@127.0.0.1:{port}\n"
        "reg_expires=60\n"
        "reg_sendregister=1\n"
        "publish=0\n")


def test_linphone_tls_register_fetch_unregister(start, tmp_path):
    """Register and unregister; linphone's own refresh (54 s after the 200) is waited
    for only over UDP and TCP (tests/test_interop_linphone.py)."""
    exe = require_client("linphone-daemon", "linphone-cli")
    srv, pki = serve_tls(start, tmp_path)
    phone = LinphoneDaemon(exe, tmp_path / "linphone", linphone_tls_rc(srv.tls[1], pki["ca"]))
    try:
        deadline = time.monotonic() + 15
        while (state := phone.state()) != "LinphoneRegistrationOk" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state == "LinphoneRegistrationOk", sip_trace(phone.log())[-6000:]
        first = fetch_one(srv, "alice")
        assert_tls_binding(first, r"sip:alice@127\.0\.0\.1:\d+;transport=tls")
        assert first["instance"] and first["instance"].startswith("<urn:uuid:")
        assert 45 <= first["expires"] <= 60     # (60 asked; a loaded machine lags)
        assert "SSL handshake finished" in phone.log()

        assert "Status: Ok" in phone.ask("unregister ALL")
        wait_gone(srv, "alice")
    finally:
        phone.stop()
    assert srv.metrics()['fastsip_received_total{transport="tls"}'] >= 2
