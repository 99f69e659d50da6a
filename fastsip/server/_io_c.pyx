"""Batched datagram I/O for the server workers: ``recvmmsg`` / ``sendmmsg``.

One :class:`BatchIO` per worker owns ``vlen`` receive buffers of
``max_size + 1`` bytes each.  ``recv(fd)`` drains up to ``vlen`` datagrams in
one system call and returns them with their source addresses; ``send(fd,
items)`` sends many datagrams in one system call.  Both work on non-blocking
UDP sockets (IPv4 and IPv6) and on connected ``AF_UNIX`` datagram sockets
(the hand-off channels between workers, where addresses are ``None``).

The server's workers use ``serve_udp`` and ``serve_inbox``: one call reads a
batch, passes each datagram to the registrar core and sends the replies with
one ``sendmmsg`` to the addresses they came from, so no Python code runs per
datagram.  When the callable they are given is a core's own ``serve_shard``
(``RegistrarCore.serve_shard`` of a core not in shared mode), the core is
called in C (``RegistrarCore.serve_c``, cimported from fastsip/core/registrar.pxd)
on the receive buffer and the source host as text, and its replies are copied
into this object's send buffer: no Python object is made per datagram (the
source host becomes bytes only for the rate limiter, the request only when the
core raises).  Any other callable (the shared location's, with ``--cluster``)
is called as before, with bytes.  The worker's event loop (:class:`EventLoop`, ``_evloop.pxi``)
calls them itself, with the latency :class:`Histogram` and the per-source
:class:`RateLimiter` (``_meters.pxi``), so no Python code runs per wake-up
either.

A datagram longer than ``max_size`` is dropped and counted in
:attr:`BatchIO.oversized`; nothing else is ever raised for what a peer sends.

The hand-off datagram's header is defined once, in ``handoff.pxd``:
``serve_udp`` writes it, ``serve_inbox`` reads it, and Python code uses
:func:`encode_handoff` / :func:`decode_handoff` (never its own encoding).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, EMSGSIZE, errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy, memset, strlen
from posix.time cimport timespec

cimport cython

from fastsip.core._core cimport SV_READ, SV_SHARD, SV_STAGED, SV_WAIT, RegistrarCore, Store
from fastsip.server cimport handoff as ho

import collections
import os


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned short sa_family_t
    ctypedef unsigned int socklen_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct iovec:
        void* iov_base
        size_t iov_len
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags, timespec* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags)
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t size)
    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        unsigned int s_addr
    struct in6_addr:
        pass
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short ntohs(unsigned short)
    unsigned short htons(unsigned short)
    enum:
        INET6_ADDRSTRLEN
        IPPROTO_IP
        IP_MTU_DISCOVER
        IP_PMTUDISC_WANT
        IP_PMTUDISC_DO

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)


cdef enum:
    MAX_VLEN = 1024
    REPLY_AREA = 65536          # the send buffer's first size (it grows for a large batch)


cdef RegistrarCore _core_of(object serve_shard):
    """The core whose own ``serve_shard`` this is, to be called in C
    (``serve_c``), or None: the callable is called in Python.  A core in
    shared mode is always called in Python (what it returns is the shared
    location's business), as is a subclass's override of ``serve_shard``."""
    cdef object core = getattr(serve_shard, "__self__", None)
    if not isinstance(core, RegistrarCore) or (<RegistrarCore>core).shared:
        return None
    if serve_shard != RegistrarCore.serve_shard.__get__(core, type(core)) or \
            getattr(type(core), "serve_shard", None) is not RegistrarCore.serve_shard:
        return None
    return <RegistrarCore>core

#: The hand-off header (fastsip/server/handoff.pxd), for Python code.
HANDOFF_HEADER = ho.HANDOFF_HEADER
H_UDP = ho.H_UDP
H_TCP = ho.H_TCP
H_TCP_REPLY = ho.H_TCP_REPLY
H_CONN_CLOSED = ho.H_CONN_CLOSED
MAX_HOST = ho.MAX_HOST


cdef bytes _handoff_blob(ho.Handoff* h, const char* host, const char* data, Py_ssize_t n):
    """One hand-off datagram: the header ``h``, ``h.host_len`` bytes of ``host``, the message."""
    cdef Py_ssize_t hl = h.host_len
    cdef bytes blob = PyBytes_FromStringAndSize(NULL, ho.HANDOFF_HEADER + hl + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(blob)
    ho.handoff_write(p, h)
    memcpy(p + ho.HANDOFF_HEADER, host, hl)
    memcpy(p + ho.HANDOFF_HEADER + hl, data, n)
    return blob


def set_dont_fragment(int fd):
    """Set DF on the IPv4 UDP socket ``fd`` (``IP_PMTUDISC_DO``).  What the wire sees
    does not change for a datagram within the path's MTU (the default sets DF on those
    too), but the kernel leaves its IP ID 0 instead of running its ID generator per
    packet, a few % of a worker's time at saturation; a larger one fails with EMSGSIZE,
    and the loop sends it again with fragments allowed (``_send_fragmented``)."""
    cdef int do = IP_PMTUDISC_DO
    if setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, &do, sizeof(int)) != 0:
        raise OSError(errno, os.strerror(errno))


def encode_handoff(int kind, int listener, int origin, bytes host, int64_t conn_id, int port,
                   bytes data):
    """A hand-off datagram: the header, ``host`` (the source host, ASCII) and ``data``.

    ``kind`` is ``H_UDP``, ``H_TCP``, ``H_TCP_REPLY`` or ``H_CONN_CLOSED``; ``listener`` and
    ``origin`` are 0..255, ``port`` 0..65535, ``host`` at most ``MAX_HOST``
    bytes (``ValueError`` otherwise).
    """
    cdef ho.Handoff h
    if not (0 <= kind <= 255 and 0 <= listener <= 255 and 0 <= origin <= 255):
        raise ValueError("kind, listener and origin must be within 0..255")
    if not 0 <= port <= 65535:
        raise ValueError("port must be within 0..65535")
    if len(host) > ho.MAX_HOST:
        raise ValueError(f"host longer than {ho.MAX_HOST} bytes")
    h.kind = kind
    h.listener = listener
    h.origin = origin
    h.host_len = <uint8_t>len(host)
    h.conn_id = conn_id
    h.port = port
    return _handoff_blob(&h, PyBytes_AS_STRING(host), PyBytes_AS_STRING(data),
                         PyBytes_GET_SIZE(data))


def decode_handoff(bytes blob):
    """``(kind, listener, origin, host, conn_id, port, data)`` of a hand-off
    datagram; ``ValueError`` when it is too short or its host too long."""
    cdef ho.Handoff h
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(blob)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(blob)
    if not ho.handoff_read(p, size, &h):
        raise ValueError("not a hand-off datagram")
    return (h.kind, h.listener, h.origin,
            PyBytes_FromStringAndSize(<const char*>p + ho.HANDOFF_HEADER, h.host_len),
            h.conn_id, h.port,
            PyBytes_FromStringAndSize(<const char*>p + ho.HANDOFF_HEADER + h.host_len,
                                      size - ho.HANDOFF_HEADER - h.host_len))


cdef object _addr_of(sockaddr_storage* ss, socklen_t namelen):
    """The (host, port) tuple of a received source address (None when there is none)."""
    cdef char text[INET6_ADDRSTRLEN + 1]
    cdef sockaddr_in* a4
    cdef sockaddr_in6* a6
    if namelen == 0:
        return None
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in*>ss
        if inet_ntop(AF_INET, &a4.sin_addr, text, sizeof(text)) == NULL:
            return None
        return (text.decode("ascii"), ntohs(a4.sin_port))
    if ss.ss_family == AF_INET6:
        a6 = <sockaddr_in6*>ss
        if inet_ntop(AF_INET6, &a6.sin6_addr, text, sizeof(text)) == NULL:
            return None
        return (text.decode("ascii"), ntohs(a6.sin6_port))
    return None


cdef bint _send_fragmented(int fd, const msghdr* m) noexcept nogil:
    """Send one datagram larger than the path's MTU on a socket that sets DF (the
    supervisor's UDP sockets, ``IP_PMTUDISC_DO``: the kernel then leaves the IP ID 0
    and skips its per-packet ID generator) with fragments allowed, as by default;
    False if it could not go."""
    cdef int want = IP_PMTUDISC_WANT, do = IP_PMTUDISC_DO
    cdef bint ok
    if setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, &want, sizeof(int)) != 0:
        return False
    ok = sendmsg(fd, m, MSG_DONTWAIT) >= 0
    setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, &do, sizeof(int))
    return ok


cdef Py_ssize_t _sendmmsg_all(int fd, mmsghdr* hdrs, int cnt) noexcept:
    """sendmmsg ``cnt`` datagrams; returns how many did not go out (a full
    socket buffer, an error for a destination: the client retransmits).  One
    larger than the path's MTU goes out in fragments (``_send_fragmented``)."""
    cdef int i = 0, n
    cdef Py_ssize_t failed = 0
    while i < cnt:
        with nogil:
            n = sendmmsg(fd, hdrs + i, <unsigned int>(cnt - i), MSG_DONTWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return failed + cnt - i
            if errno != EMSGSIZE or not _send_fragmented(fd, &hdrs[i].msg_hdr):
                failed += 1
            i += 1
            continue
        i += n
    return failed


cdef Py_ssize_t _ipv4_text(const unsigned char* a, char* out) noexcept nogil:
    """The dotted quad of the address ``a`` (network order) into ``out`` (16 bytes),
    NUL-terminated: its length."""
    cdef Py_ssize_t n = 0
    cdef int i, v
    for i in range(4):
        v = a[i]
        if v >= 100:
            out[n] = <char>(48 + v // 100)
            n += 1
        if v >= 10:
            out[n] = <char>(48 + v // 10 % 10)
            n += 1
        out[n] = <char>(48 + v % 10)
        n += 1
        out[n] = b'.' if i < 3 else 0
        n += 1
    return n - 1


cdef int _fill_addr(object addr, sockaddr_storage* ss, socklen_t* namelen) except -1:
    """Fill a destination address from a (host, port) tuple; 0 on success, 1 when unusable."""
    cdef bytes host
    cdef int port
    cdef sockaddr_in* a4 = <sockaddr_in*>ss
    cdef sockaddr_in6* a6 = <sockaddr_in6*>ss
    if addr is None:
        namelen[0] = 0
        return 0
    try:
        host = addr[0] if type(addr[0]) is bytes else (<str?>addr[0]).encode("ascii")
        port = addr[1]
    except Exception:
        return 1
    if port < 0 or port > 65535:
        return 1
    memset(ss, 0, sizeof(sockaddr_storage))
    if inet_pton(AF_INET, host, &a4.sin_addr) == 1:
        a4.sin_family = AF_INET
        a4.sin_port = htons(<unsigned short>port)
        namelen[0] = sizeof(sockaddr_in)
        return 0
    if inet_pton(AF_INET6, host, &a6.sin6_addr) == 1:
        a6.sin6_family = AF_INET6
        a6.sin6_port = htons(<unsigned short>port)
        namelen[0] = sizeof(sockaddr_in6)
        return 0
    return 1


include "_meters.pxi"
include "_recent.pxi"
include "_writes.pxi"
include "_conn.pxi"


cdef class BatchIO:
    """Receive and send many datagrams per system call.

    ``BatchIO(vlen=64, max_size=65535)``: at most ``vlen`` datagrams per call;
    datagrams longer than ``max_size`` are dropped and counted.
    """

    cdef mmsghdr* _hdrs
    cdef iovec* _iov
    cdef sockaddr_storage* _names
    cdef char* _bufs
    cdef readonly int vlen
    cdef readonly Py_ssize_t max_size
    cdef mmsghdr* _shdrs              # replies sent by serve_udp / serve_inbox
    cdef iovec* _siov
    cdef sockaddr_storage* _snames
    cdef sa_family_t _last_family     # the source host of the last datagram, as text
    cdef unsigned char _last_addr[16]     # (most batches come from few hosts)
    cdef char _last_text[INET6_ADDRSTRLEN + 1]
    cdef Py_ssize_t _last_len         # -1: none yet
    cdef bytes _last_host             # ... and as bytes, once asked for (None until then)
    cdef char* _rbuf                  # the replies of the core called in C (serve_c), copied
    cdef Py_ssize_t _rcap, _rlen
    cdef Py_ssize_t* _roff            # send slot -> offset of its reply in _rbuf, -1: none
    cdef readonly unsigned long long oversized
    cdef readonly unsigned long long send_errors
    cdef readonly unsigned long long served_c   # datagrams given to a core in C (serve_c)

    def __cinit__(self, int vlen=64, Py_ssize_t max_size=65535):
        if vlen < 1 or vlen > MAX_VLEN:
            raise ValueError(f"vlen must be within 1..{MAX_VLEN}")
        if max_size < 1 or max_size > 65535:
            raise ValueError("max_size must be within 1..65535")
        self.vlen = vlen
        self.max_size = max_size
        self._hdrs = <mmsghdr*>PyMem_Malloc(vlen * sizeof(mmsghdr))
        self._iov = <iovec*>PyMem_Malloc(vlen * sizeof(iovec))
        self._names = <sockaddr_storage*>PyMem_Malloc(vlen * sizeof(sockaddr_storage))
        self._bufs = <char*>PyMem_Malloc(vlen * (max_size + 1))
        self._shdrs = <mmsghdr*>PyMem_Malloc(vlen * sizeof(mmsghdr))
        self._siov = <iovec*>PyMem_Malloc(vlen * sizeof(iovec))
        self._snames = <sockaddr_storage*>PyMem_Malloc(vlen * sizeof(sockaddr_storage))
        self._roff = <Py_ssize_t*>PyMem_Malloc(vlen * sizeof(Py_ssize_t))
        self._rcap = REPLY_AREA
        self._rbuf = <char*>realloc(NULL, self._rcap)
        self._last_len = -1
        if not (self._hdrs and self._iov and self._names and self._bufs and self._shdrs
                and self._siov and self._snames and self._roff and self._rbuf):
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._hdrs)
        PyMem_Free(self._iov)
        PyMem_Free(self._names)
        PyMem_Free(self._bufs)
        PyMem_Free(self._shdrs)
        PyMem_Free(self._siov)
        PyMem_Free(self._snames)
        PyMem_Free(self._roff)
        free(self._rbuf)

    cdef int _recv(self, int fd) except -1:
        """recvmmsg into the buffers: how many datagrams arrived (0 when none)."""
        cdef int i, n
        cdef Py_ssize_t stride = self.max_size + 1
        cdef mmsghdr* h
        for i in range(self.vlen):
            h = &self._hdrs[i]
            memset(h, 0, sizeof(mmsghdr))
            self._iov[i].iov_base = self._bufs + i * stride
            self._iov[i].iov_len = stride
            h.msg_hdr.msg_iov = &self._iov[i]
            h.msg_hdr.msg_iovlen = 1
            h.msg_hdr.msg_name = &self._names[i]
            h.msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        with nogil:
            n = recvmmsg(fd, self._hdrs, <unsigned int>self.vlen, MSG_DONTWAIT, NULL)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            raise OSError(errno, "recvmmsg failed")
        return n

    cdef bint _oversized(self, int i) noexcept:
        cdef mmsghdr* h = &self._hdrs[i]
        if h.msg_len > <unsigned int>self.max_size or (h.msg_hdr.msg_flags & MSG_TRUNC):
            self.oversized += 1
            return True
        return False

    def recv(self, int fd):
        """Up to ``vlen`` datagrams waiting on ``fd``: a list of ``(data, (host, port) or None)``.

        Returns an empty list when nothing is waiting.  Raises ``OSError`` only
        for errors of the socket itself (not EAGAIN/EINTR).
        """
        cdef int i, n = self._recv(fd)
        cdef Py_ssize_t stride = self.max_size + 1
        cdef list out = []
        cdef mmsghdr* h
        for i in range(n):
            h = &self._hdrs[i]
            if self._oversized(i):
                continue
            out.append((PyBytes_FromStringAndSize(self._bufs + i * stride, h.msg_len),
                        _addr_of(&self._names[i], h.msg_hdr.msg_namelen)))
        return out

    def send(self, int fd, list items):
        """Send ``items``, a list of ``(data, (host, port) or None)``.

        Returns the index of the first item that did not go out because the
        socket buffer is full (``len(items)`` when all went out): the caller
        may keep ``items[returned:]`` for later.  Items that cannot go out for
        other reasons (not bytes, an unusable address, an error for one
        destination) are skipped and counted in ``send_errors``.
        """
        return self._send(fd, items)

    cdef Py_ssize_t _send(self, int fd, list items) except -1:
        cdef Py_ssize_t total = len(items), k = 0
        cdef int i, n, cnt
        cdef object item, data
        cdef mmsghdr* h
        cdef Py_ssize_t* idx = <Py_ssize_t*>PyMem_Malloc(self.vlen * sizeof(Py_ssize_t))
        if idx == NULL:
            raise MemoryError()
        try:
            while k < total:
                cnt = 0
                while k < total and cnt < self.vlen:
                    item = items[k]
                    k += 1
                    data = item[0]
                    if not isinstance(data, bytes):
                        self.send_errors += 1
                        continue
                    h = &self._hdrs[cnt]
                    memset(h, 0, sizeof(mmsghdr))
                    if _fill_addr(item[1], &self._names[cnt], &h.msg_hdr.msg_namelen):
                        self.send_errors += 1
                        continue
                    if h.msg_hdr.msg_namelen:
                        h.msg_hdr.msg_name = &self._names[cnt]
                    self._iov[cnt].iov_base = PyBytes_AS_STRING(data)
                    self._iov[cnt].iov_len = PyBytes_GET_SIZE(data)
                    h.msg_hdr.msg_iov = &self._iov[cnt]
                    h.msg_hdr.msg_iovlen = 1
                    idx[cnt] = k - 1
                    cnt += 1
                i = 0
                while i < cnt:
                    with nogil:
                        n = sendmmsg(fd, self._hdrs + i, <unsigned int>(cnt - i), MSG_DONTWAIT)
                    if n < 0:
                        if errno == EINTR:
                            continue
                        if errno == EAGAIN:
                            return idx[i]
                        # an error for this one datagram (e.g. no route): skip it
                        if errno != EMSGSIZE or \
                                not _send_fragmented(fd, &self._hdrs[i].msg_hdr):
                            self.send_errors += 1
                        i += 1
                        continue
                    i += n
            return total
        finally:
            PyMem_Free(idx)

    def flush(self, list fds, list queues, Py_ssize_t max_pending):
        """Send each ``queues[j]`` (a list for ``send``) to ``fds[j]``; what a full
        socket leaves stays queued, at most ``max_pending`` items per queue (the
        oldest are dropped).  Returns how many were dropped."""
        return self._flush(fds, queues, max_pending)

    cdef Py_ssize_t _flush(self, list fds, list queues, Py_ssize_t max_pending) except -1:
        cdef Py_ssize_t j, sent, dropped = 0, left
        cdef list q
        for j in range(len(queues)):
            q = <list>queues[j]
            if not q:
                continue
            sent = self._send(<int>fds[j], q)
            if sent >= len(q):
                del q[:]
                continue
            del q[:sent]
            left = len(q)
            if left > max_pending:
                del q[:left - max_pending]
                dropped += left - max_pending
        return dropped

    # -- the server's receive loop, one batch per call ----------------------------

    cdef Py_ssize_t _host_text(self, sockaddr_storage* ss) noexcept:
        """The source host of a received address as ASCII text in ``_last_text``:
        its length, or -1 for other families.  The last one is kept, as a batch
        mostly comes from few hosts."""
        cdef const void* raw
        cdef int size
        if ss.ss_family == AF_INET:
            raw = &(<sockaddr_in*>ss).sin_addr
            size = 4
        elif ss.ss_family == AF_INET6:
            raw = &(<sockaddr_in6*>ss).sin6_addr
            size = 16
        else:
            return -1
        if self._last_len >= 0 and ss.ss_family == self._last_family \
                and memcmp(raw, self._last_addr, size) == 0:
            return self._last_len
        if size == 4:           # (glibc's inet_ntop formats IPv4 with sprintf)
            self._last_len = _ipv4_text(<const unsigned char*>raw, self._last_text)
        elif inet_ntop(ss.ss_family, raw, self._last_text, sizeof(self._last_text)) == NULL:
            self._last_len = -1
            return -1
        else:
            self._last_len = strlen(self._last_text)
        self._last_host = None
        self._last_family = ss.ss_family
        memcpy(self._last_addr, raw, size)
        return self._last_len

    cdef bytes _host_bytes(self):
        """The host ``_host_text`` found last, as bytes (made once per host)."""
        if self._last_host is None:
            self._last_host = PyBytes_FromStringAndSize(self._last_text, self._last_len)
        return self._last_host

    cdef bytes _host_of(self, sockaddr_storage* ss):
        """The source host of a received address as ASCII bytes (None for other
        families)."""
        if self._host_text(ss) < 0:
            return None
        return self._host_bytes()

    cdef int _copy_reply(self, int j, const char* reply, Py_ssize_t n) except -1:
        """Copy a reply the core wrote in C into the send buffer, for send slot
        ``j`` (``_place_replies`` points the slot at it once the batch is done:
        the buffer may move while it grows)."""
        cdef char* grown
        cdef Py_ssize_t cap = self._rcap
        if self._rlen + n > cap:
            while self._rlen + n > cap:
                cap *= 2
            grown = <char*>realloc(self._rbuf, cap)
            if grown == NULL:
                raise MemoryError()
            self._rbuf = grown
            self._rcap = cap
        memcpy(self._rbuf + self._rlen, reply, n)
        self._roff[j] = self._rlen
        self._siov[j].iov_len = n
        self._rlen += n
        return 0

    cdef void _place_replies(self, int cnt) noexcept:
        """Point the send slots of copied replies at their bytes."""
        cdef int j
        for j in range(cnt):
            if self._roff[j] >= 0:
                self._siov[j].iov_base = self._rbuf + self._roff[j]

    cdef void _queue_reply(self, int j, bytes reply, sockaddr_storage* to,
                           socklen_t tolen) noexcept:
        """Put ``reply`` in send slot ``j`` (the caller keeps ``reply`` alive);
        None: the slot's reply was copied (``_copy_reply``)."""
        cdef mmsghdr* h = &self._shdrs[j]
        memset(h, 0, sizeof(mmsghdr))
        h.msg_hdr.msg_name = to
        h.msg_hdr.msg_namelen = tolen
        if reply is not None:
            self._siov[j].iov_base = PyBytes_AS_STRING(reply)
            self._siov[j].iov_len = PyBytes_GET_SIZE(reply)
            self._roff[j] = -1
        h.msg_hdr.msg_iov = &self._siov[j]
        h.msg_hdr.msg_iovlen = 1

    cdef void _send_replies(self, int fd, mmsghdr* hdrs, int cnt) noexcept:
        """sendmmsg ``cnt`` prepared replies.  A reply that finds the socket
        buffer full, or fails for its destination, is dropped and counted in
        ``send_errors`` (the client retransmits)."""
        self.send_errors += _sendmmsg_all(fd, hdrs, cnt)

    def serve_udp(self, int fd, object serve_shard, double now, int shard, int nshards, int li,
                  list queues, object allow=None, object bug=None):
        """Read one batch from the UDP socket ``fd`` and answer it.

        Each datagram goes to ``serve_shard(data, host, port, now, "udp", -1,
        shard, nshards)`` (``RegistrarCore.serve_shard``; a core's own is called
        in C, ``serve_c``, with the same results).  Reply bytes go back
        to the sender with one ``sendmmsg``; an int return (the AOR belongs to
        that shard) queues a hand-off datagram ``(blob, None)`` on
        ``queues[owner]``.  ``allow``, when given, may refuse a datagram (rate
        limiting): a :class:`RateLimiter` (checked in C) or any ``allow(host,
        now)`` callable; ``bug(data)`` is called when ``serve_shard``
        raises.  Returns ``(received, handed)``; 0 received means nothing was
        waiting.  Only the system's own socket errors raise ``OSError``.
        """
        cdef int handed = 0
        cdef int n = self._serve_udp(fd, serve_shard, _core_of(serve_shard), now, shard, nshards,
                                     li, queues, allow, bug, &handed, None)
        return n, handed

    cdef int _serve_udp(self, int fd, object serve_shard, RegistrarCore core, double now,
                        int shard, int nshards, int li, list queues, object allow, object bug,
                        int* handed_out, WriteQueue wq) except -1:
        """``serve_udp``; ``core``: ``_core_of(serve_shard)``, called in C when not None.
        With ``wq`` (``--cluster``), ``core`` is its shared core, called in C with one
        shard: a staged write goes to ``wq``, what waits to ``wq.slow``."""
        cdef int n = self._recv(fd), i, cnt = 0, handed = 0, port, owner
        cdef Py_ssize_t stride = self.max_size + 1, hl, r
        cdef RateLimiter limiter = allow if type(allow) is RateLimiter else None
        cdef mmsghdr* h
        cdef sockaddr_storage* ss
        cdef const char* buf
        cdef const char* reply
        cdef bytes data, host
        cdef object res
        cdef list keep = None
        cdef ho.Handoff hand
        hand.kind = ho.H_UDP
        hand.listener = <uint8_t>li
        hand.origin = <uint8_t>shard
        hand.conn_id = -1
        self._rlen = 0
        for i in range(n):
            if self._oversized(i):
                continue
            h = &self._hdrs[i]
            ss = &self._names[i]
            hl = self._host_text(ss)
            if hl < 0:
                continue
            port = ntohs((<sockaddr_in*>ss).sin_port)     # same offset in sockaddr_in6
            if limiter is not None:
                if not limiter._allow(self._host_bytes(), now):
                    continue
            elif allow is not None and not allow(self._host_bytes(), now):
                continue
            buf = self._bufs + i * stride
            if core is not None:
                self.served_c += 1
                try:
                    r = core.serve_c(buf, h.msg_len, self._last_text, hl, port, now, 0, -1,
                                     shard, nshards, &reply)
                except Exception:
                    if bug is not None:
                        bug(PyBytes_FromStringAndSize(buf, h.msg_len))
                    continue
                if r > 0:
                    self._copy_reply(cnt, reply, r)
                    self._queue_reply(cnt, None, ss, h.msg_hdr.msg_namelen)
                    cnt += 1
                    continue
                if wq is not None:
                    if r == SV_STAGED and self._queued(wq, buf, h.msg_len, hl, port, ss,
                                                        h.msg_hdr.msg_namelen, li, now):
                        continue
                    if r == SV_STAGED or r == SV_WAIT or r == SV_READ:
                        data = PyBytes_FromStringAndSize(buf, h.msg_len)
                        try:
                            wq.slow(data, self._host_bytes(), port, now, r, li)
                        except Exception:
                            if bug is not None:
                                bug(data)
                    continue
                if r > SV_SHARD:
                    continue                    # no reply (or shared mode's, never here)
                owner = SV_SHARD - r
            else:
                data = PyBytes_FromStringAndSize(buf, h.msg_len)
                host = self._host_bytes()
                try:
                    res = serve_shard(data, host, port, now, "udp", -1, shard, nshards)
                except Exception:
                    if bug is not None:
                        bug(data)
                    continue
                if res is None:
                    continue
                if type(res) is not int:
                    if keep is None:
                        keep = []
                    keep.append(res)
                    self._queue_reply(cnt, <bytes>res, ss, h.msg_hdr.msg_namelen)
                    cnt += 1
                    continue
                owner = <int>res
                if owner < 0 or owner >= len(queues):
                    continue
            hand.host_len = <uint8_t>hl
            hand.port = <unsigned short>port
            (<list>queues[owner]).append(
                (_handoff_blob(&hand, self._last_text, buf, h.msg_len), None))
            handed += 1
        if cnt:
            self._place_replies(cnt)
            self._send_replies(fd, self._shdrs, cnt)
        handed_out[0] = handed
        return n

    cdef bint _queued(self, WriteQueue wq, const char* buf, Py_ssize_t n, Py_ssize_t hl, int port,
                      sockaddr_storage* ss, socklen_t namelen, int li, double now) noexcept:
        """Queue the write the shared core just staged; False when it must go to
        Python (no primary known for its slot, or no memory)."""
        try:
            return wq.add(buf, n, self._last_text, hl, port, ss, namelen, li, now) == 0
        except Exception:
            return False

    def serve_inbox(self, int fd, object serve_shard, double now, list udp_fds,
                    object bug=None):
        """Read one batch of hand-off datagrams from ``fd`` and serve the UDP ones.

        A UDP hand-off is served with ``serve_shard(..., 0, 1)`` (it is ours)
        and answered from ``udp_fds[listener]``, the socket its client sent to.
        Other hand-offs (TCP requests and TCP replies, which need the worker's
        connections) are returned as ``(kind, listener, origin, host (bytes),
        conn_id, port, data)`` tuples.  Returns ``(received, served, others)``.
        """
        cdef int served = 0
        cdef list others = []
        cdef int n = self._serve_inbox(fd, serve_shard, _core_of(serve_shard), now, udp_fds, bug,
                                       &served, others)
        return n, served, others

    cdef int _serve_inbox(self, int fd, object serve_shard, RegistrarCore core, double now,
                          list udp_fds, object bug, int* served_out, list others) except -1:
        """``serve_inbox``: the others appended to ``others``, the count of UDP ones
        served in ``served_out``; returns how many datagrams were read.
        ``core``: ``_core_of(serve_shard)``, called in C when not None."""
        cdef int n = self._recv(fd), i, cnt = 0, served = 0, li, port, hl, k, fdi, j
        cdef Py_ssize_t stride = self.max_size + 1, size, r = 0
        cdef unsigned char* p
        cdef const char* msg
        cdef const char* reply
        cdef char hostz[ho.MAX_HOST + 1]
        cdef ho.Handoff hand
        cdef bytes data, host
        cdef object res = None
        cdef list keep = None
        cdef int lis[MAX_VLEN]
        cdef sockaddr_in* a4
        cdef sockaddr_in6* a6
        cdef sockaddr_storage* ss
        self._rlen = 0
        for i in range(n):
            if self._oversized(i):
                continue
            p = <unsigned char*>(self._bufs + i * stride)
            size = self._hdrs[i].msg_len
            if not ho.handoff_read(p, size, &hand):
                continue
            hl = hand.host_len
            li = hand.listener
            port = hand.port
            msg = <char*>p + ho.HANDOFF_HEADER + hl
            size -= ho.HANDOFF_HEADER + hl
            if hand.kind != ho.H_UDP:
                others.append((hand.kind, li, hand.origin,
                               PyBytes_FromStringAndSize(<char*>p + ho.HANDOFF_HEADER, hl),
                               hand.conn_id, port, PyBytes_FromStringAndSize(msg, size)))
                continue
            served += 1
            if core is not None:
                self.served_c += 1
                try:
                    r = core.serve_c(msg, size, <char*>p + ho.HANDOFF_HEADER, hl, port, now, 0,
                                     -1, 0, 1, &reply)
                except Exception:
                    if bug is not None:
                        bug(PyBytes_FromStringAndSize(msg, size))
                    continue
                if r <= 0 or li >= len(udp_fds):
                    continue
            else:
                host = PyBytes_FromStringAndSize(<char*>p + ho.HANDOFF_HEADER, hl)
                data = PyBytes_FromStringAndSize(msg, size)
                try:
                    res = serve_shard(data, host, port, now, "udp", -1, 0, 1)
                except Exception:
                    if bug is not None:
                        bug(data)
                    continue
                if res is None or li >= len(udp_fds):
                    continue
            ss = &self._snames[cnt]
            memset(ss, 0, sizeof(sockaddr_storage))
            memcpy(hostz, <char*>p + ho.HANDOFF_HEADER, hl)
            hostz[hl] = 0
            a4 = <sockaddr_in*>ss
            a6 = <sockaddr_in6*>ss
            if inet_pton(AF_INET, hostz, &a4.sin_addr) == 1:
                a4.sin_family = AF_INET
                a4.sin_port = htons(<unsigned short>port)
                self._queue_reply(cnt, None if core is not None else <bytes>res, ss,
                                  sizeof(sockaddr_in))
            elif inet_pton(AF_INET6, hostz, &a6.sin6_addr) == 1:
                a6.sin6_family = AF_INET6
                a6.sin6_port = htons(<unsigned short>port)
                self._queue_reply(cnt, None if core is not None else <bytes>res, ss,
                                  sizeof(sockaddr_in6))
            else:
                self.send_errors += 1
                continue
            if core is not None:
                self._copy_reply(cnt, reply, r)
            else:
                if keep is None:
                    keep = []
                keep.append(res)
            lis[cnt] = li
            cnt += 1
        if cnt:
            self._place_replies(cnt)
        if cnt and len(udp_fds) == 1:
            self._send_replies(<int>udp_fds[0], self._shdrs, cnt)
        elif cnt:
            # one sendmmsg per listener; the receive headers, done with, gather them
            for fdi in range(len(udp_fds)):
                k = 0
                for j in range(cnt):
                    if lis[j] == fdi:
                        self._hdrs[k] = self._shdrs[j]
                        k += 1
                if k:
                    self._send_replies(<int>udp_fds[fdi], self._hdrs, k)
        served_out[0] = served
        return n


include "_evloop.pxi"
include "_statefile.pxi"
