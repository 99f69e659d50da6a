# cython: language_level=3
"""Declarations and small inline helpers shared by the load tool's compiled
modules (the engine, its parts and the echo): the socket and poll calls, the
batch sizes, the clock, the header-name compare and the request-number
digits.  Declarations only: there is no ``_common`` module at run time."""

from libc.stdint cimport int64_t, uint32_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from *:
    """
    #include <sys/socket.h>
    #include <netinet/in.h>
    #include <poll.h>
    #include <string.h>

    /* Attach an IP_PKTINFO control message that picks the source address. */
    static CYTHON_UNUSED void fl_set_pktinfo(struct msghdr *m, char *cbuf, uint32_t src_be) {
        struct cmsghdr *c;
        struct in_pktinfo *pi;
        m->msg_control = cbuf;
        m->msg_controllen = CMSG_SPACE(sizeof(struct in_pktinfo));
        c = CMSG_FIRSTHDR(m);
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
        pi = (struct in_pktinfo *)CMSG_DATA(c);
        memset(pi, 0, sizeof(*pi));
        pi->ipi_spec_dst.s_addr = src_be;
    }
    #define FL_CBUF_SIZE CMSG_SPACE(sizeof(struct in_pktinfo))
    """
    enum: FL_CBUF_SIZE
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL
    enum: POLLIN
    enum: POLLOUT
    enum: POLLERR
    enum: POLLHUP
    ctypedef unsigned int socklen_t
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct sockaddr_storage:
        pass
    struct pollfd:
        int fd
        short events
        short revents
    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags) nogil
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, timespec *timeout) nogil
    ssize_t send(int fd, const void *buf, size_t n, int flags) nogil
    ssize_t recv(int fd, void *buf, size_t n, int flags) nogil
    int poll(pollfd *fds, unsigned long nfds, int timeout) nogil
    int ppoll(pollfd *fds, unsigned long nfds, const timespec *tmo, const void *sigmask) nogil
    void fl_set_pktinfo(msghdr *m, char *cbuf, uint32_t src_be) nogil


cdef enum:
    BATCH = 64            # messages per sendmmsg / recvmmsg
    MSG_MAX = 4096        # largest request or reply handled


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline bint name_is(const char *p, Py_ssize_t n, const char *lname, Py_ssize_t ln) noexcept nogil:
    """Case-insensitive compare of header name ``p[:n]`` with lower-case ``lname``."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != ln:
        return False
    for i in range(n):
        c = <unsigned char>p[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>lname[i]:
            return False
    return True


cdef inline void put_seq(char *digits, uint32_t seq) noexcept nogil:
    """The ten decimal digits of request number ``seq``."""
    cdef int i
    for i in range(9, -1, -1):
        digits[i] = <char>(48 + seq % 10)
        seq //= 10
