# Included by _io_c.pyx: a worker's connections to the Redis primaries (--cluster).
#
# Each Conn is one TCP (or TLS) connection to one primary, already logged in with RESP3
# and CLIENT TRACKING (fastsip/cluster/client.py: open_conn).  Commands are queued with
# an item that stands for them (push) and written together when the batch ends
# (flush); hiredis' reader parses the replies, in order.  The event loop calls
# on_events when the socket is ready, and the common case never enters the
# interpreter: a WriteGroup takes its writes' replies itself, a Batch (the WAIT of one
# pipeline) acknowledges its groups in C (WriteQueue.waited: the busy marks, Recent,
# one sendmmsg of the 200s).  Anything else is handed to the shared location's Python
# (fastsip/server/shared.py), which WriteQueue.bind names: a Pending's reply, an
# invalidation push, a group with a reply other than 1, a WAIT that came short, a
# write that others wait for, a lost connection (every item left is answered LOST).

from cpython.bytearray cimport PyByteArray_AS_STRING

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    enum:
        MSG_NOSIGNAL

cdef enum:
    READ_SIZE = 1 << 18     # bytes read from a connection at a time

#: The reply of a command whose connection was lost before it came.
LOST = object()


cdef class Batch:
    """The writes of one pipeline to one primary, and its ``WAIT``: ``size``
    writes sent, ``acked`` (Python's writes answered 1, waiting for the ``WAIT``),
    ``groups`` (the WriteGroups that wait for it)."""

    cdef public Py_ssize_t size
    cdef public list acked
    cdef public list groups

    def __cinit__(self):
        self.acked = []
        self.groups = []


cdef class Conn:
    """One connection to one primary (see ``_conn.pxi``).

    ``Conn(addr, sock, reader, loop, queue, replicas, soft, push_type,
    protocol_error)``: ``sock`` logged in, ``reader`` its ``hiredis.Reader`` (the
    login's: nothing read is lost), ``queue`` the WriteQueue it reports to,
    ``soft`` the exceptions of a TLS socket that mean "not now".
    """

    cdef readonly object addr, sock, reader
    cdef readonly int fd
    cdef readonly bint closed
    cdef public int replicas            # of this primary, as the slot map says (WAIT needs one)
    cdef readonly int inflight          # pipelines sent whose WAIT is not answered yet
    cdef Batch batch                    # the writes of this batch on it (open_batch), or None
    cdef bytearray buf                  # replies are read into it (the reader copies them)
    cdef list out                       # packed commands not yet written
    cdef bytes pending                  # written in part: the rest
    cdef object waiting                 # deque: one item per command written or queued
    cdef object loop
    cdef WriteQueue wq
    cdef object soft, push_type, protocol_error
    cdef bint tls, want_out

    def __init__(self, addr, sock, reader, loop, WriteQueue queue not None, int replicas,
                 soft, push_type, protocol_error):
        self.addr = addr
        self.sock = sock
        self.reader = reader
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.tls = hasattr(sock, "cipher")
        self.buf = bytearray(READ_SIZE)
        self.out = []
        self.pending = b""
        self.waiting = collections.deque()
        self.loop = loop
        self.wq = queue
        self.replicas = replicas
        self.soft = soft
        self.push_type = push_type
        self.protocol_error = protocol_error
        loop.add(self.fd, self.on_events, EPOLLIN)

    cpdef push(self, bytes packed, object item):
        """Queue a command and the item its reply goes to."""
        self.out.append(packed)
        self.waiting.append(item)

    cpdef Batch open_batch(self):
        """The Batch of this batch's writes on this connection (a new one, which
        ``WriteQueue.end_batches`` ends, if none is open)."""
        if self.batch is None:
            self.batch = Batch()
            self.wq.opened.append(self)
        return self.batch

    cpdef flush(self):
        """Write what is queued (the rest waits for the socket to take it)."""
        cdef bytes data
        cdef ssize_t n
        if self.closed or not (self.out or self.pending):
            return
        data = self.pending + b"".join(self.out) if self.pending else b"".join(self.out)
        self.out.clear()
        if self.tls:
            try:
                n = self.sock.send(data)
            except self.soft:
                n = 0
            except OSError:
                self.lose()
                return
        else:
            n = send(self.fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                     MSG_DONTWAIT | MSG_NOSIGNAL)
            if n < 0:
                if errno != EAGAIN and errno != EINTR:
                    self.lose()
                    return
                n = 0
        self.pending = data[n:] if n < PyBytes_GET_SIZE(data) else b""
        if self.pending and not self.want_out:
            self.want_out = True
            self.loop.modify(self.fd, EPOLLIN | EPOLLOUT)
        elif not self.pending and self.want_out:
            self.want_out = False
            self.loop.modify(self.fd, EPOLLIN)

    def on_events(self, unsigned int events):
        """The loop's handler: the socket is ready (``events``: the epoll mask)."""
        if events & EPOLLOUT:
            self.flush()
        if self.closed or not self._read():
            return
        try:
            self._dispatch()
        except self.protocol_error:
            self.lose()
            return
        self.wq._after_replies()

    cdef bint _read(self) except -1:
        """Feed what the socket has to the reader; False when the connection is gone."""
        cdef ssize_t n
        cdef object reader = self.reader, buf = self.buf
        while True:
            if self.tls:
                try:
                    n = self.sock.recv_into(buf)
                except self.soft:
                    return True
                except OSError:
                    self.lose()
                    return False
            else:
                n = recv(self.fd, PyByteArray_AS_STRING(buf), READ_SIZE, MSG_DONTWAIT)
                if n < 0:
                    if errno == EAGAIN or errno == EINTR:
                        return True
                    self.lose()
                    return False
            if n == 0:
                self.lose()
                return False
            reader.feed(buf, 0, n)
            if n < READ_SIZE and not self.tls:
                return True

    cdef int _dispatch(self) except -1:
        """Hand every complete reply to its item, in order."""
        cdef object waiting = self.waiting, reader = self.reader, reply, item
        cdef WriteQueue wq = self.wq
        while not self.closed:      # (a callback may lose it: lose() answered the rest)
            if waiting and type(waiting[0]) is WriteGroup:
                # a WriteGroup stands for many commands and takes their replies itself
                reply = (<WriteGroup>waiting[0])._take_from(reader, self.push_type)
                if reply is True:
                    wq._replied(<WriteGroup>waiting.popleft(), False)
                    continue
            else:
                reply = reader.gets()
            if reply is False:
                return 0
            if type(reply) is self.push_type:
                wq.on_push(reply)
            elif waiting:
                item = waiting.popleft()
                if type(item) is Batch:
                    self.inflight -= 1
                    wq._waited(<Batch>item, reply)
                else:
                    wq.on_reply(item, reply)
        return 0

    def lose(self):
        """The connection is gone: every item left is answered LOST, the queue's
        owner is told (``on_lost``)."""
        cdef object item
        if self.closed:
            return
        self._close()
        waiting, self.waiting = self.waiting, collections.deque()
        while waiting:
            item = waiting.popleft()
            if type(item) is WriteGroup:
                self.wq._replied(<WriteGroup>item, True)
            elif type(item) is Batch:
                self.wq.on_waited(item, LOST)
            else:
                self.wq.on_reply(item, LOST)
        self.wq.on_lost(self)

    def close(self):
        """Close without telling anyone (the worker is stopping, or the primary is
        one no more)."""
        if not self.closed:
            self._close()

    cdef int _close(self) except -1:
        self.closed = True
        self.inflight = 0
        if self.batch is not None:
            self.batch = None
            self.wq.opened.remove(self)
        try:
            self.loop.remove(self.fd)
        except (OSError, KeyError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        return 0
