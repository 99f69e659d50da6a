# Credentials and challenges (RFC 7235 2.1): the scan behind scan_credentials,
# step by step, for callers that want spans instead of a dict.
cdef enum AuthErr:
    AE_OK = 0
    AE_EMPTY
    AE_SCHEME
    AE_WS_AFTER_SCHEME
    AE_NAME
    AE_EQ
    AE_QSTRING
    AE_VALUE
    AE_COMMA


cdef struct AuthScan:
    Span scheme
    Span token68         # off -1 when the value has no token68
    Py_ssize_t pos       # where the scan goes on; the offset of an error
    AuthErr err
