# cython: language_level=3
"""The load engine's send path: the request templates, the phones, the
schedule of new requests and the batch they are built in (see _send_c.pyx).
What runs once per request or per reply is inline here."""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from load._common cimport BATCH, iovec, mmsghdr, put_seq, socklen_t
from load._window_c cimport F_MALFORMED

cdef enum:
    MAX_SITES = 4             # request-number sites in one template
    KIND_OVERRIDE = 0xFFFF    # the kind of a phone's one-off request (see push_override)
    ACK_AUTHED = 0x8000       # Ack.kind: an answer to a challenge of the request of that kind


cdef struct Tpl:              # a pre-built request
    const char *data
    uint32_t length
    uint32_t cid_off          # the Call-ID value
    uint32_t cid_len
    int nsites                # where the ten-digit request number goes
    uint32_t sites[MAX_SITES]


cdef struct Templates:
    Tpl *tpls                 # [phone * nkinds + kind]
    int nkinds
    Tpl *ovr                  # [phone]: its one-off request


cdef struct Ack:              # --acked: a phone's last request answered 2xx
    uint32_t seq              # its request number (its CSeq number; 0: none yet)
    uint32_t cid              # the request number its Call-ID was built with (itself, or
                              # for an answer to a challenge, the challenged request's)
    uint32_t later            # the phone's requests after it that got no 2xx
    uint16_t kind             # its kind (| ACK_AUTHED: an answer to a challenge)
    uint16_t tgt              # the index of its target
    uint32_t ovr_seq          # the challenged request of the phone's one-off request
    uint16_t ovr_kind         # and its kind


cdef struct Phones:
    uint32_t n
    uint16_t *sock            # the index of its socket (stream: its connection to target 0)
    uint16_t *tgt             # the target of its next request
    uint16_t ntargets
    int rotate                # round robin: every request of a phone goes to the next target
    uint32_t stride           # streams: connections per target (target t's are sock + t * stride)
    uint32_t *src             # its IPv4 source address, network order (0: the socket's)
    uint8_t *busy             # a request outstanding (one at a time, as a real UA)
    uint32_t cursor           # where the search for an idle phone starts
    uint32_t *pending         # phones whose one-off request waits to be sent (a stack)
    uint32_t npending
    Ack *ack                  # per phone, when acknowledgements are tracked (else NULL)


cdef struct Schedule:         # the new requests of a phase
    uint16_t *pattern         # their kinds, cycled
    uint32_t plen
    uint16_t *mal_kinds       # kinds of the malformed share
    uint32_t nmal
    uint64_t mal_thresh       # share * 2**32
    int closed_loop
    double rate               # open loop: per second
    uint32_t inflight         # closed loop: the window
    uint32_t refill           # closed loop: new requests go out once this many slots are free
    uint64_t max_new
    int64_t t0
    int64_t send_until


cdef struct Entry:            # one message of the batch being built
    uint32_t seq
    uint32_t phone
    uint16_t kind
    uint16_t sock
    uint16_t tgt              # the index of its target
    uint8_t flags
    uint8_t retrans


cdef struct Batch:
    Entry ent[BATCH]
    mmsghdr msgs[BATCH]
    iovec iov[BATCH]
    char *sbuf                # BATCH * MSG_MAX
    char *cbuf                # BATCH control messages (IP_PKTINFO)


# set-up (Python objects; raise on bad input)
cdef int tpl_fill(Tpl *t, tpl) except -1
cdef int templates_set(Templates *ts, list templates, int nkinds) except -1
cdef int phones_set(Phones *ph, Templates *ts, socks, srcs, targets, int nsock, int ntargets,
                    bint rotate, uint32_t stride) except -1
cdef int sched_set(Schedule *s, pattern, malformed_kinds, double malformed_ratio,
                   bint closed_loop, double rate, int inflight, max_new,
                   double duration) except -1
cdef void sched_start(Schedule *s, double duration) noexcept nogil
cdef void send_free(Templates *ts, Phones *ph, Schedule *s) noexcept nogil
cdef int phones_track_acks(Phones *ph) noexcept nogil

# the batch
cdef int batch_init(Batch *b) noexcept nogil
cdef void batch_free(Batch *b) noexcept nogil
cdef void batch_build(Batch *b, int nb, const Templates *ts, const char *dsts, socklen_t dlen,
                      const uint32_t *src) noexcept nogil


cdef inline Tpl *tpl_of(const Templates *ts, uint32_t phone, uint16_t kind) noexcept nogil:
    if kind == KIND_OVERRIDE:
        return &ts.ovr[phone]
    return &ts.tpls[phone * ts.nkinds + kind]


cdef inline bint callid_matches(const Tpl *tp, uint32_t seq, const char *cid,
                                Py_ssize_t cid_len) noexcept nogil:
    """Is ``cid`` the Call-ID that request ``seq`` built from ``tp`` carried?"""
    cdef char expect[512]
    cdef char digits[10]
    cdef uint32_t off
    cdef int k
    if <uint32_t>cid_len != tp.cid_len:
        return False
    memcpy(expect, tp.data + tp.cid_off, tp.cid_len)
    put_seq(digits, seq)
    for k in range(tp.nsites):
        off = tp.sites[k]
        if off >= tp.cid_off and off + 10 <= tp.cid_off + tp.cid_len:
            memcpy(expect + (off - tp.cid_off), digits, 10)
    return memcmp(expect, cid, tp.cid_len) == 0


cdef inline int64_t phones_take(Phones *ph) noexcept nogil:
    """The next idle phone from the cursor on, now busy; -1 when all are busy."""
    cdef uint32_t phone = ph.cursor, tries = 0
    while ph.busy[phone] and tries < ph.n:
        phone += 1
        if phone == ph.n:
            phone = 0
        tries += 1
    if ph.busy[phone]:
        return -1
    ph.cursor = phone + 1 if phone + 1 < ph.n else 0
    ph.busy[phone] = 1
    return phone


cdef inline bint sched_open(const Schedule *s, int64_t t, uint64_t sent_new) noexcept nogil:
    """May new requests still be sent?"""
    return sent_new < s.max_new and t < s.send_until


cdef inline int64_t sched_due(const Schedule *s, int64_t t, uint64_t sent_new,
                              uint64_t outstanding, int64_t *max_lag) noexcept nogil:
    """How many new requests to send now (at most 16 batches); an open loop
    running behind records how far in ``max_lag``."""
    cdef int64_t due, lag
    if s.closed_loop:
        due = <int64_t>s.inflight - <int64_t>outstanding
        if due < <int64_t>s.refill and <uint64_t>due < s.max_new - sent_new:
            return 0            # wait for a fuller refill (see sched_set)
    else:
        due = <int64_t>((t - s.t0) * s.rate / 1e9) + 1 - <int64_t>sent_new
        if due > 1:
            lag = <int64_t>((due - 1) * 1e9 / s.rate)
            if lag > max_lag[0]:
                max_lag[0] = lag
    if due > BATCH * 16:
        due = BATCH * 16
    if <uint64_t>due > s.max_new - sent_new:
        due = <int64_t>(s.max_new - sent_new)
    return due


cdef inline int64_t sched_next(const Schedule *s, int64_t t, uint64_t sent_new,
                               uint64_t outstanding, bint ring_full) noexcept nogil:
    """When the next new request falls due (``t``: now; the far future: not
    before a reply or a timeout frees the window)."""
    if s.closed_loop:
        if ring_full or outstanding >= s.inflight:
            return 0x7FFFFFFFFFFFFFFF
        if (s.inflight - outstanding >= s.refill
                or s.inflight - outstanding >= s.max_new - sent_new):
            return t
        return 0x7FFFFFFFFFFFFFFF
    return s.t0 + <int64_t>(sent_new * 1e9 / s.rate)


cdef inline uint16_t phone_target(Phones *ph, uint32_t phone) noexcept nogil:
    """The target of ``phone``'s next request; round robin moves the phone on
    to the next target for the request after."""
    cdef uint16_t t = ph.tgt[phone]
    if ph.rotate:
        ph.tgt[phone] = t + 1 if t + 1 < ph.ntargets else 0
    return t


cdef inline uint16_t sched_kind(const Schedule *s, uint64_t seq, uint64_t sent_new,
                                uint8_t *flags) noexcept nogil:
    """The kind of new request ``seq``; a malformed one gets ``F_MALFORMED``."""
    cdef uint64_t h = (seq * <uint64_t>2654435761) & <uint64_t>0xFFFFFFFF
    if h < s.mal_thresh:
        flags[0] = F_MALFORMED
        return s.mal_kinds[seq % s.nmal]
    flags[0] = 0
    return s.pattern[sent_new % s.plen]


cdef inline void entry_set(Entry *e, uint64_t seq, uint32_t phone, uint16_t kind,
                           const Phones *ph, uint16_t tgt, uint8_t flags,
                           uint8_t retrans) noexcept nogil:
    """Request ``seq`` of ``phone`` to target ``tgt`` (on the phone's socket,
    or its connection to that target)."""
    e.seq = <uint32_t>seq
    e.phone = phone
    e.kind = kind
    e.sock = <uint16_t>(ph.sock[phone] + tgt * ph.stride)
    e.tgt = tgt
    e.flags = flags
    e.retrans = retrans


cdef inline int batch_run(const Batch *b, int start, int nb) noexcept nogil:
    """How many entries from ``start`` on go out on the same socket."""
    cdef int run = 1
    while start + run < nb and b.ent[start + run].sock == b.ent[start].sock:
        run += 1
    return run


cdef inline void phone_ok(Phones *ph, uint32_t phone, uint32_t seq, uint16_t kind,
                          uint16_t tgt) noexcept nogil:
    """Request ``seq`` of ``phone`` got a 2xx (acknowledgements tracked: ``ph.ack``)."""
    cdef Ack *a = &ph.ack[phone]
    a.seq = seq
    a.tgt = tgt
    a.later = 0
    if kind == KIND_OVERRIDE:
        a.kind = a.ovr_kind | ACK_AUTHED
        a.cid = a.ovr_seq
    else:
        a.kind = kind
        a.cid = seq
