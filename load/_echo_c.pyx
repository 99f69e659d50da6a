# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""The echo: a trivial C-speed registrar stand-in for throughput figures.

:func:`echo_udp` answers every request on a UDP socket with a ``200 OK``
that copies Via, From, To (adding a tag), Call-ID and CSeq, in batches of
``recvmmsg``/``sendmmsg``; no state, no checks.  It is the "echo floor"
that the load tool's rate is measured against
(``python -m load.responder --fast``).  :func:`echo_stream` does the same
for the plaintext of a stream connection (TCP, TLS, WebSocket frames):
all the complete requests of a buffer in, all their replies out, in one
call; the responder's Python loop around it does the sockets and TLS.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno, EINTR
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset

from load._common cimport (BATCH, MSG_DONTWAIT, MSG_MAX, POLLIN, iovec, mmsghdr, name_is,
                           now_ns, poll, pollfd, recvmmsg, sendmmsg)
from load._scan_c cimport frame_length
from load._ws_c cimport WS_BINARY, WS_HDR_MAX, WS_TEXT, WsFrame, ws_parse, ws_put, ws_xor


cdef Py_ssize_t build_ok(const char *p, Py_ssize_t n, char *out, Py_ssize_t cap,
                         const char *chal, Py_ssize_t chal_n) noexcept nogil:
    """A ``200 OK`` answering request ``p[:n]`` (Via, From, To + tag, Call-ID,
    CSeq copied); 0 when ``p`` is not a request or does not fit.  With a
    challenge (``chal[:chal_n]``, a whole header line without its CRLF), a
    request without an Authorization header gets a ``401 Unauthorized`` with
    that line instead: the digest floor (nothing is checked)."""
    cdef Py_ssize_t pos, end, ne, o, ll
    cdef const char *nl
    cdef const char *colon
    cdef bint is_to, has_tag, has_auth = False
    if n < 8 or memcmp(p, b"SIP/2.0 ", 8) == 0:
        return 0
    if cap < 64:
        return 0
    o = 26          # room for either start line: "SIP/2.0 401 Unauthorized\r\n" is 26 bytes
    nl = <const char *>memchr(p, 10, n)
    if nl == NULL:
        return 0
    pos = nl - p + 1
    while pos < n:
        nl = <const char *>memchr(p + pos, 10, n - pos)
        end = n if nl == NULL else nl - p
        ll = end - pos
        if ll > 0 and p[end - 1] == 13:
            ll -= 1
        if ll == 0:
            break
        colon = <const char *>memchr(p + pos, 58, ll)
        if colon != NULL:
            ne = colon - p
            while ne > pos and (p[ne - 1] == 32 or p[ne - 1] == 9):
                ne -= 1
            if chal_n and name_is(p + pos, ne - pos, b"authorization", 13):
                has_auth = True
            is_to = name_is(p + pos, ne - pos, b"to", 2) or name_is(p + pos, ne - pos, b"t", 1)
            if (is_to or name_is(p + pos, ne - pos, b"via", 3) or name_is(p + pos, ne - pos, b"v", 1)
                    or name_is(p + pos, ne - pos, b"from", 4) or name_is(p + pos, ne - pos, b"f", 1)
                    or name_is(p + pos, ne - pos, b"call-id", 7) or name_is(p + pos, ne - pos, b"i", 1)
                    or name_is(p + pos, ne - pos, b"cseq", 4)):
                if o + ll + 16 > cap:
                    return 0
                memcpy(out + o, p + pos, ll)
                o += ll
                if is_to:
                    has_tag = False
                    for ne in range(pos, pos + ll - 4):
                        if memcmp(p + ne, b";tag=", 5) == 0:
                            has_tag = True
                            break
                    if not has_tag:
                        memcpy(out + o, b";tag=fl", 7)
                        o += 7
                out[o] = 13
                out[o + 1] = 10
                o += 2
        pos = end + 1
    if chal_n and not has_auth:
        if o + chal_n + 2 + 21 > cap:
            return 0
        memcpy(out, b"SIP/2.0 401 Unauthorized\r\n", 26)
        memcpy(out + o, chal, chal_n)
        o += chal_n
        out[o] = 13
        out[o + 1] = 10
        o += 2
    else:
        memmove(out + 16, out + 26, o - 26)
        o -= 10
        memcpy(out, b"SIP/2.0 200 OK\r\n", 16)
    if o + 21 > cap:
        return 0
    memcpy(out + o, b"Content-Length: 0\r\n\r\n", 21)
    return o + 21


def _build_ok(bytes request, bytes challenge=b""):
    """Test hook: the echo's reply to ``request`` (``b""`` when none), with
    ``challenge`` as :func:`echo_udp`."""
    cdef char out[MSG_MAX]
    cdef Py_ssize_t n = build_ok(PyBytes_AS_STRING(request), PyBytes_GET_SIZE(request), out, MSG_MAX,
                                 PyBytes_AS_STRING(challenge), PyBytes_GET_SIZE(challenge))
    return PyBytes_FromStringAndSize(out, n)


def echo_udp(int fd, double duration, uint64_t max_packets, bytes challenge=b""):
    """Answer every REGISTER on UDP socket ``fd`` with a 200, in batches.

    The trivial C-speed registrar stand-in for throughput figures: no state,
    no checks, one ``recvmmsg`` and one ``sendmmsg`` per batch.  Stops after
    ``duration`` seconds or ``max_packets`` received (whichever first), or
    on a signal.  Returns ``(received, answered)``.  With ``challenge`` (a
    ``WWW-Authenticate: ...`` line, no CRLF), requests without Authorization
    get a 401 with that line and the others a 200, the digest check left
    out: the floor of a registration with digest (two requests).
    """
    cdef const char *chal = PyBytes_AS_STRING(challenge)
    cdef Py_ssize_t chal_n = PyBytes_GET_SIZE(challenge)
    cdef mmsghdr *rm = <mmsghdr *>calloc(BATCH, sizeof(mmsghdr))
    cdef mmsghdr *sm = <mmsghdr *>calloc(BATCH, sizeof(mmsghdr))
    cdef iovec *ri = <iovec *>calloc(BATCH, sizeof(iovec))
    cdef iovec *si = <iovec *>calloc(BATCH, sizeof(iovec))
    cdef char *names = <char *>calloc(BATCH, 128)
    cdef char *inb = <char *>malloc(BATCH * MSG_MAX)
    cdef char *outb = <char *>malloc(BATCH * MSG_MAX)
    cdef pollfd pfd
    cdef int64_t until = now_ns() + <int64_t>(duration * 1e9)
    cdef uint64_t received = 0, answered = 0
    cdef int i, n, k, r
    cdef Py_ssize_t m
    if not (rm and sm and ri and si and names and inb and outb):
        free(rm); free(sm); free(ri); free(si); free(names); free(inb); free(outb)
        raise MemoryError()
    pfd.fd = fd
    pfd.events = POLLIN
    try:
        while received < max_packets and now_ns() < until:
            r = poll(&pfd, 1, 100)
            if r < 0 and errno != EINTR:
                raise OSError(errno, "poll failed")
            PyErr_CheckSignals()
            if r <= 0:
                continue
            while received < max_packets:
                for i in range(BATCH):
                    ri[i].iov_base = inb + i * MSG_MAX
                    ri[i].iov_len = MSG_MAX
                    rm[i].msg_hdr.msg_iov = &ri[i]
                    rm[i].msg_hdr.msg_iovlen = 1
                    rm[i].msg_hdr.msg_name = names + i * 128
                    rm[i].msg_hdr.msg_namelen = 128
                    rm[i].msg_hdr.msg_control = NULL
                    rm[i].msg_hdr.msg_controllen = 0
                n = recvmmsg(fd, rm, BATCH, MSG_DONTWAIT, NULL)
                if n <= 0:
                    break
                received += n
                k = 0
                for i in range(n):
                    m = build_ok(inb + i * MSG_MAX, rm[i].msg_len, outb + k * MSG_MAX, MSG_MAX,
                                 chal, chal_n)
                    if m == 0:
                        continue
                    si[k].iov_base = outb + k * MSG_MAX
                    si[k].iov_len = m
                    memset(&sm[k], 0, sizeof(mmsghdr))
                    sm[k].msg_hdr.msg_iov = &si[k]
                    sm[k].msg_hdr.msg_iovlen = 1
                    sm[k].msg_hdr.msg_name = rm[i].msg_hdr.msg_name
                    sm[k].msg_hdr.msg_namelen = rm[i].msg_hdr.msg_namelen
                    k += 1
                if k:
                    r = sendmmsg(fd, sm, k, 0)
                    if r > 0:
                        answered += r
                if n < BATCH:
                    break
    finally:
        free(rm); free(sm); free(ri); free(si); free(names); free(inb); free(outb)
    return received, answered


def echo_stream(bytes data, bint ws):
    """The replies to every complete request in ``data``, the plaintext
    received on a stream connection: ``(consumed, replies, requests, bad)``.

    Requests are framed by Content-Length, or one per WebSocket frame with
    ``ws`` (the replies then go in unmasked frames).  ``consumed`` bytes of
    ``data`` were used (the rest is an incomplete message); ``bad`` counts
    what breaks the stream: an unmasked client frame, a fragmented or
    broken one, garbage.  After a bad one the caller closes the connection.
    """
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, m, r, o = 0, cap
    cdef char *out
    cdef char *nb
    cdef char scratch[MSG_MAX]
    cdef char reply[MSG_MAX]
    cdef WsFrame f
    cdef uint64_t reqs = 0, bad = 0
    cap = n + 4096
    out = <char *>malloc(cap)
    if out == NULL:
        raise MemoryError()
    try:
        while pos < n and not bad:
            if ws:
                m = ws_parse(p + pos, n - pos, &f)
                if m == 0:
                    break
                if (m < 0 or not f.masked or not f.fin or f.plen > MSG_MAX
                        or (f.opcode != WS_TEXT and f.opcode != WS_BINARY)):
                    bad += 1
                    break
                ws_xor(scratch, p + pos + f.hlen, f.plen,
                       <const unsigned char *>(p + pos + f.hlen - 4))
                r = build_ok(scratch, f.plen, reply, MSG_MAX, NULL, 0)
            else:
                m = frame_length(p + pos, n - pos)
                if m == 0:
                    break
                if m < 0:
                    bad += 1
                    break
                r = (build_ok(p + pos, m, reply, MSG_MAX, NULL, 0)
                     if p[pos] != 13 and p[pos] != 10 else 0)
            pos += m
            if r == 0:
                continue
            reqs += 1
            if o + r + WS_HDR_MAX > cap:
                cap = 2 * cap + r + WS_HDR_MAX
                nb = <char *>realloc(out, cap)
                if nb == NULL:
                    raise MemoryError()
                out = nb
            if ws:
                o += ws_put(out + o, WS_TEXT, reply, r, False, 0)
            else:
                memcpy(out + o, reply, r)
                o += r
        return pos, PyBytes_FromStringAndSize(out, o), reqs, bad
    finally:
        free(out)
