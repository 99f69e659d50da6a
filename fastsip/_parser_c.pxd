# C-level interface of the parser, for other compiled modules (the registrar).
#
# The scan records where things are (Span = offset + length into the input);
# nothing here builds a Python object.
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


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


cdef struct Span:
    Py_ssize_t off
    Py_ssize_t length


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


# A name-addr / addr-spec with its parameters (From, To, Contact, Route, Path).
cdef struct NameAddr:
    Span display         # display name, raw (with its quotes when quoted)
    Span uri             # the URI without <>
    Span params          # ";a=b;c" after the URI, raw (may be empty)
    Span p_expires       # value spans of well-known params; off = -1 when absent
    Span p_q
    Span p_tag
    Span p_instance      # +sip.instance (raw, with quotes)
    Span p_regid
    Span raw             # the whole entry, trimmed
    uint8_t quoted       # display name is a quoted-string
    uint8_t star         # the wildcard Contact "*"
    uint8_t bracketed    # URI was written inside <>


# A parsed SIP/SIPS URI.
cdef struct UriSpans:
    Span scheme
    Span user            # raw, still escaped; length 0 and off -1 when absent
    Span password
    Span host            # with the brackets of an IPv6 reference
    Span params          # ";..." raw
    Span headers         # "?..." raw, without the "?"
    int port             # -1 when absent
    uint8_t sips


cdef struct ViaSpans:
    Span protocol
    Span version
    Span transport
    Span host
    Span params
    Span branch
    Span raw
    int port


cdef int scan_message(const char* buf, Py_ssize_t n, Msg* m, const Limits* lim) noexcept nogil
cdef void msg_init(Msg* m) noexcept nogil
cdef void msg_release(Msg* m) noexcept nogil
cdef Py_ssize_t parse_name_addr(const char* buf, Py_ssize_t pos, Py_ssize_t end, NameAddr* na,
                                bint in_list, Py_ssize_t* err_pos) noexcept nogil
cdef Py_ssize_t parse_via(const char* buf, Py_ssize_t pos, Py_ssize_t end, ViaSpans* v,
                          Py_ssize_t* err_pos) noexcept nogil
cdef Py_ssize_t scan_param(const char* buf, Py_ssize_t pos, Py_ssize_t end,
                           Span* name, Span* value, Py_ssize_t* err_pos) noexcept nogil
cdef struct TokenIter:
    int htype
    int i                # the header line being read; -1 before the first
    Py_ssize_t pos, end


cdef int next_header_token(const char* buf, const Msg* m, TokenIter* it, Span* tok) noexcept nogil
cdef Py_ssize_t bad_call_id(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil
cdef Py_ssize_t next_list_token(const char* buf, Py_ssize_t pos, Py_ssize_t end,
                                Span* tok) noexcept nogil
cdef Py_ssize_t skip_lws(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil
cdef Py_ssize_t skip_token(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil
cdef int scan_sip_uri(const char* buf, Py_ssize_t s, Py_ssize_t e, UriSpans* u,
                      Py_ssize_t* err_pos) noexcept nogil
cdef int64_t parse_uint(const char* buf, Py_ssize_t s, Py_ssize_t e, int64_t clamp) noexcept nogil
cdef int parse_qvalue(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil
cdef bint ieq(const char* a, Py_ssize_t alen, const char* lower_b, Py_ssize_t blen) noexcept nogil
cdef uint64_t hash_bytes(const char* p, Py_ssize_t n, uint64_t k0, uint64_t k1) noexcept nogil
cdef uint64_t uri_key_hash(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil
cdef uint64_t aor_hash(const char* aor, Py_ssize_t n) noexcept nogil     # stable_hash
# The forms of canonical_aor: the comparison prefix of a URI (with the port),
# the address-of-record keyed by user@host (the default), or by user alone.
cdef enum AorForm:
    AOR_URI = 0
    AOR_HOST = 1
    AOR_USER = 2
cdef Py_ssize_t canonical_aor(const char* buf, const UriSpans* u, char* out, Py_ssize_t cap,
                              int form) noexcept nogil
cdef Py_ssize_t scan_quoted(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil
cdef Span trim(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil
cdef object raise_parse_error(int code, Py_ssize_t pos, object data, const Limits* lim, const Msg* m)
cdef class Parser:
    cdef Limits lim
    cpdef object parse(self, object data)


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


cdef int auth_scan_start(const char* b, Py_ssize_t n, AuthScan* st) noexcept nogil
cdef int auth_next_name(const char* b, Py_ssize_t n, AuthScan* st, Span* name) noexcept nogil
cdef int auth_param_value(const char* b, Py_ssize_t n, AuthScan* st, Span* value,
                          bint* escaped) noexcept nogil
