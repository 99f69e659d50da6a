"""Interop with Net::SIP (Debian package libnet-sip-perl), a Perl SIP stack.

tests/netsip/register.pl drives Net::SIP::Simple as a phone: From and To
sip:alice@127.0.0.1:PORT (the registrar's host:port), the registrar
sip:127.0.0.1:PORT (;transport=tcp for TCP), and Net::SIP's own Contact, the
address of the leg it opens (it binds 5060, or the next free port).  Net::SIP
answers a 401 itself; it offers only MD5 (it skips a SHA-256 challenge).
Net::SIP::Simple gives every REGISTER a new Call-ID and CSeq 1: a refresh is a
new registration of the same Contact.  Between the steps the admin API is asked
for sip:alice@127.0.0.1, without the port.
"""
import os

import pytest

from conftest import require_client
from interop import HERE, USERS, LineClient, assert_gone, assert_refreshed, fetch_one, serve

pytestmark = pytest.mark.server
DRIVER = os.path.join(HERE, "netsip", "register.pl")


@pytest.fixture
def netsip():
    """perl, with Net::SIP."""
    return require_client("perl:Net::SIP", "libnet-sip-perl")


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_netsip_register_fetch_refresh_unregister(netsip, start, tmp_path, transport, auth):
    srv = serve(start, tmp_path, auth)
    host, port = srv.udp if transport == "udp" else srv.tcp
    cmd = [netsip, DRIVER, host, str(port), transport, "alice"]
    if auth:
        cmd.append(USERS["alice"])
    with LineClient(cmd, tmp_path / "netsip.log") as phone:
        status, code, expires, contacts = phone.ask("register 3600")
        assert (status, code, expires) == ("done", "200", "3600"), contacts
        first = fetch_one(srv, "alice")
        assert first["contact"] in contacts            # the 200 listed what was stored
        assert first["contact"].startswith("sip:alice@127.0.0.1")
        assert first["transport"] == transport

        status, code, expires, contacts = phone.ask("register 1800")
        assert (status, code, expires) == ("done", "200", "1800"), contacts
        second = fetch_one(srv, "alice")
        assert_refreshed(first, second)
        assert 1790 <= second["expires"] <= 1800

        status, code, expires, contacts = phone.ask("register 0")
        assert (status, code, contacts) == ("done", "200", "-")
        assert_gone(srv, "alice")
        assert phone.close() == 0

    m = srv.metrics()
    assert m['fastsip_replies_total{code="200"}'] == 3
    if auth:
        assert m['fastsip_replies_total{code="401"}'] == 3
