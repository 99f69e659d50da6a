# cython: language_level=3
"""What the engine counts: the latency histogram and :class:`Counters`
(the counters Python reads off the engine).  ``hist_add`` is inline: it runs
for every matched reply."""

from libc.stdint cimport int64_t, uint64_t

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil

cdef enum:
    NSTATUS = 700         # status codes 0..699 are counted
    MAX_TARGETS = 64      # targets counted apart
    HSUB = 64             # histogram sub-buckets per power of two
    HBUCKETS = 128 + 40 * 64


cdef struct Hist:
    uint64_t n
    uint64_t sum_ns
    uint64_t max_ns
    uint64_t b[HBUCKETS]


cdef inline int hist_index(uint64_t v) noexcept nogil:
    """Log-linear bucket: exact below 128 ns, then 64 buckets per power of two."""
    cdef int e
    if v < 128:
        return <int>v
    e = 63 - __builtin_clzll(v)
    if e > 46:
        return HBUCKETS - 1
    return 128 + (e - 7) * HSUB + <int>((v >> (e - 6)) & (HSUB - 1))


cdef inline void hist_add(Hist *h, uint64_t v) noexcept nogil:
    h.n += 1
    h.sum_ns += v
    if v > h.max_ns:
        h.max_ns = v
    h.b[hist_index(v)] += 1


cdef class Counters:
    # totals of the phase
    cdef readonly uint64_t sent_new, sent_total, retransmissions, outstanding
    cdef readonly uint64_t finals, ok, provisional, timeouts, duplicates, late
    cdef readonly uint64_t stale, mismatched, not_response, unparsable
    cdef readonly uint64_t send_errors, stalls_busy, stalls_ring, challenged
    cdef readonly uint64_t mal_sent, mal_finals, mal_timeouts, conn_closed
    cdef readonly int64_t first_send_ns, last_send_ns, last_final_ns
    cdef readonly int64_t max_lag_ns
    cdef uint64_t status[NSTATUS]
    cdef uint64_t mal_status[NSTATUS]
    # per target (the request's): sent (not retransmissions), 2xx, other finals (of which
    # 5xx), timeouts
    cdef readonly int ntargets
    cdef uint64_t tgt_sent[MAX_TARGETS]
    cdef uint64_t tgt_ok[MAX_TARGETS]
    cdef uint64_t tgt_other[MAX_TARGETS]
    cdef uint64_t tgt_5xx[MAX_TARGETS]
    cdef uint64_t tgt_timeouts[MAX_TARGETS]
    cdef Hist *hist_total
    # since the last take_interval()
    cdef Hist *hist_ival
    cdef uint64_t iv_sent, iv_finals, iv_ok, iv_timeouts
