"""The worker's per-source token bucket (fastsip/server/ratelimit.py), with a fake clock."""
from fastsip.server.ratelimit import RateLimiter


def test_burst_then_the_rate_per_source():
    rl = RateLimiter(rate=10, burst=3)
    assert [rl.allow(b"10.0.0.1", 100.0) for _ in range(5)] == [True, True, True, False, False]
    assert rl.refused == 2
    assert rl.allow(b"10.0.0.2", 100.0)                 # another source has its own bucket
    assert not rl.allow(b"10.0.0.1", 100.05)            # half a token
    assert rl.allow(b"10.0.0.1", 100.15)                # refilled at 10/s
    assert len(rl) == 2


def test_configure_keeps_buckets_and_a_flood_of_sources_is_bounded():
    rl = RateLimiter(rate=1, burst=1, max_sources=4)
    assert rl.allow(b"a", 0.0) and not rl.allow(b"a", 0.0)
    rl.configure(1000, 5)
    assert rl.allow(b"a", 0.01)                         # 10 tokens' worth, capped at 5
    for i in range(10):
        rl.allow(f"s{i}".encode(), 0.02)
    assert len(rl) <= 4
