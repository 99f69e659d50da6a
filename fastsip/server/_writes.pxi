# Included by _io_c.pyx: the staged writes of the shared location (--cluster), kept in C.
#
# With --cluster the loop calls the core in C as without it (serve_c).  A REGISTER that
# changes bindings comes back SV_STAGED: the core applied the plan to its cache and left
# the write in C fields (RegistrarCore.staged_*).  WriteQueue.add packs its FCALL
# (fastsip/cluster/_resp_c.pxd) into the WriteGroup of the primary of its slot, with the
# request, its source and the reply, and no Python object is made for it.  The shared
# location (fastsip/server/shared.py) takes the groups once per batch (take) and sends
# each as one pipeline; a group stands for all its commands on the connection, takes
# their replies (take_reply: 1 is written, anything else is kept for Python), and when
# acknowledged (done) ends the busy marks, remembers the records for a re-assertion and
# sends the 200s with one sendmmsg.  The record is no object either: the core writes it
# straight into the command (RegistrarCore.staged_record_into), and ``recent``
# (Recent, _recent.pxi) copies it from there.  Whatever is not the common case (a
# conflict, an error, a lost connection, WAIT coming short) is handed to Python as the
# request it was (hand), and handled as before.

from libc.stdint cimport int16_t, uint64_t

from fastsip.cluster._resp_c cimport cas_record_at, cas_size, cas_slot, cas_write


cdef enum:
    SLOTS = 16384           # Redis Cluster's hash slots
    MAX_INFLIGHT = 1        # pipelines with a WAIT in flight per primary (more writes wait)
    W_SENT = 0              # queued or sent, no reply yet
    W_ACKED = 1             # Redis answered 1: written (a WAIT may still be due)
    W_ODD = 2               # another reply: Python's (take_odd)
    W_DONE = 3              # answered, or handed to Python


ctypedef struct Write:
    Py_ssize_t cmd_off, cmd_len         # its FCALL, in the group's commands
    Py_ssize_t rec_off, rec_len         # its record, inside the FCALL (rec_len -1: none)
    Py_ssize_t aor_off                  # in the group's data: the AOR, the source host,
    Py_ssize_t aor_len, host_len        # the reply and the request, one after another
    Py_ssize_t reply_len, req_len
    uint64_t expected, version
    long long pxat
    double first                        # when the request arrived
    sockaddr_storage to
    socklen_t tolen
    int port, li
    uint8_t state
    uint8_t tosend                      # done(): its reply is still to send


cdef int _grow(char** buf, Py_ssize_t* cap, Py_ssize_t need) except -1:
    cdef Py_ssize_t c = cap[0] if cap[0] else 4096
    cdef char* p
    if need <= cap[0]:
        return 0
    while c < need:
        c *= 2
    p = <char*>realloc(buf[0], c)
    if p == NULL:
        raise MemoryError()
    buf[0] = p
    cap[0] = c
    return 0


cdef class WriteGroup:
    """The staged writes of one batch to one primary (see ``_writes.pxi``).

    ``n`` writes, ``taken`` of them answered; ``wait``: a ``WAIT`` follows
    them (the primary has a replica), so ``done`` waits for it.
    """

    cdef Write* w
    cdef Py_ssize_t cap
    cdef readonly Py_ssize_t n, taken
    cdef char* cmd
    cdef Py_ssize_t cmd_len, cmd_cap
    cdef char* data
    cdef Py_ssize_t data_len, data_cap
    cdef list odd                       # (i, reply) of replies other than 1
    cdef public bint wait
    cdef readonly list done_aors        # the AORs done() acknowledged, when asked for
    cdef readonly Py_ssize_t send_failed

    def __cinit__(self):
        self.odd = []

    def __dealloc__(self):
        free(self.w)
        free(self.cmd)
        free(self.data)

    cdef int _add(self, RegistrarCore core, const char* req, Py_ssize_t req_len,
                  const char* host, Py_ssize_t host_len, int port, sockaddr_storage* to,
                  socklen_t tolen, int li, double now, long long pxat) except -1:
        cdef Write* w
        cdef Write* grown
        cdef Py_ssize_t size, nr = core.staged_record_len
        cdef char* d
        if self.n == self.cap:
            grown = <Write*>realloc(self.w, (self.cap * 2 if self.cap else 16) * sizeof(Write))
            if grown == NULL:
                raise MemoryError()
            self.w = grown
            self.cap = self.cap * 2 if self.cap else 16
        w = &self.w[self.n]
        size = cas_size(core.staged_aor_len, core.staged_expected, nr if nr > 0 else 0, pxat)
        # everything that can fail first: a command without its entry would take
        # another write's reply
        _grow(&self.cmd, &self.cmd_cap, self.cmd_len + size)
        _grow(&self.data, &self.data_cap, self.data_len + core.staged_aor_len + host_len
              + core.staged_reply + req_len)
        cas_write(self.cmd + self.cmd_len, core.staged_aor, core.staged_aor_len,
                  core.staged_expected, NULL, nr if nr > 0 else 0, pxat, False)
        w.rec_len = nr
        w.rec_off = 0
        if nr >= 0:                     # the record, from the core's copy, in its room
            w.rec_off = self.cmd_len + cas_record_at(core.staged_aor_len,
                                                     core.staged_expected, nr)
            core.staged_record_into(self.cmd + w.rec_off)
        w.cmd_off = self.cmd_len
        w.cmd_len = size
        self.cmd_len += size
        w.aor_len = core.staged_aor_len
        w.host_len = host_len
        w.reply_len = core.staged_reply
        w.req_len = req_len
        w.aor_off = self.data_len
        d = self.data + self.data_len
        memcpy(d, core.staged_aor, w.aor_len)
        memcpy(d + w.aor_len, host, host_len)
        memcpy(d + w.aor_len + host_len, core.staged_reply_bytes(), w.reply_len)
        memcpy(d + w.aor_len + host_len + w.reply_len, req, req_len)
        self.data_len += w.aor_len + host_len + w.reply_len + req_len
        w.expected = core.staged_expected
        w.version = core.staged_version
        w.pxat = pxat
        w.first = now
        memcpy(&w.to, to, tolen)
        w.tolen = tolen
        w.port = port
        w.li = li
        w.state = W_SENT
        w.tosend = 0
        self.n += 1
        return 0

    def commands(self):
        """The FCALLs of the group, one after another, as they go on the wire."""
        return PyBytes_FromStringAndSize(self.cmd, self.cmd_len)

    cdef int _take(self, object reply) except -1:
        cdef Py_ssize_t i = self.taken
        if i >= self.n:
            return 0
        self.taken += 1
        if type(reply) is int and reply == 1:
            self.w[i].state = W_ACKED
        else:
            self.w[i].state = W_ODD
            self.odd.append((i, reply))
        return 0

    cdef int _take_int(self, long long value) except -1:
        """An integer reply (the common one, 1: written) without a Python object."""
        cdef Py_ssize_t i = self.taken
        if i >= self.n:
            return 0
        if value == 1:
            self.taken += 1
            self.w[i].state = W_ACKED
            return 0
        return self._take(value)

    def take_odd(self):
        """``[(i, reply)]``: the replies other than 1 taken since the last call."""
        cdef list odd = self.odd
        self.odd = []
        return odd

    def indices(self, int state):
        """The writes in ``state`` (0: no reply yet, 1: written)."""
        cdef Py_ssize_t i
        return [i for i in range(self.n) if self.w[i].state == state]

    def hand(self, Py_ssize_t i):
        """Write ``i`` for Python, which takes it over: ``(request, host, port,
        listener, first, aor, expected, version, record, pxat, reply)``."""
        cdef Write* w
        cdef const char* d
        if i < 0 or i >= self.n:
            raise IndexError(i)
        w = &self.w[i]
        d = self.data + w.aor_off
        w.state = W_DONE
        return (PyBytes_FromStringAndSize(d + w.aor_len + w.host_len + w.reply_len, w.req_len),
                PyBytes_FromStringAndSize(d + w.aor_len, w.host_len), w.port, w.li, w.first,
                PyBytes_FromStringAndSize(d, w.aor_len), w.expected, w.version,
                None if w.rec_len < 0 else
                PyBytes_FromStringAndSize(self.cmd + w.rec_off, w.rec_len), w.pxat,
                PyBytes_FromStringAndSize(d + w.aor_len + w.host_len, w.reply_len)
                if w.reply_len else None)

    cpdef Py_ssize_t done(self, Store store, Recent recent, double now, list udp_fds,
                          bint want_aors=False) except -1:
        """The written ones (1, and the WAIT after them when ``wait``) are
        acknowledged: their AORs' copies are the stored ones (``Store.cache_done``),
        their records go to ``recent`` (with ``now``),
        their 200s leave with one sendmmsg per listener (``udp_fds[li]``;
        the ones that could not are counted in ``send_failed``).  Returns how many;
        with ``want_aors`` their AORs are in ``done_aors``."""
        cdef Py_ssize_t i, count = 0, k, nfds
        if store is None or recent is None or udp_fds is None:
            raise TypeError("done() needs a store, a Recent and the listeners' descriptors")
        nfds = len(udp_fds)
        cdef int li, cnt
        cdef Write* w
        cdef const char* d
        cdef mmsghdr* hdrs = NULL
        cdef iovec* iov = NULL
        cdef list aors = [] if want_aors else None
        try:
            for i in range(self.n):
                w = &self.w[i]
                if w.state != W_ACKED:
                    continue
                w.state = W_DONE
                d = self.data + w.aor_off
                store.done_c(d, w.aor_len)
                recent.put_c(d, w.aor_len, w.version,
                             NULL if w.rec_len < 0 else self.cmd + w.rec_off, w.rec_len,
                             w.pxat, now)
                if aors is not None:
                    aors.append(PyBytes_FromStringAndSize(d, w.aor_len))
                count += 1
                if w.reply_len:
                    if hdrs == NULL:
                        hdrs = <mmsghdr*>PyMem_Malloc(self.n * sizeof(mmsghdr))
                        iov = <iovec*>PyMem_Malloc(self.n * sizeof(iovec))
                        if hdrs == NULL or iov == NULL:
                            raise MemoryError()
                    w.tosend = 1
            if hdrs != NULL:
                for li in range(nfds):
                    cnt = 0
                    for i in range(self.n):
                        w = &self.w[i]
                        if not w.tosend or w.li != li:
                            continue
                        w.tosend = 0
                        memset(&hdrs[cnt], 0, sizeof(mmsghdr))
                        iov[cnt].iov_base = self.data + w.aor_off + w.aor_len + w.host_len
                        iov[cnt].iov_len = w.reply_len
                        hdrs[cnt].msg_hdr.msg_iov = &iov[cnt]
                        hdrs[cnt].msg_hdr.msg_iovlen = 1
                        hdrs[cnt].msg_hdr.msg_name = &w.to
                        hdrs[cnt].msg_hdr.msg_namelen = w.tolen
                        cnt += 1
                    if cnt:
                        self.send_failed += _sendmmsg_all(<int>udp_fds[li], hdrs, cnt)
                for i in range(self.n):             # a listener that is not there
                    if self.w[i].tosend:
                        self.w[i].tosend = 0
                        self.send_failed += 1
        finally:
            PyMem_Free(hdrs)
            PyMem_Free(iov)
        self.done_aors = aors
        return count


cdef class WriteQueue:
    """A shared core's staged writes of one batch, by primary (see ``_writes.pxi``).

    ``WriteQueue(core, slow, grace)``: ``core`` a ``RegistrarCore(shared=True)``,
    called in C by the loop; ``slow(data, host, port, now, r, li)`` takes a
    request that cannot be queued here (``r``: STAGED without a known primary,
    WAIT, READ); ``grace``: seconds a key outlives its latest binding
    (``--cluster-grace``).  ``set_owners(owners)``: the primary index of each
    slot (-1: none).  ``take()``: the groups queued since the last call.
    """

    cdef readonly RegistrarCore core
    cdef readonly object slow
    cdef double grace
    cdef int16_t owner[SLOTS]
    cdef list groups                    # primary index -> WriteGroup of this batch, or None
    cdef readonly Py_ssize_t n          # writes queued since send_groups()
    cdef list links                     # primary index -> its Conn, or None
    cdef readonly list opened           # Conns with an open Batch (Conn.open_batch)
    # the shared location's (bind): what the writes need, and its Python for the rest
    cdef Store store
    cdef Recent recent
    cdef list udp_fds, born, fresh
    cdef dict parked, outbox
    cdef set reasserting
    cdef bytes wait_cmd
    cdef object connect, orphan, after_batch, on_group, on_reply
    cdef readonly object on_waited, on_push, on_lost
    cdef readonly unsigned long long writes, round_trips, batched, queued, send_failed

    def __init__(self, RegistrarCore core not None, slow, double grace):
        cdef int s
        if not core.shared:
            raise ValueError("the core is not in shared mode")
        self.core = core
        self.slow = slow
        self.grace = grace
        self.groups = []
        self.links = []
        self.opened = []
        for s in range(SLOTS):
            self.owner[s] = -1

    def set_owners(self, owners):
        """``owners[slot]``: the index of the primary serving it (-1: none), for
        every slot (16384)."""
        cdef int s, j, top = -1
        if len(owners) != SLOTS:
            raise ValueError(f"{SLOTS} slots expected")
        for s in range(SLOTS):
            j = owners[s]
            if j < -1 or j > 32767:
                raise ValueError("a primary index out of range")
            self.owner[s] = <int16_t>j
            if j > top:
                top = j
        for j in range(len(self.groups), top + 1):
            self.groups.append(None)

    cdef int add(self, const char* req, Py_ssize_t req_len, const char* host,
                 Py_ssize_t host_len, int port, sockaddr_storage* to, socklen_t tolen, int li,
                 double now) except -1:
        """Queue the write the core just staged (SV_STAGED) for the request ``req``
        from ``host``:``port`` (``to``); 1 when no primary is known for its slot
        (the caller hands it to ``slow``)."""
        cdef RegistrarCore core = self.core
        cdef int slot = cas_slot(core.staged_aor, core.staged_aor_len), j
        cdef WriteGroup g
        cdef long long pxat = 0
        if slot < 0:
            return 1
        j = self.owner[slot]
        if j < 0 or j >= len(self.groups):
            return 1
        g = <WriteGroup>self.groups[j]
        if g is None:
            g = WriteGroup()
            self.groups[j] = g
        if core.staged_record_len >= 0:
            pxat = <long long>((core.staged_latest + self.grace) * 1000)
        g._add(core, req, req_len, host, host_len, port, to, tolen, li, now, pxat)
        self.n += 1
        return 0

    def bind(self, *, Store store not None, Recent recent not None, list udp_fds not None,
             dict parked not None, set reasserting not None, list born not None,
             list fresh not None, dict outbox not None, bytes wait_cmd not None, connect,
             orphan, after_batch, on_group, on_waited, on_reply, on_push, on_lost):
        """The shared location's state that decides whether Python is needed (it
        never replaces these objects), and its Python for what is not the common
        case: ``connect(j)`` a Conn to primary j or None; ``orphan(group)`` its
        writes cannot be sent; ``after_batch(li)`` the whole end of a batch;
        ``on_group(group, lost)``, ``on_waited(batch, reply)``, ``on_reply(item,
        reply)``, ``on_push(push)``, ``on_lost(conn)`` as ``Conn`` says."""
        self.store, self.recent, self.udp_fds = store, recent, udp_fds
        self.parked, self.reasserting, self.born, self.fresh, self.outbox = \
            parked, reasserting, born, fresh, outbox
        self.wait_cmd = wait_cmd
        self.connect, self.orphan, self.after_batch = connect, orphan, after_batch
        self.on_group, self.on_waited, self.on_reply = on_group, on_waited, on_reply
        self.on_push, self.on_lost = on_push, on_lost

    def set_links(self, list links not None):
        """``links[j]``: the Conn to primary j (the index ``set_owners`` uses), or None."""
        self.links = list(links)

    def counters(self):
        """The counters kept here, by their names in ``metrics.WorkerCounters``."""
        return {"cluster_writes": self.writes, "cluster_round_trips": self.round_trips,
                "cluster_batched": self.batched, "cluster_queued": self.queued,
                "dropped_send_failed": self.send_failed}

    cdef int after(self, int li) except -1:
        """The loop read a batch from UDP listener ``li``: send its writes, one
        pipeline per primary ended by ``WAIT``; Python only when something else
        waits (a Pending staged, a reply to send)."""
        if self.born or self.fresh or self.outbox:
            self.after_batch(li)
            return 0
        self.send_groups()
        self.end_batches()
        return 0

    cpdef int send_groups(self, bint hold=True) except -1:
        """Put each primary's queued writes into the open Batch of its connection;
        those of a primary with MAX_INFLIGHT pipelines in flight wait (the group
        grows) until its WAIT is answered (``_after_replies``), unless not ``hold``
        (the slot map is about to change)."""
        cdef Py_ssize_t j
        cdef WriteGroup g
        cdef Conn conn
        cdef object c
        cdef Batch batch
        if not self.n:
            return 0
        for j in range(len(self.groups)):
            if self.groups[j] is None:
                continue
            g = <WriteGroup>self.groups[j]
            c = self.links[j] if j < len(self.links) else None
            if hold and c is not None and (<Conn>c).inflight >= MAX_INFLIGHT:
                continue
            self.groups[j] = None
            self.n -= g.n
            if c is None or (<Conn>c).closed:
                c = self.connect(j)
                if c is None:
                    self.orphan(g)
                    continue
            conn = <Conn>c
            batch = conn.open_batch()
            batch.size += g.n
            self.queued += g.n
            g.wait = conn.replicas > 0
            if g.wait:
                batch.groups.append(g)
            conn.push(g.commands(), g)
        return 0

    cpdef int end_batches(self) except -1:
        """End every open Batch: its ``WAIT`` (when the primary has a replica and it
        holds writes), and the pipeline goes out."""
        cdef Conn conn
        cdef Batch batch
        while self.opened:
            conn = <Conn>self.opened.pop()
            batch, conn.batch = conn.batch, None
            if conn.replicas and batch.size:
                conn.push(self.wait_cmd, batch)
                conn.inflight += 1
            conn.flush()
            self.round_trips += 1
            self.batched += batch.size
        return 0

    cdef inline bint _waited_on(self):
        """Do requests wait for writes (parked), or re-assertions for theirs?"""
        return bool(self.parked) or bool(self.reasserting)

    cdef int _replied(self, WriteGroup g, bint lost) except -1:
        """Redis answered every write of ``g`` (``lost``: the connection went first)."""
        if lost or g.odd or self._waited_on():
            self.on_group(g, lost)
        elif not g.wait:
            self.group_done(g, _clock(CLOCK_REALTIME), False)
        return 0

    cdef int _waited(self, Batch batch, object reply) except -1:
        """``WAIT``'s reply for ``batch``."""
        cdef object g
        cdef double now
        if type(reply) is int and reply >= 1 and not batch.acked and not self._waited_on():
            now = _clock(CLOCK_REALTIME)
            for g in batch.groups:
                self.group_done(<WriteGroup>g, now, False)
        else:
            self.on_waited(batch, reply)
        return 0

    cpdef Py_ssize_t group_done(self, WriteGroup g, double now, bint want_aors) except -1:
        """``g``'s written ones are acknowledged (``WriteGroup.done``): returns how many."""
        cdef Py_ssize_t n = g.done(self.store, self.recent, now, self.udp_fds, want_aors)
        self.writes += n
        self.send_failed += g.send_failed
        g.send_failed = 0
        return n

    cdef int _after_replies(self) except -1:
        """Replies were handled: send what they staged (decisions made again)."""
        if self.fresh or self.outbox or self.opened:
            self.after_batch(-1)
        elif self.n:                    # writes that waited for a pipeline in flight
            self.send_groups()
            self.end_batches()
        return 0
