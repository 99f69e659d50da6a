# The store's Python API (store.pyx) over the binding table (table.pxd).

cdef class Store(BindingTable):
    cdef object make_binding(self, int32_t slot)
    cdef int32_t _find_str(self, aor) except -2
    cdef void _drain(self) noexcept
    cdef void drain_head(self, Py_ssize_t n) noexcept
    cdef int _load_in(self, int32_t a, const BindingIn* bi, object drop_flows) except -1
    cdef int32_t _unmark(self, aor) except -2
    cdef void done_c(self, const char* aor, Py_ssize_t n) noexcept

