"""The server's per-batch loop (fastsip.server._io_c.BatchIO.serve_udp / serve_inbox) on
real loopback sockets, with an in-process registrar: what a worker does with
one batch, without the worker around it."""
import socket
import time

import pytest

import fastsip
from fastsip.server._io_c import BatchIO
from fastsip.server.testing import contacts_of, register, request


@pytest.fixture
def udp():
    socks = []

    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        socks.append(s)
        return s
    yield make
    for s in socks:
        s.close()


def aors_by_shard(n=2, count=8):
    out = {s: [] for s in range(n)}
    i = 0
    while min(len(v) for v in out.values()) < count:
        user = f"u{i}"
        out[fastsip.shard_of(f"sip:{user}@example.com", n)].append(user)
        i += 1
    return out


def test_serve_udp_answers_its_shard_and_queues_the_rest(udp):
    server, client = udp(), udp()
    server.setblocking(False)
    reg = fastsip.Registrar(max_expires=3600)
    io = BatchIO(16, 4096)
    users = aors_by_shard()
    for user in users[0][:3] + users[1][:2]:
        client.sendto(register(user, contact=f"sip:{user}@127.0.0.1:5", call_id=f"c-{user}"),
                      server.getsockname())
    client.sendto(b"x" * 5000, server.getsockname())          # longer than 4096: dropped
    time.sleep(0.05)
    queues = [[], []]
    got, handed = io.serve_udp(server.fileno(), reg.serve_shard, time.time(), 0, 2, 0, queues)
    assert (got, handed) == (6, 2) and io.oversized == 1
    replies = [fastsip.parse(client.recv(4096)) for _ in range(3)]
    assert sorted(r.call_id for r in replies) == sorted(f"c-{u}" for u in users[0][:3])
    assert all(r.status == 200 for r in replies)
    assert queues[0] == [] and len(queues[1]) == 2
    # nothing waiting: (0, 0)
    assert io.serve_udp(server.fileno(), reg.serve_shard, time.time(), 0, 2, 0, queues) == (0, 0)

    # the owner serves the hand-offs from its inbox and answers the client itself
    owner = fastsip.Registrar(max_expires=3600)
    inbox_r, inbox_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox_r.setblocking(False)
    assert BatchIO(16, 8192).send(inbox_w.fileno(), queues[1]) == 2
    got, served, others = BatchIO(16, 8192).serve_inbox(
        inbox_r.fileno(), owner.serve_shard, time.time(), [server.fileno()])
    assert (got, served, others) == (2, 2, [])
    replies = [fastsip.parse(client.recv(4096)) for _ in range(2)]
    assert sorted(r.call_id for r in replies) == sorted(f"c-{u}" for u in users[1][:2])
    user = users[1][0]
    (b,) = owner.lookup(f"sip:{user}@example.com")
    assert b.source == client.getsockname()            # the client's own address, carried over
    assert reg.lookup(f"sip:{user}@example.com") == []
    inbox_r.close()
    inbox_w.close()


def test_serve_udp_rate_limit_and_bugs_are_the_callers(udp):
    server, client = udp(), udp()
    server.setblocking(False)
    seen, bugs = [], []

    def allow(host, now):
        seen.append(host)
        return len(seen) % 2 == 1                       # every other datagram refused

    def serve(*args):
        if b"boom" in args[0]:
            raise RuntimeError("a bug in the core")
        return fastsip.Registrar().serve_shard(*args)
    for i in range(4):
        client.sendto(request("OPTIONS", call_id=f"o{i}") +
                      (b"boom" if i == 2 else b""), server.getsockname())
    time.sleep(0.05)
    got, handed = BatchIO(16, 4096).serve_udp(server.fileno(), serve, time.time(), 0, 1, 0,
                                             [[]], allow, bugs.append)
    assert (got, handed) == (4, 0)
    assert seen == [b"127.0.0.1"] * 4
    assert len(bugs) == 1 and b"boom" in bugs[0]
    assert fastsip.parse(client.recv(4096)).call_id == "o0"
    client.settimeout(0.2)
    with pytest.raises(socket.timeout):
        client.recv(4096)


def test_recv_and_send_round_trip(udp):
    a, b = udp(), udp()
    a.setblocking(False)
    io = BatchIO(4, 2048)
    assert io.send(b.fileno(), [(b"one", a.getsockname()), (b"two", a.getsockname()),
                                (b"bad", ("not an address", 1))]) == 3
    assert io.send_errors == 1
    time.sleep(0.05)
    assert io.recv(a.fileno()) == [(b"one", b.getsockname()), (b"two", b.getsockname())]
    assert io.recv(a.fileno()) == []


def test_serve_shard_answers_its_own_and_names_the_owner_of_others():
    """serve_shard: one scan, the owner's number for a foreign AOR, else the reply."""
    reg = fastsip.Registrar(max_expires=3600)
    users = aors_by_shard()
    mine, theirs = users[0][0], users[1][0]
    assert reg.serve_shard(register(theirs), b"127.0.0.1", 5060, 1000.0, "udp", -1, 0, 2) == 1
    reply = reg.serve_shard(register(mine, contact=f"sip:{mine}@127.0.0.1:5", expires=600),
                            b"127.0.0.1",
                            5060, 1000.0, "udp", -1, 0, 2)
    assert contacts_of(fastsip.parse(reply)) == {f"sip:{mine}@127.0.0.1:5": 600}


def test_handoff_header_is_one_format_for_cython_and_python(udp):
    """The hand-off header (fastsip/server/handoff.pxd) is written by serve_udp and
    encode_handoff and read by serve_inbox and decode_handoff: each reads the other's."""
    from fastsip.server._io_c import H_TCP, H_TCP_REPLY, H_UDP, HANDOFF_HEADER, decode_handoff, encode_handoff
    blob = encode_handoff(H_TCP, 3, 7, b"2001:db8::1", (1 << 40) | 5, 5061, b"REGISTER ...")
    assert len(blob) == HANDOFF_HEADER + len(b"2001:db8::1") + len(b"REGISTER ...")
    assert decode_handoff(blob) == (H_TCP, 3, 7, b"2001:db8::1", (1 << 40) | 5, 5061,
                                    b"REGISTER ...")
    assert decode_handoff(encode_handoff(H_UDP, 0, 1, b"127.0.0.1", -1, 0, b""))[4] == -1
    for bad in (blob[:HANDOFF_HEADER - 1], blob[:HANDOFF_HEADER + 3]):
        with pytest.raises(ValueError):
            decode_handoff(bad)
    with pytest.raises(ValueError):
        encode_handoff(H_TCP, 0, 0, b"x" * 65, 1, 1, b"")
    with pytest.raises(ValueError):
        encode_handoff(H_TCP, 256, 0, b"", 1, 1, b"")

    # serve_udp's hand-offs decode in Python
    server, client = udp(), udp()
    server.setblocking(False)
    users = aors_by_shard()
    msg = register(users[1][0])
    client.sendto(msg, server.getsockname())
    time.sleep(0.05)
    queues = [[], []]
    reg = fastsip.Registrar(max_expires=3600)
    assert BatchIO(4, 4096).serve_udp(server.fileno(), reg.serve_shard, time.time(), 0, 2, 1,
                                      queues) == (1, 1)
    kind, li, origin, host, cid, port, data = decode_handoff(queues[1][0][0])
    assert (kind, li, origin, host, cid, port) == (H_UDP, 1, 0, b"127.0.0.1", -1,
                                                   client.getsockname()[1])
    assert data == msg

    # and serve_inbox returns what encode_handoff wrote (TCP kinds are the worker's)
    inbox_r, inbox_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox_r.setblocking(False)
    sent = [(encode_handoff(H_TCP, 0, 1, b"::1", 77, 5070, b"req"), None),
            (encode_handoff(H_TCP_REPLY, 0, 1, b"", 78, 0, b"reply"), None),
            (b"short", None)]
    assert BatchIO(4, 4096).send(inbox_w.fileno(), sent) == 3
    got, served, others = BatchIO(4, 4096).serve_inbox(inbox_r.fileno(), reg.serve_shard,
                                                       time.time(), [server.fileno()])
    assert (got, served) == (3, 0)
    assert others == [(H_TCP, 0, 1, b"::1", 77, 5070, b"req"),
                      (H_TCP_REPLY, 0, 1, b"", 78, 0, b"reply")]
    inbox_r.close()
    inbox_w.close()


# -- the core called in C (RegistrarCore.serve_c) ----------------------------------------------

def _mixed_batch(users):
    """Datagrams of every kind the core answers differently: its own REGISTERs and another
    shard's, a retransmission, refusals (420, 423, 400), OPTIONS, a method not allowed, a
    response and an ACK (no reply), garbage (no reply)."""
    mine, theirs = users[0], users[1]
    again = register(mine[0], contact=f"sip:{mine[0]}@127.0.0.1:5", call_id="c-again",
                     branch="z9hG4bKsame")
    return [
        register(mine[0], contact=f"sip:{mine[0]}@127.0.0.1:5", call_id="c-0"),
        register(mine[1], contact=[f"sip:{mine[1]}@127.0.0.1:{p}" for p in (6, 7)],
                 call_id="c-1", expires=120),
        register(theirs[0], contact=f"sip:{theirs[0]}@127.0.0.1:5", call_id="c-t"),
        again, again,
        register(mine[2], contact=f"sip:{mine[2]}@127.0.0.1:5", extra=("Require: foo",)),
        register(mine[3], contact=f"sip:{mine[3]}@127.0.0.1:5", expires=1),
        register(mine[4], contact="not a uri <"),
        request("OPTIONS", call_id="o1"),
        request("INVITE", f"sip:{mine[0]}@example.com", call_id="i1"),
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        request("ACK", call_id="a1"),
        b"\x00garbage",
    ]


def _serve_batch(udp, serve_shard, batch, now, nshards=2):
    """``batch`` sent to a fresh socket and served in one ``serve_udp``: the replies
    received (bytes, in order), the hand-off queues, and the BatchIO."""
    server, client = udp(), udp()
    server.setblocking(False)
    for d in batch:
        client.sendto(d, server.getsockname())
    time.sleep(0.05)
    io = BatchIO(32, 4096)
    queues = [[] for _ in range(nshards)]
    got, handed = io.serve_udp(server.fileno(), serve_shard, now, 0, nshards, 0, queues)
    assert got == len(batch)
    client.settimeout(0.3)
    replies = []
    while True:
        try:
            replies.append(client.recv(4096))
        except TimeoutError:
            break
    # the client's port differs between runs: received replies name it in rport
    port = str(client.getsockname()[1]).encode()
    return [r.replace(port, b"PORT") for r in replies], queues, io, client.getsockname()[1]


def test_core_in_c_answers_as_the_python_call(udp):
    """serve_udp given a core's own serve_shard calls it in C (serve_c): the same replies
    byte for byte, the same hand-offs, the same bindings and counters as through a
    Python callable that wraps it."""
    users = aors_by_shard(count=5)
    batch = _mixed_batch(users)
    now = 1_700_000_000.0
    in_c = fastsip.Registrar(max_expires=3600, min_expires=30)
    in_py = fastsip.Registrar(max_expires=3600, min_expires=30)
    r_c, q_c, io_c, port_c = _serve_batch(udp, in_c.serve_shard, batch, now)
    r_py, q_py, io_py, port_py = _serve_batch(udp, lambda *a: in_py.serve_shard(*a), batch, now)
    assert io_c.served_c == len(batch) and io_py.served_c == 0
    assert len(r_c) == 9 and r_c == r_py
    codes = [fastsip.parse(r).status for r in r_c]
    assert codes == [200, 200, 200, 200, 420, 423, 400, 200, 405]
    # hand-offs: the same message, the same source host (ports differ between the runs)
    from fastsip.server._io_c import decode_handoff
    assert q_c[0] == q_py[0] == [] and len(q_c[1]) == len(q_py[1]) == 1
    h_c, h_py = decode_handoff(q_c[1][0][0]), decode_handoff(q_py[1][0][0])
    assert h_c[5] == port_c and h_py[5] == port_py
    assert h_c[:5] + h_c[6:] == h_py[:5] + h_py[6:]
    assert in_c.stats() == in_py.stats()
    for user in users[0][:2]:
        aor = f"sip:{user}@example.com"
        assert [(b.uri, b.expires_at, b.call_id) for b in in_c.lookup(aor, now)] == \
            [(b.uri, b.expires_at, b.call_id) for b in in_py.lookup(aor, now)] != []
    assert in_c.lookup(f"sip:{users[0][0]}@example.com", now)[0].source == ("127.0.0.1", port_c)


def test_core_in_c_serves_handoffs_from_the_inbox(udp):
    """serve_inbox calls the core in C too: hand-offs answered from the listener, as the
    Python call answers them."""
    from fastsip.server._io_c import H_UDP, encode_handoff
    server, client = udp(), udp()
    port = client.getsockname()[1]
    users = aors_by_shard()
    msgs = [register(u, contact=f"sip:{u}@127.0.0.1:5", call_id=f"h-{u}") for u in users[1][:3]]
    now = 1_700_000_000.0
    out = {}
    for name, reg, serve in (("c", fastsip.Registrar(), None), ("py", fastsip.Registrar(), 1)):
        inbox_r, inbox_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox_r.setblocking(False)
        BatchIO(4, 4096).send(inbox_w.fileno(), [
            (encode_handoff(H_UDP, 0, 0, b"127.0.0.1", -1, port, m), None) for m in msgs])
        io = BatchIO(16, 4096)
        call = reg.serve_shard if serve is None else (lambda *a, r=reg: r.serve_shard(*a))
        assert io.serve_inbox(inbox_r.fileno(), call, now, [server.fileno()]) == (3, 3, [])
        assert io.served_c == (3 if serve is None else 0)
        out[name] = [client.recv(4096) for _ in msgs]
        assert reg.lookup(f"sip:{users[1][0]}@example.com", now)[0].source == ("127.0.0.1", port)
        inbox_r.close()
        inbox_w.close()
    assert out["c"] == out["py"]
    assert [fastsip.parse(r).call_id for r in out["c"]] == [f"h-{u}" for u in users[1][:3]]


def test_core_in_c_only_for_a_core_s_own_serve_shard(udp):
    """A subclass's serve_shard written in Python, a core in shared mode and any other
    callable are called in Python, as before."""
    calls = []

    class Mine(fastsip.Registrar):
        def serve_shard(self, *args):
            calls.append(args[0])
            return super().serve_shard(*args)
    batch = [request("OPTIONS", call_id="o1")]
    mine = Mine()
    replies, _q, io, _p = _serve_batch(udp, mine.serve_shard, batch, time.time(), 1)
    assert io.served_c == 0 and calls == batch and len(replies) == 1
    shared = fastsip.Registrar(shared=True)
    replies, _q, io, _p = _serve_batch(udp, shared.serve_shard, batch, time.time(), 1)
    assert io.served_c == 0 and len(replies) == 1
    plain = fastsip.Registrar()
    replies, _q, io, _p = _serve_batch(udp, plain.serve_shard, batch, time.time(), 1)
    assert io.served_c == 1 and len(replies) == 1


def test_core_in_c_that_raises_is_a_bug_with_the_request(udp):
    """An exception in the core called in C (here an authorize whose check raises) goes to
    ``bug`` with the request's bytes; the rest of the batch is answered."""
    class Broken:
        def check(self, *args):
            raise RuntimeError("a bug behind the core")
    server, client = udp(), udp()
    server.setblocking(False)
    reg = fastsip.Registrar(authorize=Broken())
    boom = register("alice", contact="sip:alice@127.0.0.1:5")
    client.sendto(boom, server.getsockname())
    client.sendto(request("OPTIONS", call_id="o1"), server.getsockname())
    time.sleep(0.05)
    bugs = []
    io = BatchIO(16, 4096)
    assert io.serve_udp(server.fileno(), reg.serve_shard, time.time(), 0, 1, 0, [[]], None,
                        bugs.append) == (2, 0)
    assert io.served_c == 2 and bugs == [boom]
    assert fastsip.parse(client.recv(4096)).call_id == "o1"


def test_core_in_c_with_the_rate_limiter(udp):
    """The compiled rate limiter sees the source host as bytes, with the core in C."""
    from fastsip.server._io_c import RateLimiter
    server, client = udp(), udp()
    server.setblocking(False)
    for i in range(5):
        client.sendto(request("OPTIONS", call_id=f"o{i}"), server.getsockname())
    time.sleep(0.05)
    limiter = RateLimiter(1.0, 2.0)
    io = BatchIO(16, 4096)
    assert io.serve_udp(server.fileno(), fastsip.Registrar().serve_shard, time.time(), 0, 1, 0,
                        [[]], limiter) == (5, 0)
    assert io.served_c == 2 and limiter.refused == 3 and len(limiter) == 1
    assert [fastsip.parse(client.recv(4096)).call_id for _ in range(2)] == ["o0", "o1"]


def test_core_in_c_large_replies_grow_the_send_buffer(udp):
    """Replies copied from the core go into one send buffer per batch, which grows: a
    batch of 200s that list many bindings each arrives whole."""
    server, client = udp(), udp()
    server.setblocking(False)
    reg = fastsip.Registrar(max_expires=3600, max_contacts=64)
    n = 40
    for i in range(n):
        contacts = [f"sip:user{i}-{k:03d}-{'x' * 40}@127.0.0.1:{5000 + k}" for k in range(30)]
        client.sendto(register(f"user{i}", contact=contacts, call_id=f"big-{i}"),
                      server.getsockname())
    time.sleep(0.1)
    io = BatchIO(64, 8192)
    assert io.serve_udp(server.fileno(), reg.serve_shard, time.time(), 0, 1, 0, [[]]) == (n, 0)
    replies = [fastsip.parse(client.recv(65536)) for _ in range(n)]
    assert [r.call_id for r in replies] == [f"big-{i}" for i in range(n)]
    assert all(len(r.contacts) == 30 for r in replies)
    assert sum(len(r.raw) for r in replies) > 65536


def test_core_in_c_names_each_sender_by_its_own_address(udp):
    """The source host the core is given in C is each datagram's own, written out for
    every form of an IPv4 address (one to three digits, 0 and 255), also when senders
    alternate within one batch: bindings keep it, replies name it in received=."""
    server = udp()
    server.setblocking(False)
    hosts = ["127.0.0.1", "127.1.22.203", "127.10.0.99", "127.255.255.254"]
    senders = []
    for i, host in enumerate(hosts * 2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        s.settimeout(2)
        senders.append(s)
        s.sendto(register(f"h{i}", contact=f"sip:h{i}@10.0.0.1", expires=600),
                 server.getsockname())
    try:
        time.sleep(0.05)
        reg = fastsip.Registrar(max_expires=3600)
        now = 1_700_000_000.0
        io = BatchIO(32, 4096)
        got, _ = io.serve_udp(server.fileno(), reg.serve_shard, now, 0, 1, 0, [[]])
        assert got == len(senders) and io.served_c == len(senders)
        for i, s in enumerate(senders):
            host, port = s.getsockname()
            assert f";received={host}".encode() in s.recv(4096)
            assert reg.lookup(f"sip:h{i}@example.com", now)[0].source == (host, port)
    finally:
        for s in senders:
            s.close()
