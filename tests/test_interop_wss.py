"""Interop over WebSocket (issue #13, RFC 7118): JsSIP 3.13 and SIP.js 0.21, in Node 20
(tests/js/register.mjs, the ``ws`` package as WebSocket) and in Debian's chromium
headless (tests/js/browser.mjs: playwright-core drives it; the page tests/js/page.html
comes from a local http server on 127.0.0.1), against ``fastsip serve`` on its defaults
plus only the TLS flags (tests/interop.py: serve_tls).  Both run the same client code,
tests/js/clients.mjs, on the libraries' defaults: the user agent's URI sip:alice@127.0.0.1
and the server's ws:// or wss:// URL, nothing else.

The test CA is trusted, no certificate error ignored: Node through
NODE_EXTRA_CA_CERTS; chromium through the NSS database of its HOME
($HOME/.pki/nssdb, made with certutil from libnss3-tools), which chromium on Linux
reads for locally trusted CAs (without it: net::ERR_CERT_AUTHORITY_INVALID).

Both libraries write a Contact at a random ``.invalid`` host with ;transport=ws
(JsSIP also reg-id=1 and +sip.instance; SIP.js neither): the registrar can reach it
only through that WebSocket connection, so the binding must go when the connection
closes: when the page is closed, or the Node program dies without unregistering.
"""
import os
import re
import shutil
import subprocess

import pytest

from conftest import JS, require_client
from interop import LineClient, assert_gone, assert_refreshed, fetch_one, serve_tls, wait_gone

pytestmark = pytest.mark.server
LIBS = ["jssip", "sipjs"]
AOR = "sip:alice@127.0.0.1"


def js_client(where, lib, url, tmp_path, ca):
    """The driver of ``lib`` in Node or in chromium, as a LineClient."""
    node = shutil.which("node")
    require_client("npm:jssip", "jssip")
    require_client("npm:sip.js", "sip.js")
    if where == "node":
        require_client("npm:ws", "ws")
        env = dict(os.environ, NODE_EXTRA_CA_CERTS=ca)
        return LineClient([node, str(JS / "register.mjs"), lib, url, AOR], tmp_path / "js.log", env=env)
    require_client("npm:playwright-core", "playwright-core")
    require_client("npm:esbuild", "esbuild")
    chromium = require_client("chromium", "chromium")
    certutil = require_client("certutil", "libnss3-tools")
    home, profile = tmp_path / "home", tmp_path / "profile"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    profile.mkdir()
    for args in (["-N", "--empty-password"], ["-A", "-n", "fastsip test CA", "-t", "C,,", "-i", ca]):
        subprocess.run([certutil, "-d", f"sql:{nssdb}", *args], check=True, capture_output=True,
                       timeout=30)
    env = dict(os.environ, CHROMIUM=chromium, BROWSER_HOME=str(home), BROWSER_PROFILE=str(profile))
    # the browser's start and the page's load come before the first answer
    return LineClient([node, str(JS / "browser.mjs"), lib, url, AOR], tmp_path / "browser.log",
                      env=env, timeout=45.0)


def url_of(srv, transport):
    host, port = getattr(srv, transport)
    return f"{transport}://{host}:{port}"


def assert_ws_binding(binding, lib, transport, answer_contacts):
    """A binding registered over a WebSocket: its transport, the connection, the
    library's Contact (a .invalid host), which the 200 listed."""
    assert binding["transport"] == transport, binding
    assert re.fullmatch(r"sip:\w+@\w+\.invalid;transport=ws", binding["contact"]), binding["contact"]
    assert binding["conn_id"] >= 0 and binding["source"][0] == "127.0.0.1", binding
    assert f"<{binding['contact']}>" in answer_contacts
    if lib == "jssip":          # RFC 5626: JsSIP's Contact carries an instance and reg-id
        assert binding["instance"] and binding["reg_id"] == 1, binding
    else:
        assert not binding["instance"] and not binding["reg_id"], binding
    assert 590 <= binding["expires"] <= 600       # both ask 600 s


PLACES = [("node", "ws"), ("node", "wss"), ("browser", "ws"), ("browser", "wss")]


@pytest.mark.parametrize("where,transport", PLACES, ids=[f"{w}-{t}" for w, t in PLACES])
@pytest.mark.parametrize("lib", LIBS)
def test_js_register_fetch_refresh_unregister(start, tmp_path, lib, where, transport):
    srv, pki = serve_tls(start, tmp_path)
    with js_client(where, lib, url_of(srv, transport), tmp_path, pki["ca"]) as phone:
        status, code, expires, contacts = phone.ask("register")
        assert (status, code, expires) == ("done", "200", "600"), (contacts, phone.log())
        first = fetch_one(srv, "alice")
        assert_ws_binding(first, lib, transport, contacts)

        status, code, expires, contacts = phone.ask("register")
        assert (status, code, expires) == ("done", "200", "600"), (contacts, phone.log())
        second = fetch_one(srv, "alice")
        assert_refreshed(first, second)
        assert second["call_id"] == first["call_id"] and second["cseq"] > first["cseq"]
        assert second["conn_id"] == first["conn_id"]

        status, code, expires, contacts = phone.ask("unregister")
        assert (status, code) == ("done", "200"), (contacts, phone.log())
        assert_gone(srv, "alice")
        assert phone.close() == 0
    m = srv.metrics()
    assert m[f'fastsip_received_total{{transport="{transport}"}}'] >= 3
    assert m['fastsip_replies_total{code="200"}'] >= 3


@pytest.mark.parametrize("where", ["node", "browser"])
@pytest.mark.parametrize("lib", LIBS)
def test_js_binding_gone_when_connection_closes(start, tmp_path, lib, where):
    """Registered over WSS, the page is closed (in Node: the program exits) without an
    unregister: the binding (granted 600 s) goes with its connection."""
    srv, pki = serve_tls(start, tmp_path)
    with js_client(where, lib, url_of(srv, "wss"), tmp_path, pki["ca"]) as phone:
        status, code, expires, contacts = phone.ask("register")
        assert (status, code, expires) == ("done", "200", "600"), (contacts, phone.log())
        assert_ws_binding(fetch_one(srv, "alice"), lib, "wss", contacts)
        assert phone.ask("close")[:2] == ("done", "close")
        # the browser still runs: the page's closing, not the browser's, ends the flow
        wait_gone(srv, "alice")
        assert phone.close() == 0
