# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The hot loop of the load tool: batched send, receive, match, time.

:class:`Engine` holds pre-built requests (templates), patches a ten-digit
request number into them, sends them in batches (``sendmmsg`` over UDP, a
raw socket, or ``send`` over TCP connections), receives replies in batches
(``recvmmsg``/``recv``), matches every reply by CSeq number and Call-ID to
the send time of its request, and keeps counters and latency histograms.
Pacing (open loop, ``rate``) or a window (closed loop, ``inflight``),
timeouts and SIP timer E/F style retransmissions run inside :meth:`Engine.run`,
which returns to Python every slice so it can draw progress and answer
digest challenges.

The "echo" responder used for throughput figures is in ``load._echo_c``.

Per packet nothing here creates a Python object, except the copy of a
401/407 reply that is handed to Python to answer.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from posix.time cimport timespec

from load._common cimport (BATCH, FL_CBUF_SIZE, MSG_DONTWAIT, MSG_MAX, MSG_NOSIGNAL, POLLERR,
                           POLLHUP, POLLIN, POLLOUT, fl_set_pktinfo, iovec, mmsghdr, name_is,
                           now_ns, pollfd, ppoll, put_seq, recv, recvmmsg, send, sendmmsg,
                           socklen_t)
from load._scan_c cimport ReplyInfo, frame_length, scan_reply
from load._stats_c cimport NSTATUS, Counters, hist_add
from load._tcp_c cimport (Conn, conn_flush, conn_free, conn_queue, conn_recv, conns_flush,
                          conns_poll_events)
from load._window_c cimport (F_AUTHED, F_MALFORMED, ST_DONE, ST_FREE, ST_OUT, ST_TIMEOUT, Slot,
                             Window, win_due, win_expire, win_find, win_free, win_full, win_init,
                             win_next_timer, win_set_timers, win_slot)

cdef enum:
    MAX_SITES = 4
    KIND_OVERRIDE = 0xFFFF

# transports
cdef enum:
    T_UDP = 0
    T_TCP = 1
    T_RAW = 2


cdef struct Tpl:
    const char *data
    uint32_t length
    uint32_t cid_off
    uint32_t cid_len
    int nsites
    uint32_t sites[MAX_SITES]


cdef struct Entry:         # one message of the batch being built
    uint32_t seq
    uint32_t phone
    uint16_t kind
    uint16_t sock
    uint8_t flags
    uint8_t retrans


# ------------------------------------------------------------ the engine

@cython.final
cdef class Engine(Counters):
    """Sends pre-built requests and matches the replies.

    Build it with the transport, the target address (a ``sockaddr`` as
    bytes, see ``load.netutil``) and the sockets; then give it templates
    with :meth:`set_templates`, the phones with :meth:`set_phones`, the load
    with :meth:`configure`, and call :meth:`run` until it reports done.
    """

    cdef int transport
    cdef int nsock
    cdef int *fds
    cdef int rawfd
    cdef Conn *conns
    cdef pollfd *pfds
    cdef bytes dest
    cdef bint use_pktinfo

    # templates: users * kinds, plus one override per phone
    cdef list _tpl_keep
    cdef Tpl *tpls
    cdef int nkinds
    cdef list _ovr_keep
    cdef Tpl *ovr
    cdef uint32_t users
    cdef uint16_t *phone_sock
    cdef uint32_t *phone_src
    cdef uint8_t *busy
    cdef uint32_t cursor

    # what to send
    cdef uint16_t *pattern
    cdef uint32_t plen
    cdef uint16_t *mal_kinds
    cdef uint32_t nmal
    cdef uint64_t mal_thresh
    cdef int closed_loop
    cdef double rate
    cdef uint32_t inflight
    cdef uint64_t max_new
    cdef int64_t t0
    cdef int64_t send_until
    cdef bint answer_challenges

    # request numbers and the ring of outstanding requests
    cdef Window win
    cdef uint32_t *pending
    cdef uint32_t npending
    cdef public list challenges

    # batch buffers
    cdef Entry ent[BATCH]
    cdef mmsghdr msgs[BATCH]
    cdef iovec iov[BATCH]
    cdef char *sbuf
    cdef char *cbuf
    cdef mmsghdr rmsgs[BATCH]
    cdef iovec riov[BATCH]
    cdef char *rbuf

    def __cinit__(self):
        self.fds = NULL
        self.conns = NULL
        self.pfds = NULL
        self.tpls = NULL
        self.ovr = NULL
        self.phone_sock = NULL
        self.phone_src = NULL
        self.busy = NULL
        self.pattern = NULL
        self.mal_kinds = NULL
        self.pending = NULL
        self.sbuf = NULL
        self.cbuf = NULL
        self.rbuf = NULL

    def __init__(self, str transport, bytes dest, fds, int rawfd=-1, int ring_bits=20,
                 bint pktinfo=True):
        """``transport``: ``"udp"``, ``"tcp"`` or ``"raw"``; ``dest``: the
        target ``sockaddr`` (unused for TCP, whose sockets are connected);
        ``fds``: the UDP sockets (bound) or TCP connections (connected),
        non-blocking; ``rawfd``: the raw socket for ``"raw"``;
        ``ring_bits``: log2 of the most requests that may be outstanding;
        ``pktinfo``: pick each phone's source address with IP_PKTINFO."""
        cdef int i
        if transport == "udp":
            self.transport = T_UDP
        elif transport == "tcp":
            self.transport = T_TCP
        elif transport == "raw":
            self.transport = T_RAW
            if rawfd < 0:
                raise ValueError("raw transport needs a raw socket")
        else:
            raise ValueError(f"unknown transport {transport!r}")
        if not 10 <= ring_bits <= 26:
            raise ValueError("ring_bits must be within 10..26")
        self.dest = dest
        self.rawfd = rawfd
        self.use_pktinfo = pktinfo and self.transport == T_UDP
        self.nsock = len(fds)
        if self.nsock < 1 or self.nsock > 65535:
            raise ValueError("need 1 to 65535 sockets")
        self.fds = <int *>calloc(self.nsock, sizeof(int))
        self.pfds = <pollfd *>calloc(self.nsock, sizeof(pollfd))
        self.conns = <Conn *>calloc(self.nsock, sizeof(Conn))
        self.sbuf = <char *>malloc(BATCH * MSG_MAX)
        self.cbuf = <char *>calloc(BATCH, FL_CBUF_SIZE)
        self.rbuf = <char *>malloc(BATCH * MSG_MAX)
        if (self.fds == NULL or self.pfds == NULL or self.conns == NULL
                or self.sbuf == NULL or self.cbuf == NULL or self.rbuf == NULL
                or win_init(&self.win, ring_bits) < 0):
            raise MemoryError()
        for i in range(self.nsock):
            self.fds[i] = fds[i]
            self.pfds[i].fd = fds[i]
            self.pfds[i].events = POLLIN
        for i in range(BATCH):
            self.riov[i].iov_base = self.rbuf + i * MSG_MAX
            self.riov[i].iov_len = MSG_MAX
        self.challenges = []
        self.plen = 0
        self.users = 0

    def __dealloc__(self):
        cdef int i
        if self.conns != NULL:
            for i in range(self.nsock):
                conn_free(&self.conns[i])
        free(self.fds); free(self.pfds); free(self.conns)
        free(self.tpls); free(self.ovr)
        free(self.phone_sock); free(self.phone_src); free(self.busy)
        free(self.pattern); free(self.mal_kinds)
        free(self.pending)
        win_free(&self.win)
        free(self.sbuf); free(self.cbuf); free(self.rbuf)

    # ---------------------------------------------------------- set-up

    cdef int _fill_tpl(self, Tpl *t, tpl) except -1:
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

    def set_templates(self, list templates, int nkinds):
        """``templates[phone * nkinds + kind]`` = ``(data, sites, (cid_off, cid_len))``.

        ``data`` must stay unchanged; the engine keeps a reference.
        """
        cdef Py_ssize_t i, n = len(templates)
        if nkinds < 1 or n % nkinds:
            raise ValueError("len(templates) must be a multiple of nkinds")
        if self.users and n // nkinds != self.users:
            raise ValueError("templates do not match the number of phones")
        free(self.tpls)
        self.tpls = <Tpl *>calloc(n, sizeof(Tpl))
        if self.tpls == NULL:
            raise MemoryError()
        for i in range(n):
            self._fill_tpl(&self.tpls[i], templates[i])
        self._tpl_keep = templates
        self.nkinds = nkinds

    def set_phones(self, socks, srcs):
        """Per phone: the index of its socket, and its IPv4 source address
        as an integer (host order; 0 = the socket's own address)."""
        cdef Py_ssize_t i, n = len(socks)
        if n != len(srcs) or n < 1:
            raise ValueError("socks and srcs must have the same, non-zero length")
        free(self.phone_sock); free(self.phone_src); free(self.busy); free(self.ovr); free(self.pending)
        self.phone_sock = <uint16_t *>calloc(n, sizeof(uint16_t))
        self.phone_src = <uint32_t *>calloc(n, sizeof(uint32_t))
        self.busy = <uint8_t *>calloc(n, 1)
        self.ovr = <Tpl *>calloc(n, sizeof(Tpl))
        self.pending = <uint32_t *>calloc(n, sizeof(uint32_t))
        if (self.phone_sock == NULL or self.phone_src == NULL or self.busy == NULL
                or self.ovr == NULL or self.pending == NULL):
            raise MemoryError()
        for i in range(n):
            if not 0 <= socks[i] < self.nsock:
                raise ValueError("phone socket index out of range")
            self.phone_sock[i] = socks[i]
            a = srcs[i]
            # network byte order for in_pktinfo
            self.phone_src[i] = (((a >> 24) & 0xff) | ((a >> 8) & 0xff00)
                                 | ((a << 8) & 0xff0000) | ((a & 0xff) << 24))
        self.users = n
        self._ovr_keep = [None] * n
        self.npending = 0
        self.cursor = 0

    def configure(self, *, pattern, malformed_kinds=(), double malformed_ratio=0.0,
                  bint closed_loop=False, double rate=0.0, int inflight=0,
                  max_new=None, double duration=0.0, double timeout=2.0,
                  double t1=0.0, double t2=4.0, bint answer_challenges=False):
        """Set the load for the next phase and start its clock.

        ``pattern``: kinds of the new requests, cycled; ``malformed_kinds``:
        kinds used for a share ``malformed_ratio`` of them; closed loop keeps
        ``inflight`` requests outstanding, open loop sends ``rate`` per
        second; the phase sends at most ``max_new`` requests for at most
        ``duration`` seconds (0: no time bound; one of the two must be set);
        ``timeout``: seconds until a request is given up; ``t1`` > 0 turns on
        retransmissions at t1, 2*t1, 4*t1 ... capped at ``t2`` apart (RFC
        3261 timer E); ``answer_challenges``: hand 401/407 replies to Python.
        """
        cdef int k
        cdef uint32_t u
        if len(pattern) < 1:
            raise ValueError("empty pattern")
        if max_new is None and duration <= 0:
            raise ValueError("a phase needs a count or a duration")
        if closed_loop and inflight < 1:
            raise ValueError("closed loop needs inflight >= 1")
        if not closed_loop and rate <= 0:
            raise ValueError("open loop needs rate > 0")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if t1 > 0 and self.transport == T_TCP:
            raise ValueError("no retransmissions over TCP")
        for k in list(pattern) + list(malformed_kinds):
            if not 0 <= k < self.nkinds:
                raise ValueError("kind out of range")
        free(self.pattern); free(self.mal_kinds)
        self.plen = len(pattern)
        self.pattern = <uint16_t *>malloc(self.plen * sizeof(uint16_t))
        self.nmal = len(malformed_kinds)
        self.mal_kinds = <uint16_t *>malloc((self.nmal + 1) * sizeof(uint16_t))
        for u in range(self.plen):
            self.pattern[u] = pattern[u]
        for u in range(self.nmal):
            self.mal_kinds[u] = malformed_kinds[u]
        self.mal_thresh = <uint64_t>(malformed_ratio * 4294967296.0) if self.nmal else 0
        self.closed_loop = closed_loop
        self.rate = rate
        self.inflight = inflight
        self.max_new = 0xFFFFFFFFFFFFFFFF if max_new is None else max_new
        self.answer_challenges = answer_challenges
        win_set_timers(&self.win, timeout, t1, t2)
        if not closed_loop and duration > 0:
            # open loop: request k is due at k / rate; those due before the end
            # are sent even when the generator runs a little late (the grace
            # below bounds how late), so the count is exactly ceil(rate * duration)
            sched = <uint64_t>(rate * duration)
            if sched < rate * duration:
                sched += 1
            if sched < self.max_new:
                self.max_new = sched
        self.reset_counters()
        self.t0 = now_ns()
        self.send_until = self.t0 + <int64_t>(duration * 1e9) if duration > 0 else 0x7FFFFFFFFFFFFFFF
        if not closed_loop and duration > 0:
            self.send_until += 250000000

    def push_override(self, uint32_t phone, tpl):
        """Send ``tpl`` (``(data, sites, cid)``) as ``phone``'s next request,
        ahead of new load (an answer to a digest challenge)."""
        if phone >= self.users:
            raise ValueError("phone out of range")
        self._fill_tpl(&self.ovr[phone], tpl)
        self._ovr_keep[phone] = tpl
        self.pending[self.npending] = phone
        self.npending += 1

    def release(self, uint32_t phone):
        """Free a phone that Python will not send for (a challenge it cannot answer)."""
        if phone < self.users:
            self.busy[phone] = 0

    def stop_sending(self):
        """End the phase's sending now (Ctrl-C); outstanding requests drain."""
        self.send_until = now_ns()

    # ---------------------------------------------------------- the loop

    def run(self, double slice_s):
        """Send, receive and time for up to ``slice_s`` seconds.

        Returns ``"slice"`` when the slice ended, ``"challenges"`` when
        replies wait in :attr:`challenges` for Python to answer, ``"done"``
        when the phase has sent everything and nothing is outstanding.
        """
        cdef int64_t t, until = now_ns() + <int64_t>(slice_s * 1e9)
        cdef int64_t wait_ns, next_due
        cdef int nready, i, got, rounds
        cdef timespec ts
        cdef bint can_send, progressed
        while True:
            t = now_ns()
            self._expire(t)
            progressed = self._send_some(t)
            t = now_ns()
            can_send = self._may_send_new(t)
            if self.challenges:
                return "challenges"
            if not can_send and self.outstanding == 0 and self.npending == 0:
                self._flush_tcp()
                return "done"
            if t >= until:
                return "slice"
            # how long may we sleep in poll?
            wait_ns = until - t
            if progressed or self.npending:
                wait_ns = 0
            elif can_send:
                if self.closed_loop:
                    if self.outstanding < self.inflight and not win_full(&self.win):
                        wait_ns = 0
                else:
                    next_due = self.t0 + <int64_t>(self.sent_new * 1e9 / self.rate)
                    if next_due - t < wait_ns:
                        wait_ns = next_due - t if next_due > t else 0
            if self.outstanding:
                next_due = win_next_timer(&self.win)
                if next_due - t < wait_ns:
                    wait_ns = next_due - t if next_due > t else 0
            if wait_ns < 0:
                wait_ns = 0
            if self.transport == T_TCP:
                conns_poll_events(self.conns, self.pfds, self.nsock)
            ts.tv_sec = wait_ns // 1000000000
            ts.tv_nsec = wait_ns % 1000000000
            with nogil:
                nready = ppoll(self.pfds, self.nsock, &ts, NULL)
            if nready < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                raise OSError(errno, "ppoll failed")
            if nready == 0:
                continue
            for i in range(self.nsock):
                if self.pfds[i].revents == 0:
                    continue
                if self.transport == T_TCP:
                    if self.pfds[i].revents & POLLOUT:
                        if conn_flush(&self.conns[i], self.fds[i]):
                            self.conn_closed += 1
                    if self.pfds[i].revents & (POLLIN | POLLERR | POLLHUP):
                        if conn_recv(&self.conns[i], self.fds[i], _on_message, <void *>self,
                                     &self.unparsable):
                            self.conn_closed += 1
                else:
                    rounds = 0
                    while rounds < 8:
                        got = self._recv_udp(self.fds[i])
                        if got < BATCH:
                            break
                        rounds += 1

    cdef bint _may_send_new(self, int64_t t) noexcept nogil:
        return self.sent_new < self.max_new and t < self.send_until

    cdef void _expire(self, int64_t t) noexcept:
        """Time out what is too old; send the retransmissions that are due."""
        cdef Slot *s
        cdef Slot *due[BATCH]
        cdef int i, nb
        while True:
            s = win_expire(&self.win, t)
            if s == NULL:
                break
            self.outstanding -= 1
            self.busy[s.phone] = 0
            if s.flags & F_MALFORMED:
                self.mal_timeouts += 1
            else:
                self.timeouts += 1
                self.iv_timeouts += 1
        while self.win.nlevels:
            nb = win_due(&self.win, t, due, BATCH)
            for i in range(nb):
                s = due[i]
                self.ent[i].seq = s.seq
                self.ent[i].phone = s.phone
                self.ent[i].kind = s.kind
                self.ent[i].sock = self.phone_sock[s.phone]
                self.ent[i].flags = s.flags
                self.ent[i].retrans = 1
            if nb:
                self._transmit(nb)
            if nb < BATCH:
                break

    cdef bint _send_some(self, int64_t t) noexcept:
        """Send pending challenge answers, then the new requests now due."""
        cdef int nb = 0
        cdef int64_t due, lag
        cdef uint32_t phone, tries
        cdef uint64_t seq, h
        cdef uint16_t kind
        cdef uint8_t flags
        cdef bint sent_any = False
        # answers to challenges first: they finish transactions already counted
        while self.npending and not win_full(&self.win):
            self.npending -= 1
            phone = self.pending[self.npending]
            seq = self.win.head
            self.win.head += 1
            self.ent[nb].seq = <uint32_t>seq
            self.ent[nb].phone = phone
            self.ent[nb].kind = KIND_OVERRIDE
            self.ent[nb].sock = self.phone_sock[phone]
            self.ent[nb].flags = F_AUTHED
            self.ent[nb].retrans = 0
            nb += 1
            if nb == BATCH:
                self._transmit(nb)
                nb = 0
                sent_any = True
        if nb:
            self._transmit(nb)
            nb = 0
            sent_any = True
        if not self._may_send_new(t):
            self._flush_tcp()
            return sent_any
        if self.closed_loop:
            due = <int64_t>self.inflight - <int64_t>self.outstanding
        else:
            due = <int64_t>((t - self.t0) * self.rate / 1e9) + 1 - <int64_t>self.sent_new
            if due > 1:
                lag = <int64_t>((due - 1) * 1e9 / self.rate)
                if lag > self.max_lag_ns:
                    self.max_lag_ns = lag
        if due > BATCH * 16:
            due = BATCH * 16
        if <uint64_t>due > self.max_new - self.sent_new:
            due = <int64_t>(self.max_new - self.sent_new)
        while due > 0:
            if nb == BATCH:
                self._transmit(nb)
                nb = 0
                sent_any = True
            if win_full(&self.win):
                self.stalls_ring += 1
                break
            tries = 0
            phone = self.cursor
            while self.busy[phone] and tries < self.users:
                phone += 1
                if phone == self.users:
                    phone = 0
                tries += 1
            if self.busy[phone]:
                self.stalls_busy += 1
                break
            self.cursor = phone + 1 if phone + 1 < self.users else 0
            seq = self.win.head
            self.win.head += 1
            h = (seq * <uint64_t>2654435761) & <uint64_t>0xFFFFFFFF
            flags = 0
            if h < self.mal_thresh:
                kind = self.mal_kinds[seq % self.nmal]
                flags = F_MALFORMED
            else:
                kind = self.pattern[self.sent_new % self.plen]
            self.busy[phone] = 1
            self.ent[nb].seq = <uint32_t>seq
            self.ent[nb].phone = phone
            self.ent[nb].kind = kind
            self.ent[nb].sock = self.phone_sock[phone]
            self.ent[nb].flags = flags
            self.ent[nb].retrans = 0
            self.sent_new += 1
            self.iv_sent += 1
            if flags & F_MALFORMED:
                self.mal_sent += 1
            nb += 1
            due -= 1
        if nb:
            self._transmit(nb)
            sent_any = True
        self._flush_tcp()
        return sent_any

    cdef inline Tpl *_tpl(self, uint32_t phone, uint16_t kind) noexcept nogil:
        if kind == KIND_OVERRIDE:
            return &self.ovr[phone]
        return &self.tpls[phone * self.nkinds + kind]

    cdef void _transmit(self, int nb) noexcept:
        """Build the ``nb`` entries of the batch, send them, record the slots."""
        cdef int i, j, start, run, sent, k
        cdef Entry tmp
        cdef Tpl *tp
        cdef char *buf
        cdef char digits[10]
        cdef int64_t t
        cdef Slot *s
        cdef const char *dst = PyBytes_AS_STRING(self.dest)
        cdef socklen_t dlen = <socklen_t>PyBytes_GET_SIZE(self.dest)
        cdef int fd
        # group by socket (insertion sort: the batch is nearly sorted already)
        for i in range(1, nb):
            tmp = self.ent[i]
            j = i - 1
            while j >= 0 and self.ent[j].sock > tmp.sock:
                self.ent[j + 1] = self.ent[j]
                j -= 1
            self.ent[j + 1] = tmp
        for i in range(nb):
            tp = self._tpl(self.ent[i].phone, self.ent[i].kind)
            buf = self.sbuf + i * MSG_MAX
            memcpy(buf, tp.data, tp.length)
            put_seq(digits, self.ent[i].seq)
            for k in range(tp.nsites):
                memcpy(buf + tp.sites[k], digits, 10)
            self.iov[i].iov_base = buf
            self.iov[i].iov_len = tp.length
            memset(&self.msgs[i], 0, sizeof(mmsghdr))
            self.msgs[i].msg_hdr.msg_iov = &self.iov[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
            if self.transport != T_TCP:
                self.msgs[i].msg_hdr.msg_name = <void *>dst
                self.msgs[i].msg_hdr.msg_namelen = dlen
            if self.use_pktinfo and self.phone_src[self.ent[i].phone]:
                fl_set_pktinfo(&self.msgs[i].msg_hdr, self.cbuf + i * FL_CBUF_SIZE,
                               self.phone_src[self.ent[i].phone])
        t = now_ns()
        start = 0
        while start < nb:
            run = 1
            while start + run < nb and self.ent[start + run].sock == self.ent[start].sock:
                run += 1
            if self.transport == T_TCP:
                sent = conn_queue(&self.conns[self.ent[start].sock], &self.iov[start], run)
            else:
                fd = self.rawfd if self.transport == T_RAW else self.fds[self.ent[start].sock]
                sent = sendmmsg(fd, &self.msgs[start], run, MSG_DONTWAIT)
                if sent < 0:
                    sent = 0
            for i in range(start, start + run):
                s = win_slot(&self.win, self.ent[i].seq)
                if self.ent[i].retrans:
                    if i - start < sent:
                        self.retransmissions += 1
                        self.sent_total += 1
                    continue
                if i - start < sent:
                    s.t_send = t
                    s.seq = self.ent[i].seq
                    s.phone = self.ent[i].phone
                    s.kind = self.ent[i].kind
                    s.state = ST_OUT
                    s.flags = self.ent[i].flags
                    self.outstanding += 1
                    self.sent_total += 1
                else:
                    s.state = ST_FREE
                    s.seq = self.ent[i].seq
                    self.busy[self.ent[i].phone] = 0
                    self.send_errors += 1
            start += run
        if self.first_send_ns == 0:
            self.first_send_ns = t
        self.last_send_ns = t

    # ---------------------------------------------------------- receive

    cdef int _recv_udp(self, int fd) noexcept:
        cdef int i, n
        cdef int64_t t
        for i in range(BATCH):
            self.rmsgs[i].msg_hdr.msg_name = NULL
            self.rmsgs[i].msg_hdr.msg_namelen = 0
            self.rmsgs[i].msg_hdr.msg_iov = &self.riov[i]
            self.rmsgs[i].msg_hdr.msg_iovlen = 1
            self.rmsgs[i].msg_hdr.msg_control = NULL
            self.rmsgs[i].msg_hdr.msg_controllen = 0
            self.rmsgs[i].msg_hdr.msg_flags = 0
        n = recvmmsg(fd, self.rmsgs, BATCH, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        t = now_ns()
        for i in range(n):
            self._on_reply(self.rbuf + i * MSG_MAX, self.rmsgs[i].msg_len, t)
        return n

    cdef void _on_reply(self, const char *p, Py_ssize_t n, int64_t t) noexcept:
        """Match one reply to its request and account for it."""
        cdef ReplyInfo ri
        cdef int rc, k
        cdef uint64_t seq, lat
        cdef Slot *s
        cdef Tpl *tp
        cdef char expect[512]
        cdef char digits[10]
        cdef uint32_t off
        rc = scan_reply(p, n, &ri)
        if rc == -1:
            self.not_response += 1
            return
        if rc < 0:
            self.unparsable += 1
            return
        seq = ri.cseq
        s = win_find(&self.win, seq)
        if s == NULL:
            self.stale += 1
            return
        # the Call-ID must be the one of that request
        tp = self._tpl(s.phone, s.kind)
        if <uint32_t>ri.cid_len != tp.cid_len:
            self.mismatched += 1
            return
        memcpy(expect, tp.data + tp.cid_off, tp.cid_len)
        put_seq(digits, <uint32_t>seq)
        for k in range(tp.nsites):
            off = tp.sites[k]
            if off >= tp.cid_off and off + 10 <= tp.cid_off + tp.cid_len:
                memcpy(expect + (off - tp.cid_off), digits, 10)
        if memcmp(expect, ri.cid, tp.cid_len) != 0:
            self.mismatched += 1
            return
        if ri.status < 200:
            if ri.status >= 100:
                self.status[ri.status] += 1
            self.provisional += 1
            return
        if ri.status >= NSTATUS:
            ri.status = 0
        if s.state == ST_DONE:
            self.duplicates += 1
            return
        if s.state == ST_TIMEOUT:
            self.late += 1
            return
        # first final reply
        s.state = ST_DONE
        self.outstanding -= 1
        self.last_final_ns = t
        if s.flags & F_MALFORMED:
            self.mal_status[ri.status] += 1
            self.mal_finals += 1
            self.busy[s.phone] = 0
            return
        lat = <uint64_t>(t - s.t_send) if t > s.t_send else 0
        hist_add(self.hist_total, lat)
        hist_add(self.hist_ival, lat)
        self.status[ri.status] += 1
        self.finals += 1
        self.iv_finals += 1
        if 200 <= ri.status < 300:
            self.ok += 1
            self.iv_ok += 1
        if ((ri.status == 401 or ri.status == 407) and self.answer_challenges
                and not (s.flags & F_AUTHED)):
            self.challenged += 1
            self.challenges.append((s.phone, s.kind, PyBytes_FromStringAndSize(p, n)))
            return          # the phone stays busy until its answer is final
        self.busy[s.phone] = 0

    cdef void _flush_tcp(self) noexcept:
        if self.transport == T_TCP:
            self.conn_closed += conns_flush(self.conns, self.fds, self.nsock)


cdef void _on_message(void *engine, const char *p, Py_ssize_t n, int64_t t) noexcept:
    """A message from a TCP connection (conn_recv's callback)."""
    (<Engine>engine)._on_reply(p, n, t)
