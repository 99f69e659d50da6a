# The FCALL of a staged write, packed in C (_resp_c.pyx): for pack_cas, and for the
# server's queue of staged writes (fastsip/server/_io_c.pyx), which packs them into
# a batch's buffer without a Python object per write.
from libc.stdint cimport uint64_t

cdef Py_ssize_t cas_size(Py_ssize_t aor_len, uint64_t expected, Py_ssize_t record_len,
                         long long pxat_ms) noexcept
cdef Py_ssize_t cas_record_at(Py_ssize_t aor_len, uint64_t expected,
                              Py_ssize_t record_len) noexcept
cdef int cas_write(char* p, const char* aor, Py_ssize_t aor_len, uint64_t expected,
                   const char* record, Py_ssize_t record_len, long long pxat_ms,
                   bint slot) noexcept
cdef int cas_slot(const char* aor, Py_ssize_t aor_len) noexcept
