# The Python message classes (message.pyx).

cdef class Parser:
    cdef Limits lim
    cpdef object parse(self, object data)
