# The store's Python API (store.pyx) over the binding table (table.pxd).

cdef class Store(BindingTable):
    cdef object make_binding(self, int32_t slot)
    cdef int32_t _find_str(self, aor) except -2
