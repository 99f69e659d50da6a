# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: auto_pickle=False, autotestdict=False
"""WebSocket frames (RFC 6455) in C, for SIP over WebSocket (RFC 7118).

:func:`ws_put` writes one frame (FIN set, one SIP message per frame as RFC
7118 section 5.1 asks), masked when a client sends it; :func:`ws_parse`
reads a frame header; :func:`ws_xor` applies or removes a masking key.
The load engine's connections (``load._tcp_c``) frame with these, and so
does the echo (``load._echo_c``) on its server side.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


cdef Py_ssize_t ws_put(char *dst, int opcode, const char *payload, size_t n, bint mask,
                       uint32_t key) noexcept nogil:
    """Write a final frame of ``opcode`` carrying ``payload[:n]`` at ``dst``
    (room for ``n + WS_HDR_MAX`` bytes); masked with ``key`` when ``mask``.
    Returns the frame's length."""
    cdef Py_ssize_t h = 2
    cdef unsigned char k[4]
    cdef int i
    dst[0] = <char>(0x80 | (opcode & 0x0F))
    if n < 126:
        dst[1] = <char>n
    elif n < 65536:
        dst[1] = 126
        dst[2] = <char>(n >> 8)
        dst[3] = <char>(n & 0xFF)
        h = 4
    else:
        dst[1] = 127
        for i in range(8):
            dst[2 + i] = <char>((<uint64_t>n >> (56 - 8 * i)) & 0xFF)
        h = 10
    if mask:
        dst[1] = <char>(<unsigned char>dst[1] | 0x80)
        k[0] = <unsigned char>(key >> 24)
        k[1] = <unsigned char>(key >> 16)
        k[2] = <unsigned char>(key >> 8)
        k[3] = <unsigned char>key
        memcpy(dst + h, k, 4)
        h += 4
        ws_xor(dst + h, payload, n, k)
    else:
        memcpy(dst + h, payload, n)
    return h + n


cdef Py_ssize_t ws_parse(const char *p, Py_ssize_t n, WsFrame *f) noexcept nogil:
    """The header of the frame at ``p[:n]`` in ``f``; returns the whole
    frame's length, 0 when more bytes are needed, -1 for a frame that breaks
    the stream (reserved bits set, a payload over ``WS_PAYLOAD_MAX``)."""
    cdef const unsigned char *u = <const unsigned char *>p
    cdef Py_ssize_t h = 2
    cdef uint64_t length
    cdef int i
    if n < 2:
        return 0
    if u[0] & 0x70:
        return -1
    f.fin = (u[0] & 0x80) != 0
    f.opcode = u[0] & 0x0F
    f.masked = (u[1] & 0x80) != 0
    length = u[1] & 0x7F
    if length == 126:
        if n < 4:
            return 0
        length = (<uint64_t>u[2] << 8) | u[3]
        h = 4
    elif length == 127:
        if n < 10:
            return 0
        length = 0
        for i in range(8):
            length = (length << 8) | u[2 + i]
        h = 10
    if length > WS_PAYLOAD_MAX:
        return -1
    if f.masked:
        h += 4
    f.hlen = h
    f.plen = <Py_ssize_t>length
    if n < h + f.plen:
        return 0
    return h + f.plen


cdef void ws_xor(char *dst, const char *src, Py_ssize_t n, const unsigned char *key) noexcept nogil:
    """``dst[i] = src[i] ^ key[i % 4]`` (``dst`` may be ``src``), eight bytes at a time."""
    cdef uint64_t k8, w
    cdef Py_ssize_t i = 0
    cdef unsigned char kk[8]
    for i in range(8):
        kk[i] = key[i & 3]
    memcpy(&k8, kk, 8)
    i = 0
    while i + 8 <= n:
        memcpy(&w, src + i, 8)
        w ^= k8
        memcpy(dst + i, &w, 8)
        i += 8
    while i < n:
        dst[i] = <char>(<unsigned char>src[i] ^ key[i & 3])
        i += 1


def _frame(bytes payload, int opcode=WS_TEXT, bint mask=True, uint32_t key=0x11223344):
    """Test hook: ``payload`` as one frame."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef char *buf = <char *>malloc(n + WS_HDR_MAX)
    if buf == NULL:
        raise MemoryError()
    try:
        n = ws_put(buf, opcode, PyBytes_AS_STRING(payload), n, mask, key)
        return PyBytes_FromStringAndSize(buf, n)
    finally:
        free(buf)


def _parse(bytes data):
    """Test hook: ``(frame length, fin, opcode, masked, payload unmasked)``, or
    the length alone (0: incomplete, -1: broken)."""
    cdef WsFrame f
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t m = ws_parse(p, PyBytes_GET_SIZE(data), &f)
    cdef bytearray out
    cdef char *q
    if m <= 0:
        return m
    out = bytearray(p[f.hlen:f.hlen + f.plen])
    q = out
    if f.masked and f.plen:
        ws_xor(q, q, f.plen, <const unsigned char *>(p + f.hlen - 4))
    return m, bool(f.fin), f.opcode, bool(f.masked), bytes(out)
