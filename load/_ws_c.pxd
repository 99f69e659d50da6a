# cython: language_level=3
"""WebSocket frames (RFC 6455) for SIP over WebSocket (RFC 7118): one SIP
message per frame (see _ws_c.pyx)."""

from libc.stdint cimport uint32_t

cdef enum:
    WS_CONT = 0
    WS_TEXT = 1
    WS_BINARY = 2
    WS_CLOSE = 8
    WS_PING = 9
    WS_PONG = 10
    WS_HDR_MAX = 14            # the longest header: 2 + 8 (length) + 4 (masking key)
    WS_PAYLOAD_MAX = 1 << 20   # a larger frame breaks the stream


cdef struct WsFrame:
    int fin
    int opcode
    int masked
    Py_ssize_t hlen            # the header's length: the payload starts here
    Py_ssize_t plen            # the payload's length


cdef Py_ssize_t ws_put(char *dst, int opcode, const char *payload, size_t n, bint mask,
                       uint32_t key) noexcept nogil
cdef Py_ssize_t ws_parse(const char *p, Py_ssize_t n, WsFrame *f) noexcept nogil
cdef void ws_xor(char *dst, const char *src, Py_ssize_t n, const unsigned char *key) noexcept nogil


cdef inline uint32_t ws_next_key(uint32_t *state) noexcept nogil:
    """The next masking key from a xorshift32 generator (RFC 6455 asks for an
    unpredictable key against proxies that cache; a load tool on loopback
    needs only that it varies)."""
    cdef uint32_t x = state[0]
    if x == 0:
        x = 0x9E3779B9
    x ^= x << 13
    x ^= x >> 17
    x ^= x << 5
    state[0] = x
    return x
