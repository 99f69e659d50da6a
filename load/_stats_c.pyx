# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""What the load engine counts, and how Python reads it.

:class:`Counters` holds the counters, the replies by status code and two
latency histograms (the phase's and the current interval's); the engine
(``load._loadio_c.Engine``) is a :class:`Counters` and updates the fields
directly, per packet, without a Python object.  The histogram is
log-linear: exact below 128 ns, then 64 buckets per power of two (1.6 %).
"""

from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset


cdef inline uint64_t hist_value(int i) noexcept nogil:
    """Middle of bucket ``i`` in nanoseconds."""
    cdef int e, mant
    if i < 128:
        return <uint64_t>i
    e = (i - 128) // HSUB + 7
    mant = (i - 128) % HSUB
    return ((<uint64_t>(HSUB + mant) << (e - 6)) + (<uint64_t>1 << (e - 7)))


cdef uint64_t hist_quantile(const Hist *h, double q) noexcept nogil:
    """The value below which a share ``q`` of the samples lie (0 when empty)."""
    cdef uint64_t rank, acc = 0, v
    cdef int i
    if h.n == 0:
        return 0
    rank = <uint64_t>(q * h.n)
    if rank >= h.n:
        rank = h.n - 1
    for i in range(HBUCKETS):
        acc += h.b[i]
        if acc > rank:
            v = hist_value(i)
            return v if v < h.max_ns else h.max_ns
    return h.max_ns


cdef dict _hist_dict(Hist *h):
    return {
        "count": h.n,
        "mean": (h.sum_ns / h.n / 1e6) if h.n else 0.0,
        "p50": hist_quantile(h, 0.50) / 1e6,
        "p90": hist_quantile(h, 0.90) / 1e6,
        "p99": hist_quantile(h, 0.99) / 1e6,
        "p999": hist_quantile(h, 0.999) / 1e6,
        "max": h.max_ns / 1e6,
    }


cdef class Counters:
    """The counters of a load phase: requests sent, replies by kind and
    status code, latency (read-only attributes and the methods below)."""

    def __cinit__(self):
        self.ntargets = 1
        self.hist_total = <Hist *>calloc(1, sizeof(Hist))
        self.hist_ival = <Hist *>calloc(1, sizeof(Hist))
        if self.hist_total == NULL or self.hist_ival == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.hist_total); free(self.hist_ival)

    def reset_counters(self):
        """Zero every counter and histogram (outstanding requests stay)."""
        self.sent_new = self.sent_total = self.retransmissions = 0
        self.finals = self.ok = self.provisional = self.timeouts = self.duplicates = 0
        self.late = self.stale = self.mismatched = self.not_response = self.unparsable = 0
        self.send_errors = self.stalls_busy = self.stalls_ring = self.challenged = 0
        self.mal_sent = self.mal_finals = self.mal_timeouts = self.conn_closed = 0
        self.first_send_ns = self.last_send_ns = self.last_final_ns = 0
        self.max_lag_ns = 0
        memset(self.status, 0, sizeof(self.status))
        memset(self.mal_status, 0, sizeof(self.mal_status))
        memset(self.tgt_sent, 0, sizeof(self.tgt_sent))
        memset(self.tgt_ok, 0, sizeof(self.tgt_ok))
        memset(self.tgt_other, 0, sizeof(self.tgt_other))
        memset(self.tgt_5xx, 0, sizeof(self.tgt_5xx))
        memset(self.tgt_timeouts, 0, sizeof(self.tgt_timeouts))
        memset(self.hist_total, 0, sizeof(Hist))
        memset(self.hist_ival, 0, sizeof(Hist))
        self.iv_sent = self.iv_finals = self.iv_ok = self.iv_timeouts = 0

    def status_counts(self, bint malformed=False):
        """``{status: count}`` of the final and provisional replies."""
        cdef uint64_t *a
        if malformed:
            a = &self.mal_status[0]
        else:
            a = &self.status[0]
        return {i: a[i] for i in range(NSTATUS) if a[i]}

    def target_counts(self):
        """Per target, in order: ``{"sent", "ok", "non_2xx", "5xx", "timeouts"}``
        of the requests sent to it.  They add up to the totals: ``sent_total -
        retransmissions`` (new requests, malformed ones included, and answers
        to challenges), ``ok``, ``finals - ok`` (of which ``5xx``: the replies
        of status 500 to 599) and ``timeouts`` (malformed requests' replies and
        silences are counted apart, as in the totals)."""
        return [{"sent": self.tgt_sent[i], "ok": self.tgt_ok[i], "non_2xx": self.tgt_other[i],
                 "5xx": self.tgt_5xx[i], "timeouts": self.tgt_timeouts[i]}
                for i in range(self.ntargets)]

    def latency(self):
        """Latency of every matched final reply, in milliseconds."""
        return _hist_dict(self.hist_total)

    def take_interval(self):
        """Counts and latency since the previous call (for progress and plots)."""
        d = _hist_dict(self.hist_ival)
        d.update(sent=self.iv_sent, finals=self.iv_finals, ok=self.iv_ok,
                 timeouts=self.iv_timeouts)
        memset(self.hist_ival, 0, sizeof(Hist))
        self.iv_sent = self.iv_finals = self.iv_ok = self.iv_timeouts = 0
        return d


def _hist_roundtrip(values):
    """Test hook: feed ``values`` (ns) to a histogram; return its summary."""
    cdef Hist *h = <Hist *>calloc(1, sizeof(Hist))
    try:
        for v in values:
            hist_add(h, v)
        return _hist_dict(h)
    finally:
        free(h)
