# cython: language_level=3
"""Reading replies for the load engine: the UDP receive batch, the reply
scanner and the TCP framer (see _scan_c.pyx)."""

from libc.stdint cimport uint64_t

from load._common cimport BATCH, iovec, mmsghdr

cdef struct ReplyInfo:
    int status
    uint64_t cseq
    const char *cid
    Py_ssize_t cid_len


cdef struct RecvBatch:
    mmsghdr msgs[BATCH]
    iovec iov[BATCH]
    char *buf                 # BATCH * MSG_MAX


cdef int scan_reply(const char *p, Py_ssize_t n, ReplyInfo *out) noexcept nogil
cdef Py_ssize_t frame_length(const char *p, Py_ssize_t n) noexcept nogil
cdef int rbatch_init(RecvBatch *b) noexcept nogil
cdef void rbatch_free(RecvBatch *b) noexcept nogil
cdef int rbatch_recv(RecvBatch *b, int fd) noexcept nogil
