# Included by _io_c.pyx: the worker's event loop (fastsip/server/loop.py is its Python face).

from cpython.exc cimport PyErr_CheckSignals
from libc.math cimport ceil
from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, nanosleep


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP

cdef extern from "<unistd.h>" nogil:
    int close(int fd)


cdef enum:
    FD_PY = 0               # a descriptor whose handler is Python: handler(events)
    FD_UDP = 1              # a UDP listener, served by serve_udp
    FD_INBOX = 2            # this worker's hand-off inbox, served by serve_inbox
    MAX_EVENTS = 256
    LOOP_BATCHES = 16       # batches read from one socket per readiness event

#: Batches read from one socket per readiness event before the others get their turn.
BATCHES_PER_EVENT = LOOP_BATCHES

EP_IN = EPOLLIN
EP_OUT = EPOLLOUT
EP_ERR = EPOLLHUP | EPOLLERR


cdef inline double _clock(int which) noexcept nogil:
    cdef timespec ts
    clock_gettime(which, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The loop's clock (CLOCK_MONOTONIC, as ``time.monotonic()``)."""
    return _clock(CLOCK_MONOTONIC)


cdef inline bint _udp_ready(epoll_event* evs, int n) noexcept:
    """Did this wake-up bring a UDP listener's datagrams?"""
    cdef int i
    for i in range(n):
        if <int>((evs[i].data.u64 >> 32) & 0xFF) == FD_UDP:
            return True
    return False


cdef class EventLoop:
    """A worker's event loop: one epoll, the UDP listeners and the inbox served in C.

    ``add(fd, handler, mask)`` / ``modify`` / ``remove``: a descriptor served
    by Python (TCP, TLS and WebSocket connections, their listeners, the
    control channel, the signal wake-up): ``handler(events)`` is called with
    the epoll mask when it is ready.  ``add_udp(fd, li)`` and
    ``add_inbox(fd)`` register descriptors served here, after ``serve(...)``
    has given the loop what serving needs: each readiness event reads up to
    ``BATCHES_PER_EVENT`` batches (``BatchIO.serve_udp`` / ``serve_inbox``),
    the clock is read once per batch, the counters and the latency histogram
    are kept in C, hand-offs are sent (``BatchIO.flush``) after the wake-up
    that queued them.

    ``run(tick)`` loops until ``stop()``.  ``tick(active)`` is the Python
    side's timers (state file, TCP sweeps, the report): it is called when the
    time it asked for has come, ``active`` telling whether any descriptor
    was ready since its last call, and returns ``(next, next_if_active)``,
    two ``monotonic()`` times: when to call it again, and how soon once a
    descriptor is ready.  Between those times Python runs only for the
    Python descriptors.

    ``batch_wait`` (seconds, ``--batch-wait``; may change at a SIGHUP): when
    the loop is woken again within two waits of the last wake-up (steady
    traffic), it sleeps that long before reading, so a receive batch collects
    what arrives meanwhile; slower traffic is read at once.  Those sleeps are
    counted in ``batch_waits``.
    """

    cdef int _epfd
    cdef dict _handlers                 # fd -> handler(events), the Python descriptors
    cdef public double batch_wait
    cdef double _last_wake
    cdef bint _stopping
    cdef BatchIO _udp_io, _inbox_io
    cdef object _serve_shard, _bug, _on_handoffs
    cdef RegistrarCore _core            # the core of _serve_shard, called in C (or None)
    cdef WriteQueue _wq                 # --cluster: the shared core's staged writes (or None)
    cdef RateLimiter _limiter
    cdef Histogram _hist
    cdef list _queues, _peer_fds, _udp_fds, _others
    cdef int _shard, _nshards
    cdef Py_ssize_t _max_pending
    cdef readonly unsigned long long received_udp, batches_udp, handoffs_sent
    cdef readonly unsigned long long handoffs_received, batches_inbox, batch_waits
    cdef readonly unsigned long long dropped_handoff_overflow

    def __cinit__(self, *args, **kwargs):
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self._handlers = {}
        self._others = []

    def __dealloc__(self):
        if self._epfd >= 0:
            close(self._epfd)

    def close(self):
        if self._epfd >= 0:
            close(self._epfd)
            self._epfd = -1

    cdef int _ctl(self, int op, int fd, uint32_t mask, uint64_t data) except -1:
        cdef epoll_event ev
        ev.events = mask
        ev.data.u64 = data
        if epoll_ctl(self._epfd, op, fd, &ev) < 0:
            raise OSError(errno, f"epoll_ctl({op}, {fd}) failed")
        return 0

    # -- descriptors ------------------------------------------------------------------

    def add(self, int fd, handler, unsigned int mask=EPOLLIN):
        """Serve ``fd`` in Python: ``handler(events)`` when it is ready."""
        self._ctl(EPOLL_CTL_ADD, fd, mask, <uint64_t><uint32_t>fd)
        self._handlers[fd] = handler

    def modify(self, int fd, unsigned int mask):
        self._ctl(EPOLL_CTL_MOD, fd, mask, <uint64_t><uint32_t>fd)

    def remove(self, int fd):
        """Stop watching ``fd`` (Python or C-served); nothing when it is not watched."""
        cdef epoll_event ev
        self._handlers.pop(fd, None)
        epoll_ctl(self._epfd, EPOLL_CTL_DEL, fd, &ev)

    def add_udp(self, int fd, int li):
        """Serve the UDP listener ``fd`` (listener number ``li``) here."""
        if self._udp_io is None:
            raise RuntimeError("serve() first")
        self._ctl(EPOLL_CTL_ADD, fd, EPOLLIN,
                  <uint64_t><uint32_t>fd | (<uint64_t>FD_UDP << 32) | (<uint64_t>li << 40))

    def add_inbox(self, int fd):
        """Serve this worker's hand-off inbox ``fd`` here."""
        if self._inbox_io is None:
            raise RuntimeError("serve() first")
        self._ctl(EPOLL_CTL_ADD, fd, EPOLLIN, <uint64_t><uint32_t>fd | (<uint64_t>FD_INBOX << 32))

    def serve(self, BatchIO udp_io not None, BatchIO inbox_io not None, serve_shard,
              int shard, int nshards, list queues not None, list peer_fds not None,
              list udp_fds not None, RateLimiter limiter not None, Histogram hist not None,
              bug, on_handoffs, Py_ssize_t max_pending):
        """What the C-served descriptors need.  ``serve_shard``: the core's
        (``RegistrarCore.serve_shard``, then called in C: ``serve_c``) or any
        callable like it (the shared location's); ``queues[j]``: hand-offs for worker j,
        sent to ``peer_fds[j]``, at most ``max_pending`` kept while its inbox is
        full; ``udp_fds[li]``: listener li, where replies to hand-offs leave;
        ``on_handoffs(others, now)``: the hand-offs that are not UDP requests
        (``serve_inbox``'s others), served in Python, returns how many requests
        it served; ``bug(data)``: the core raised."""
        self._udp_io = udp_io
        self._inbox_io = inbox_io
        self._serve_shard = serve_shard
        self._core = _core_of(serve_shard)
        self._shard = shard
        self._nshards = nshards
        self._queues = queues
        self._peer_fds = [-1 if f is None else f for f in peer_fds]
        self._udp_fds = udp_fds
        self._limiter = limiter
        self._hist = hist
        self._bug = bug
        self._on_handoffs = on_handoffs
        self._max_pending = max_pending

    def set_queue(self, WriteQueue queue):
        """``--cluster``: serve the UDP listeners with ``queue.core`` (a shared core)
        in C, one shard, its staged writes queued in ``queue`` (``_writes.pxi``) and
        sent when the batches of one wake-up are served (``WriteQueue.after``);
        None: with ``serve``'s callable."""
        self._wq = queue

    def counters(self):
        """The counters kept here, by their names in ``metrics.WorkerCounters``."""
        return {"received_udp": self.received_udp, "batches_udp": self.batches_udp,
                "handoffs_sent": self.handoffs_sent,
                "handoffs_received": self.handoffs_received,
                "batches_inbox": self.batches_inbox, "batch_waits": self.batch_waits,
                "dropped_handoff_overflow": self.dropped_handoff_overflow}

    # -- serving ----------------------------------------------------------------------

    cdef int _on_udp(self, int fd, int li) except -1:
        cdef int b, got, handed = 0, vlen = self._udp_io.vlen
        cdef double now, t0
        cdef unsigned long long handed_total = 0
        cdef object limiter = self._limiter if self._limiter.rate else None
        cdef WriteQueue wq = self._wq
        cdef RegistrarCore core = self._core if wq is None else wq.core
        cdef int shard = self._shard if wq is None else 0
        cdef int nshards = self._nshards if wq is None else 1
        for b in range(LOOP_BATCHES):
            now = _clock(CLOCK_REALTIME)
            t0 = _clock(CLOCK_MONOTONIC)
            got = self._udp_io._serve_udp(fd, self._serve_shard, core, now, shard, nshards, li,
                                          self._queues, limiter, self._bug, &handed, wq)
            if not got:
                break
            self.received_udp += got
            handed_total += handed
            self.batches_udp += 1
            self._hist._observe(_clock(CLOCK_MONOTONIC) - t0, got - handed)
            if got < vlen:
                break
        if handed_total:
            self.handoffs_sent += handed_total
            self._flush()
        if wq is not None:
            wq.after(li)
        return 0

    cdef int _on_inbox(self, int fd) except -1:
        cdef int b, got, served = 0, vlen = self._inbox_io.vlen
        cdef double now, t0
        cdef list others = self._others
        for b in range(LOOP_BATCHES):
            now = _clock(CLOCK_REALTIME)
            t0 = _clock(CLOCK_MONOTONIC)
            got = self._inbox_io._serve_inbox(fd, self._serve_shard, self._core, now,
                                              self._udp_fds, self._bug, &served, others)
            if not got:
                break
            if others:
                try:
                    served += self._on_handoffs(others, now)
                finally:
                    del others[:]
            self.handoffs_received += served
            self.batches_inbox += 1
            self._hist._observe(_clock(CLOCK_MONOTONIC) - t0, served)
            if got < vlen:
                break
        return 0

    cdef bint _pending(self) noexcept:
        cdef object q
        if self._queues is None:
            return False
        for q in self._queues:
            if q:
                return True
        return False

    cdef int _flush(self) except -1:
        self.dropped_handoff_overflow += self._inbox_io._flush(self._peer_fds, self._queues,
                                                               self._max_pending)
        return 0

    # -- the loop ---------------------------------------------------------------------

    def stop(self):
        """End ``run()`` after the current wake-up."""
        self._stopping = True

    @property
    def stopping(self):
        return self._stopping

    def run(self, tick):
        """Serve until ``stop()``; ``tick(active)`` as the class says.  An exception
        of a Python handler or of ``tick`` ends the loop and propagates."""
        cdef epoll_event evs[MAX_EVENTS]
        cdef int n, i, timeout_ms, kind
        cdef uint64_t u
        cdef double t, wait, next_tick = 0.0, next_if_active = 0.0
        cdef bint active = False
        cdef timespec ts
        cdef object handler
        while not self._stopping:
            if self._pending():
                timeout_ms = 0
            else:
                wait = next_tick - _clock(CLOCK_MONOTONIC)
                timeout_ms = 0 if wait <= 0 else <int>ceil(wait * 1000.0)
            with nogil:
                n = epoll_wait(self._epfd, evs, MAX_EVENTS, timeout_ms)
            if n < 0:
                if errno != EINTR:
                    raise OSError(errno, "epoll_wait failed")
                n = 0
            PyErr_CheckSignals()        # Python's signal handlers (SIGTERM) run here
            if n > 0:
                if not active:
                    active = True
                    if next_if_active < next_tick:
                        next_tick = next_if_active
                wait = self.batch_wait
                if wait > 0 and _udp_ready(evs, n):
                    # Steady traffic (woken again within two waits): let the batch grow.
                    # Slower traffic would pay a second wake-up for nothing.  Only UDP
                    # counts: the replies of Redis (--cluster) to a batch wake the loop
                    # right after it, and are not traffic.
                    t = _clock(CLOCK_MONOTONIC)
                    if t - self._last_wake < 2 * wait:
                        ts.tv_sec = <long>wait
                        ts.tv_nsec = <long>((wait - ts.tv_sec) * 1e9)
                        with nogil:
                            nanosleep(&ts, NULL)
                        self.batch_waits += 1
                    self._last_wake = t
            for i in range(n):
                u = evs[i].data.u64
                kind = <int>((u >> 32) & 0xFF)
                if kind == FD_UDP:
                    self._on_udp(<int><uint32_t>u, <int>(u >> 40))
                elif kind == FD_INBOX:
                    self._on_inbox(<int><uint32_t>u)
                else:
                    handler = self._handlers.get(<int><uint32_t>u)
                    if handler is not None:
                        handler(evs[i].events)
            if self._pending():
                self._flush()
            if _clock(CLOCK_MONOTONIC) >= next_tick:
                next_tick, next_if_active = tick(active)
                active = False
