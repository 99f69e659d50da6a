# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""Stream connections of the load engine: TCP, and TLS and WebSocket on it.

Requests are appended to a connection's queue (:func:`conn_queue`): as
they are, or each in a masked WebSocket frame (RFC 7118: one SIP message
per frame), into the output for the socket or, under TLS, into the
plaintext the engine encrypts (``load._loadio_c``, with Python's ``ssl``)
before it appends the result to the output.  The output is written with
non-blocking ``send`` (:func:`conn_flush`).  Received plaintext (read by
:func:`conn_recv`, or decrypted by the engine) is cut into messages by
their Content-Length or their WebSocket frames and handed one by one to a
callback (:func:`conn_deliver`).  A connection the peer closed, or that
failed, is marked closed and stays so; the functions return True when that
happens so the caller counts it.
"""

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove

from load._common cimport (MSG_DONTWAIT, MSG_NOSIGNAL, POLLIN, POLLOUT, iovec, now_ns, pollfd,
                           recv, send)
from load._scan_c cimport frame_length
from load._ws_c cimport (WS_BINARY, WS_CLOSE, WS_CONT, WS_HDR_MAX, WS_PING, WS_PONG, WS_TEXT, WsFrame,
                         ws_next_key, ws_parse, ws_put, ws_xor)


cdef int buf_reserve(Buf *b, size_t extra) noexcept nogil:
    """Room for ``extra`` more bytes; -1 when out of memory."""
    cdef size_t cap
    cdef char *nb
    if b.len + extra <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 65536
    while cap < b.len + extra:
        cap *= 2
    nb = <char *>realloc(b.p, cap)
    if nb == NULL:
        return -1
    b.p = nb
    b.cap = cap
    return 0


cdef int buf_append(Buf *b, const char *p, size_t n) noexcept nogil:
    if buf_reserve(b, n) < 0:
        return -1
    memcpy(b.p + b.len, p, n)
    b.len += n
    return 0


cdef inline void buf_consume(Buf *b, size_t n) noexcept nogil:
    if n < b.len:
        memmove(b.p, b.p + n, b.len - n)
        b.len -= n
    else:
        b.len = 0


cdef int conn_queue(Conn *c, const iovec *iov, int n) noexcept nogil:
    """Queue the ``n`` messages of ``iov`` (each in a masked frame over
    WebSocket); ``n``, or 0 when the connection is closed or out of memory."""
    cdef size_t need = 0
    cdef int i
    cdef Buf *dst = &c.plain if c.tls else &c.out
    if c.closed:
        return 0
    for i in range(n):
        need += iov[i].iov_len + (WS_HDR_MAX if c.ws else 0)
    if buf_reserve(dst, need) < 0:
        return 0
    for i in range(n):
        if c.ws:
            dst.len += ws_put(dst.p + dst.len, WS_TEXT, <const char *>iov[i].iov_base,
                              iov[i].iov_len, True, ws_next_key(&c.mask))
        else:
            memcpy(dst.p + dst.len, iov[i].iov_base, iov[i].iov_len)
            dst.len += iov[i].iov_len
    return n


cdef bint conn_flush(Conn *c, int fd) noexcept nogil:
    """Write as much of the output as ``fd`` takes now; True when the
    connection failed (it is closed from now on)."""
    cdef ssize_t w
    while c.out.len and not c.closed:
        w = send(fd, c.out.p, c.out.len, MSG_DONTWAIT | MSG_NOSIGNAL)
        if w <= 0:
            if w < 0 and (errno == EAGAIN or errno == EINTR):
                return False
            c.closed = 1
            return True
        buf_consume(&c.out, w)
    return False


cdef bint _deliver_ws(Conn *c, int64_t t, on_message_fn on_message, void *ctx,
                      uint64_t *garbage) noexcept:
    """WebSocket frames out of ``c.inb``: data frames to ``on_message``, a
    ping answered, a close closes; True when the connection is done."""
    cdef Py_ssize_t pos = 0, m
    cdef WsFrame f
    cdef char *p
    cdef char pong[WS_HDR_MAX + 125]
    while pos < <Py_ssize_t>c.inb.len:
        m = ws_parse(c.inb.p + pos, c.inb.len - pos, &f)
        if m == 0:
            break
        if m < 0:
            garbage[0] += 1
            pos = c.inb.len
            break
        p = c.inb.p + pos + f.hlen
        if f.masked:            # a server must not mask; take it all the same
            ws_xor(p, p, f.plen, <const unsigned char *>(p - 4))
        if f.opcode == WS_TEXT or f.opcode == WS_BINARY:
            if f.fin:
                on_message(ctx, p, f.plen, t)
            else:               # fragmented: not one SIP message per frame (RFC 7118 5.1)
                garbage[0] += 1
        elif f.opcode == WS_PING and f.plen <= 125:
            c.pings += 1
            buf_append(&c.plain if c.tls else &c.out, pong,
                       ws_put(pong, WS_PONG, p, f.plen, True, ws_next_key(&c.mask)))
        elif f.opcode == WS_CLOSE:
            c.closed = 1
            c.inb.len = 0
            return True
        elif f.opcode == WS_CONT:
            garbage[0] += 1
        pos += m
    buf_consume(&c.inb, pos)
    return False


cdef bint conn_deliver(Conn *c, int64_t t, on_message_fn on_message, void *ctx,
                       uint64_t *garbage) noexcept:
    """Hand every complete message in the received plaintext to
    ``on_message`` (received at ``t``); a broken stream is dropped and
    counted in ``garbage``.  True when the peer closed (a WebSocket close)."""
    cdef Py_ssize_t pos = 0, m
    if c.ws:
        if _deliver_ws(c, t, on_message, ctx, garbage):
            return True
    else:
        while pos < <Py_ssize_t>c.inb.len:
            m = frame_length(c.inb.p + pos, c.inb.len - pos)
            if m == 0:
                break
            if m < 0:           # garbage: drop the buffer
                garbage[0] += 1
                pos = c.inb.len
                break
            if c.inb.p[pos] != 13 and c.inb.p[pos] != 10:     # not a CRLF keep-alive
                on_message(ctx, c.inb.p + pos, m, t)
            pos += m
        buf_consume(&c.inb, pos)
    if c.inb.len >= TCP_IN_CAP:     # one message larger than the buffer
        garbage[0] += 1
        c.inb.len = 0
    return False


cdef bint conn_recv(Conn *c, int fd, on_message_fn on_message, void *ctx,
                    uint64_t *garbage) noexcept:
    """Read what ``fd`` has (a few rounds; plaintext: not for TLS) and deliver
    every complete message.  True when the peer closed the connection (or it
    failed)."""
    cdef ssize_t r
    cdef size_t room
    cdef int rounds = 0
    if buf_reserve(&c.inb, TCP_IN_CAP - c.inb.len) < 0:
        return False
    while rounds < 8 and not c.closed:
        rounds += 1
        room = TCP_IN_CAP - c.inb.len
        r = recv(fd, c.inb.p + c.inb.len, room, MSG_DONTWAIT)
        if r <= 0:
            if r < 0 and (errno == EAGAIN or errno == EINTR):
                return False
            c.closed = 1
            return True
        c.inb.len += r
        if conn_deliver(c, now_ns(), on_message, ctx, garbage):
            return True
        if <size_t>r < room:        # drained for now: ppoll says when there is more
            break
    return False


cdef void conn_free(Conn *c) noexcept nogil:
    free(c.out.p)
    free(c.plain.p)
    free(c.inb.p)
    c.out.p = c.plain.p = c.inb.p = NULL
    c.out.len = c.out.cap = c.plain.len = c.plain.cap = c.inb.len = c.inb.cap = 0


cdef int conns_flush(Conn *conns, const int *fds, int n) noexcept nogil:
    """Flush every connection with queued output; how many failed."""
    cdef int i, failed = 0
    for i in range(n):
        if conns[i].out.len and conn_flush(&conns[i], fds[i]):
            failed += 1
    return failed


cdef void conns_poll_events(const Conn *conns, pollfd *pfds, int n) noexcept nogil:
    """What to wait for on each connection: input, output while some is
    queued; closed connections are left out."""
    cdef int i
    for i in range(n):
        pfds[i].events = POLLIN | POLLOUT if conns[i].out.len else POLLIN
        if conns[i].closed:
            pfds[i].fd = -1
