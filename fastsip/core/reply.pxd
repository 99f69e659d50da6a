# The reply writer (reply.pyx).

cdef class ReplyWriter:
    cdef char* out
    cdef Py_ssize_t length, cap
    cdef char date_buf[40]
    cdef Py_ssize_t date_len
    cdef long date_sec
    cdef bytes server_line
    cdef uint64_t counts[700]          # replies written, by status
    cdef int order[MAX_LISTED]         # the 200's listing order

    cdef int w(self, const char* p, Py_ssize_t n) except -1
    cdef int wbytes(self, bytes b) except -1
    cdef int wint(self, int64_t v) except -1
    cdef int copy_header(self, const Req* rq, int htype, const char* name,
                         Py_ssize_t name_len) except -1
    cdef int via(self, const Req* rq) except -1
    cdef int date(self, double now) except -1
    cdef int start(self, const Req* rq, int status, const char* reason,
                   Py_ssize_t reason_len) except -1
    cdef bytes finish(self, const Req* rq, int status)
    cdef bytes reply(self, const Req* rq, int status, object reason, object headers)
    cdef bytes ok(self, const Req* rq, const AorView* v, bint outbound, bint path)
    cdef int qvalue(self, int q) except -1
