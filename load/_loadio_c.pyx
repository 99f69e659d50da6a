# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""The hot loop of the load tool: batched send, receive, match, time.

:class:`Engine` holds pre-built requests (templates), patches a ten-digit
request number into them, sends them in batches (``sendmmsg`` over UDP, a
raw socket, or ``send`` over stream connections: TCP, TLS, WebSocket over
TCP or TLS), receives replies in batches (``recvmmsg``/``recv``), matches every reply by CSeq number and Call-ID to
the send time of its request, and keeps counters and latency histograms.
Pacing (open loop, ``rate``) or a window (closed loop, ``inflight``),
timeouts and SIP timer E/F style retransmissions run inside :meth:`Engine.run`,
which returns to Python every slice so it can draw progress and answer
digest challenges.

The engine ties together its parts, one module each (C structs and
functions, declared in their ``.pxd``):

``load._send_c``     templates, phones, the schedule, the send batch
``load._window_c``   the ring of outstanding requests, timeouts, retransmissions
``load._tcp_c``      stream connections (output queue, input framing)
``load._ws_c``       WebSocket frames (RFC 6455/7118), which ``load._tcp_c`` uses
``load._scan_c``     the receive batch, the reply scanner, the TCP framer
``load._stats_c``    :class:`Counters` (which :class:`Engine` is) and the histogram

The "echo" responder used for throughput figures is in ``load._echo_c``.

Per packet nothing here creates a Python object, except the copy of a
401/407 reply that is handed to Python to answer.

Several targets (a cluster): every phone holds the target of its next
request (the same one always, or the next one after each request: round
robin), set up once by :meth:`Engine.set_phones`; a request carries its
target's index through the batch (its address, or its connection to that
target) and the window (its retransmissions, its reply's and its timeout's
count per target).  Per request that is one load and one store, nothing
is hashed.

TLS is Python's ``ssl`` with memory BIOs (``SSLObject``), driven from here
once per batch, not per message: the requests queued on a connection in one
pass of the loop are encrypted with one ``write`` and sent with one
``send``; what one ``recv`` brings (up to 256 KiB) goes into the BIO with
one ``write`` and comes out with one ``read`` per TLS record.  (An
``SSLSocket`` reads a record's header and its body with two system calls
of their own: 3.8 us per 400-byte record against 1.2 us here.)
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from posix.time cimport timespec

from load._common cimport (BATCH, MSG_DONTWAIT, MSG_MAX, POLLERR, POLLHUP, POLLIN, POLLOUT,
                           now_ns, pollfd, ppoll, recv, sendmmsg, socklen_t)
from load._scan_c cimport (RecvBatch, ReplyInfo, rbatch_free, rbatch_init, rbatch_recv,
                           scan_reply)
from load._send_c cimport (ACK_AUTHED, KIND_OVERRIDE, Ack, Batch, Entry, Phones, Schedule,
                           Templates, batch_build, batch_free, batch_init, batch_run,
                           callid_matches, entry_set, phone_ok, phone_target, phones_set,
                           phones_take, phones_track_acks, sched_due, sched_kind, sched_next,
                           sched_open, sched_set, sched_start, send_free, templates_set, tpl_fill,
                           tpl_of)
from load._stats_c cimport MAX_TARGETS, NSTATUS, Counters, hist_add
from load._tcp_c cimport (TCP_IN_CAP, Conn, buf_append, buf_reserve, conn_deliver, conn_flush,
                          conn_free, conn_queue, conn_recv, conns_flush, conns_poll_events)
from load._window_c cimport (F_AUTHED, F_MALFORMED, ST_DONE, ST_TIMEOUT, Slot,
                             Window, win_due, win_expire, win_find, win_free, win_full, win_init,
                             win_next_timer, win_sent, win_set_timers, win_unsent)

import ssl

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    enum:
        PyBUF_READ
        PyBUF_WRITE

# transports
cdef enum:
    T_UDP = 0
    T_TCP = 1
    T_RAW = 2
    T_TLS = 3
    T_WS = 4
    T_WSS = 5

cdef enum:
    TLS_RBUF = 1 << 18    # ciphertext read from a TLS connection at once

_STREAMS = {"tcp": T_TCP, "tls": T_TLS, "ws": T_WS, "wss": T_WSS}


@cython.final
cdef class Engine(Counters):
    """Sends pre-built requests and matches the replies.

    Build it with the transport, the target address (a ``sockaddr`` as
    bytes, see ``load.netutil``) and the sockets; then give it templates
    with :meth:`set_templates`, the phones with :meth:`set_phones`, the load
    with :meth:`configure`, and call :meth:`run` until it reports done.
    """

    # sockets (the memory of a new object is zeroed: every pointer starts NULL)
    cdef int transport
    cdef bint stream
    cdef int nsock
    cdef int *fds
    cdef int rawfd
    cdef Conn *conns
    cdef pollfd *pfds
    cdef bytes dest           # the targets' sockaddrs, dlen bytes each
    cdef socklen_t dlen
    cdef int per_target       # streams: connections per target; UDP: every socket serves all
    cdef bint use_pktinfo

    # what to send and to whom (the lists keep the templates' bytes alive)
    cdef Templates tpl
    cdef list _tpl_keep
    cdef list _ovr_keep
    cdef Phones ph
    cdef Schedule sch
    cdef Batch out

    # the outstanding requests; the replies Python has to answer
    cdef Window win
    cdef bint answer_challenges
    cdef public list challenges

    # the receive batch (UDP)
    cdef RecvBatch inb

    # TLS: per connection (SSLObject, incoming MemoryBIO, outgoing MemoryBIO);
    # the ciphertext one recv brings
    cdef list _tls
    cdef char *rbuf

    def __init__(self, str transport, dest, fds, int rawfd=-1, int ring_bits=20,
                 bint pktinfo=True):
        """``transport``: ``"udp"``, ``"tcp"``, ``"raw"``, ``"tls"``, ``"ws"``
        or ``"wss"``; ``dest``: the target ``sockaddr`` (bytes), or a list
        of them, one per target, all of one family (the stream transports,
        whose sockets are connected, use only their number); ``fds``: the UDP
        sockets (bound; each sends to every target) or stream connections
        (connected, past their TLS and WebSocket handshakes: see
        :meth:`set_tls`; with several targets, as many to each, target
        ``t``'s from index ``t * len(fds) / targets`` on), non-blocking;
        ``rawfd``: the raw socket for ``"raw"``;
        ``ring_bits``: log2 of the most requests that may be outstanding;
        ``pktinfo``: pick each phone's source address with IP_PKTINFO."""
        cdef int i
        dests = [dest] if isinstance(dest, bytes) else list(dest)
        if not 1 <= len(dests) <= MAX_TARGETS:
            raise ValueError(f"need 1 to {MAX_TARGETS} targets")
        if any(not isinstance(d, bytes) or len(d) != len(dests[0]) or not d for d in dests):
            raise ValueError("the targets' sockaddrs must be bytes of one family")
        if transport == "udp":
            self.transport = T_UDP
        elif transport in _STREAMS:
            self.transport = _STREAMS[transport]
            self.stream = True
        elif transport == "raw":
            self.transport = T_RAW
            if rawfd < 0:
                raise ValueError("raw transport needs a raw socket")
        else:
            raise ValueError(f"unknown transport {transport!r}")
        if not 10 <= ring_bits <= 26:
            raise ValueError("ring_bits must be within 10..26")
        self.dest = b"".join(dests)
        self.dlen = <socklen_t>len(dests[0])
        self.ntargets = len(dests)
        self.rawfd = rawfd
        self.use_pktinfo = pktinfo and self.transport == T_UDP
        self.nsock = len(fds)
        if self.nsock < 1 or self.nsock > 65535:
            raise ValueError("need 1 to 65535 sockets")
        self.per_target = self.nsock
        if self.stream:
            if self.nsock % self.ntargets:
                raise ValueError("as many connections to every target")
            self.per_target = self.nsock // self.ntargets
        self.fds = <int *>calloc(self.nsock, sizeof(int))
        self.pfds = <pollfd *>calloc(self.nsock, sizeof(pollfd))
        self.conns = <Conn *>calloc(self.nsock, sizeof(Conn))
        if (self.fds == NULL or self.pfds == NULL or self.conns == NULL
                or rbatch_init(&self.inb) < 0 or win_init(&self.win, ring_bits) < 0
                or batch_init(&self.out) < 0):
            raise MemoryError()
        for i in range(self.nsock):
            self.fds[i] = fds[i]
            self.pfds[i].fd = fds[i]
            self.pfds[i].events = POLLIN
            self.conns[i].ws = self.transport == T_WS or self.transport == T_WSS
            self.conns[i].tls = self.transport == T_TLS or self.transport == T_WSS
            self.conns[i].mask = <uint32_t>2654435761 * <uint32_t>(i + 1)
        if self.transport == T_TLS or self.transport == T_WSS:
            self.rbuf = <char *>malloc(TLS_RBUF)
            if self.rbuf == NULL:
                raise MemoryError()
        self.challenges = []

    def __dealloc__(self):
        cdef int i
        if self.conns != NULL:
            for i in range(self.nsock):
                conn_free(&self.conns[i])
        free(self.fds); free(self.pfds); free(self.conns); free(self.rbuf)
        rbatch_free(&self.inb)
        send_free(&self.tpl, &self.ph, &self.sch)
        batch_free(&self.out)
        win_free(&self.win)

    # ---------------------------------------------------------- set-up

    def set_templates(self, list templates, int nkinds):
        """``templates[phone * nkinds + kind]`` = ``(data, sites, (cid_off, cid_len))``.

        ``data`` must stay unchanged; the engine keeps a reference.
        """
        cdef Py_ssize_t n = len(templates)
        if nkinds < 1 or n % nkinds:
            raise ValueError("len(templates) must be a multiple of nkinds")
        if self.ph.n and n // nkinds != self.ph.n:
            raise ValueError("templates do not match the number of phones")
        templates_set(&self.tpl, templates, nkinds)
        self._tpl_keep = templates

    def set_tls(self, list objs):
        """The TLS state of every connection, in order: ``(SSLObject,
        incoming MemoryBIO, outgoing MemoryBIO, plaintext)``, the handshake
        done; ``plaintext``: bytes already decrypted and not yet framed
        (what followed the WebSocket handshake's answer)."""
        cdef int i
        if self.transport != T_TLS and self.transport != T_WSS:
            raise ValueError("TLS state for a transport without TLS")
        if len(objs) != self.nsock:
            raise ValueError("one TLS state per connection")
        self._tls = []
        for i in range(self.nsock):
            sslobj, inbio, outbio, plain = objs[i]
            # the C object under ssl.SSLObject: the same read/write without a Python frame
            # per call (one per TLS record received)
            self._tls.append((getattr(sslobj, "_sslobj", sslobj), inbio, outbio))
            if plain and buf_append(&self.conns[i].inb, plain, len(plain)) < 0:
                raise MemoryError()

    def ws_pings(self):
        """WebSocket pings answered, over every connection."""
        cdef int i
        cdef uint64_t n = 0
        for i in range(self.nsock):
            n += self.conns[i].pings
        return n

    def set_phones(self, socks, srcs, targets=None, bint rotate=False):
        """Per phone: the index of its socket (streams: of its connection to
        the first target), its IPv4 source address as an integer (host
        order; 0 = the socket's own address) and the target of its first
        request (``targets``; None: the first).  ``rotate``: round robin,
        each request of a phone goes to the target after its previous one's;
        else all of a phone's requests go to its target."""
        cdef Py_ssize_t n = len(socks)
        if n != len(srcs) or n < 1 or (targets is not None and len(targets) != n):
            raise ValueError("socks, srcs (and targets) must have the same, non-zero length")
        phones_set(&self.ph, &self.tpl, socks, srcs, targets, self.per_target, self.ntargets,
                   rotate, self.per_target if self.stream else 0)
        self._ovr_keep = [None] * n

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
        if t1 > 0 and self.stream:
            raise ValueError("no retransmissions over a stream transport")
        if (self.transport == T_TLS or self.transport == T_WSS) and self._tls is None:
            raise ValueError("set_tls() first")
        for k in list(pattern) + list(malformed_kinds):
            if not 0 <= k < self.tpl.nkinds:
                raise ValueError("kind out of range")
        sched_set(&self.sch, pattern, malformed_kinds, malformed_ratio, closed_loop, rate,
                  inflight, max_new, duration)
        win_set_timers(&self.win, timeout, t1, t2)
        self.answer_challenges = answer_challenges
        self.reset_counters()
        sched_start(&self.sch, duration)

    def push_override(self, uint32_t phone, tpl, int kind=-1, uint32_t challenged=0):
        """Send ``tpl`` (``(data, sites, cid)``) as ``phone``'s next request,
        ahead of new load (an answer to a digest challenge: ``kind`` and
        ``challenged``, the kind and request number of the challenged request,
        which :meth:`acked` reports for it)."""
        if phone >= self.ph.n:
            raise ValueError("phone out of range")
        tpl_fill(&self.tpl.ovr[phone], tpl)
        if self.ph.ack != NULL:
            self.ph.ack[phone].ovr_kind = <uint16_t>kind if 0 <= kind < ACK_AUTHED else 0
            self.ph.ack[phone].ovr_seq = challenged
        self._ovr_keep[phone] = tpl
        self.ph.pending[self.ph.npending] = phone
        self.ph.npending += 1

    def track_acks(self):
        """From now on keep, per phone, its last request answered 2xx (see
        :meth:`acked`), across phases; :meth:`set_phones` drops what was kept."""
        if self.ph.n == 0:
            raise ValueError("set_phones() first")
        if phones_track_acks(&self.ph) < 0:
            raise MemoryError()

    def acked(self):
        """Per phone whose request got a 2xx (:meth:`track_acks`), in phone order:
        ``(phone, seq, kind, cid_seq, authed, target, later)``: its last such
        request's number (its CSeq number) and kind, the request number its
        Call-ID was built with (``seq``; for an answer to a digest challenge,
        ``authed`` true, the challenged request's, and ``kind`` is that one's),
        the index of the target that answered, and how many of the phone's
        requests after it got no 2xx (a non-2xx final or no answer in time):
        0 when it was the phone's last request."""
        cdef uint32_t i
        cdef Ack *a
        out = []
        if self.ph.ack == NULL:
            return out
        for i in range(self.ph.n):
            a = &self.ph.ack[i]
            if a.seq:
                out.append((i, a.seq, a.kind & ~ACK_AUTHED, a.cid, bool(a.kind & ACK_AUTHED),
                            a.tgt, a.later))
        return out

    def release(self, uint32_t phone):
        """Free a phone that Python will not send for (a challenge it cannot answer)."""
        if phone < self.ph.n:
            self.ph.busy[phone] = 0

    def stop_sending(self):
        """End the phase's sending now (Ctrl-C); outstanding requests drain."""
        self.sch.send_until = now_ns()

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
            can_send = sched_open(&self.sch, t, self.sent_new)
            if self.challenges:
                return "challenges"
            if not can_send and self.outstanding == 0 and self.ph.npending == 0:
                self._flush_streams()
                return "done"
            if t >= until:
                return "slice"
            # how long may we sleep in poll?
            wait_ns = until - t
            if progressed or self.ph.npending:
                wait_ns = 0
            elif can_send:
                next_due = sched_next(&self.sch, t, self.sent_new, self.outstanding,
                                      win_full(&self.win))
                if next_due - t < wait_ns:
                    wait_ns = next_due - t if next_due > t else 0
            if self.outstanding:
                next_due = win_next_timer(&self.win)
                if next_due - t < wait_ns:
                    wait_ns = next_due - t if next_due > t else 0
            if wait_ns < 0:
                wait_ns = 0
            if self.stream:
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
                if self.stream:
                    if self.pfds[i].revents & POLLOUT:
                        if conn_flush(&self.conns[i], self.fds[i]):
                            self.conn_closed += 1
                    if self.pfds[i].revents & (POLLIN | POLLERR | POLLHUP):
                        if self.conns[i].tls:
                            if self._recv_tls(i):
                                self.conn_closed += 1
                        elif conn_recv(&self.conns[i], self.fds[i], _on_message, <void *>self,
                                       &self.unparsable):
                            self.conn_closed += 1
                else:
                    rounds = 0
                    while rounds < 8:
                        got = self._recv_udp(self.fds[i])
                        if got < BATCH:
                            break
                        rounds += 1

    cdef int _flush_streams(self) except -1:
        """Encrypt what TLS connections have queued; write every connection's output."""
        cdef int i
        if not self.stream:
            return 0
        if self._tls is not None:
            for i in range(self.nsock):
                if self.conns[i].plain.len and not self.conns[i].closed:
                    self._seal(i)
        self.conn_closed += conns_flush(self.conns, self.fds, self.nsock)
        return 0

    cdef int _seal(self, int i) except -1:
        """Encrypt connection ``i``'s queued plaintext into its output (one
        ``SSLObject.write``: TLS records of up to 16 KiB)."""
        cdef Conn *c = &self.conns[i]
        cdef bytes data
        sslobj, _, outbio = self._tls[i]
        try:
            sslobj.write(PyMemoryView_FromMemory(c.plain.p, c.plain.len, PyBUF_READ))
        except ssl.SSLError:
            c.closed = 1
            self.conn_closed += 1
            return 0
        c.plain.len = 0
        data = outbio.read()
        if buf_append(&c.out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) < 0:
            raise MemoryError()
        return 0

    cdef bint _recv_tls(self, int i) except -1:
        """Read what TLS connection ``i`` has (a few rounds), decrypt it and
        deliver every complete message; True when the peer closed it."""
        cdef Conn *c = &self.conns[i]
        cdef ssize_t r
        cdef Py_ssize_t room, n
        cdef int64_t t
        cdef int rounds = 0
        sslobj, inbio, _ = self._tls[i]
        if buf_reserve(&c.inb, TCP_IN_CAP - c.inb.len) < 0:
            raise MemoryError()
        while rounds < 8 and not c.closed:
            rounds += 1
            with nogil:
                r = recv(self.fds[i], self.rbuf, TLS_RBUF, MSG_DONTWAIT)
            if r <= 0:
                if r < 0 and (errno == EAGAIN or errno == EINTR):
                    return False
                c.closed = 1
                return True
            t = now_ns()
            inbio.write(PyMemoryView_FromMemory(self.rbuf, r, PyBUF_READ))
            while inbio.pending:        # one read per TLS record, until the BIO runs dry
                room = TCP_IN_CAP - <Py_ssize_t>c.inb.len
                if room <= 0:           # one message larger than the buffer
                    self.unparsable += 1
                    c.inb.len = 0
                    room = TCP_IN_CAP
                try:
                    n = sslobj.read(room, PyMemoryView_FromMemory(c.inb.p + c.inb.len, room,
                                                                  PyBUF_WRITE))
                except ssl.SSLWantReadError:
                    break               # the rest of a record is still on its way
                except ssl.SSLError:
                    c.closed = 1
                    return True
                if n == 0:              # close_notify
                    c.closed = 1
                    return True
                c.inb.len += n
            if conn_deliver(c, t, _on_message, <void *>self, &self.unparsable):
                return True
            if r < TLS_RBUF:            # drained for now: ppoll says when there is more
                break
        return False

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
            self.ph.busy[s.phone] = 0
            if s.flags & F_MALFORMED:
                self.mal_timeouts += 1
            else:
                self.timeouts += 1
                self.iv_timeouts += 1
                self.tgt_timeouts[s.tgt] += 1
                if self.ph.ack != NULL:
                    self.ph.ack[s.phone].later += 1
        while self.win.nlevels:
            nb = win_due(&self.win, t, due, BATCH)
            for i in range(nb):
                s = due[i]
                entry_set(&self.out.ent[i], s.seq, s.phone, s.kind, &self.ph, s.tgt, s.flags, 1)
            if nb:
                self._transmit(nb)
            if nb < BATCH:
                break

    cdef int _send_some(self, int64_t t) except -1:
        """Send pending challenge answers, then the new requests now due."""
        cdef int nb = 0
        cdef int64_t due, phone
        cdef uint32_t one
        cdef uint64_t seq
        cdef uint16_t kind
        cdef uint8_t flags
        cdef bint sent_any = False
        # answers to challenges first: they finish transactions already counted
        while self.ph.npending and not win_full(&self.win):
            self.ph.npending -= 1
            one = self.ph.pending[self.ph.npending]
            entry_set(&self.out.ent[nb], self.win.head, one, KIND_OVERRIDE, &self.ph,
                      phone_target(&self.ph, one), F_AUTHED, 0)
            self.win.head += 1
            nb += 1
            if nb == BATCH:
                self._transmit(nb)
                nb = 0
                sent_any = True
        if nb:
            self._transmit(nb)
            nb = 0
            sent_any = True
        if not sched_open(&self.sch, t, self.sent_new):
            self._flush_streams()
            return sent_any
        due = sched_due(&self.sch, t, self.sent_new, self.outstanding, &self.max_lag_ns)
        while due > 0:
            if nb == BATCH:
                self._transmit(nb)
                nb = 0
                sent_any = True
            if win_full(&self.win):
                self.stalls_ring += 1
                break
            phone = phones_take(&self.ph)
            if phone < 0:
                self.stalls_busy += 1
                break
            seq = self.win.head
            self.win.head += 1
            kind = sched_kind(&self.sch, seq, self.sent_new, &flags)
            entry_set(&self.out.ent[nb], seq, <uint32_t>phone, kind, &self.ph,
                      phone_target(&self.ph, <uint32_t>phone), flags, 0)
            self.sent_new += 1
            self.iv_sent += 1
            if flags & F_MALFORMED:
                self.mal_sent += 1
            nb += 1
            due -= 1
        if nb:
            self._transmit(nb)
            sent_any = True
        self._flush_streams()
        return sent_any

    cdef void _transmit(self, int nb) noexcept:
        """Build the ``nb`` entries of the batch, send them, record the slots."""
        cdef int i, start, run, sent, fd
        cdef int64_t t
        cdef Entry *e
        batch_build(&self.out, nb, &self.tpl,
                    NULL if self.stream else PyBytes_AS_STRING(self.dest), self.dlen,
                    self.ph.src if self.use_pktinfo else NULL)
        t = now_ns()
        start = 0
        while start < nb:
            run = batch_run(&self.out, start, nb)
            if self.stream:
                sent = conn_queue(&self.conns[self.out.ent[start].sock], &self.out.iov[start], run)
            else:
                fd = self.rawfd if self.transport == T_RAW else self.fds[self.out.ent[start].sock]
                sent = sendmmsg(fd, &self.out.msgs[start], run, MSG_DONTWAIT)
                if sent < 0:
                    sent = 0
            for i in range(start, start + run):
                e = &self.out.ent[i]
                if e.retrans:
                    if i - start < sent:
                        self.retransmissions += 1
                        self.sent_total += 1
                    continue
                if i - start < sent:
                    win_sent(&self.win, e.seq, e.phone, e.kind, e.tgt, e.flags, t)
                    self.outstanding += 1
                    self.sent_total += 1
                    self.tgt_sent[e.tgt] += 1
                else:
                    win_unsent(&self.win, e.seq)
                    self.ph.busy[e.phone] = 0
                    self.send_errors += 1
            start += run
        if self.first_send_ns == 0:
            self.first_send_ns = t
        self.last_send_ns = t

    # ---------------------------------------------------------- receive

    cdef int _recv_udp(self, int fd) noexcept:
        """One batch of replies from ``fd``, each matched; how many."""
        cdef int i, n = rbatch_recv(&self.inb, fd)
        cdef int64_t t
        if n == 0:
            return 0
        t = now_ns()
        for i in range(n):
            self._on_reply(self.inb.buf + i * MSG_MAX, self.inb.msgs[i].msg_len, t)
        return n

    cdef void _on_reply(self, const char *p, Py_ssize_t n, int64_t t) noexcept:
        """Match one reply to its request and account for it."""
        cdef ReplyInfo ri
        cdef int rc
        cdef uint64_t lat
        cdef Slot *s
        rc = scan_reply(p, n, &ri)
        if rc == -1:
            self.not_response += 1
            return
        if rc < 0:
            self.unparsable += 1
            return
        s = win_find(&self.win, ri.cseq)
        if s == NULL:
            self.stale += 1
            return
        # the Call-ID must be the one of that request
        if not callid_matches(tpl_of(&self.tpl, s.phone, s.kind), <uint32_t>ri.cseq,
                              ri.cid, ri.cid_len):
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
            self.ph.busy[s.phone] = 0
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
            self.tgt_ok[s.tgt] += 1
            if self.ph.ack != NULL:
                phone_ok(&self.ph, s.phone, s.seq, s.kind, s.tgt)
        else:
            self.tgt_other[s.tgt] += 1
            if ri.status >= 500:
                self.tgt_5xx[s.tgt] += 1
            if self.ph.ack != NULL:
                self.ph.ack[s.phone].later += 1
        if ((ri.status == 401 or ri.status == 407) and self.answer_challenges
                and not (s.flags & F_AUTHED)):
            self.challenged += 1
            self.challenges.append((s.phone, s.kind, PyBytes_FromStringAndSize(p, n)))
            return          # the phone stays busy until its answer is final
        self.ph.busy[s.phone] = 0


cdef void _on_message(void *engine, const char *p, Py_ssize_t n, int64_t t) noexcept:
    """A message from a stream connection (conn_deliver's callback)."""
    (<Engine>engine)._on_reply(p, n, t)
