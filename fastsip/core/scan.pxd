# The message scan's types (scan.pyx): where the start line, each header
# and the body are, as offsets into the input.

cdef enum:
    INLINE_HEADERS = 24     # headers kept inside the message object; more go to the heap


cdef enum HdrType:
    HDR_OTHER = 0
    HDR_VIA
    HDR_FROM
    HDR_TO
    HDR_CALL_ID
    HDR_CSEQ
    HDR_CONTACT
    HDR_EXPIRES
    HDR_CONTENT_LENGTH
    HDR_CONTENT_TYPE
    HDR_MAX_FORWARDS
    HDR_REQUIRE
    HDR_PROXY_REQUIRE
    HDR_SUPPORTED
    HDR_UNSUPPORTED
    HDR_PATH
    HDR_AUTHORIZATION
    HDR_PROXY_AUTHORIZATION
    HDR_WWW_AUTHENTICATE
    HDR_PROXY_AUTHENTICATE
    HDR_ROUTE
    HDR_RECORD_ROUTE
    HDR_USER_AGENT
    HDR_SERVER
    HDR_DATE
    HDR_MIN_EXPIRES
    HDR_ALLOW
    HDR_ACCEPT
    HDR_SUBJECT
    HDR_CONTENT_ENCODING
    HDR_EVENT
    HDR_REFER_TO
    HDR_ALLOW_EVENTS
    HDR_SESSION_EXPIRES
    HDR_IDENTITY
    HDR_ACCEPT_CONTACT
    HDR_REFERRED_BY
    HDR_REJECT_CONTACT
    HDR_REQUEST_DISPOSITION
    HDR_IDENTITY_INFO
    HDR_TIMESTAMP
    HDR_RETRY_AFTER
    HDR_WARNING
    HDR__COUNT


cdef enum ErrCode:
    OK = 0
    E_EMPTY = -1
    E_START_LINE = -2
    E_METHOD = -3
    E_RURI = -4
    E_VERSION = -5
    E_STATUS = -6
    E_HEADER_NAME = -7
    E_NO_COLON = -8
    E_FOLD_START = -9
    E_BARE_CR = -10
    E_CONTENT_LENGTH = -11
    E_CL_CONFLICT = -12
    E_BODY_SHORT = -13
    E_TOO_LARGE = -14
    E_TOO_MANY_HEADERS = -15
    E_LINE_TOO_LONG = -16
    E_URI_TOO_LONG = -17
    E_NO_MEMORY = -18


cdef struct Header:
    int32_t name_off
    int32_t val_off      # first byte of the value after the colon and its LWS
    int32_t val_len      # up to the last non-blank byte; may span folded lines
    uint16_t name_len
    uint8_t htype        # HdrType
    uint8_t folded       # the value contains line breaks (folding) to normalise


cdef struct Limits:
    Py_ssize_t max_size
    Py_ssize_t max_headers
    Py_ssize_t max_line
    Py_ssize_t max_uri
    Py_ssize_t max_contacts


cdef struct Msg:
    Span method          # requests
    Span uri             # requests
    Span reason          # responses
    int status           # 0 for a request
    int uri_bracketed    # the Request-URI was sent inside <> (tolerated; validate() refuses)
    Py_ssize_t start     # offset of the start line
    Py_ssize_t body_off
    Py_ssize_t body_len
    int64_t content_length   # -1: no Content-Length header
    Py_ssize_t cl_pos    # where the Content-Length value is (for errors)
    Py_ssize_t err_pos
    int nheaders
    int cap
    Header* hdrs         # == inline_hdrs or a heap block
    int16_t first[<int>HDR__COUNT]   # index of the first header of each type, -1 if absent
    Header inline_hdrs[<int>INLINE_HEADERS]
