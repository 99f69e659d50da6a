# cython: language_level=3
"""The load engine's stream connections (TCP, and under TLS and WebSocket):
an output queue and an input buffer per connection (see _tcp_c.pyx)."""

from libc.stdint cimport int64_t, uint32_t, uint64_t

from load._common cimport iovec, pollfd

cdef enum:
    TCP_IN_CAP = 1 << 18  # received (plaintext) bytes of one connection not yet framed


cdef struct Buf:           # a growable byte buffer
    char *p
    size_t len
    size_t cap


cdef struct Conn:          # one connection
    Buf out                # bytes for the socket (ciphertext over TLS)
    Buf plain              # TLS: messages queued, not yet encrypted (the engine seals them)
    Buf inb                # received plaintext not yet framed
    int ws                 # messages travel as WebSocket frames, masked (a client's)
    int tls                # the engine encrypts and decrypts between the socket and the buffers
    uint32_t mask          # the masking-key generator's state
    uint64_t pings         # WebSocket pings answered
    int closed


# what conn_deliver hands every complete message to
ctypedef void (*on_message_fn)(void *ctx, const char *p, Py_ssize_t n, int64_t t) noexcept

cdef int buf_reserve(Buf *b, size_t extra) noexcept nogil
cdef int buf_append(Buf *b, const char *p, size_t n) noexcept nogil
cdef int conn_queue(Conn *c, const iovec *iov, int n) noexcept nogil
cdef bint conn_flush(Conn *c, int fd) noexcept nogil
cdef bint conn_deliver(Conn *c, int64_t t, on_message_fn on_message, void *ctx,
                       uint64_t *garbage) noexcept
cdef bint conn_recv(Conn *c, int fd, on_message_fn on_message, void *ctx,
                    uint64_t *garbage) noexcept
cdef void conn_free(Conn *c) noexcept nogil
cdef int conns_flush(Conn *conns, const int *fds, int n) noexcept nogil
cdef void conns_poll_events(const Conn *conns, pollfd *pfds, int n) noexcept nogil
