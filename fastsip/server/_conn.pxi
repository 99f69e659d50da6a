# Included by _io_c.pyx: a worker's connections to the Redis primaries (--cluster).
#
# Each Conn is one TCP (or TLS) connection to one primary, already logged in with RESP3
# and CLIENT TRACKING (fastsip/cluster/client.py: open_conn).  Commands are queued with
# an item that stands for them (push) and written together when the batch ends
# (flush); their replies go to the items in order.  The event loop calls on_events
# when the socket is ready, and the common case never enters the interpreter: the
# replies are framed here (_reply_end), an integer (FCALL's 1, WAIT's count) is read
# in C and taken by a WriteGroup (its writes' replies) or a Batch (the WAIT of one
# pipeline: its groups acknowledged in C, WriteQueue._waited: the busy marks, Recent,
# one sendmmsg of the 200s).  Any other reply, a whole one, is made a Python object
# by hiredis' reader.  Anything else is handed to the shared location's Python
# (fastsip/server/shared.py), which WriteQueue.bind names: a Pending's reply, an
# invalidation push, a group with a reply other than 1, a WAIT that came short, a
# write that others wait for, a lost connection (every item left is answered LOST).

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from libc.string cimport memchr, memmove

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    enum:
        MSG_NOSIGNAL

cdef enum:
    READ_SIZE = 1 << 18     # bytes read from a connection at a time (more for a larger reply)
    NOT_YET = -1            # _reply_end: the reply is not complete yet
    MALFORMED = -2          # _reply_end: not RESP


cdef long long _resp_number(const char* p, const char* end, bint* ok) noexcept nogil:
    """The decimal integer in ``p[:end - p]`` (an optional ``-``, 1 to 18 digits)."""
    cdef bint neg = p < end and p[0] == b'-'
    cdef long long v = 0
    cdef const char* q = p + 1 if neg else p
    ok[0] = q < end and end - q <= 18
    while ok[0] and q < end:
        if q[0] < b'0' or q[0] > b'9':
            ok[0] = False
        v = v * 10 + (q[0] - 48)       # '0'
        q += 1
    return -v if neg else v


cdef Py_ssize_t _reply_end(const char* b, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    """Where the RESP3 reply that starts at ``b[p]`` ends (its last byte + 1), or
    NOT_YET when ``b[:n]`` does not hold all of it, or MALFORMED.  Only the framing is
    read: a line (``+ - : , ( # _``), a length and that many bytes (``$ ! =``), or a
    count of replies that follow (``* ~ >``; twice the count for ``%``; ``|``, an
    attribute, is followed by the reply it belongs to)."""
    cdef Py_ssize_t left = 1, length
    cdef const char* eol
    cdef char t
    cdef bint ok
    while left:
        if p >= n:
            return NOT_YET
        eol = <const char*>memchr(b + p, b'\n', n - p)
        if eol == NULL:
            return NOT_YET
        if eol - b < p + 2 or (eol - 1)[0] != b'\r':
            return MALFORMED
        t = b[p]
        left -= 1
        if t == b'+' or t == b'-' or t == b':' or t == b',' or t == b'(' or t == b'#' or t == b'_':
            p = eol - b + 1
            continue
        length = _resp_number(b + p + 1, eol - 1, &ok)
        if not ok or length < -1 or length > (<Py_ssize_t>1 << 40):
            return MALFORMED
        p = eol - b + 1
        if t == b'$' or t == b'!' or t == b'=':
            if length >= 0:
                if p + length + 2 > n:
                    return NOT_YET
                if b[p + length] != b'\r' or b[p + length + 1] != b'\n':
                    return MALFORMED
                p += length + 2
        elif t == b'*' or t == b'~' or t == b'>':
            left += length if length > 0 else 0
        elif t == b'%':
            left += 2 * length if length > 0 else 0
        elif t == b'|':
            left += 2 * length + 1 if length > 0 else 1
        else:
            return MALFORMED
    return p

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
    protocol_error)``: ``sock`` logged in, with nothing unread after the login;
    ``reader`` an empty ``hiredis.Reader`` (for the replies other than integers);
    ``queue`` the WriteQueue it reports to; ``soft`` the exceptions of a TLS socket
    that mean "not now".
    """

    cdef readonly object addr, sock, reader
    cdef readonly int fd
    cdef readonly bint closed
    cdef public int replicas            # of this primary, as the slot map says (WAIT needs one)
    cdef readonly int inflight          # pipelines sent whose WAIT is not answered yet
    cdef readonly unsigned long long reads      # reads that brought bytes (progress, for
                                                # the owner's check of a silent primary)
    cdef Batch batch                    # the writes of this batch on it (open_batch), or None
    cdef bytearray buf                  # replies are read into it
    cdef Py_ssize_t end                 # buf[:end]: a reply not complete yet
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

    @property
    def owed(self):
        """Replies owed: commands written or queued whose reply has not come."""
        return len(self.waiting)

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
        self.wq._after_replies()

    cdef bint _read(self) except -1:
        """Read what the socket has and hand each complete reply to its item; False
        when the connection is gone (lost)."""
        cdef ssize_t n, room
        while True:
            room = len(self.buf) - self.end
            if room == 0:               # one reply larger than the buffer
                PyByteArray_Resize(self.buf, 2 * len(self.buf))
                room = len(self.buf) - self.end
            if self.tls:
                try:
                    n = self.sock.recv_into(memoryview(self.buf)[self.end:])
                except self.soft:
                    return True
                except OSError:
                    self.lose()
                    return False
            else:
                n = recv(self.fd, PyByteArray_AS_STRING(self.buf) + self.end, room, MSG_DONTWAIT)
                if n < 0:
                    if errno == EAGAIN or errno == EINTR:
                        return True
                    self.lose()
                    return False
            if n == 0:
                self.lose()
                return False
            self.reads += 1
            self.end += n
            try:
                self._dispatch()
            except self.protocol_error:
                self.lose()
            if self.closed:
                return False
            if n < room and not self.tls:
                return True

    cdef int _dispatch(self) except -1:
        """Hand every complete reply in ``buf`` to its item, in order; keep the rest."""
        cdef const char* b = PyByteArray_AS_STRING(self.buf)
        cdef Py_ssize_t p = 0, e
        while p < self.end and not self.closed:     # (a callback may lose it)
            e = _reply_end(b, p, self.end)
            if e == NOT_YET:
                break
            if e == MALFORMED:
                raise self.protocol_error(f"Redis at {self.addr}: not a RESP reply")
            self._reply(b, p, e)
            p = e
        if p and not self.closed:
            memmove(PyByteArray_AS_STRING(self.buf), b + p, self.end - p)
            self.end -= p
        return 0

    cdef int _reply(self, const char* b, Py_ssize_t p, Py_ssize_t e) except -1:
        """The reply ``b[p:e]``: an integer for a WriteGroup or a Batch is read here,
        anything else by the reader."""
        cdef object waiting = self.waiting, head = waiting[0] if waiting else None
        cdef object reply
        cdef long long value = 0
        cdef bint ok = False
        cdef WriteGroup g
        if b[p] == b':' and head is not None:
            value = _resp_number(b + p + 1, b + e - 2, &ok)
        if ok:
            reply = None
        else:
            self.reader.feed(self.buf, p, e - p)
            reply = self.reader.gets()
            if type(reply) is self.push_type:
                self.wq.on_push(reply)
                return 0
            if head is None:            # nothing asked for it
                return 0
        if type(head) is WriteGroup:
            g = <WriteGroup>head
            if ok:
                g._take_int(value)
            else:
                g._take(reply)
            if g.taken == g.n:
                waiting.popleft()
                self.wq._replied(g, False)
            return 0
        waiting.popleft()
        if ok:
            reply = value
        if type(head) is Batch:
            self.inflight -= 1
            self.wq._waited(<Batch>head, reply)
        else:
            self.wq.on_reply(head, reply)
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
        self.end = 0
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
