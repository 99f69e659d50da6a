# cython: language_level=3
"""The reply scanner and the TCP framer of the load engine (see _scan_c.pyx)."""

from libc.stdint cimport uint64_t

cdef struct ReplyInfo:
    int status
    uint64_t cseq
    const char *cid
    Py_ssize_t cid_len


cdef int scan_reply(const char *p, Py_ssize_t n, ReplyInfo *out) noexcept nogil
cdef Py_ssize_t frame_length(const char *p, Py_ssize_t n) noexcept nogil
