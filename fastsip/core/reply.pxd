# The reply writer (reply.pyx).

cdef enum:
    MAX_DATAGRAM = 65507          # the largest UDP payload (IPv4): a 302's size limit

cdef class ReplyWriter:
    cdef char* out
    cdef Py_ssize_t length, cap
    cdef char date_buf[40]
    cdef Py_ssize_t date_len
    cdef long date_sec
    cdef bytes server_line
    cdef uint64_t counts[700]          # replies written, by status
    cdef int order[MAX_LISTED]         # the listing order of a 200 or 302 (by_q)
    cdef int omitted                   # contacts the last 302 left out (its size limit)

    cdef int w(self, const char* p, Py_ssize_t n) except -1
    cdef int wbytes(self, bytes b) except -1
    cdef Py_ssize_t challenge(self, const Req* rq, list wire, const char* nonce,
                              Py_ssize_t nonce_len) except -1
    cdef int wint(self, int64_t v) except -1
    cdef int copy_header(self, const Req* rq, int htype, const char* name,
                         Py_ssize_t name_len) except -1
    cdef int via(self, const Req* rq) except -1
    cdef int date(self, double now) except -1
    cdef int start(self, const Req* rq, int status, const char* reason,
                   Py_ssize_t reason_len) except -1
    cdef Py_ssize_t finish(self, const Req* rq, int status) except -1
    cdef bytes result(self)
    cdef Py_ssize_t reply(self, const Req* rq, int status, object reason,
                          object headers) except -1
    cdef int by_q(self, const AorView* v, double now) noexcept
    cdef Py_ssize_t ok(self, const Req* rq, const AorView* v, bint outbound,
                       bint path) except -1
    cdef Py_ssize_t moved(self, const Req* rq, const AorView* v, uint64_t skip,
                          Py_ssize_t limit) except -1
    cdef int qvalue(self, int q) except -1
