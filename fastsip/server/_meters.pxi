# Included by _io_c.pyx: the latency histogram and the per-source rate limiter, in C so
# that the worker's loop (_evloop.pxi) and serve_udp use them without entering Python.

cdef enum:
    MAX_BOUNDS = 32

#: Sources a RateLimiter tracks at most, by default.
RATE_SOURCES_MAX = 100000


cdef class Histogram:
    """A histogram of durations (seconds) with fixed upper bounds: ``observe(value, n)``
    adds ``n`` observations of ``value`` (the bucket is the first bound >= value, as
    ``bisect_left``; above the last bound, the overflow bucket).

    ``Histogram(bounds)``: at most 32 increasing bounds (``metrics.Histogram``
    gives the latency buckets of ``/metrics``)."""

    cdef double _bounds[MAX_BOUNDS]
    cdef unsigned long long _counts[MAX_BOUNDS + 1]
    cdef int _nb
    cdef readonly tuple bounds
    cdef readonly double sum
    cdef readonly unsigned long long count

    def __init__(self, bounds):
        cdef int i
        bounds = tuple(bounds)
        if len(bounds) > MAX_BOUNDS:
            raise ValueError(f"at most {MAX_BOUNDS} bounds")
        self.bounds = bounds
        self._nb = len(bounds)
        for i in range(self._nb):
            self._bounds[i] = bounds[i]
        memset(self._counts, 0, sizeof(self._counts))
        self.sum = 0.0
        self.count = 0

    cdef inline void _observe(self, double value, long n) noexcept:
        cdef int i = 0
        while i < self._nb and self._bounds[i] < value:
            i += 1
        self._counts[i] += n
        self.sum += value * n
        self.count += n

    def observe(self, double value, long n=1):
        self._observe(value, n)

    @property
    def counts(self):
        """Observations per bucket (the last: above every bound)."""
        return [self._counts[i] for i in range(self._nb + 1)]

    def as_dict(self):
        return {"counts": self.counts, "sum": self.sum, "count": self.count}


@cython.final
@cython.freelist(64)
cdef class _Bucket:
    cdef double tokens
    cdef double last


@cython.final
cdef class RateLimiter:
    """``allow(host, now)``: whether a message from ``host`` (bytes) may be served at ``now``.

    A token bucket per source host: ``rate`` tokens per second, ``burst`` at
    most; 0 turns the limit off (callers check :attr:`rate` and skip the
    call).  Refusals are counted in :attr:`refused`.  At most ``max_sources``
    sources are tracked: when that many are, the full buckets (sources that
    would be allowed their whole burst anyway) are forgotten, and if that is
    not enough (a flood of distinct sources) all of them.  ``serve_udp``
    checks each datagram here without a call into Python.
    """

    cdef readonly double rate
    cdef readonly double burst
    cdef readonly Py_ssize_t max_sources
    cdef readonly unsigned long long refused
    cdef dict _buckets                  # source host -> _Bucket

    def __cinit__(self, double rate=0.0, double burst=0.0,
                  Py_ssize_t max_sources=RATE_SOURCES_MAX):
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets = {}
        self.refused = 0

    def configure(self, double rate, double burst):
        """New limits (a SIGHUP); the buckets are kept."""
        self.rate = rate
        self.burst = burst

    def __len__(self):
        return len(self._buckets)

    def allow(self, host, double now) -> bool:
        return self._allow(host, now)

    cdef bint _allow(self, object host, double now) except -1:
        cdef object found = self._buckets.get(host)
        cdef _Bucket b
        cdef double tokens
        if found is None:
            if len(self._buckets) >= self.max_sources:
                self._prune(now)
            b = _Bucket.__new__(_Bucket)
            b.tokens = self.burst - 1.0
            b.last = now
            self._buckets[host] = b
            return True
        b = <_Bucket>found
        tokens = b.tokens + (now - b.last) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        b.last = now
        if tokens < 1.0:
            b.tokens = tokens
            self.refused += 1
            return False
        b.tokens = tokens - 1.0
        return True

    cdef int _prune(self, double now) except -1:
        cdef _Bucket b
        full = [h for h, b in self._buckets.items()
                if b.tokens + (now - b.last) * self.rate >= self.burst]
        for h in full:
            del self._buckets[h]
        if len(self._buckets) >= self.max_sources:     # a flood of distinct sources: start over
            self._buckets.clear()
        return 0
