"""SIP over WebSocket (RFC 7118, issue #13): `fastsip serve --listen ws:/wss:` against the
`websockets` package's client (an implementation that is not ours), and raw sockets for
what a well-behaved client never sends.

What a browser sees: the `sip` subprotocol, register, refresh, fetch, unregister, the
binding gone when the connection closes (a `.invalid` contact, RFC 7118 section 5),
keep-alives, the server's pings when it is silent.  What an attacker sees: no `sip`
offered, an Origin not allowed, unmasked and oversized frames, a stalled upgrade;
each refused, counted, and the server serves on.
"""
import os
import ssl
import struct
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

import fastsip
from fastsip.server.testing import contacts_of, make_test_pki, register, wait_for

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def ws_serve(start, pki, *args, **kw):
    return start("--tls-cert", pki["cert"], "--tls-key", pki["key"], *args,
                 transports=("udp", "ws", "wss"), **kw)


class Browser:
    """A WebSocket SIP client as a browser runs one: websockets' client, `sip` offered."""

    def __init__(self, srv, scheme="ws", pki=None, **kw):
        addr = srv.ws if scheme == "ws" else srv.wss
        ctx = None
        if scheme == "wss":
            ctx = ssl.create_default_context(cafile=pki["ca"])
        kw.setdefault("subprotocols", ["sip"])
        self.conn = ws_connect(f"{scheme}://{addr[0]}:{addr[1]}/", ssl=ctx, open_timeout=5, **kw)
        self.conn.__enter__()       # as `with ws_connect(...)` does (websockets >= 17 asks it)
        self.local = self.conn.socket.getsockname()[:2]
        self.transport = scheme.upper()

    def ask(self, user, *, contact=None, cseq=1, expires=None, call_id=None):
        self.conn.send(register(user, contact=contact, transport=self.transport,
                                local=("df7jal23ls0d.invalid", 0), cseq=cseq, expires=expires,
                                call_id=call_id or f"ws-{user}").decode())
        return fastsip.parse(self.recv())

    def recv(self, timeout=5.0):
        data = self.conn.recv(timeout=timeout)
        return data.encode() if isinstance(data, str) else data

    def close(self):
        self.conn.close()


@pytest.fixture
def browser():
    made = []

    def _browser(*args, **kw):
        made.append(Browser(*args, **kw))
        return made[-1]
    try:
        yield _browser
    finally:
        for b in made:
            b.close()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_register_refresh_fetch_unregister_and_the_flow_ends_with_the_connection(
        start, pki, browser, phone, scheme):
    srv = ws_serve(start, pki)
    b = browser(srv, scheme, pki)
    assert b.conn.subprotocol == "sip"
    invalid = "sip:k3v9b@df7jal23ls0d.invalid;transport=ws"
    ok = b.ask("alice", contact=invalid)
    assert ok.status == 200 and contacts_of(ok) == {invalid: 3600}
    assert ok.headers["Via"].startswith(f"SIP/2.0/{scheme.upper()} ")
    [stored] = srv.api("/api/bindings")["bindings"]
    assert (stored["transport"], stored["contact"]) == (scheme, invalid)
    assert contacts_of(b.ask("alice", contact=invalid, cseq=2, expires=600)) == {invalid: 600}
    # a routable contact over the same connection, and a UDP phone of the same AOR
    b.ask("alice", contact="sip:alice@192.0.2.5:5060", call_id="ws-routable")
    u = phone(srv.udp)
    assert set(contacts_of(u.ask(register("alice")))) == {invalid, "sip:alice@192.0.2.5:5060"}
    # a fetch over WebSocket lists every transport's bindings
    u.ask(register("alice", contact="sip:alice@192.0.2.9", call_id="udp-a"))
    assert len(contacts_of(b.ask("alice", call_id="ws-fetch"))) == 3
    assert contacts_of(b.ask("alice", contact=invalid, cseq=3, expires=0)) == {
        "sip:alice@192.0.2.5:5060": 3600, "sip:alice@192.0.2.9": 3600}
    b.ask("alice", contact=invalid, cseq=4)
    # the page closes: the .invalid contact goes with its connection, the others stay
    b.close()
    assert wait_for(lambda: len(srv.api("/api/bindings")["bindings"]) == 2)
    assert {x["contact"] for x in srv.api("/api/bindings")["bindings"]} == {
        "sip:alice@192.0.2.5:5060", "sip:alice@192.0.2.9"}
    m = srv.metrics()
    assert m["fastsip_flow_bindings_removed_total"] == 1
    assert m[f'fastsip_received_total{{transport="{scheme}"}}'] == 6


def test_an_outbound_flow_over_ws_ends_with_its_connection_in_the_worker_owning_it(
        start, pki, browser):
    srv = ws_serve(start, pki, workers=2)
    b = browser(srv, "ws")
    users = [f"user{i}" for i in range(24)]
    for i, u in enumerate(users):
        b.conn.send(register(          # contact None: the Contact is in extra, with its params
            u, transport="WS", call_id=f"f{i}",
            extra=('Contact: <sip:x@192.0.2.1;transport=ws>;reg-id=1;'
                   '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"',
                   "Supported: outbound")).decode())
        assert fastsip.parse(b.recv()).status == 200
    stored = srv.api("/api/bindings")["bindings"]
    assert len(stored) == 24 and {s["worker"] for s in stored} == {0, 1}
    assert all(s["reg_id"] == 1 for s in stored)
    b.close()
    assert wait_for(lambda: srv.api("/api/bindings")["bindings"] == [])
    assert srv.metrics()["fastsip_flow_bindings_removed_total"] == 24


def test_keepalives_and_the_servers_ping_of_a_silent_connection(start, pki, browser, connect):
    srv = ws_serve(start, pki, "--tcp-idle-timeout", "2", workers=1)
    b = browser(srv, "ws")
    b.conn.send("\r\n\r\n")
    assert b.recv() == b"\r\n"
    b.ask("alice", contact="sip:k3v9b@df7jal23ls0d.invalid;transport=ws")
    time.sleep(3.5)            # silent past the idle timeout: the pings kept it open
    assert len(srv.api("/api/bindings")["bindings"]) == 1
    assert b.ask("alice", call_id="fetch").status == 200
    # a client that answers nothing (raw socket, no pong) is closed, and its flow ends
    raw = _raw_upgrade(connect, srv.ws)
    raw.sendall(_frame(register("bob", contact="sip:b@x.invalid;transport=ws",
                                transport="WS")))
    assert b"SIP/2.0 200 OK" in raw.recv(65536)
    assert wait_for(lambda: len(srv.api("/api/bindings")["bindings"]) == 1, timeout=8)


def _raw_upgrade(connect, addr):
    """A socket past a good upgrade: a client of our own, for frames no library sends."""
    s = connect(addr)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Protocol: sip\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _frame(payload: bytes, opcode=1, masked=True, length=None):
    n = len(payload) if length is None else length
    head = bytes([0x80 | opcode])
    mbit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _closed(s, timeout=5.0):
    s.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got
    except TimeoutError:
        return None


def test_bad_upgrades_and_frames_are_refused_and_the_server_serves_on(start, pki, browser,
                                                                     connect):
    srv = ws_serve(start, pki, "--tcp-message-timeout", "1", "--ws-origin",
                   "https://phone.example.com", workers=1)
    with pytest.raises(InvalidStatus) as no_sip:
        browser(srv, "ws", subprotocols=None)
    assert no_sip.value.response.status_code == 400
    with pytest.raises(InvalidStatus) as origin:
        browser(srv, "ws", origin="https://evil.example")
    assert origin.value.response.status_code == 403
    assert browser(srv, "ws", origin="https://phone.example.com").conn.subprotocol == "sip"
    # an unmasked frame: closed with 1002
    raw = _raw_upgrade(connect, srv.ws)
    raw.sendall(_frame(b"REGISTER", masked=False))
    assert _closed(raw).startswith(b"\x88\x02\x03\xea")
    # a frame larger than --max-message-size: closed with 1009 before it is read
    raw = _raw_upgrade(connect, srv.ws)
    raw.sendall(_frame(b"", length=1 << 20)[:14])
    assert _closed(raw).startswith(b"\x88\x02\x03\xf1")
    # an upgrade that never ends: closed at the deadline
    slow = connect(srv.ws)
    slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert _closed(slow) is not None
    # a plain GET of / is answered, not left hanging
    plain = connect(srv.ws)
    plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _closed(plain)
    assert answer.startswith(b"HTTP/1.1 200") and b"WebSocket" in answer
    # and a browser registers meanwhile
    b = browser(srv, "ws")
    assert b.ask("alice", contact="sip:k@a.invalid;transport=ws").status == 200
    m = srv.metrics()
    for reason, n in (("subprotocol", 1), ("origin", 1), ("unmasked", 1), ("too_big", 1)):
        assert m[f'fastsip_ws_refused_total{{reason="{reason}"}}'] == n, reason
    assert m['fastsip_tcp_closed_total{reason="handshake_timeout"}'] == 1
    assert m["fastsip_internal_errors_total"] == 0


def test_replies_of_both_workers_come_back_as_frames_on_the_one_connection(start, pki,
                                                                          browser):
    srv = ws_serve(start, pki, workers=2)
    b = browser(srv, "wss", pki)
    for i in range(30):
        assert b.ask(f"u{i}", contact=f"sip:u{i}@192.0.2.1").status == 200
    assert {x["worker"] for x in srv.api("/api/bindings")["bindings"]} == {0, 1}
    with pytest.raises(ConnectionClosed):
        b.conn.send("x" * 40000)            # above --max-message-size: closed with 1009
        b.recv()


def test_a_killed_worker_takes_its_connections_flows_from_every_shard(start, pki, browser):
    """kill -9 of the worker holding a browser's connection: the flows it registered,
    in both workers' shards, are gone once the worker is restarted, from memory and
    from the state file; the flows of a connection the other worker holds stay, in
    both shards (the restarted worker reloads those from the state file), and so do
    bindings with routable contacts."""
    import signal
    srv = ws_serve(start, pki, "--flush-interval", "0.05", workers=2)

    def holder_of(b, tag):
        """Register 24 AORs over ``b``; the worker holding its connection."""
        for i in range(24):
            ok = b.ask(f"{tag}{i}", contact=f"sip:{tag}{i}@df7jal23ls0d.invalid;transport=ws")
            assert ok.status == 200
        conns = {s["conn_id"] & 0xFF for s in srv.api("/api/bindings")["bindings"]
                 if s["aor"].startswith(f"sip:{tag}")}
        assert len(conns) == 1
        return conns.pop()
    doomed = browser(srv, "ws")
    holder = holder_of(doomed, "d")
    for k in range(50):                 # a connection the other worker accepts (the
        other = browser(srv, "ws")      # ones the same worker took die with it)
        if holder_of(other, f"s{k}x") != holder:
            break
    else:
        pytest.fail("the kernel gave every connection to one worker")
    assert doomed.ask("keep", contact="sip:keep@192.0.2.1;transport=ws").status == 200
    survivors = {s["contact"] for s in srv.api("/api/bindings")["bindings"]
                 if s["aor"].startswith((f"sip:s{k}x", "sip:keep"))}
    assert len(survivors) == 25
    assert {s["worker"] for s in srv.api("/api/bindings")["bindings"]
            if s["contact"] in survivors} == {0, 1}
    time.sleep(0.3)                     # the state file has them all
    os.kill(srv.worker_pids()[holder], signal.SIGKILL)

    def contacts():
        try:
            return {s["contact"] for s in srv.api("/api/bindings")["bindings"]}
        except OSError:
            return None
    assert wait_for(lambda: len(srv.worker_pids()) == 2 and contacts() == survivors,
                    timeout=15), contacts() ^ survivors
    assert other.ask("s0", call_id="fetch").status == 200     # its connection lives


def test_a_register_and_a_close_in_one_read_get_the_reply_then_the_close(start, pki,
                                                                           connect):
    srv = ws_serve(start, pki, workers=1)
    raw = _raw_upgrade(connect, srv.ws)
    raw.sendall(_frame(register("alice", contact="sip:alice@192.0.2.1", transport="WS"))
                + _frame(struct.pack("!H", 1000), opcode=8))
    got = _closed(raw)
    assert got[:2] == b"\x81\x7e" and b"SIP/2.0 200 OK" in got      # the reply's text frame
    assert got.endswith(b"\x88\x02\x03\xe8")                         # then the close, last
    assert srv.api("/api/bindings")["bindings"][0]["contact"] == "sip:alice@192.0.2.1"
