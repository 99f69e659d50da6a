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
