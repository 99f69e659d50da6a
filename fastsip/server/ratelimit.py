"""The per-source rate limit (``--rate-limit``, ``--rate-burst``): a token bucket per source host.

Each worker keeps its own buckets, so a source spread over several workers
by its ports gets up to N times the rate.  At most ``max_sources`` sources
are tracked: when that many are, the full buckets (sources that would be
allowed their whole burst anyway) are forgotten, and if that is not enough
(a flood of distinct sources) all of them.
"""
from __future__ import annotations

RATE_SOURCES_MAX = 100_000


class RateLimiter:
    """``allow(host, now)``: whether a message from ``host`` (bytes) may be served at ``now``.

    ``rate`` tokens per second, ``burst`` at most; 0 turns the limit off
    (callers check :attr:`rate` and skip the call).  Refusals are counted in
    :attr:`refused`.
    """

    __slots__ = ("rate", "burst", "max_sources", "buckets", "refused")

    def __init__(self, rate: float = 0.0, burst: float = 0.0,
                 max_sources: int = RATE_SOURCES_MAX) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self.buckets: dict = {}          # source host -> [tokens, last]
        self.refused = 0

    def configure(self, rate: float, burst: float) -> None:
        """New limits (a SIGHUP); the buckets are kept."""
        self.rate = rate
        self.burst = burst

    def __len__(self) -> int:
        return len(self.buckets)

    def allow(self, host, now: float) -> bool:
        b = self.buckets.get(host)
        burst = self.burst
        if b is None:
            if len(self.buckets) >= self.max_sources:
                self._prune(now)
            self.buckets[host] = [burst - 1.0, now]
            return True
        tokens = min(burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            self.refused += 1
            return False
        b[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        rate, burst = self.rate, self.burst
        full = [h for h, b in self.buckets.items() if b[0] + (now - b[1]) * rate >= burst]
        for h in full:
            del self.buckets[h]
        if len(self.buckets) >= self.max_sources:     # a flood of distinct sources: start over
            self.buckets.clear()
