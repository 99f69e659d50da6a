# cython: language_level=3
"""The load engine's TCP connections: an output queue and an input buffer
per connection (see _tcp_c.pyx)."""

from libc.stdint cimport int64_t, uint64_t

from load._common cimport iovec, pollfd

cdef enum:
    TCP_IN_CAP = 1 << 18  # receive buffer of one TCP connection


cdef struct Conn:          # one TCP connection
    char *ob               # queued output
    size_t olen
    size_t ocap
    char *ib               # received bytes not yet framed
    size_t ilen
    int closed


# what conn_recv hands every complete message to
ctypedef void (*on_message_fn)(void *ctx, const char *p, Py_ssize_t n, int64_t t) noexcept

cdef int conn_queue(Conn *c, const iovec *iov, int n) noexcept nogil
cdef bint conn_flush(Conn *c, int fd) noexcept nogil
cdef bint conn_recv(Conn *c, int fd, on_message_fn on_message, void *ctx,
                    uint64_t *garbage) noexcept
cdef void conn_free(Conn *c) noexcept nogil
cdef int conns_flush(Conn *conns, const int *fds, int n) noexcept nogil
cdef void conns_poll_events(const Conn *conns, pollfd *pfds, int n) noexcept nogil
