"""The per-source rate limit (``--rate-limit``, ``--rate-burst``): a token bucket per source host.

Compiled (``_io_c.RateLimiter``), so that ``BatchIO.serve_udp`` checks each
datagram without entering Python.  Each worker keeps its own buckets, so a
source spread over several workers by its ports gets up to N times the rate.
At most ``max_sources`` sources are tracked (``RATE_SOURCES_MAX`` by
default): when that many are, the full buckets (sources that would be
allowed their whole burst anyway) are forgotten, and if that is not enough
(a flood of distinct sources) all of them.
"""
from __future__ import annotations

from fastsip.server._io_c import RATE_SOURCES_MAX, RateLimiter

__all__ = ["RATE_SOURCES_MAX", "RateLimiter"]
