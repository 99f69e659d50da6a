# The failed-attempts budget of digest authentication (throttle.pyx).

cdef class FailureBudget:
    cdef readonly int limit
    cdef readonly double backoff
    cdef readonly Py_ssize_t max_entries
    cdef dict sources        # host (bytes) -> [failures, window start, refused until]
    cdef dict users          # user (str) -> [failures, window start, refused until, {hosts}]
    cdef list events         # throttles begun: (kind, key, until), for the server's log
    cdef double refusing_until   # the latest end of a refusal (``refuses`` is no after it)

    cdef bint watching(self, double now) noexcept
    cdef bint refuses(self, bytes host, str user, double now)
    cdef int failed(self, bytes host, str user, double now) except -1
