# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""The send path of the load engine.

Templates are requests built once (by scapy, in Python) per phone and kind,
with the spots where the ten-digit request number goes; a phone may also
have a one-off request (its answer to a digest challenge).  The schedule
says which kinds the new requests of a phase are, how many, and how fast
(open loop: a rate; closed loop: a window).  :func:`batch_build` copies the
templates of up to ``BATCH`` requests into the send buffer, patches their
request numbers in, and sets up one ``mmsghdr`` each, grouped by socket so
that every socket gets one ``sendmmsg``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from load._common cimport (BATCH, FL_CBUF_SIZE, MSG_MAX, fl_set_pktinfo, mmsghdr, now_ns,
                           put_seq, socklen_t)

# ------------------------------------------------------------ set-up


cdef int tpl_fill(Tpl *t, tpl) except -1:
    """``t`` from ``tpl`` = ``(data, sites, (cid_off, cid_len))``; ``data``
    is not copied (the caller keeps it alive)."""
    cdef bytes data = tpl[0]
    sites = tpl[1]
    cid = tpl[2]
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n > MSG_MAX:
        raise ValueError(f"a request of {n} bytes is longer than {MSG_MAX}")
    if not 1 <= len(sites) <= MAX_SITES:
        raise ValueError("a template needs 1 to 4 request-number sites")
    t.data = PyBytes_AS_STRING(data)
    t.length = <uint32_t>n
    t.nsites = len(sites)
    for i, s in enumerate(sites):
        if s < 0 or s + 10 > n:
            raise ValueError("request-number site outside the template")
        t.sites[i] = s
    if cid[0] < 0 or cid[0] + cid[1] > n or cid[1] > 512:
        raise ValueError("Call-ID span outside the template")
    t.cid_off = cid[0]
    t.cid_len = cid[1]
    return 0


cdef int templates_set(Templates *ts, list templates, int nkinds) except -1:
    cdef Py_ssize_t i, n = len(templates)
    free(ts.tpls)
    ts.tpls = <Tpl *>calloc(n, sizeof(Tpl))
    if ts.tpls == NULL:
        raise MemoryError()
    for i in range(n):
        tpl_fill(&ts.tpls[i], templates[i])
    ts.nkinds = nkinds
    return 0


cdef int phones_set(Phones *ph, Templates *ts, socks, srcs, targets, int nsock, int ntargets,
                    bint rotate, uint32_t stride) except -1:
    """The phones (all idle), with room for one one-off request each.

    ``socks[i]``: phone i's socket (< ``nsock``); ``targets[i]``: the target
    of its first request (< ``ntargets``; None: all target 0); ``rotate``:
    round robin, each request of a phone to the next target; ``stride``:
    connections per target (streams; 0: the sockets serve every target)."""
    cdef Py_ssize_t i, n = len(socks)
    free(ph.sock); free(ph.src); free(ph.busy); free(ts.ovr); free(ph.pending); free(ph.tgt)
    free(ph.ack)
    ph.ack = NULL
    ph.sock = <uint16_t *>calloc(n, sizeof(uint16_t))
    ph.src = <uint32_t *>calloc(n, sizeof(uint32_t))
    ph.busy = <uint8_t *>calloc(n, 1)
    ts.ovr = <Tpl *>calloc(n, sizeof(Tpl))
    ph.pending = <uint32_t *>calloc(n, sizeof(uint32_t))
    ph.tgt = <uint16_t *>calloc(n, sizeof(uint16_t))
    if (ph.sock == NULL or ph.src == NULL or ph.busy == NULL
            or ts.ovr == NULL or ph.pending == NULL or ph.tgt == NULL):
        raise MemoryError()
    for i in range(n):
        if not 0 <= socks[i] < nsock:
            raise ValueError("phone socket index out of range")
        ph.sock[i] = socks[i]
        a = srcs[i]
        # network byte order for in_pktinfo
        ph.src[i] = (((a >> 24) & 0xff) | ((a >> 8) & 0xff00)
                     | ((a << 8) & 0xff0000) | ((a & 0xff) << 24))
        if targets is not None:
            if not 0 <= targets[i] < ntargets:
                raise ValueError("phone target index out of range")
            ph.tgt[i] = targets[i]
    ph.n = n
    ph.npending = 0
    ph.cursor = 0
    ph.ntargets = ntargets
    ph.rotate = rotate and ntargets > 1
    ph.stride = stride
    return 0


cdef int sched_set(Schedule *s, pattern, malformed_kinds, double malformed_ratio,
                   bint closed_loop, double rate, int inflight, max_new,
                   double duration) except -1:
    """The schedule of the next phase (the arguments are checked by the caller)."""
    cdef uint32_t u
    cdef uint64_t n
    free(s.pattern); free(s.mal_kinds)
    s.plen = len(pattern)
    s.pattern = <uint16_t *>malloc(s.plen * sizeof(uint16_t))
    s.nmal = len(malformed_kinds)
    s.mal_kinds = <uint16_t *>malloc((s.nmal + 1) * sizeof(uint16_t))
    if s.pattern == NULL or s.mal_kinds == NULL:
        raise MemoryError()
    for u in range(s.plen):
        s.pattern[u] = pattern[u]
    for u in range(s.nmal):
        s.mal_kinds[u] = malformed_kinds[u]
    s.mal_thresh = <uint64_t>(malformed_ratio * 4294967296.0) if s.nmal else 0
    s.closed_loop = closed_loop
    s.rate = rate
    s.inflight = inflight
    # a closed loop refills its window an eighth at a time, not one request per reply:
    # against a server that answers one by one, per-reply refills cost the tool a
    # send (and a wake-up) per request, and the tool, not the server, became the limit
    s.refill = inflight // 8 if inflight >= 8 else 1
    s.max_new = 0xFFFFFFFFFFFFFFFF if max_new is None else max_new
    if not closed_loop and duration > 0:
        # open loop: request k is due at k / rate; those due before the end
        # are sent even when the generator runs a little late (the grace in
        # sched_start bounds how late), so the count is exactly ceil(rate * duration)
        n = <uint64_t>(rate * duration)
        if n < rate * duration:
            n += 1
        if n < s.max_new:
            s.max_new = n
    return 0


cdef void sched_start(Schedule *s, double duration) noexcept nogil:
    """Start the phase's clock: new requests go out for ``duration`` seconds
    (0: until ``max_new``)."""
    s.t0 = now_ns()
    s.send_until = s.t0 + <int64_t>(duration * 1e9) if duration > 0 else 0x7FFFFFFFFFFFFFFF
    if not s.closed_loop and duration > 0:
        s.send_until += 250000000


cdef int phones_track_acks(Phones *ph) noexcept nogil:
    """Keep, per phone, its last request answered 2xx (``Ack``, all zero: none
    yet); -1 when out of memory.  Kept across phases (set_phones drops it)."""
    if ph.ack == NULL:
        ph.ack = <Ack *>calloc(ph.n if ph.n else 1, sizeof(Ack))
    return -1 if ph.ack == NULL else 0


cdef void send_free(Templates *ts, Phones *ph, Schedule *s) noexcept nogil:
    free(ts.tpls); free(ts.ovr)
    free(ph.sock); free(ph.src); free(ph.busy); free(ph.pending); free(ph.tgt); free(ph.ack)
    free(s.pattern); free(s.mal_kinds)


# ------------------------------------------------------------ the batch

cdef int batch_init(Batch *b) noexcept nogil:
    """-1 when out of memory."""
    b.sbuf = <char *>malloc(BATCH * MSG_MAX)
    b.cbuf = <char *>calloc(BATCH, FL_CBUF_SIZE)
    return -1 if b.sbuf == NULL or b.cbuf == NULL else 0


cdef void batch_free(Batch *b) noexcept nogil:
    free(b.sbuf); free(b.cbuf)
    b.sbuf = b.cbuf = NULL


cdef void batch_build(Batch *b, int nb, const Templates *ts, const char *dsts, socklen_t dlen,
                      const uint32_t *src) noexcept nogil:
    """Build the first ``nb`` entries: sort them by socket, copy each one's
    template, patch its request number in; address each to its target, the
    ``dlen`` bytes at ``dsts + tgt * dlen`` (NULL: the socket is connected),
    from its phone's ``src`` (NULL: no IP_PKTINFO)."""
    cdef int i, j, k
    cdef Entry tmp
    cdef const Tpl *tp
    cdef char *buf
    cdef char digits[10]
    # group by socket (insertion sort: the batch is nearly sorted already)
    for i in range(1, nb):
        tmp = b.ent[i]
        j = i - 1
        while j >= 0 and b.ent[j].sock > tmp.sock:
            b.ent[j + 1] = b.ent[j]
            j -= 1
        b.ent[j + 1] = tmp
    for i in range(nb):
        tp = tpl_of(ts, b.ent[i].phone, b.ent[i].kind)
        buf = b.sbuf + i * MSG_MAX
        memcpy(buf, tp.data, tp.length)
        put_seq(digits, b.ent[i].seq)
        for k in range(tp.nsites):
            memcpy(buf + tp.sites[k], digits, 10)
        b.iov[i].iov_base = buf
        b.iov[i].iov_len = tp.length
        memset(&b.msgs[i], 0, sizeof(mmsghdr))
        b.msgs[i].msg_hdr.msg_iov = &b.iov[i]
        b.msgs[i].msg_hdr.msg_iovlen = 1
        if dsts != NULL:
            b.msgs[i].msg_hdr.msg_name = <void *>(dsts + b.ent[i].tgt * dlen)
            b.msgs[i].msg_hdr.msg_namelen = dlen
        if src != NULL and src[b.ent[i].phone]:
            fl_set_pktinfo(&b.msgs[i].msg_hdr, b.cbuf + i * FL_CBUF_SIZE, src[b.ent[i].phone])
