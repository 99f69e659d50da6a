# The hand-off datagram between workers, defined once: its header is written and
# read only here (``fastsip.server._io_c`` cimports this file; Python code uses
# ``_io_c.encode_handoff`` / ``decode_handoff``).
#
# A hand-off datagram is the header, the source host (ASCII, ``host_len``
# bytes) and the SIP message.  The header, 14 bytes, big-endian:
#
#   offset  size  field
#        0     1  kind       H_UDP, H_TCP (a request over a stream), H_TCP_REPLY (a reply
#                            to deliver) or H_CONN_CLOSED (a stream connection closed)
#        1     1  listener   H_UDP: the UDP listener the client sent to (its reply leaves
#                            from it); H_TCP: the transport's number (fastsip.core TRANSPORTS)
#        2     1  origin     the worker that received it (holds the TCP connection)
#        3     1  host_len   length of the source host that follows (at most MAX_HOST)
#        4     8  conn_id    the TCP connection id (signed; -1 for UDP)
#       12     2  port       the source port
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t


cdef enum:
    HANDOFF_HEADER = 14
    H_UDP = 1
    H_TCP = 2
    H_TCP_REPLY = 3
    H_CONN_CLOSED = 4
    MAX_HOST = 64           # an IPv6 address in text is at most 45 bytes


cdef struct Handoff:
    uint8_t kind
    uint8_t listener
    uint8_t origin
    uint8_t host_len
    int64_t conn_id
    uint16_t port


cdef inline void handoff_write(unsigned char* p, const Handoff* h) noexcept nogil:
    """Write the header ``h`` into the first HANDOFF_HEADER bytes at ``p``."""
    cdef uint64_t cid = <uint64_t>h.conn_id
    cdef int k
    p[0] = h.kind
    p[1] = h.listener
    p[2] = h.origin
    p[3] = h.host_len
    for k in range(8):
        p[4 + k] = (cid >> (56 - 8 * k)) & 0xFF
    p[12] = (h.port >> 8) & 0xFF
    p[13] = h.port & 0xFF


cdef inline bint handoff_read(const unsigned char* p, Py_ssize_t size, Handoff* h) noexcept nogil:
    """Read the header of a ``size``-byte datagram into ``h``; False when the
    datagram is too short for its header and host, or the host is too long."""
    cdef uint64_t cid = 0
    cdef int k
    if size < HANDOFF_HEADER or p[3] > MAX_HOST or size < HANDOFF_HEADER + p[3]:
        return False
    h.kind = p[0]
    h.listener = p[1]
    h.origin = p[2]
    h.host_len = p[3]
    for k in range(8):
        cid = (cid << 8) | p[4 + k]
    h.conn_id = <int64_t>cid
    h.port = (p[12] << 8) | p[13]
    return True
