# cython: language_level=3
"""The window of outstanding requests: a ring of slots indexed by request
number, with the timeout and the retransmission timers (see _window_c.pyx).
The per-reply look-up and the per-request bookkeeping are inline."""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    MAX_LEVELS = 32       # retransmission levels
    SEQ_BASE = 1000000000 # the first request number (ten digits, far below 2**31)

# slot states
cdef enum:
    ST_FREE = 0       # never sent (or the send failed)
    ST_OUT = 1        # sent, no final reply yet
    ST_DONE = 2       # final reply received
    ST_TIMEOUT = 3    # given up

# slot flags
cdef enum:
    F_MALFORMED = 1
    F_AUTHED = 2      # an answer to a challenge (never challenged again)


cdef struct Slot:
    int64_t t_send
    uint32_t seq
    uint32_t phone
    uint16_t kind
    uint16_t tgt              # the index of its target
    uint8_t state
    uint8_t flags


cdef struct Window:
    uint64_t head             # the next request number
    uint64_t tail             # requests below it are settled (answered or given up)
    uint64_t mask             # ring size - 1
    Slot *ring
    int64_t timeout_ns
    int nlevels               # retransmission i is due rtx_off[i] after the send
    int64_t rtx_off[MAX_LEVELS]
    uint64_t rtx_ptr[MAX_LEVELS]   # per level: requests below it are done with it


cdef int win_init(Window *w, int ring_bits) noexcept nogil
cdef void win_free(Window *w) noexcept nogil
cdef void win_set_timers(Window *w, double timeout, double t1, double t2) noexcept nogil
cdef int64_t win_next_timer(const Window *w) noexcept nogil
cdef Slot *win_expire(Window *w, int64_t t) noexcept nogil
cdef int win_due(Window *w, int64_t t, Slot **out, int cap) noexcept nogil


cdef inline bint win_full(const Window *w) noexcept nogil:
    return w.head - w.tail > w.mask


cdef inline void win_sent(Window *w, uint32_t seq, uint32_t phone, uint16_t kind, uint16_t tgt,
                          uint8_t flags, int64_t t) noexcept nogil:
    """Request ``seq`` went out to target ``tgt`` at ``t``: outstanding from now on."""
    cdef Slot *s = &w.ring[seq & w.mask]
    s.t_send = t
    s.seq = seq
    s.phone = phone
    s.kind = kind
    s.tgt = tgt
    s.state = ST_OUT
    s.flags = flags


cdef inline void win_unsent(Window *w, uint32_t seq) noexcept nogil:
    """Request ``seq`` could not be sent: its slot stays free."""
    cdef Slot *s = &w.ring[seq & w.mask]
    s.state = ST_FREE
    s.seq = seq


cdef inline Slot *win_find(Window *w, uint64_t seq) noexcept nogil:
    """The slot of request ``seq`` if it was sent and is still in the ring,
    else NULL (a stale reply)."""
    cdef Slot *s
    if seq < SEQ_BASE or seq >= w.head or w.head - seq > w.mask:
        return NULL
    s = &w.ring[seq & w.mask]
    if s.seq != seq or s.state == ST_FREE:
        return NULL
    return s
