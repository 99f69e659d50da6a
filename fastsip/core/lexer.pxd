# The lexer's types (lexer.pyx).

cdef struct Span:
    Py_ssize_t off
    Py_ssize_t length
