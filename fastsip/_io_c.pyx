"""Batched datagram I/O for the server workers: ``recvmmsg`` / ``sendmmsg``.

One :class:`BatchIO` per worker owns ``vlen`` receive buffers of
``max_size + 1`` bytes each.  ``recv(fd)`` drains up to ``vlen`` datagrams in
one system call and returns them with their source addresses; ``send(fd,
items)`` sends many datagrams in one system call.  Both work on non-blocking
UDP sockets (IPv4 and IPv6) and on connected ``AF_UNIX`` datagram sockets
(the hand-off channels between workers, where addresses are ``None``).

A datagram longer than ``max_size`` is dropped and counted in
:attr:`BatchIO.oversized`; nothing else is ever raised for what a peer sends.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, errno
from libc.string cimport memset



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
    struct timespec:
        pass
    int recvmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags, timespec* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags)
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

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)


cdef enum:
    MAX_VLEN = 1024


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
        host = (<str?>addr[0]).encode("ascii")
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
    cdef readonly unsigned long long oversized
    cdef readonly unsigned long long send_errors

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
        if not (self._hdrs and self._iov and self._names and self._bufs):
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._hdrs)
        PyMem_Free(self._iov)
        PyMem_Free(self._names)
        PyMem_Free(self._bufs)

    def recv(self, int fd):
        """Up to ``vlen`` datagrams waiting on ``fd``: a list of ``(data, (host, port) or None)``.

        Returns an empty list when nothing is waiting.  Raises ``OSError`` only
        for errors of the socket itself (not EAGAIN/EINTR).
        """
        cdef int i, n
        cdef Py_ssize_t stride = self.max_size + 1
        cdef list out = []
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
                return out
            raise OSError(errno, "recvmmsg failed")
        for i in range(n):
            h = &self._hdrs[i]
            if h.msg_len > <unsigned int>self.max_size or (h.msg_hdr.msg_flags & MSG_TRUNC):
                self.oversized += 1
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
                        self.send_errors += 1
                        i += 1
                        continue
                    i += n
            return total
        finally:
            PyMem_Free(idx)
