"""The worker's compiled event loop (fastsip.server._io_c.EventLoop) on real loopback
sockets, without a worker around it: Python descriptors, the tick, the UDP listeners
and the inbox served in C, hand-offs sent after the wake-up, counters and latency in C."""
import socket
import time
from bisect import bisect_left

import pytest

import fastsip
from fastsip.server._io_c import BatchIO, EventLoop, RateLimiter, monotonic
from fastsip.server.loop import EP_IN, EP_OUT
from fastsip.server.metrics import LATENCY_BUCKETS, Histogram, WorkerCounters
from fastsip.server.testing import register, request


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


def users_of_shard(shard, n=2, count=3):
    out, i = [], 0
    while len(out) < count:
        if fastsip.shard_of(f"sip:u{i}@example.com", n) == shard:
            out.append(f"u{i}")
        i += 1
    return out


def test_python_descriptors_the_tick_and_stop():
    loop = EventLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    seen, ticks = [], []

    def on_a(events):
        seen.append(events)
        if len(seen) == 1:
            a.recv(100)
            loop.modify(a.fileno(), EP_IN | EP_OUT)     # writable at once: called again
        else:
            loop.remove(a.fileno())

    def tick(active):
        ticks.append((monotonic(), active))
        if len(ticks) == 1:
            b.send(b"x")
        if len(ticks) == 4:
            loop.stop()
        return monotonic() + 0.05, monotonic() + 0.01  # soon once a descriptor is ready

    loop.add(a.fileno(), on_a)
    t0 = monotonic()
    loop.run(tick)
    assert seen[0] == EP_IN and seen[1] & EP_OUT and len(seen) == 2
    assert [act for _t, act in ticks] == [False, True, False, False]
    assert ticks[1][0] - ticks[0][0] < 0.04            # next_if_active: called sooner
    assert ticks[3][0] - ticks[2][0] >= 0.045          # idle: when it asked
    assert monotonic() - t0 < 1.0
    a.close()
    b.close()
    loop.close()


def test_an_exception_of_a_handler_ends_run():
    loop = EventLoop()
    a, b = socket.socketpair()

    def boom(events):
        raise RuntimeError("handler bug")
    loop.add(a.fileno(), boom)
    b.send(b"x")
    with pytest.raises(RuntimeError, match="handler bug"):
        loop.run(lambda active: (monotonic() + 1, monotonic() + 1))
    a.close()
    b.close()


def test_udp_and_inbox_served_in_c_with_handoffs_counters_and_latency(udp):
    """Worker 0 answers its own AORs and hands the others over to worker 1's inbox
    after the same wake-up; worker 1 answers them from its own UDP socket; nothing
    of Python runs but the tick."""
    client = udp()
    socks = [udp(), udp()]
    inbox = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    for s in socks + [r for r, _w in inbox]:
        s.setblocking(False)
    regs = [fastsip.Registrar(max_expires=3600) for _ in range(2)]
    loops, hists, queues = [], [], []
    for w in range(2):
        loop, hist, q = EventLoop(), Histogram(), [[], []]
        loop.serve(BatchIO(16, 4096), BatchIO(16, 8192), regs[w].serve_shard, w, 2, q,
                   [None if j == w else inbox[j][1].fileno() for j in range(2)],
                   [socks[w].fileno()], RateLimiter(), hist, None,
                   lambda others, now: 0, 100)
        loop.add_udp(socks[w].fileno(), 0)
        loop.add_inbox(inbox[w][0].fileno())
        loops.append(loop)
        hists.append(hist)
        queues.append(q)
    mine, theirs = users_of_shard(0), users_of_shard(1)
    for user in mine + theirs:
        client.sendto(register(user, contact=f"sip:{user}@127.0.0.1:5", call_id=f"c-{user}"),
                      socks[0].getsockname())
    time.sleep(0.05)

    def once(loop):
        calls = []

        def tick(active):
            calls.append(active)
            if len(calls) == 2:
                loop.stop()
            return monotonic() + 0.02, monotonic()
        loop.run(tick)
    once(loops[0])
    assert queues[0] == [[], []]                        # sent in the wake-up that queued them
    once(loops[1])
    replies = [fastsip.parse(client.recv(4096)) for _ in range(6)]
    assert sorted(r.call_id for r in replies) == sorted(f"c-{u}" for u in mine + theirs)
    assert regs[1].lookup(f"sip:{theirs[0]}@example.com")[0].source == client.getsockname()
    c0, c1 = loops[0].counters(), loops[1].counters()
    assert (c0["received_udp"], c0["handoffs_sent"], c0["batches_udp"]) == (6, 3, 1)
    assert (c1["handoffs_received"], c1["batches_inbox"], c1["received_udp"]) == (3, 1, 0)
    assert hists[0].count == 3 and hists[1].count == 3
    # the report adds them to the Python counters, as named in metrics.METRICS
    c = WorkerCounters()
    c.handoffs_sent = 1                                 # one handed over by a stream connection
    r = c.report(c0)
    assert r["received"]["udp"] == 6 and r["handoffs_sent"] == 4 and r["batches"]["udp"] == 1
    for s in [x for pair in inbox for x in pair]:
        s.close()


def test_compiled_rate_limiter_in_serve_udp(udp):
    server, client = udp(), udp()
    server.setblocking(False)
    limiter = RateLimiter(rate=1, burst=2)
    for i in range(4):
        client.sendto(request("OPTIONS", call_id=f"o{i}"), server.getsockname())
    time.sleep(0.05)
    got, handed = BatchIO(16, 4096).serve_udp(server.fileno(), fastsip.Registrar().serve_shard,
                                             time.time(), 0, 1, 0, [[]], limiter)
    assert (got, handed) == (4, 0) and limiter.refused == 2 and len(limiter) == 1
    assert {fastsip.parse(client.recv(4096)).call_id for _ in range(2)} == {"o0", "o1"}


def test_histogram_buckets_as_bisect_left():
    h = Histogram()
    values = [0.0, 1e-5, 1.1e-5, 3e-4, 1.0, 5.0]
    for v in values:
        h.observe(v, 2)
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    for v in values:
        expected[bisect_left(LATENCY_BUCKETS, v)] += 2
    assert h.as_dict() == {"counts": expected, "sum": pytest.approx(2 * sum(values)),
                           "count": 12}
