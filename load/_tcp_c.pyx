# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""TCP connections of the load engine.

Requests are appended to a connection's output queue (:func:`conn_queue`)
and written with non-blocking ``send`` (:func:`conn_flush`); replies are
read into the connection's input buffer, cut into messages by their
Content-Length and handed one by one to a callback (:func:`conn_recv`).
A connection the peer closed, or that failed, is marked closed and stays
so; the functions return True when that happens so the caller counts it.
"""

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

from load._common cimport (MSG_DONTWAIT, MSG_NOSIGNAL, POLLIN, POLLOUT, iovec, now_ns, pollfd,
                           recv, send)
from load._scan_c cimport frame_length


cdef int conn_queue(Conn *c, const iovec *iov, int n) noexcept nogil:
    """Append the ``n`` messages of ``iov`` to the output; ``n``, or 0 when
    the connection is closed or out of memory."""
    cdef size_t need = 0, cap
    cdef int i
    cdef char *nb
    if c.closed:
        return 0
    for i in range(n):
        need += iov[i].iov_len
    if c.olen + need > c.ocap:
        cap = c.ocap * 2 if c.ocap else 65536
        while cap < c.olen + need:
            cap *= 2
        nb = <char *>realloc(c.ob, cap)
        if nb == NULL:
            return 0
        c.ob = nb
        c.ocap = cap
    for i in range(n):
        memcpy(c.ob + c.olen, iov[i].iov_base, iov[i].iov_len)
        c.olen += iov[i].iov_len
    return n


cdef bint conn_flush(Conn *c, int fd) noexcept nogil:
    """Write as much of the output as ``fd`` takes now; True when the
    connection failed (it is closed from now on)."""
    cdef ssize_t w
    while c.olen and not c.closed:
        w = send(fd, c.ob, c.olen, MSG_DONTWAIT | MSG_NOSIGNAL)
        if w <= 0:
            if w < 0 and (errno == EAGAIN or errno == EINTR):
                return False
            c.closed = 1
            return True
        if <size_t>w < c.olen:
            memmove(c.ob, c.ob + w, c.olen - w)
        c.olen -= w
    return False


cdef bint conn_recv(Conn *c, int fd, on_message_fn on_message, void *ctx,
                    uint64_t *garbage) noexcept:
    """Read what ``fd`` has (a few rounds) and call ``on_message`` for every
    complete message; a broken stream is dropped and counted in ``garbage``.
    True when the peer closed the connection (or it failed)."""
    cdef ssize_t r
    cdef Py_ssize_t pos, m
    cdef int64_t t
    cdef int rounds = 0
    if c.ib == NULL:
        c.ib = <char *>malloc(TCP_IN_CAP)
        if c.ib == NULL:
            return False
    while rounds < 8 and not c.closed:
        rounds += 1
        r = recv(fd, c.ib + c.ilen, TCP_IN_CAP - c.ilen, MSG_DONTWAIT)
        if r <= 0:
            if r < 0 and (errno == EAGAIN or errno == EINTR):
                return False
            c.closed = 1
            return True
        t = now_ns()
        c.ilen += r
        pos = 0
        while pos < <Py_ssize_t>c.ilen:
            m = frame_length(c.ib + pos, c.ilen - pos)
            if m == 0:
                break
            if m < 0:           # garbage: drop the buffer
                garbage[0] += 1
                pos = c.ilen
                break
            if c.ib[pos] != 13 and c.ib[pos] != 10:     # not a CRLF keep-alive
                on_message(ctx, c.ib + pos, m, t)
            pos += m
        if pos:
            memmove(c.ib, c.ib + pos, c.ilen - pos)
            c.ilen -= pos
        if c.ilen == TCP_IN_CAP:     # one message larger than the buffer
            garbage[0] += 1
            c.ilen = 0
    return False


cdef void conn_free(Conn *c) noexcept nogil:
    free(c.ob)
    free(c.ib)
    c.ob = c.ib = NULL


cdef int conns_flush(Conn *conns, const int *fds, int n) noexcept nogil:
    """Flush every connection with queued output; how many failed."""
    cdef int i, failed = 0
    for i in range(n):
        if conns[i].olen and conn_flush(&conns[i], fds[i]):
            failed += 1
    return failed


cdef void conns_poll_events(const Conn *conns, pollfd *pfds, int n) noexcept nogil:
    """What to wait for on each connection: input, output while some is
    queued; closed connections are left out."""
    cdef int i
    for i in range(n):
        pfds[i].events = POLLIN | POLLOUT if conns[i].olen else POLLIN
        if conns[i].closed:
            pfds[i].fd = -1
