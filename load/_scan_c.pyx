# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""Reading replies for the load engine, in C, without Python objects.

:func:`rbatch_recv` receives up to ``BATCH`` datagrams with one
``recvmmsg``; :func:`scan_reply` finds the status code, the CSeq number
and the Call-ID span of a response (the engine's match key);
:func:`frame_length` cuts a TCP stream into messages by their
Content-Length.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp

from load._common cimport MSG_DONTWAIT, MSG_MAX, name_is, recvmmsg


cdef int scan_reply(const char *p, Py_ssize_t n, ReplyInfo *out) noexcept nogil:
    """Status code, CSeq number and Call-ID span of a response.

    Returns 0 on success, -1 for something that is not a SIP response, -2 when
    the Call-ID or the CSeq number is missing.
    """
    cdef Py_ssize_t pos, end, ne, vs, ve, i
    cdef const char *nl
    cdef const char *colon
    cdef int found = 0
    cdef uint64_t num
    if n < 12 or memcmp(p, b"SIP/2.0 ", 8) != 0:
        return -1
    if not (48 <= p[8] <= 57 and 48 <= p[9] <= 57 and 48 <= p[10] <= 57):
        return -1
    out.status = (p[8] - 48) * 100 + (p[9] - 48) * 10 + (p[10] - 48)
    out.cid = NULL
    out.cid_len = 0
    out.cseq = 0
    nl = <const char *>memchr(p, 10, n)
    if nl == NULL:
        return -2
    pos = nl - p + 1
    while pos < n and found != 3:
        nl = <const char *>memchr(p + pos, 10, n - pos)
        end = n if nl == NULL else nl - p
        ve = end
        if ve > pos and p[ve - 1] == 13:
            ve -= 1
        if ve == pos:                       # blank line: end of headers
            break
        colon = <const char *>memchr(p + pos, 58, ve - pos)
        if colon != NULL:
            ne = colon - p
            while ne > pos and (p[ne - 1] == 32 or p[ne - 1] == 9):
                ne -= 1
            vs = colon - p + 1
            while vs < ve and (p[vs] == 32 or p[vs] == 9):
                vs += 1
            while ve > vs and (p[ve - 1] == 32 or p[ve - 1] == 9):
                ve -= 1
            if name_is(p + pos, ne - pos, b"call-id", 7) or name_is(p + pos, ne - pos, b"i", 1):
                out.cid = p + vs
                out.cid_len = ve - vs
                found |= 1
            elif name_is(p + pos, ne - pos, b"cseq", 4):
                num = 0
                i = vs
                while i < ve and 48 <= p[i] <= 57 and i - vs < 12:
                    num = num * 10 + (p[i] - 48)
                    i += 1
                if i > vs:
                    out.cseq = num
                    found |= 2
        pos = end + 1
    return 0 if found == 3 else -2


cdef Py_ssize_t frame_length(const char *p, Py_ssize_t n) noexcept nogil:
    """Length of the first complete message in a TCP stream buffer.

    0 when more bytes are needed, -1 when the headers are unreasonably long
    (the stream is broken).  Leading CRLF keep-alives count as a message of
    their own length (the caller skips them).
    """
    cdef Py_ssize_t i = 0, pos, ve, vs, cl = 0
    cdef const char *nl
    cdef const char *colon
    while i < n and (p[i] == 13 or p[i] == 10):
        i += 1
    if i > 0:
        return i
    pos = 0
    while True:
        if pos >= n:
            return 0 if n < 65536 else -1
        nl = <const char *>memchr(p + pos, 10, n - pos)
        if nl == NULL:
            return 0 if n < 65536 else -1
        ve = nl - p
        if ve > pos and p[ve - 1] == 13:
            ve -= 1
        if ve == pos:                        # blank line
            pos = nl - p + 1
            break
        colon = <const char *>memchr(p + pos, 58, ve - pos)
        if colon != NULL:
            vs = colon - p
            while vs > pos and (p[vs - 1] == 32 or p[vs - 1] == 9):
                vs -= 1
            if name_is(p + pos, vs - pos, b"content-length", 14) or name_is(p + pos, vs - pos, b"l", 1):
                vs = colon - p + 1
                while vs < ve and (p[vs] == 32 or p[vs] == 9):
                    vs += 1
                cl = 0
                while vs < ve and 48 <= p[vs] <= 57 and cl < 1000000:
                    cl = cl * 10 + (p[vs] - 48)
                    vs += 1
        pos = nl - p + 1
    if pos + cl > n:
        return 0
    return pos + cl


cdef int rbatch_init(RecvBatch *b) noexcept nogil:
    """-1 when out of memory."""
    cdef int i
    b.buf = <char *>malloc(BATCH * MSG_MAX)
    if b.buf == NULL:
        return -1
    for i in range(BATCH):
        b.iov[i].iov_base = b.buf + i * MSG_MAX
        b.iov[i].iov_len = MSG_MAX
    return 0


cdef void rbatch_free(RecvBatch *b) noexcept nogil:
    free(b.buf)
    b.buf = NULL


cdef int rbatch_recv(RecvBatch *b, int fd) noexcept nogil:
    """Receive what waits on ``fd`` (at most ``BATCH`` datagrams, without
    blocking); how many: datagram ``i`` is ``b.buf + i * MSG_MAX``, its
    length ``b.msgs[i].msg_len``."""
    cdef int i, n
    for i in range(BATCH):
        b.msgs[i].msg_hdr.msg_name = NULL
        b.msgs[i].msg_hdr.msg_namelen = 0
        b.msgs[i].msg_hdr.msg_iov = &b.iov[i]
        b.msgs[i].msg_hdr.msg_iovlen = 1
        b.msgs[i].msg_hdr.msg_control = NULL
        b.msgs[i].msg_hdr.msg_controllen = 0
        b.msgs[i].msg_hdr.msg_flags = 0
    n = recvmmsg(fd, b.msgs, BATCH, MSG_DONTWAIT, NULL)
    return n if n > 0 else 0


def _scan_reply(bytes data):
    """Test hook: ``(status, cseq, call_id)`` of a response, or the error code."""
    cdef ReplyInfo ri
    cdef int rc = scan_reply(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &ri)
    if rc:
        return rc
    return ri.status, ri.cseq, PyBytes_FromStringAndSize(ri.cid, ri.cid_len)


def _frame_length(bytes data):
    """Test hook for the TCP framer."""
    return frame_length(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
