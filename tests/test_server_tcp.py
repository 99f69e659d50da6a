"""TCP hardening (issue #14): the message deadline, the per-source cap, fair eviction, counters.

The first tests drive ``fastsip.server.tcp.TcpServer`` in this process with
real sockets on 127.0.0.1 (sources bound on 127/8) and a fake clock for the
deadlines; the others attack the real server (``fastsip serve``), every wait
bounded.
"""
import random
import select
import socket
import time
from types import SimpleNamespace

import pytest

import fastsip
from fastsip.server.metrics import Histogram, WorkerCounters
from fastsip.server.ratelimit import RateLimiter
from fastsip.server.tcp import Sources, TcpServer, source_key
from fastsip.server.testing import contacts_of, register, request, wait_for

# ----------------------------------------------------------------------------- in process

def test_source_key_is_the_ipv4_address_or_the_ipv6_64():
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("fe80::1%lo") == "fe80::/64"


def test_sources_bookkeeping_matches_a_plain_count():
    rnd = random.Random(14)
    s = Sources()
    held = {}                       # fd -> conn
    fd = 0
    for _ in range(5000):
        if held and rnd.random() < 0.45:
            conn = held.pop(rnd.choice(list(held)))
            s.remove(conn)
            s.remove(conn)          # twice: a no-op
        else:
            fd += 1
            conn = SimpleNamespace(fd=fd, source=f"10.0.0.{rnd.randrange(6)}")
            held[fd] = conn
            s.add(conn)
        counts = {}
        for c in held.values():
            counts[c.source] = counts.get(c.source, 0) + 1
        assert s.top == max(counts.values(), default=0)
        assert len(s) == len(counts)
        assert all(s.count(src) == n for src, n in counts.items())
        assert {n: srcs for n, srcs in s.by_count.items()} == {
            n: {src for src, m in counts.items() if m == n} for n in set(counts.values())}
        for newcomer in range(s.top + 1):
            victim = s.victim(newcomer)
            if newcomer + 1 < s.top:
                # the oldest connection of a source holding the most
                assert counts[victim.source] == s.top
                assert victim.fd == min(c.fd for c in held.values() if c.source == victim.source)
            else:
                assert victim is None


class _Loop:
    def add(self, fd, handler, mask=0):
        pass

    def modify(self, fd, mask):
        pass

    def remove(self, fd):
        pass


class _Reg:
    def __init__(self):
        self.served = []

    def serve_shard(self, item, host, port, now, transport, cid, index, n):
        self.served.append(item)
        return None

    def connection_closed(self, cid, now):
        return 0


@pytest.fixture
def tcp_server():
    """tcp_server(**cfg) -> (TcpServer, listener, connect(source) -> client socket);
    every socket closed at the end."""
    made = []

    def _make(**settings):
        cfg = SimpleNamespace(max_connections=100, max_connections_per_source=1000,
                              max_message_size=16384, tcp_idle_timeout=300.0,
                              tcp_message_timeout=1.0, ws_origin=[])
        cfg.__dict__.update(settings)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(128)
        lsock.setblocking(False)
        srv = TcpServer([("tcp", lsock)], _Loop(), 0, 1, _Reg(), cfg, RateLimiter(), SimpleNamespace(),
                        WorkerCounters(), Histogram(), lambda data: None)
        clients = []

        def connect(source="127.0.0.1"):
            c = socket.create_connection(lsock.getsockname(), timeout=2,
                                         source_address=(source, 0))
            clients.append(c)
            srv.on_accept("tcp", lsock)
            return c
        made.append((srv, clients))
        return srv, connect
    try:
        yield _make
    finally:
        for srv, clients in made:
            srv.close_all()
            for c in clients:
                c.close()


def _conn_of(srv, client):
    port = client.getsockname()[1]
    return next(c for c in srv.conns.values() if c.peer[1] == port)


def _feed(srv, conn, client, data):
    client.sendall(data)
    assert select.select([conn.sock], [], [], 2)[0]
    srv.read(conn)


def _closed_by_server(client, timeout=2.0):
    """Whether the server closed ``client`` within ``timeout`` (what it sent before is read)."""
    deadline = time.monotonic() + timeout
    while select.select([client], [], [], max(0.0, deadline - time.monotonic()))[0]:
        try:
            if client.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
    return False


def test_message_clock_starts_at_a_messages_first_byte_and_not_at_keepalives(tcp_server):
    srv, connect = tcp_server(tcp_message_timeout=1.0)
    client = connect()
    conn = _conn_of(srv, client)
    late = lambda: time.time() + 5       # noqa: E731 - well past any deadline
    # keep-alives: whole, split, a lone CRLF: no clock
    for piece in (b"\r\n\r\n", b"\r\n", b"\r\n", b"\r", b"\n\r\n", b"\r\n"):
        _feed(srv, conn, client, piece)
        assert conn.started == 0 and not srv.partial
    srv.deadlines(late())
    assert conn.fd in srv.conns
    # the first byte of a message starts it (after the lone CRLF held above), later bytes don't
    msg = request("OPTIONS", call_id="m1")
    t0 = time.time()
    _feed(srv, conn, client, msg[:1])
    started = conn.started
    assert t0 <= started <= time.time() and conn.fd in srv.partial
    time.sleep(0.02)
    _feed(srv, conn, client, msg[1:10])
    assert conn.started == started
    # complete: stopped; a complete message and the start of the next: restarted
    _feed(srv, conn, client, msg[10:])
    assert conn.started == 0 and not srv.partial
    _feed(srv, conn, client, msg + msg[:5])
    assert conn.started > started and conn.fd in srv.partial
    assert len(srv.reg.served) == 2
    srv.deadlines(conn.started + 0.9)      # not yet
    assert conn.fd in srv.conns
    srv.deadlines(conn.started + 1.1)
    assert conn.fd not in srv.conns and not srv.partial
    assert srv.c.tcp_closed_message_timeout == 1
    assert _closed_by_server(client)


def test_deadlines_close_only_the_late_ones_and_zero_turns_them_off(tcp_server):
    srv, connect = tcp_server(tcp_message_timeout=0)
    clients = [connect() for _ in range(3)]
    for client in clients:
        _feed(srv, _conn_of(srv, client), client, b"REG")
        time.sleep(0.05)
    srv.deadlines(time.time() + 100)
    assert len(srv) == 3
    srv.cfg.tcp_message_timeout = 1.0                   # a SIGHUP
    second = _conn_of(srv, clients[1]).started
    third = _conn_of(srv, clients[2]).started
    srv.deadlines(second + 0.5)
    assert len(srv) == 3
    srv.deadlines(second + 1.0 + (third - second) / 2)  # past the first two's, not the third's
    assert len(srv) == 1 and srv.c.tcp_closed_message_timeout == 2
    assert [c.fd for c in srv.partial.values()] == [_conn_of(srv, clients[2]).fd]


def test_per_source_cap_then_fair_eviction_when_every_slot_is_taken(tcp_server):
    srv, connect = tcp_server(max_connections=4, max_connections_per_source=3)
    flood = [connect("127.0.0.2") for _ in range(5)]
    assert len(srv) == 3 and srv.c.tcp_refused_per_source == 2
    assert all(_closed_by_server(c) for c in flood[3:])
    connect("127.0.0.3")
    assert len(srv) == 4                            # full
    # a newcomer from a source holding nothing takes the oldest slot of the biggest holder
    connect("127.0.0.4")
    assert len(srv) == 4 and srv.c.tcp_closed_evicted == 1
    assert _closed_by_server(flood[0]) and not _closed_by_server(flood[1], 0.1)
    assert [srv.sources.count(f"127.0.0.{i}") for i in (2, 3, 4)] == [2, 1, 1]
    # then no source holds more than one above the newcomer's: refused
    late = connect("127.0.0.4")
    assert srv.c.tcp_refused_max_connections == 1 and srv.c.dropped_max_connections == 1
    assert _closed_by_server(late) and len(srv) == 4
    # the biggest holder itself is refused too, and a closed slot is free again
    connect("127.0.0.2")
    assert srv.c.tcp_refused_max_connections == 2
    srv.close(_conn_of(srv, flood[1]))
    connect("127.0.0.2")
    assert len(srv) == 4 and srv.sources.count("127.0.0.2") == 2


# ----------------------------------------------------------------------------- the real server

def _tcp_register(ua, user, call_id, cseq=1):
    me = f"sip:{user}@{ua.local[0]}:{ua.local[1]};transport=tcp"
    r = ua.ask(register(user, contact=me, transport="TCP", local=ua.local, expires=300,
                        call_id=call_id, cseq=cseq))
    return r.status, contacts_of(r), me


def _flood(addr, source, n, into):
    """Open ``n`` connections from ``source`` into the list ``into``; a refusal may already
    reset one while it connects."""
    for _ in range(n):
        s = socket.socket()
        into.append(s)
        s.settimeout(5)
        s.bind((source, 0))
        try:
            s.connect(addr)
        except ConnectionResetError:
            pass


@pytest.mark.server
def test_slowloris_is_closed_by_the_message_deadline_and_keepalives_are_not(start, phone):
    """One header byte every 0.5 s with a 1 s message deadline and a 60 s idle timeout:
    closed before 3 s.  Meanwhile a phone with keep-alives (whole, split, a lone CRLF)
    stays connected and registers again on the same connection."""
    srv = start("--tcp-message-timeout", "1", "--tcp-idle-timeout", "60", workers=1)
    ua = phone(srv.tcp, "tcp")
    status, contacts, me = _tcp_register(ua, "kept", "k1")
    assert (status, contacts) == (200, {me: 300})
    slow = socket.create_connection(srv.tcp, timeout=2)
    try:
        data = register("slow", contact="sip:slow@127.0.0.1:1;transport=tcp", transport="TCP")
        t0 = time.monotonic()
        closed_after = None
        pongs = 0
        for i, byte in enumerate(data[:12]):
            try:
                slow.sendall(bytes([byte]))
            except (ConnectionResetError, BrokenPipeError):     # reset since the last look
                closed_after = time.monotonic() - t0
                break
            # the good phone: a keep-alive each step, in pieces every other step
            if i % 3 == 0:
                ua.send(fastsip.PING)
            elif i % 3 == 1:
                ua.send(b"\r\n")
            else:
                ua.send(b"\r\n")          # completes the split one
            if select.select([slow], [], [], 0.5)[0]:
                try:
                    slow.recv(100)
                except ConnectionResetError:
                    pass
                closed_after = time.monotonic() - t0
                break
        assert closed_after is not None and 0.9 < closed_after < 3.0, closed_after
    finally:
        slow.close()
    while (got := ua.recv(0.3)) in (fastsip.PONG, fastsip.PING):     # PONGs read together
        pongs += len(got) // 2
    assert got is None and pongs >= 1
    status, contacts, _ = _tcp_register(ua, "kept", "k1", cseq=2)
    assert (status, contacts) == (200, {me: 300})
    m = srv.metrics()
    assert m['fastsip_tcp_closed_total{reason="message_timeout"}'] == 1
    assert m['fastsip_tcp_closed_total{reason="idle"}'] == 0
    assert m["fastsip_tcp_connections"] == 1


@pytest.mark.server
def test_one_sources_flood_is_capped_and_another_source_registers(start, phone):
    """80 connections from 127.0.0.2 against a cap of 50 per source (100 slots): 50 held,
    30 refused and counted; phones from 127.0.0.3 register over TCP, nobody is evicted."""
    srv = start("--max-connections", "100", "--max-connections-per-source", "50", workers=1)
    flood = []
    try:
        _flood(srv.tcp, "127.0.0.2", 80, flood)
        assert wait_for(lambda: srv.metrics()['fastsip_tcp_refused_total{reason="per_source"}'] == 30)
        assert srv.metrics()["fastsip_tcp_connections"] == 50
        for i in range(10):
            ua = phone(srv.tcp, "tcp", source="127.0.0.3")
            status, contacts, me = _tcp_register(ua, f"good{i}", f"g{i}")
            assert (status, contacts) == (200, {me: 300})
        m = srv.metrics()
        assert m["fastsip_tcp_connections"] == 60
        assert m['fastsip_tcp_refused_total{reason="max_connections"}'] == 0
        assert m['fastsip_tcp_closed_total{reason="evicted"}'] == 0
        assert m["fastsip_tcp_sources"] == 2
    finally:
        for s in flood:
            s.close()


@pytest.mark.server
def test_issue_14_one_source_holding_every_slot_does_not_lock_the_others_out(start, phone):
    """The issue's case: --max-connections 100, 250 idle connections from one source
    (under its default cap), then 10 TCP REGISTERs from another: all succeed, each
    taking a slot of the flooder's; the refusals and evictions are counted."""
    srv = start("--max-connections", "100", workers=1)
    flood = []
    try:
        _flood(srv.tcp, "127.0.0.2", 250, flood)
        assert wait_for(lambda: srv.metrics()['fastsip_tcp_refused_total{reason="max_connections"}']
                        == 150)
        m = srv.metrics()
        assert m["fastsip_tcp_connections"] == 100
        assert m['fastsip_dropped_total{reason="max_connections"}'] == 150       # as before
        for i in range(10):
            ua = phone(srv.tcp, "tcp", source="127.0.0.3")
            status, contacts, me = _tcp_register(ua, f"good{i}", f"g{i}")
            assert (status, contacts) == (200, {me: 300})
        m = srv.metrics()
        assert m["fastsip_tcp_connections"] == 100
        assert m['fastsip_tcp_closed_total{reason="evicted"}'] == 10
        assert m['fastsip_tcp_refused_total{reason="per_source"}'] == 0
    finally:
        for s in flood:
            s.close()
