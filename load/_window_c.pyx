# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""The window of outstanding requests of the load engine.

Request numbers count up from ``SEQ_BASE``; request ``seq`` lives in slot
``seq & mask`` of a ring while it is outstanding.  ``head`` is the next
number to hand out, ``tail`` the oldest one not yet settled: the ring is
full when ``head - tail`` exceeds its size.  :func:`win_expire` gives up
the requests older than the timeout (oldest first, at the tail);
:func:`win_due` lists the retransmissions that fall due (SIP timer E: one
level per retransmission, each with a pointer that only moves forward).
No Python objects: the engine calls these with its own counters.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free


cdef int win_init(Window *w, int ring_bits) noexcept nogil:
    """An empty ring of ``2**ring_bits`` slots; -1 when out of memory."""
    w.mask = (<uint64_t>1 << ring_bits) - 1
    w.ring = <Slot *>calloc(w.mask + 1, sizeof(Slot))
    w.head = w.tail = SEQ_BASE
    w.timeout_ns = 2000000000
    w.nlevels = 0
    return -1 if w.ring == NULL else 0


cdef void win_free(Window *w) noexcept nogil:
    free(w.ring)
    w.ring = NULL


cdef void win_set_timers(Window *w, double timeout, double t1, double t2) noexcept nogil:
    """Give up after ``timeout`` seconds; with ``t1`` > 0 retransmit at t1,
    then 2*t1, 4*t1 ... apart, at most ``t2`` apart, until the timeout."""
    cdef int64_t off, gap
    cdef int k
    w.timeout_ns = <int64_t>(timeout * 1e9)
    w.nlevels = 0
    if t1 > 0:
        off = <int64_t>(t1 * 1e9)
        gap = off
        while off < w.timeout_ns and w.nlevels < MAX_LEVELS:
            w.rtx_off[w.nlevels] = off
            w.nlevels += 1
            gap = gap * 2
            if gap > <int64_t>(t2 * 1e9):
                gap = <int64_t>(t2 * 1e9)
            off += gap
    for k in range(w.nlevels):
        w.rtx_ptr[k] = w.head


cdef int64_t win_next_timer(const Window *w) noexcept nogil:
    """Earliest time a timeout or a retransmission falls due."""
    cdef int64_t best = 0x7FFFFFFFFFFFFFFF, c
    cdef int k
    cdef const Slot *s
    cdef uint64_t q = w.tail
    while q < w.head:
        s = &w.ring[q & w.mask]
        if s.state == ST_OUT and s.seq == q:
            best = s.t_send + w.timeout_ns
            break
        q += 1
        if q - w.tail > 64:
            return 0      # many answered slots to skip: let win_expire do it now
    for k in range(w.nlevels):
        q = w.rtx_ptr[k]
        if q < w.head:
            s = &w.ring[q & w.mask]
            c = s.t_send + w.rtx_off[k]
            if c < best:
                best = c
    return best


cdef Slot *win_expire(Window *w, int64_t t) noexcept nogil:
    """Move the tail past settled requests; the next request that is too old
    at ``t`` is marked timed out and returned, NULL when there is none."""
    cdef Slot *s
    while w.tail < w.head:
        s = &w.ring[w.tail & w.mask]
        if s.state == ST_OUT and s.seq == w.tail:
            if t - s.t_send < w.timeout_ns:
                return NULL
            s.state = ST_TIMEOUT
            w.tail += 1
            return s
        w.tail += 1
    return NULL


cdef int win_due(Window *w, int64_t t, Slot **out, int cap) noexcept nogil:
    """Up to ``cap`` outstanding requests whose next retransmission is due at
    ``t``, level by level, oldest first; call again while it returns ``cap``."""
    cdef Slot *s
    cdef int k, n = 0
    cdef uint64_t q
    for k in range(w.nlevels):
        q = w.rtx_ptr[k]
        if q < w.tail:
            q = w.tail
        while q < w.head:
            s = &w.ring[q & w.mask]
            if s.state == ST_OUT and s.seq == q:
                if t - s.t_send < w.rtx_off[k]:
                    break
                if n == cap:
                    w.rtx_ptr[k] = q
                    return n
                out[n] = s
                n += 1
            q += 1
        w.rtx_ptr[k] = q
    return n
