# cython: freethreading_compatible=False
"""The compiled SIP parser.

``scan_message`` walks a datagram once and records where the start line, every
header and the body are (offsets into the input, no Python objects).  The
Python-visible classes below build typed values from those spans only when a
caller asks for them, and cache them.  Every error goes through
``raise_parse_error`` so that each one carries its byte offset and the SIP
status a server should answer with.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_DecodeASCII
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memchr, memcmp, memcpy, memset

from fastsip import errors as _errors

# --------------------------------------------------------------------------
# Character classes
# --------------------------------------------------------------------------

cdef enum:
    C_TOKEN = 1      # RFC 3261 token
    C_WS = 2         # SP / HTAB
    C_LWS = 4        # SP / HTAB / CR / LF (inside an already framed value)
    C_DIGIT = 8
    C_HEX = 16
    C_URIC = 32      # may appear in a URI (reserved / unreserved / escaped / [ ])
    C_SCHEME = 64    # scheme characters after the first
    C_WORD = 128     # Call-ID "word"

cdef enum:
    U_USER = 1       # user: unreserved / escaped / user-unreserved
    U_PASS = 2       # password
    U_HOST = 4       # hostname / IPv4 characters
    U_PARAM = 8      # uri-parameter name or value (paramchar)
    U_HDR = 16       # uri header name or value (hnv-unreserved / unreserved / escaped)
    U_IPV6 = 32      # inside [ ]
    U_PVAL = 64      # unquoted generic-param value: token / host characters

cdef int64_t U32MAX = 4294967295
cdef unsigned char CC[256]
cdef unsigned char UC[256]
cdef unsigned char LOWER[256]
cdef signed char HEXVAL[256]


cdef void _set(unsigned char* table, bytes chars, unsigned char flag):
    cdef unsigned char c
    for c in chars:
        table[c] |= flag


cdef void _init_tables():
    cdef int i
    memset(CC, 0, 256)
    memset(UC, 0, 256)
    for i in range(256):
        LOWER[i] = i + 32 if 65 <= i <= 90 else i
        HEXVAL[i] = -1
    alnum = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    unreserved = alnum + b"-_.!~*'()"
    for i in range(10):
        HEXVAL[48 + i] = i
    for i in range(6):
        HEXVAL[97 + i] = 10 + i
        HEXVAL[65 + i] = 10 + i
    _set(CC, alnum + b"-.!%*_+`'~", C_TOKEN)
    _set(CC, b" \t", C_WS)
    _set(CC, b" \t\r\n", C_LWS)
    _set(CC, b"0123456789", C_DIGIT)
    _set(CC, b"0123456789abcdefABCDEF", C_HEX)
    _set(CC, unreserved + b"%;/?:@&=+$,[]#", C_URIC)
    _set(CC, alnum + b"+-.", C_SCHEME)
    _set(CC, alnum + b"-.!%*_+`'~()<>:\\\"/[]?{}", C_WORD)
    _set(UC, unreserved + b"%&=+$,;?/", U_USER)
    _set(UC, unreserved + b"%&=+$,", U_PASS)
    _set(UC, alnum + b"-._", U_HOST)
    _set(UC, unreserved + b"%[]/:&+$", U_PARAM)
    _set(UC, unreserved + b"%[]/?:+$", U_HDR)
    _set(UC, b"0123456789abcdefABCDEF:.", U_IPV6)
    _set(UC, alnum + b"-.!%*_+`'~[]:", U_PVAL)


_init_tables()


cdef inline bint is_token(unsigned char c) noexcept nogil:
    return CC[c] & C_TOKEN


cdef inline bint is_ws(unsigned char c) noexcept nogil:
    return CC[c] & C_WS


cdef inline bint is_lws(unsigned char c) noexcept nogil:
    return CC[c] & C_LWS


cdef Py_ssize_t skip_lws(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    while pos < end and CC[<unsigned char>buf[pos]] & C_LWS:
        pos += 1
    return pos


cdef Py_ssize_t skip_token(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    while pos < end and CC[<unsigned char>buf[pos]] & C_TOKEN:
        pos += 1
    return pos


cdef Span trim(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    cdef Span sp
    while s < e and CC[<unsigned char>buf[s]] & C_LWS:
        s += 1
    while e > s and CC[<unsigned char>buf[e - 1]] & C_LWS:
        e -= 1
    sp.off = s
    sp.length = e - s
    return sp


cdef bint ieq(const char* a, Py_ssize_t alen, const char* lower_b, Py_ssize_t blen) noexcept nogil:
    """Case-insensitive compare of ``a`` with an already lower-case ``lower_b``."""
    cdef Py_ssize_t i
    if alen != blen:
        return False
    for i in range(alen):
        if LOWER[<unsigned char>a[i]] != <unsigned char>lower_b[i]:
            return False
    return True


cdef int64_t parse_uint(const char* buf, Py_ssize_t s, Py_ssize_t e, int64_t clamp) noexcept nogil:
    """Digits only.  -1 if empty or not all digits; values above ``clamp`` give ``clamp``.
    ``clamp`` < 0 means: values above 2**32-1 are an error (-2)."""
    cdef int64_t v = 0
    cdef Py_ssize_t i
    cdef unsigned char c
    if s >= e:
        return -1
    for i in range(s, e):
        c = buf[i]
        if not (CC[c] & C_DIGIT):
            return -1
        if v <= U32MAX:
            v = v * 10 + (c - 48)
    if v > U32MAX:
        return -2 if clamp < 0 else clamp
    if clamp >= 0 and v > clamp:
        return clamp
    return v


cdef int parse_qvalue(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """qvalue = ("0" ["." 0*3DIGIT]) / ("1" ["." 0*3("0")]) as thousandths, -1 if malformed."""
    cdef int v, scale = 100
    cdef Py_ssize_t i
    if s >= e or (buf[s] != b'0' and buf[s] != b'1'):
        return -1
    v = (buf[s] - 48) * 1000
    if s + 1 == e:
        return v
    if buf[s + 1] != b'.' or e - s > 5:
        return -1
    for i in range(s + 2, e):
        if not (CC[<unsigned char>buf[i]] & C_DIGIT):
            return -1
        v += (buf[i] - 48) * scale
        scale //= 10
    return v if v <= 1000 else -1


# --------------------------------------------------------------------------
# Header names
# --------------------------------------------------------------------------

# (full name, compact form, type).  Matching is case-insensitive.
HEADER_NAMES = (
    ("Via", "v", HDR_VIA), ("From", "f", HDR_FROM), ("To", "t", HDR_TO),
    ("Call-ID", "i", HDR_CALL_ID), ("CSeq", "", HDR_CSEQ), ("Contact", "m", HDR_CONTACT),
    ("Expires", "", HDR_EXPIRES), ("Content-Length", "l", HDR_CONTENT_LENGTH),
    ("Content-Type", "c", HDR_CONTENT_TYPE), ("Max-Forwards", "", HDR_MAX_FORWARDS),
    ("Require", "", HDR_REQUIRE), ("Proxy-Require", "", HDR_PROXY_REQUIRE),
    ("Supported", "k", HDR_SUPPORTED), ("Unsupported", "", HDR_UNSUPPORTED),
    ("Path", "", HDR_PATH), ("Authorization", "", HDR_AUTHORIZATION),
    ("Proxy-Authorization", "", HDR_PROXY_AUTHORIZATION),
    ("WWW-Authenticate", "", HDR_WWW_AUTHENTICATE),
    ("Proxy-Authenticate", "", HDR_PROXY_AUTHENTICATE), ("Route", "", HDR_ROUTE),
    ("Record-Route", "", HDR_RECORD_ROUTE), ("User-Agent", "", HDR_USER_AGENT),
    ("Server", "", HDR_SERVER), ("Date", "", HDR_DATE), ("Min-Expires", "", HDR_MIN_EXPIRES),
    ("Allow", "", HDR_ALLOW), ("Accept", "", HDR_ACCEPT), ("Subject", "s", HDR_SUBJECT),
    ("Content-Encoding", "e", HDR_CONTENT_ENCODING), ("Event", "o", HDR_EVENT),
    ("Refer-To", "r", HDR_REFER_TO), ("Allow-Events", "u", HDR_ALLOW_EVENTS),
    ("Session-Expires", "x", HDR_SESSION_EXPIRES), ("Identity", "y", HDR_IDENTITY),
    ("Accept-Contact", "a", HDR_ACCEPT_CONTACT), ("Referred-By", "b", HDR_REFERRED_BY),
    ("Reject-Contact", "j", HDR_REJECT_CONTACT),
    ("Request-Disposition", "d", HDR_REQUEST_DISPOSITION),
    ("Identity-Info", "n", HDR_IDENTITY_INFO), ("Timestamp", "", HDR_TIMESTAMP),
    ("Retry-After", "", HDR_RETRY_AFTER), ("Warning", "", HDR_WARNING),
)

cdef enum:
    HN_MAXLEN = 24

cdef int N_HN = 0
cdef const char* HN_NAME[64]
cdef int HN_LEN[64]
cdef int HN_TYPE[64]
cdef int HN_START[HN_MAXLEN + 1]     # names of length L are HN_START[L] .. HN_START[L+1]-1 ...
cdef int HN_END[HN_MAXLEN + 1]
cdef uint8_t COMPACT[256]
_hn_keep = []                         # keeps the bytes behind HN_NAME alive
CANONICAL_NAME = {}                   # HdrType -> canonical spelling


cdef void _init_hnames():
    global N_HN
    cdef int L, i
    memset(COMPACT, 0, 256)
    for L in range(HN_MAXLEN + 1):
        HN_START[L] = 0
        HN_END[L] = 0
    ordered = sorted(HEADER_NAMES, key=lambda t: len(t[0]))
    for full, compact, htype in ordered:
        low = full.lower().encode()
        _hn_keep.append(low)
        L = len(low)
        if HN_END[L] == 0:
            HN_START[L] = N_HN
        HN_NAME[N_HN] = <const char*>low
        HN_LEN[N_HN] = L
        HN_TYPE[N_HN] = htype
        N_HN += 1
        HN_END[L] = N_HN
        CANONICAL_NAME[htype] = full
        if compact:
            COMPACT[ord(compact)] = htype
            COMPACT[ord(compact.upper())] = htype


_init_hnames()


cdef inline int match_hname(const char* p, Py_ssize_t n) noexcept nogil:
    cdef int i
    if n == 1:
        return COMPACT[<unsigned char>p[0]]
    if n > HN_MAXLEN:
        return HDR_OTHER
    for i in range(HN_START[n], HN_END[n]):
        if ieq(p, n, HN_NAME[i], n):
            return HN_TYPE[i]
    return HDR_OTHER


def header_type(name):
    """The HdrType number of a header name (0 for names the parser has no type for)."""
    b = name.encode() if isinstance(name, str) else bytes(name)
    return match_hname(b, len(b))


# --------------------------------------------------------------------------
# The message scan
# --------------------------------------------------------------------------

cdef void msg_init(Msg* m) noexcept nogil:
    cdef int i
    m.hdrs = m.inline_hdrs
    m.cap = INLINE_HEADERS
    m.nheaders = 0
    m.status = 0
    m.uri_bracketed = 0
    m.content_length = -1
    m.cl_pos = 0
    m.err_pos = 0
    m.method.off = m.method.length = 0
    m.uri.off = m.uri.length = 0
    m.reason.off = m.reason.length = 0
    for i in range(HDR__COUNT):
        m.first[i] = -1


cdef void msg_release(Msg* m) noexcept nogil:
    if m.hdrs != m.inline_hdrs and m.hdrs != NULL:
        free(m.hdrs)
    m.hdrs = m.inline_hdrs
    m.cap = INLINE_HEADERS


cdef inline Py_ssize_t find_nl(const char* buf, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    cdef const char* p = <const char*>memchr(buf + pos, b'\n', n - pos)
    return n if p == NULL else p - buf


cdef inline bint is_sip_version(const char* p, Py_ssize_t n) noexcept nogil:
    return n == 7 and ieq(p, 3, b"sip", 3) and memcmp(p + 3, b"/2.0", 4) == 0


cdef inline bint looks_like_version(const char* p, Py_ssize_t n) noexcept nogil:
    """'SIP/' 1*DIGIT '.' 1*DIGIT: a version, maybe not ours (then 505)."""
    cdef Py_ssize_t i = 4
    cdef int dots = 0
    if n < 7 or not ieq(p, 4, b"sip/", 4):
        return False
    if not (CC[<unsigned char>p[4]] & C_DIGIT) or not (CC[<unsigned char>p[n - 1]] & C_DIGIT):
        return False
    while i < n:
        if p[i] == b'.':
            dots += 1
        elif not (CC[<unsigned char>p[i]] & C_DIGIT):
            return False
        i += 1
    return dots == 1


cdef int scan_start_line(const char* buf, Py_ssize_t pos, Py_ssize_t ce, Msg* m,
                         const Limits* lim) noexcept nogil:
    cdef Py_ssize_t p, s
    cdef int code
    if ce - pos >= 4 and ieq(buf + pos, 4, b"sip/", 4):
        # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        p = pos
        while p < ce and buf[p] != b' ':
            p += 1
        if not is_sip_version(buf + pos, p - pos):
            m.err_pos = pos
            return E_VERSION if looks_like_version(buf + pos, p - pos) else E_START_LINE
        p += 1
        s = p
        code = 0
        while p < ce and CC[<unsigned char>buf[p]] & C_DIGIT and p - s < 4:
            code = code * 10 + (buf[p] - 48)
            p += 1
        if p - s != 3 or code < 100 or code > 699 or (p < ce and buf[p] != b' '):
            m.err_pos = s
            return E_STATUS
        m.status = code
        if p < ce:
            p += 1
        m.reason.off = p
        m.reason.length = ce - p
        return OK
    # Request-Line = Method SP Request-URI SP SIP-Version
    p = skip_token(buf, pos, ce)
    if p == pos or p >= ce or buf[p] != b' ':
        m.err_pos = p
        return E_METHOD
    m.method.off = pos
    m.method.length = p - pos
    p += 1
    # Net::SIP sends "<sip:host;transport=tcp>" as Request-URI over TCP: tolerate
    # the brackets (RFC 4475 3.1.2.11 lets a liberal element ignore them).
    if p < ce and buf[p] == b'<':
        m.uri_bracketed = 1
        p += 1
    s = p
    # the Request-URI: scheme ":" then URI characters, no whitespace
    if p >= ce or not (b'a' <= LOWER[<unsigned char>buf[p]] <= b'z'):
        m.err_pos = p
        return E_RURI
    while p < ce and CC[<unsigned char>buf[p]] & C_SCHEME:
        p += 1
    if p >= ce or buf[p] != b':':
        m.err_pos = p
        return E_RURI
    while p < ce and buf[p] != b' ':
        if not (CC[<unsigned char>buf[p]] & C_URIC):
            if m.uri_bracketed and buf[p] == b'>' and p + 1 < ce and buf[p + 1] == b' ':
                break
            m.err_pos = p
            return E_RURI
        p += 1
    if p - s > lim.max_uri:
        m.err_pos = s
        return E_URI_TOO_LONG
    m.uri.off = s
    m.uri.length = p - s
    if m.uri_bracketed:
        if p >= ce or buf[p] != b'>':
            m.err_pos = p
            return E_RURI
        p += 1
    if p >= ce:
        m.err_pos = p
        return E_START_LINE
    p += 1
    if not is_sip_version(buf + p, ce - p):
        m.err_pos = p
        return E_VERSION if looks_like_version(buf + p, ce - p) else E_START_LINE
    return OK


cdef int add_header(Msg* m, Header* h, const Limits* lim) noexcept nogil:
    cdef Header* grown
    if m.nheaders >= lim.max_headers:
        return E_TOO_MANY_HEADERS
    if m.nheaders == m.cap:
        if m.hdrs == m.inline_hdrs:
            grown = <Header*>malloc(2 * m.cap * sizeof(Header))
            if grown != NULL:
                memcpy(grown, m.hdrs, m.cap * sizeof(Header))
        else:
            grown = <Header*>realloc(m.hdrs, 2 * m.cap * sizeof(Header))
        if grown == NULL:
            return E_NO_MEMORY
        m.hdrs = grown
        m.cap *= 2
    if m.first[h.htype] < 0:
        m.first[h.htype] = <int16_t>m.nheaders
    m.hdrs[m.nheaders] = h[0]
    m.nheaders += 1
    return OK


cdef int scan_message(const char* buf, Py_ssize_t n, Msg* m, const Limits* lim) noexcept nogil:
    """Frame one message: start line, header spans, Content-Length and body.

    Lines may end in CRLF or a bare LF.  A header value continues on lines that
    start with SP or HTAB (folding).  Without a blank line the headers run to
    the end of the input.  Returns OK or a negative ErrCode with m.err_pos set.
    """
    cdef Py_ssize_t pos = 0, nl, ce, ls, vs, ve, e
    cdef Header h
    cdef int rc
    cdef int64_t cl
    msg_init(m)
    if n > lim.max_size:
        m.err_pos = lim.max_size
        return E_TOO_LARGE
    while pos < n and (buf[pos] == b'\r' or buf[pos] == b'\n'):
        pos += 1        # RFC 3261 7.5: ignore CRLFs before the start line
    if pos >= n:
        m.err_pos = pos
        return E_EMPTY
    m.start = pos
    nl = find_nl(buf, pos, n)
    ce = nl
    if ce > pos and buf[ce - 1] == b'\r':
        ce -= 1
    if ce - pos > lim.max_line:
        m.err_pos = pos
        return E_LINE_TOO_LONG
    rc = scan_start_line(buf, pos, ce, m, lim)
    if rc != OK:
        return rc
    pos = nl + 1
    while True:
        if pos >= n:
            m.body_off = n
            break
        if buf[pos] == b'\n':
            m.body_off = pos + 1
            break
        if buf[pos] == b'\r':
            if pos + 1 == n:
                m.body_off = n
                break
            if buf[pos + 1] == b'\n':
                m.body_off = pos + 2
                break
            m.err_pos = pos
            return E_BARE_CR
        if is_ws(buf[pos]):
            m.err_pos = pos
            return E_FOLD_START
        ls = pos
        pos = skip_token(buf, pos, n)
        if pos == ls:
            m.err_pos = pos
            return E_HEADER_NAME
        h.name_off = <int32_t>ls
        h.name_len = <uint16_t>(pos - ls) if pos - ls < 65535 else 65535
        while pos < n and is_ws(buf[pos]):
            pos += 1
        if pos >= n or buf[pos] != b':':
            m.err_pos = pos
            return E_NO_COLON
        pos += 1
        # the value starts after the colon's LWS, which may include a fold
        while True:
            while pos < n and is_ws(buf[pos]):
                pos += 1
            e = pos
            if e < n and buf[e] == b'\r':
                e += 1
            if e < n and buf[e] == b'\n' and e + 1 < n and is_ws(buf[e + 1]):
                pos = e + 1
                continue
            break
        vs = pos
        h.folded = 0
        while True:
            nl = find_nl(buf, pos, n)
            pos = nl + 1
            if pos < n and is_ws(buf[pos]):
                h.folded = 1
                continue
            break
        ve = nl
        while ve > vs and is_lws(buf[ve - 1]):
            ve -= 1
        if ve - ls > lim.max_line:
            m.err_pos = ls
            return E_LINE_TOO_LONG
        h.val_off = <int32_t>vs
        h.val_len = <int32_t>(ve - vs)
        if h.folded and memchr(buf + vs, b'\n', ve - vs) == NULL:
            h.folded = 0    # only trailing blank continuation lines
        h.htype = <uint8_t>match_hname(buf + ls, h.name_len)
        if h.htype == HDR_CONTENT_LENGTH:
            cl = parse_uint(buf, vs, ve, -1)
            if cl < 0:
                m.err_pos = vs
                return E_CONTENT_LENGTH
            if m.content_length >= 0 and cl != m.content_length:
                m.err_pos = vs
                return E_CL_CONFLICT
            m.content_length = cl
            m.cl_pos = vs
        rc = add_header(m, &h, lim)
        if rc != OK:
            m.err_pos = ls
            return rc
    if m.body_off > n:
        m.body_off = n
    if m.content_length < 0:
        m.body_len = n - m.body_off      # RFC 3261 18.3: the datagram's end
    elif m.content_length > n - m.body_off:
        m.err_pos = m.cl_pos
        m.body_len = n - m.body_off
        return E_BODY_SHORT
    else:
        m.body_len = <Py_ssize_t>m.content_length
    return OK


# --------------------------------------------------------------------------
# Errors: one place turns a code into an exception
# --------------------------------------------------------------------------

cdef object raise_parse_error(int code, Py_ssize_t pos, object data, const Limits* lim,
                              const Msg* m):
    cls = _errors.BadHeader
    if code == E_EMPTY:
        cls, reason = _errors.BadStartLine, "empty message"
    elif code == E_START_LINE:
        cls, reason = _errors.BadStartLine, "bad start line"
    elif code == E_METHOD:
        cls, reason = _errors.BadStartLine, "bad method in request line"
    elif code == E_RURI:
        cls, reason = _errors.BadStartLine, "bad Request-URI"
    elif code == E_VERSION:
        cls, reason = _errors.BadVersion, "SIP version not supported"
    elif code == E_STATUS:
        cls, reason = _errors.BadStartLine, "bad status code (3 digits, 100-699)"
    elif code == E_HEADER_NAME:
        reason = "bad header name"
    elif code == E_NO_COLON:
        reason = "header line without a colon"
    elif code == E_FOLD_START:
        reason = "continuation line without a header"
    elif code == E_BARE_CR:
        reason = "bare CR in the header section"
    elif code == E_CONTENT_LENGTH:
        cls, reason = _errors.BadContentLength, "bad Content-Length"
    elif code == E_CL_CONFLICT:
        cls, reason = _errors.BadContentLength, "conflicting Content-Length headers"
    elif code == E_BODY_SHORT:
        cls = _errors.BadContentLength
        reason = (f"Content-Length {m.content_length} is larger than the "
                  f"{m.body_len} bytes of body")
    elif code == E_TOO_LARGE:
        cls = _errors.MessageTooLarge
        reason = f"message of {len(data)} bytes exceeds max_size ({lim.max_size})"
    elif code == E_TOO_MANY_HEADERS:
        cls, reason = _errors.LimitExceeded, f"more than max_headers ({lim.max_headers}) headers"
    elif code == E_LINE_TOO_LONG:
        cls, reason = _errors.LimitExceeded, f"line longer than max_line ({lim.max_line} bytes)"
    elif code == E_URI_TOO_LONG:
        cls, reason = _errors.LimitExceeded, f"URI longer than max_uri ({lim.max_uri} bytes)"
    elif code == E_NO_MEMORY:
        raise MemoryError()
    else:
        reason = f"parse error {code}"
    raise cls(reason, pos, data)


# --------------------------------------------------------------------------
# Values: quoted strings, parameters, name-addr, Via, URIs
# --------------------------------------------------------------------------

cdef Py_ssize_t bad_call_id(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """Call-ID = word [ "@" word ]: the offset of the first byte that breaks
    the rule, or -1 when the value is a valid Call-ID."""
    cdef Py_ssize_t p
    cdef int ats = 0
    if s >= e:
        return s
    for p in range(s, e):
        if buf[p] == b'@':
            ats += 1
            if ats == 1 and p > s and p + 1 < e:
                continue
        if not (CC[<unsigned char>buf[p]] & C_WORD):
            return p
    return -1


cdef Py_ssize_t next_list_token(const char* buf, Py_ssize_t pos, Py_ssize_t end,
                                Span* tok) noexcept nogil:
    """The next element of a comma-separated token list (Require, Supported, ...)
    from ``pos``: its span in ``tok`` (length 0 when the list has ended) and the
    position after it and its comma; -1 when malformed, with tok.off there."""
    cdef Py_ssize_t p
    pos = skip_lws(buf, pos, end)
    tok.off = pos
    tok.length = 0
    if pos >= end:
        return end
    p = skip_token(buf, pos, end)
    tok.length = p - pos
    if tok.length == 0:
        return -1
    p = skip_lws(buf, p, end)
    if p < end:
        if buf[p] != b',':
            tok.off = p
            return -1
        p += 1
    return p


cdef int next_header_token(const char* buf, const Msg* m, TokenIter* it, Span* tok) noexcept nogil:
    """The next option tag / token of every header line of type ``it.htype``
    (start with ``it.i = -1``): 1 with ``tok`` set, 0 when all lines are done,
    -1 when a list is malformed (``tok.off`` at the bad byte)."""
    cdef const Header* h
    while True:
        if it.i >= 0 and it.pos < it.end:
            it.pos = next_list_token(buf, it.pos, it.end, tok)
            if it.pos < 0:
                return -1
            if tok.length:
                return 1
            continue
        it.i = m.first[it.htype] if it.i < 0 else it.i + 1
        if it.i < 0:
            return 0
        while it.i < m.nheaders and m.hdrs[it.i].htype != it.htype:
            it.i += 1
        if it.i >= m.nheaders:
            it.i = m.nheaders
            it.pos = it.end = 0
            return 0
        h = &m.hdrs[it.i]
        it.pos = h.val_off
        it.end = h.val_off + h.val_len


cdef Py_ssize_t scan_quoted(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """pos is at the opening quote; returns the index after the closing one, or -1."""
    pos += 1
    while pos < end:
        if buf[pos] == b'"':
            return pos + 1
        if buf[pos] == b'\\':
            pos += 1
        pos += 1
    return -1


cdef Py_ssize_t scan_param(const char* buf, Py_ssize_t pos, Py_ssize_t end,
                           Span* name, Span* value, Py_ssize_t* err_pos) noexcept nogil:
    """One ``; name [= value]`` (pos at the ';').  Returns the index after it and
    its trailing LWS, or -1 with err_pos.  value.off is -1 when there is no '='."""
    pos = skip_lws(buf, pos + 1, end)
    name.off = pos
    pos = skip_token(buf, pos, end)
    name.length = pos - name.off
    if name.length == 0:
        err_pos[0] = pos
        return -1
    pos = skip_lws(buf, pos, end)
    value.off = -1
    value.length = 0
    if pos < end and buf[pos] == b'=':
        pos = skip_lws(buf, pos + 1, end)
        value.off = pos
        if pos < end and buf[pos] == b'"':
            pos = scan_quoted(buf, pos, end)
            if pos < 0:
                err_pos[0] = value.off
                return -1
        else:
            while pos < end and UC[<unsigned char>buf[pos]] & U_PVAL:
                pos += 1
        value.length = pos - value.off
        if value.length == 0:
            err_pos[0] = pos
            return -1
        pos = skip_lws(buf, pos, end)
    return pos


cdef inline void clear_span(Span* s) noexcept nogil:
    s.off = -1
    s.length = 0


cdef Py_ssize_t scan_params_until(const char* buf, Py_ssize_t pos, Py_ssize_t end, bint in_list,
                                  NameAddr* na, Py_ssize_t* err_pos) noexcept nogil:
    """Header parameters after a name-addr; records the well-known ones in ``na``.
    Stops at the end or, in a list, after the ',' that ends this entry."""
    cdef Span name, value
    cdef Py_ssize_t start = pos
    na.params.off = pos
    while pos < end and buf[pos] == b';':
        pos = scan_param(buf, pos, end, &name, &value, err_pos)
        if pos < 0:
            return -1
        if name.length == 7 and ieq(buf + name.off, 7, b"expires", 7):
            na.p_expires = value
        elif name.length == 1 and LOWER[<unsigned char>buf[name.off]] == b'q':
            na.p_q = value
        elif name.length == 3 and ieq(buf + name.off, 3, b"tag", 3):
            na.p_tag = value
        elif name.length == 13 and ieq(buf + name.off, 13, b"+sip.instance", 13):
            na.p_instance = value
        elif name.length == 6 and ieq(buf + name.off, 6, b"reg-id", 6):
            na.p_regid = value
    na.params.length = pos - start
    while na.params.length > 0 and is_lws(buf[start + na.params.length - 1]):
        na.params.length -= 1
    if pos < end:
        if in_list and buf[pos] == b',':
            return pos + 1
        err_pos[0] = pos
        return -1
    return pos


cdef Py_ssize_t parse_name_addr(const char* buf, Py_ssize_t pos, Py_ssize_t end, NameAddr* na,
                                bint in_list, Py_ssize_t* err_pos) noexcept nogil:
    """One name-addr or addr-spec with its header parameters (RFC 3261 20.10).

    Returns the index after the entry (after its ',' when ``in_list``) or -1
    with err_pos.  An addr-spec (no <>) ends at ';', ',' or LWS, and may not
    hold '?' (then the name-addr form is required).
    """
    cdef Py_ssize_t s, p
    clear_span(&na.display)
    clear_span(&na.p_expires)
    clear_span(&na.p_q)
    clear_span(&na.p_tag)
    clear_span(&na.p_instance)
    clear_span(&na.p_regid)
    na.params.off = -1
    na.params.length = 0
    na.quoted = na.star = na.bracketed = 0
    pos = skip_lws(buf, pos, end)
    na.raw.off = pos
    if pos >= end:
        err_pos[0] = pos
        return -1
    if buf[pos] == b'*':
        p = skip_lws(buf, pos + 1, end)
        if p >= end or (in_list and buf[p] == b','):
            na.star = 1
            na.uri.off = pos
            na.uri.length = 1
            na.raw.length = 1
            return p + 1 if p < end else p
    if buf[pos] == b'"':
        s = pos
        pos = scan_quoted(buf, pos, end)
        if pos < 0:
            err_pos[0] = s
            return -1
        na.display.off = s
        na.display.length = pos - s
        na.quoted = 1
        pos = skip_lws(buf, pos, end)
        if pos >= end or buf[pos] != b'<':
            err_pos[0] = pos
            return -1
    else:
        # *(token LWS) "<"  or an addr-spec
        p = pos
        while p < end and (CC[<unsigned char>buf[p]] & (C_TOKEN | C_LWS)):
            p += 1
        if p < end and buf[p] == b'<':
            if p > pos:
                na.display = trim(buf, pos, p)
            pos = p
    if buf[pos] == b'<':
        na.bracketed = 1
        s = pos + 1
        p = s
        while p < end and buf[p] != b'>':
            if not (CC[<unsigned char>buf[p]] & C_URIC):
                err_pos[0] = p
                return -1
            p += 1
        if p >= end or p == s:
            err_pos[0] = p
            return -1
        na.uri.off = s
        na.uri.length = p - s
        pos = skip_lws(buf, p + 1, end)
    else:
        s = pos
        p = pos
        while p < end and CC[<unsigned char>buf[p]] & C_URIC and buf[p] != b';' \
                and buf[p] != b',' and buf[p] != b'?':
            p += 1
        if p < end and buf[p] == b'?':
            err_pos[0] = p      # a URI with headers needs the <> form
            return -1
        na.uri.off = s
        na.uri.length = p - s
        pos = skip_lws(buf, p, end)
    if scheme_end(buf, na.uri.off, na.uri.off + na.uri.length) < 0:
        err_pos[0] = na.uri.off
        return -1
    pos = scan_params_until(buf, pos, end, in_list, na, err_pos)
    if pos < 0:
        return -1
    p = pos - 1 if (pos > 0 and pos <= end and buf[pos - 1] == b',') else pos
    na.raw.length = trim(buf, na.raw.off, p).length
    return pos


cdef Py_ssize_t scheme_end(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """Index of the ':' after a URI scheme, or -1."""
    cdef Py_ssize_t p = s
    if p >= e or not (b'a' <= LOWER[<unsigned char>buf[p]] <= b'z'):
        return -1
    while p < e and CC[<unsigned char>buf[p]] & C_SCHEME:
        p += 1
    if p >= e or buf[p] != b':' or p + 1 >= e:
        return -1
    return p


cdef int check_escapes(const char* buf, Py_ssize_t s, Py_ssize_t e, unsigned char allowed,
                       Py_ssize_t* err_pos) noexcept nogil:
    cdef Py_ssize_t p = s
    while p < e:
        if not (UC[<unsigned char>buf[p]] & allowed):
            err_pos[0] = p
            return -1
        if buf[p] == b'%':
            if p + 2 >= e:
                err_pos[0] = p
                return -1
            if HEXVAL[<unsigned char>buf[p + 1]] < 0 or HEXVAL[<unsigned char>buf[p + 2]] < 0:
                err_pos[0] = p
                return -1
            p += 3
            continue
        p += 1
    return 0


cdef int scan_sip_uri(const char* buf, Py_ssize_t s, Py_ssize_t e, UriSpans* u,
                      Py_ssize_t* err_pos) noexcept nogil:
    """SIP-URI / SIPS-URI (RFC 3261 25.1): returns 0, -1 (malformed, err_pos set)
    or -2 (another scheme)."""
    cdef Py_ssize_t p, at, c, hs, colon, pwd
    cdef int64_t port
    c = scheme_end(buf, s, e)
    if c < 0:
        err_pos[0] = s
        return -1
    u.scheme.off = s
    u.scheme.length = c - s
    if ieq(buf + s, c - s, b"sip", 3):
        u.sips = 0
    elif ieq(buf + s, c - s, b"sips", 4):
        u.sips = 1
    else:
        return -2
    p = c + 1
    u.user.off = -1
    u.user.length = 0
    u.password.off = -1
    u.password.length = 0
    u.port = -1
    # userinfo: everything up to the first '@' (a user may hold ';' and '?')
    at = -1
    for hs in range(p, e):
        if buf[hs] == b'@':
            at = hs
            break
    if at >= 0:
        colon = -1
        for pwd in range(p, at):
            if buf[pwd] == b':':
                colon = pwd
                break
        u.user.off = p
        u.user.length = (colon if colon >= 0 else at) - p
        if check_escapes(buf, p, p + u.user.length, U_USER, err_pos) < 0:
            return -1
        if colon >= 0:
            u.password.off = colon + 1
            u.password.length = at - colon - 1
            if check_escapes(buf, colon + 1, at, U_PASS, err_pos) < 0:
                return -1
        p = at + 1
    # host
    hs = p
    if p < e and buf[p] == b'[':
        p += 1
        while p < e and UC[<unsigned char>buf[p]] & U_IPV6:
            p += 1
        if p >= e or buf[p] != b']' or p == hs + 1:
            err_pos[0] = p
            return -1
        p += 1
    else:
        while p < e and UC[<unsigned char>buf[p]] & U_HOST:
            p += 1
    if p == hs:
        err_pos[0] = p
        return -1
    u.host.off = hs
    u.host.length = p - hs
    if p < e and buf[p] == b':':
        colon = p + 1
        p = colon
        while p < e and CC[<unsigned char>buf[p]] & C_DIGIT:
            p += 1
        port = parse_uint(buf, colon, p, -1)
        if port < 0 or port > 65535:
            err_pos[0] = colon
            return -1
        u.port = <int>port
    # uri-parameters
    u.params.off = p
    while p < e and buf[p] == b';':
        p += 1
        hs = p
        while p < e and (UC[<unsigned char>buf[p]] & U_PARAM or buf[p] == b'='):
            p += 1
        if p == hs or check_escapes(buf, hs, p, U_PARAM | U_USER, err_pos) < 0:
            err_pos[0] = p if p == hs else err_pos[0]
            return -1
    u.params.length = p - u.params.off
    u.headers.off = -1
    u.headers.length = 0
    if p < e and buf[p] == b'?':
        p += 1
        u.headers.off = p
        hs = p
        while p < e and (UC[<unsigned char>buf[p]] & U_HDR or buf[p] == b'=' or buf[p] == b'&'):
            p += 1
        if check_escapes(buf, hs, p, U_HDR | U_PARAM | U_USER, err_pos) < 0:
            return -1
        u.headers.length = p - hs
    if p != e:
        err_pos[0] = p
        return -1
    return 0


cdef Py_ssize_t parse_via(const char* buf, Py_ssize_t pos, Py_ssize_t end, ViaSpans* v,
                          Py_ssize_t* err_pos) noexcept nogil:
    """via-parm = sent-protocol LWS sent-by *( SEMI via-params ), then ',' or the end."""
    cdef Py_ssize_t s, p
    cdef int64_t port
    cdef Span name, value
    pos = skip_lws(buf, pos, end)
    v.raw.off = pos
    s = pos
    pos = skip_token(buf, pos, end)
    v.protocol.off = s
    v.protocol.length = pos - s
    pos = skip_lws(buf, pos, end)
    if v.protocol.length == 0 or pos >= end or buf[pos] != b'/':
        err_pos[0] = pos
        return -1
    pos = skip_lws(buf, pos + 1, end)
    s = pos
    pos = skip_token(buf, pos, end)
    v.version.off = s
    v.version.length = pos - s
    pos = skip_lws(buf, pos, end)
    if v.version.length == 0 or pos >= end or buf[pos] != b'/':
        err_pos[0] = pos
        return -1
    pos = skip_lws(buf, pos + 1, end)
    s = pos
    pos = skip_token(buf, pos, end)
    v.transport.off = s
    v.transport.length = pos - s
    p = pos
    pos = skip_lws(buf, pos, end)
    if v.transport.length == 0 or pos == p or pos >= end:
        err_pos[0] = pos
        return -1
    s = pos
    if buf[pos] == b'[':
        pos += 1
        while pos < end and UC[<unsigned char>buf[pos]] & U_IPV6:
            pos += 1
        if pos >= end or buf[pos] != b']':
            err_pos[0] = pos
            return -1
        pos += 1
    else:
        while pos < end and UC[<unsigned char>buf[pos]] & U_HOST:
            pos += 1
    if pos == s:
        err_pos[0] = pos
        return -1
    v.host.off = s
    v.host.length = pos - s
    v.port = -1
    pos = skip_lws(buf, pos, end)
    if pos < end and buf[pos] == b':':
        pos = skip_lws(buf, pos + 1, end)
        s = pos
        while pos < end and CC[<unsigned char>buf[pos]] & C_DIGIT:
            pos += 1
        port = parse_uint(buf, s, pos, -1)
        if port < 0 or port > 65535:
            err_pos[0] = s
            return -1
        v.port = <int>port
        pos = skip_lws(buf, pos, end)
    v.params.off = pos
    clear_span(&v.branch)
    while pos < end and buf[pos] == b';':
        pos = scan_param(buf, pos, end, &name, &value, err_pos)
        if pos < 0:
            return -1
        if name.length == 6 and ieq(buf + name.off, 6, b"branch", 6):
            v.branch = value
    v.params.length = trim(buf, v.params.off, pos).length
    v.raw.length = trim(buf, v.raw.off, pos).length
    if pos < end:
        if buf[pos] != b',':
            err_pos[0] = pos
            return -1
        return pos + 1
    return pos


# --------------------------------------------------------------------------
# Python-visible values
# --------------------------------------------------------------------------

cdef inline str _str(const char* buf, Py_ssize_t off, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(buf + off, n, "surrogateescape")


cdef str _unquote(const char* buf, Py_ssize_t off, Py_ssize_t n):
    """A quoted-string's content with its quoted-pairs resolved (unquoted text as is)."""
    cdef Py_ssize_t i
    cdef bytearray out
    if n < 2 or buf[off] != b'"':
        return _str(buf, off, n)
    if memchr(buf + off + 1, b'\\', n - 2) == NULL:
        return _str(buf, off + 1, n - 2)
    out = bytearray()
    i = off + 1
    while i < off + n - 1:
        if buf[i] == b'\\' and i + 1 < off + n - 1:
            i += 1
        out.append(<unsigned char>buf[i])
        i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


cdef str _collapse_lws(const char* buf, Py_ssize_t off, Py_ssize_t n):
    """A folded value with each run of LWS that holds a line break made one SP."""
    cdef Py_ssize_t i = off, j, end = off + n
    cdef bytearray out = bytearray()
    while i < end:
        if buf[i] == b'\r' or buf[i] == b'\n':
            while len(out) and (out[len(out) - 1] == 32 or out[len(out) - 1] == 9):
                out.pop()
            j = skip_lws(buf, i, end)
            out.append(32)
            i = j
            continue
        out.append(<unsigned char>buf[i])
        i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


cdef object _params_dict(const char* buf, Span params):
    cdef Span name, value
    cdef Py_ssize_t pos = params.off, end = params.off + params.length, err = 0
    d = {}
    if params.off < 0:
        return d
    while pos < end and buf[pos] == b';':
        pos = scan_param(buf, pos, end, &name, &value, &err)
        if pos < 0:
            break
        key = _str(buf, name.off, name.length).lower()
        d[key] = None if value.off < 0 else _unquote(buf, value.off, value.length)
    return d


cdef object _uri_params_dict(const char* buf, Span params):
    """';a=b;c' from a URI (already validated) -> {name.lower(): value or None}."""
    d = {}
    if params.length <= 0:
        return d
    for part in PyBytes_FromStringAndSize(buf + params.off + 1, params.length - 1).split(b";"):
        name, eq, value = part.partition(b"=")
        d[_unescape(name).lower()] = _unescape(value) if eq else None
    return d


cdef str _unescape(bytes raw):
    """%HH escapes resolved (the input is validated, so every % has two hex digits)."""
    cdef const char* b = raw
    cdef Py_ssize_t i = 0, n = len(raw)
    cdef bytearray out
    if memchr(b, b'%', n) == NULL:
        return raw.decode("utf-8", "surrogateescape")
    out = bytearray()
    while i < n:
        if b[i] == b'%' and i + 2 < n and HEXVAL[<unsigned char>b[i + 1]] >= 0 \
                and HEXVAL[<unsigned char>b[i + 2]] >= 0:
            out.append(HEXVAL[<unsigned char>b[i + 1]] * 16 + HEXVAL[<unsigned char>b[i + 2]])
            i += 3
        else:
            out.append(<unsigned char>b[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


@cython.final
@cython.freelist(64)
cdef class Address:
    """A name-addr or addr-spec with its header parameters: From, To, Contact,
    Route, Record-Route and Path entries.  Fields are built on access."""

    cdef bytes _data
    cdef NameAddr na

    @staticmethod
    cdef Address new(bytes data, NameAddr* na):
        cdef Address a = Address.__new__(Address)
        a._data = data
        a.na = na[0]
        return a

    @property
    def uri(self):
        """The URI, without the angle brackets."""
        return _str(self._data, self.na.uri.off, self.na.uri.length)

    @property
    def display_name(self):
        """The display name (unquoted) or None."""
        cdef const char* b = self._data
        if self.na.display.off < 0:
            return None
        if self.na.quoted:
            return _unquote(b, self.na.display.off, self.na.display.length)
        return " ".join(_str(b, self.na.display.off, self.na.display.length).split())

    @property
    def params(self):
        """Header parameters: {lower-case name: unquoted value or None}."""
        return _params_dict(self._data, self.na.params)

    @property
    def tag(self):
        if self.na.p_tag.off < 0:
            return None
        return _unquote(self._data, self.na.p_tag.off, self.na.p_tag.length)

    @property
    def is_star(self):
        """True only for the wildcard ``Contact: *``."""
        return bool(self.na.star)

    @property
    def expires(self):
        """The ``expires`` parameter as int (None if absent); values above 2**32-1 clamp."""
        cdef int64_t v
        if self.na.p_expires.off < 0:
            return None
        v = parse_uint(self._data, self.na.p_expires.off,
                       self.na.p_expires.off + self.na.p_expires.length, U32MAX)
        if v < 0:
            raise _errors.BadContact("bad expires parameter", self.na.p_expires.off, self._data)
        return v

    @property
    def q(self):
        """The ``q`` parameter as float (None if absent)."""
        cdef int v
        if self.na.p_q.off < 0:
            return None
        v = parse_qvalue(self._data, self.na.p_q.off, self.na.p_q.off + self.na.p_q.length)
        if v < 0:
            raise _errors.BadContact("bad q parameter", self.na.p_q.off, self._data)
        return v / 1000.0

    @property
    def instance(self):
        """The ``+sip.instance`` parameter (RFC 5626), unquoted, or None."""
        if self.na.p_instance.off < 0:
            return None
        return _unquote(self._data, self.na.p_instance.off, self.na.p_instance.length)

    @property
    def reg_id(self):
        """The ``reg-id`` parameter (RFC 5626) as int, or None."""
        cdef int64_t v
        if self.na.p_regid.off < 0:
            return None
        v = parse_uint(self._data, self.na.p_regid.off,
                       self.na.p_regid.off + self.na.p_regid.length, -1)
        if v < 0:
            raise _errors.BadContact("bad reg-id parameter", self.na.p_regid.off, self._data)
        return v

    def __str__(self):
        return _str(self._data, self.na.raw.off, self.na.raw.length)

    def __repr__(self):
        return f"<Address {str(self)!r}>"


@cython.final
@cython.freelist(16)
cdef class Via:
    """One Via value: ``transport``, ``host``, ``port`` (int or None),
    ``branch``, ``params`` ({lower-case name: value or None})."""

    cdef bytes _data
    cdef ViaSpans v

    @property
    def protocol(self):
        """``"SIP/2.0"`` as written (without the LWS around the slash)."""
        return (_str(self._data, self.v.protocol.off, self.v.protocol.length) + "/"
                + _str(self._data, self.v.version.off, self.v.version.length))

    @property
    def transport(self):
        return _str(self._data, self.v.transport.off, self.v.transport.length).upper()

    @property
    def host(self):
        return _str(self._data, self.v.host.off, self.v.host.length)

    @property
    def port(self):
        return None if self.v.port < 0 else self.v.port

    @property
    def branch(self):
        if self.v.branch.off < 0:
            return None
        return _unquote(self._data, self.v.branch.off, self.v.branch.length)

    @property
    def params(self):
        return _params_dict(self._data, self.v.params)

    def __str__(self):
        return _str(self._data, self.v.raw.off, self.v.raw.length)

    def __repr__(self):
        return f"<Via {str(self)!r}>"


@cython.final
@cython.freelist(16)
cdef class CSeq:
    """The CSeq header: ``seq`` (int) and ``method`` (str)."""

    cdef readonly object seq
    cdef readonly str method

    def __init__(self, seq, method):
        self.seq = seq
        self.method = method

    @staticmethod
    cdef CSeq new(object seq, str method):
        cdef CSeq c = CSeq.__new__(CSeq)
        c.seq = seq
        c.method = method
        return c

    def __eq__(self, other):
        if isinstance(other, CSeq):
            return self.seq == (<CSeq>other).seq and self.method == (<CSeq>other).method
        return NotImplemented

    def __hash__(self):
        return hash((self.seq, self.method))

    def __repr__(self):
        return f"CSeq({self.seq}, {self.method!r})"


@cython.final
cdef class SipURI:
    """A parsed SIP or SIPS URI.  ``user``, ``password`` and ``params``/``headers``
    values are unescaped; ``aor`` is the canonical address-of-record of RFC 3261
    10.3 step 5 (no parameters or headers, unescaped user, lower-case host),
    without the port: ``sip:alice@example.com:5060`` has the AOR
    ``sip:alice@example.com``, as in Kamailio and OpenSIPS."""

    cdef readonly str scheme, user, password, host, aor, text
    cdef readonly object port, params, headers

    def __repr__(self):
        return f"<SipURI {self.text!r}>"

    def __str__(self):
        return self.text

    def __eq__(self, other):
        if isinstance(other, SipURI):
            return self.text == (<SipURI>other).text
        return NotImplemented

    def __hash__(self):
        return hash(self.text)


cdef SipURI _make_uri(bytes data, UriSpans* u):
    cdef const char* b = data
    cdef SipURI r = SipURI.__new__(SipURI)
    r.text = _str(b, u.scheme.off, len(data) - u.scheme.off)
    r.scheme = "sips" if u.sips else "sip"
    r.user = None if u.user.off < 0 else _unescape(b[u.user.off:u.user.off + u.user.length])
    r.password = None if u.password.off < 0 else _unescape(
        b[u.password.off:u.password.off + u.password.length])
    r.host = _str(b, u.host.off, u.host.length)
    r.port = None if u.port < 0 else u.port
    r.params = _uri_params_dict(b, u.params)
    r.headers = {}
    if u.headers.off >= 0 and u.headers.length:
        for part in b[u.headers.off:u.headers.off + u.headers.length].split(b"&"):
            name, _, value = part.partition(b"=")
            r.headers[_unescape(name)] = _unescape(value)
    aor = r.scheme + ":"
    if r.user is not None:
        aor += r.user + "@"
    r.aor = aor + r.host.lower()            # canonical_aor's AOR_HOST: no port
    return r


def parse_uri(text):
    """Parse a SIP or SIPS URI (RFC 3261 19.1) into a :class:`SipURI`.

    Raises :class:`fastsip.BadURI` (status 400) when malformed, and with status
    416 (Unsupported URI Scheme) for a well-formed URI of another scheme.
    """
    cdef bytes data
    cdef UriSpans u
    cdef Py_ssize_t err = 0
    cdef int rc
    if isinstance(text, str):
        try:
            data = (<str>text).encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:      # other lone surrogates: bytes the scan refuses
            data = (<str>text).encode("utf-8", "surrogatepass")
    elif isinstance(text, bytes):
        data = bytes(text)
    else:
        raise TypeError(f"parse_uri() takes str or bytes, not {type(text).__name__}")
    if len(data) > 8192:
        raise _errors.LimitExceeded("URI longer than 8192 bytes", 0, data)
    rc = scan_sip_uri(data, 0, len(data), &u, &err)
    if rc == -2:
        raise _errors.BadURI("unsupported URI scheme", 0, data, 416)
    if rc < 0:
        raise _errors.BadURI("bad SIP URI", err, data)
    return _make_uri(data, &u)


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------

cdef enum:
    HAVE_CONTACTS = 1
    HAVE_VIA = 2
    HAVE_TO = 4
    HAVE_FROM = 8
    HAVE_CSEQ = 16
    HAVE_CALL_ID = 32


cdef class SipMessage:
    """What Request and Response share: headers, body and typed accessors.

    Typed values are built on first access and cached; a malformed header
    raises :class:`fastsip.ParseError` (with its byte offset) when accessed.
    Single-valued headers that occur more than once with different values
    raise too.  :meth:`validate` accesses everything at once.
    """

    cdef bytes _data
    cdef Msg m
    cdef Limits lim
    cdef uint32_t _have
    cdef object _contacts, _via, _to, _from, _cseq, _call_id

    def __dealloc__(self):
        msg_release(&self.m)

    # -- raw access -------------------------------------------------------

    @property
    def headers(self):
        """A read-only, case-insensitive view of the headers (compact forms included)."""
        return Headers.new(self)

    @property
    def body(self):
        """The body: exactly Content-Length bytes (or to the end without it)."""
        return self._data[self.m.body_off:self.m.body_off + self.m.body_len]

    def __bytes__(self):
        """The message as received (without octets after its body)."""
        return self._data[self.m.start:self.m.body_off + self.m.body_len]

    @property
    def raw(self):
        """The input bytes as given to parse()."""
        return self._data

    cdef int _index(self, int htype, str name) except -2:
        """The first header of a single-valued type, -1 if absent; raises when
        it occurs again with another value."""
        cdef int i = self.m.first[htype], j
        cdef Header* a
        cdef Header* b
        cdef const char* buf = self._data
        if i < 0:
            return -1
        a = &self.m.hdrs[i]
        for j in range(i + 1, self.m.nheaders):
            b = &self.m.hdrs[j]
            if b.htype == htype and (b.val_len != a.val_len or
                                     memcmp(buf + a.val_off, buf + b.val_off, a.val_len) != 0):
                raise _errors.BadHeader(f"conflicting {name} headers", b.name_off, self._data)
        return i

    cdef str _value(self, int i):
        cdef Header* h = &self.m.hdrs[i]
        if h.folded:
            return _collapse_lws(self._data, h.val_off, h.val_len)
        return _str(self._data, h.val_off, h.val_len)

    cdef object _single_str(self, int htype, str name):
        cdef int i = self._index(htype, name)
        return None if i < 0 else self._value(i)

    cdef object _uint_header(self, int htype, str name, cls):
        cdef int i = self._index(htype, name)
        cdef int64_t v
        cdef Header* h
        if i < 0:
            return None
        h = &self.m.hdrs[i]
        v = parse_uint(self._data, h.val_off, h.val_off + h.val_len, U32MAX)
        if v < 0:
            raise cls(f"bad {name} value", h.val_off, self._data)
        return v

    cdef list _addresses(self, int htype, str name, cls, Py_ssize_t limit):
        cdef list out = []
        cdef NameAddr na
        cdef Py_ssize_t pos, end, err = 0
        cdef int i
        cdef Header* h
        cdef const char* buf = self._data
        if self.m.first[htype] < 0:
            return out
        for i in range(self.m.first[htype], self.m.nheaders):
            h = &self.m.hdrs[i]
            if h.htype != htype:
                continue
            pos = h.val_off
            end = h.val_off + h.val_len
            while pos < end:
                pos = parse_name_addr(buf, pos, end, &na, True, &err)
                if pos < 0:
                    raise cls(f"bad {name} header", err, self._data)
                if len(out) >= limit:
                    raise _errors.LimitExceeded(
                        f"more than max_contacts ({limit}) {name} values", na.raw.off, self._data)
                out.append(Address.new(self._data, &na))
                if pos == end and buf[pos - 1] == b',':
                    raise cls(f"empty value after ',' in {name}", pos, self._data)
        return out

    cdef list _tokens(self, int htype):
        """A comma-separated token list over all lines of a header."""
        cdef list out = []
        cdef TokenIter it
        cdef Span tok
        cdef int rc
        it.htype = htype
        it.i = -1
        while True:
            rc = next_header_token(self._data, &self.m, &it, &tok)
            if rc == 0:
                return out
            if rc < 0:
                raise _errors.BadHeader(f"bad {CANONICAL_NAME[htype]} header", tok.off,
                                        self._data)
            out.append(_str(self._data, tok.off, tok.length))

    cdef object _address(self, int htype, str name):
        cdef int i = self._index(htype, name)
        cdef Header* h
        cdef NameAddr na
        cdef Py_ssize_t err = 0, pos
        if i < 0:
            return None
        h = &self.m.hdrs[i]
        pos = parse_name_addr(self._data, h.val_off, h.val_off + h.val_len, &na, False, &err)
        if pos < 0:
            raise _errors.BadNameAddr(f"bad {name} header", err, self._data)
        return Address.new(self._data, &na)

    # -- typed accessors --------------------------------------------------

    @property
    def call_id(self):
        """The Call-ID (str) or None."""
        cdef int i
        cdef Header* h
        cdef Py_ssize_t p
        cdef const char* buf
        if self._have & HAVE_CALL_ID:
            return self._call_id
        i = self._index(HDR_CALL_ID, "Call-ID")
        if i >= 0:
            h = &self.m.hdrs[i]
            buf = self._data
            if h.val_len == 0:
                raise _errors.BadHeader("empty Call-ID", h.val_off, self._data)
            p = bad_call_id(buf, h.val_off, h.val_off + h.val_len)
            if p >= 0:
                raise _errors.BadHeader("bad Call-ID", p, self._data)
            self._call_id = _str(buf, h.val_off, h.val_len)
        self._have |= HAVE_CALL_ID
        return self._call_id

    @property
    def cseq(self):
        """The CSeq (``.seq`` int, ``.method`` str) or None.  In a request the
        method must be the request's method."""
        cdef int i
        cdef Header* h
        cdef Py_ssize_t p, s, end
        cdef int64_t seq
        cdef const char* buf
        if self._have & HAVE_CSEQ:
            return self._cseq
        i = self._index(HDR_CSEQ, "CSeq")
        if i >= 0:
            h = &self.m.hdrs[i]
            buf = self._data
            end = h.val_off + h.val_len
            p = h.val_off
            while p < end and CC[<unsigned char>buf[p]] & C_DIGIT:
                p += 1
            seq = parse_uint(buf, h.val_off, p, -1)
            if seq == -2:
                raise _errors.BadCSeq("CSeq number larger than 2**32-1", h.val_off, self._data)
            s = skip_lws(buf, p, end)
            if seq < 0 or s == p:
                raise _errors.BadCSeq("bad CSeq", p, self._data)
            p = skip_token(buf, s, end)
            if p == s or p != end:
                raise _errors.BadCSeq("bad CSeq method", p, self._data)
            if self.m.status == 0 and (p - s != self.m.method.length or
                                       memcmp(buf + s, buf + self.m.method.off, p - s) != 0):
                raise _errors.BadCSeq("CSeq method differs from the request method", s,
                                      self._data)
            self._cseq = CSeq.new(seq, _str(buf, s, p - s))
        self._have |= HAVE_CSEQ
        return self._cseq

    @property
    def from_(self):
        """The From header as an :class:`Address` (``.uri``, ``.tag``, ...) or None."""
        if not self._have & HAVE_FROM:
            self._from = self._address(HDR_FROM, "From")
            self._have |= HAVE_FROM
        return self._from

    @property
    def to(self):
        """The To header as an :class:`Address` or None."""
        if not self._have & HAVE_TO:
            self._to = self._address(HDR_TO, "To")
            self._have |= HAVE_TO
        return self._to

    @property
    def via(self):
        """Every Via value, in order, as :class:`Via` objects."""
        cdef list out
        cdef Via v
        cdef ViaSpans vs
        cdef Py_ssize_t pos, end, err = 0
        cdef int i
        cdef Header* h
        if self._have & HAVE_VIA:
            return self._via
        out = []
        if self.m.first[<int>HDR_VIA] >= 0:
            for i in range(self.m.first[<int>HDR_VIA], self.m.nheaders):
                h = &self.m.hdrs[i]
                if h.htype != HDR_VIA:
                    continue
                pos = h.val_off
                end = h.val_off + h.val_len
                while True:
                    pos = parse_via(self._data, pos, end, &vs, &err)
                    if pos < 0:
                        raise _errors.BadVia("bad Via header", err, self._data)
                    v = Via.__new__(Via)
                    v._data = self._data
                    v.v = vs
                    out.append(v)
                    if pos >= end:
                        break
        self._via = out
        self._have |= HAVE_VIA
        return out

    @property
    def contacts(self):
        """Every Contact value in order, across all Contact headers and comma lists."""
        if not self._have & HAVE_CONTACTS:
            self._contacts = self._addresses(HDR_CONTACT, "Contact", _errors.BadContact,
                                             self.lim.max_contacts)
            self._have |= HAVE_CONTACTS
        return self._contacts

    @property
    def expires(self):
        """The Expires header (int, values above 2**32-1 clamp) or None."""
        return self._uint_header(HDR_EXPIRES, "Expires", _errors.BadExpires)

    @property
    def min_expires(self):
        return self._uint_header(HDR_MIN_EXPIRES, "Min-Expires", _errors.BadHeader)

    @property
    def max_forwards(self):
        return self._uint_header(HDR_MAX_FORWARDS, "Max-Forwards", _errors.BadHeader)

    @property
    def content_length(self):
        return None if self.m.content_length < 0 else self.m.content_length

    @property
    def content_type(self):
        return self._single_str(HDR_CONTENT_TYPE, "Content-Type")

    @property
    def user_agent(self):
        return self._single_str(HDR_USER_AGENT, "User-Agent")

    @property
    def server(self):
        return self._single_str(HDR_SERVER, "Server")

    @property
    def require(self):
        """Option tags of every Require header."""
        return self._tokens(HDR_REQUIRE)

    @property
    def proxy_require(self):
        return self._tokens(HDR_PROXY_REQUIRE)

    @property
    def supported(self):
        return self._tokens(HDR_SUPPORTED)

    @property
    def unsupported(self):
        return self._tokens(HDR_UNSUPPORTED)

    @property
    def allow(self):
        return self._tokens(HDR_ALLOW)

    @property
    def path(self):
        """Path entries (RFC 3327) as :class:`Address` objects."""
        return self._addresses(HDR_PATH, "Path", _errors.BadNameAddr, 1 << 30)

    @property
    def route(self):
        return self._addresses(HDR_ROUTE, "Route", _errors.BadNameAddr, 1 << 30)

    @property
    def record_route(self):
        return self._addresses(HDR_RECORD_ROUTE, "Record-Route", _errors.BadNameAddr, 1 << 30)

    cdef list _credentials(self, int htype):
        cdef list out = []
        cdef int i
        if self.m.first[htype] < 0:
            return out
        from fastsip.auth import parse_credentials, BadCredentials
        for i in range(self.m.first[htype], self.m.nheaders):
            if self.m.hdrs[i].htype == htype:
                try:
                    out.append(parse_credentials(self._value(i)))
                except BadCredentials as exc:
                    raise _errors.BadHeader(f"bad {CANONICAL_NAME[htype]} header: {exc}",
                                            self.m.hdrs[i].val_off, self._data) from None
        return out

    @property
    def authorization(self):
        """Every Authorization header as ``Credentials`` (``.scheme``, ``.params``)."""
        return self._credentials(HDR_AUTHORIZATION)

    @property
    def proxy_authorization(self):
        return self._credentials(HDR_PROXY_AUTHORIZATION)

    @property
    def www_authenticate(self):
        """Every WWW-Authenticate challenge as ``Credentials``."""
        return self._credentials(HDR_WWW_AUTHENTICATE)

    @property
    def date(self):
        """The Date header as an aware ``datetime`` (RFC 1123 form, GMT only) or None."""
        value = self._single_str(HDR_DATE, "Date")
        if value is None:
            return None
        return _parse_date(value, self.m.hdrs[self.m.first[<int>HDR_DATE]].val_off, self._data)

    def validate(self):
        """Build every typed value (raising the first :class:`ParseError`); returns self."""
        self._validate_start()
        for name in ("call_id", "cseq", "from_", "to", "via", "contacts", "expires",
                     "min_expires", "max_forwards", "content_type", "require",
                     "proxy_require", "supported", "unsupported", "allow", "path", "route",
                     "record_route", "date", "user_agent", "server",
                     "authorization", "proxy_authorization", "www_authenticate"):
            getattr(self, name)
        for c in self.contacts:
            c.expires, c.q, c.reg_id
        return self

    def _validate_start(self):
        pass


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _parse_date(value, offset, data):
    import datetime
    import re
    m = re.fullmatch(r"([A-Z][a-z]{2}), (\d{2}) ([A-Z][a-z]{2}) (\d{4}) "
                     r"(\d{2}):(\d{2}):(\d{2}) GMT", value)
    if m is None or m.group(1) not in _DAYS or m.group(3) not in _MONTHS:
        raise _errors.BadHeader("bad Date (RFC 1123 form in GMT)", offset, data)
    try:
        return datetime.datetime(int(m.group(4)), _MONTHS.index(m.group(3)) + 1,
                                 int(m.group(2)), int(m.group(5)), int(m.group(6)),
                                 int(m.group(7)), tzinfo=datetime.timezone.utc)
    except ValueError:
        raise _errors.BadHeader("bad Date (RFC 1123 form in GMT)", offset, data) from None


@cython.final
cdef class Request(SipMessage):
    """A SIP request: ``method`` and ``uri`` (the Request-URI) as str."""

    @property
    def method(self):
        return PyUnicode_DecodeASCII(PyBytes_AS_STRING(self._data) + self.m.method.off,
                                     self.m.method.length, NULL)

    @property
    def uri(self):
        return _str(self._data, self.m.uri.off, self.m.uri.length)

    def _validate_start(self):
        cdef UriSpans u
        cdef Py_ssize_t err = 0
        cdef int rc = scan_sip_uri(self._data, self.m.uri.off, self.m.uri.off + self.m.uri.length,
                                   &u, &err)
        if self.m.uri_bracketed:
            raise _errors.BadStartLine("Request-URI enclosed in <>", self.m.uri.off - 1,
                                       self._data)
        if rc == -1:
            raise _errors.BadStartLine("bad Request-URI", err, self._data)
        if rc == 0 and u.headers.off >= 0:
            raise _errors.BadStartLine("headers are not allowed in a Request-URI",
                                       u.headers.off - 1, self._data)

    def __repr__(self):
        return f"<Request {self.method} {self.uri}>"


@cython.final
cdef class Response(SipMessage):
    """A SIP response: ``status`` (int) and ``reason`` (str)."""

    @property
    def status(self):
        return self.m.status

    @property
    def reason(self):
        return _str(self._data, self.m.reason.off, self.m.reason.length)

    def __repr__(self):
        return f"<Response {self.status} {self.reason}>"


@cython.final
@cython.freelist(8)
cdef class Headers:
    """Case-insensitive, read-only view of a message's headers.  Compact and
    full names find the same headers (``get("Contact")`` also finds ``m:``)."""

    cdef SipMessage msg

    @staticmethod
    cdef Headers new(SipMessage msg):
        cdef Headers h = Headers.__new__(Headers)
        h.msg = msg
        return h

    cdef list _indexes(self, name):
        cdef bytes key = name.encode("ascii", "replace") if isinstance(name, str) else bytes(name)
        cdef const char* k = key
        cdef Py_ssize_t n = len(key), i
        cdef int htype = match_hname(k, n)
        cdef Header* h
        cdef const char* buf = self.msg._data
        cdef Msg* m = &self.msg.m
        out = []
        if htype != HDR_OTHER:
            if m.first[htype] >= 0:
                for i in range(m.first[htype], m.nheaders):
                    if m.hdrs[i].htype == htype:
                        out.append(i)
            return out
        low = key.lower()
        for i in range(m.nheaders):
            h = &m.hdrs[i]
            if h.htype == HDR_OTHER and ieq(buf + h.name_off, h.name_len, low, n):
                out.append(i)
        return out

    def get(self, name, default=None):
        """The first field value of header ``name`` (str), or ``default``."""
        idx = self._indexes(name)
        return self.msg._value(idx[0]) if idx else default

    def getall(self, name):
        """One value per header line of ``name``, in order (empty list if absent)."""
        return [self.msg._value(i) for i in self._indexes(name)]

    def __getitem__(self, name):
        idx = self._indexes(name)
        if not idx:
            raise KeyError(name)
        return self.msg._value(idx[0])

    def __contains__(self, name):
        return bool(self._indexes(name))

    def __len__(self):
        return self.msg.m.nheaders

    def items(self):
        """(name as written, value) for every header line, in order."""
        cdef int i
        cdef Header* h
        out = []
        for i in range(self.msg.m.nheaders):
            h = &self.msg.m.hdrs[i]
            out.append((_str(self.msg._data, h.name_off, h.name_len), self.msg._value(i)))
        return out

    def __iter__(self):
        return iter(self.items())

    def __repr__(self):
        return f"<Headers {self.items()!r}>"


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------

cdef class Parser:
    """A parser with its own limits.  ``fastsip.parse`` uses the defaults.

    max_size      largest message in bytes (MessageTooLarge, status 513)
    max_headers   most header lines
    max_line      longest start line or header (with its folded lines)
    max_uri       longest Request-URI
    max_contacts  most Contact values in one message
    """

    def __init__(self, *, Py_ssize_t max_size=65535, Py_ssize_t max_headers=256,
                 Py_ssize_t max_line=8192, Py_ssize_t max_uri=4096,
                 Py_ssize_t max_contacts=256):
        if min(max_size, max_headers, max_line, max_uri, max_contacts) <= 0:
            raise ValueError("limits must be positive")
        if max_headers > 32000:
            raise ValueError("max_headers is at most 32000")
        self.lim.max_size = max_size
        self.lim.max_headers = max_headers
        self.lim.max_line = max_line
        self.lim.max_uri = max_uri
        self.lim.max_contacts = max_contacts

    @property
    def limits(self):
        return dict(max_size=self.lim.max_size, max_headers=self.lim.max_headers,
                    max_line=self.lim.max_line, max_uri=self.lim.max_uri,
                    max_contacts=self.lim.max_contacts)

    cpdef object parse(self, object data):
        """Parse one message (one datagram) into a Request or Response."""
        cdef bytes b
        cdef SipMessage msg
        cdef const char* buf
        cdef Py_ssize_t n, p = 0
        cdef int rc
        if type(data) is bytes:
            b = <bytes>data
        elif isinstance(data, (bytes, bytearray, memoryview)):
            b = bytes(data)
        else:
            raise TypeError(f"parse() takes bytes, not {type(data).__name__}")
        buf = PyBytes_AS_STRING(b)
        n = PyBytes_GET_SIZE(b)
        while p < n and (buf[p] == b'\r' or buf[p] == b'\n'):
            p += 1
        if n - p >= 4 and ieq(buf + p, 4, b"sip/", 4):
            msg = Response.__new__(Response)
        else:
            msg = Request.__new__(Request)
        msg._data = b
        msg.lim = self.lim
        rc = scan_message(buf, n, &msg.m, &self.lim)
        if rc != OK:
            raise_parse_error(rc, msg.m.err_pos, b, &self.lim, &msg.m)
        return msg


cdef Parser _default_parser = Parser()


def parse(data):
    """Parse one SIP message (one datagram's bytes) into a :class:`Request` or
    :class:`Response`.  Raises :class:`fastsip.ParseError` on malformed input.

    Without Content-Length the body runs to the end of ``data`` (RFC 3261
    18.3); octets after Content-Length bytes of body are ignored.
    """
    return _default_parser.parse(data)


# --------------------------------------------------------------------------
# Stream framing (TCP)
# --------------------------------------------------------------------------

PING = b"\r\n\r\n"      # RFC 5626 keep-alive ping: answer with PONG
PONG = b"\r\n"


cdef class StreamFramer:
    """Splits a stream (TCP) into SIP messages by Content-Length (RFC 3261 18.3).

    ``feed(data)`` returns the complete items received so far: each a message's
    bytes, or :data:`PING` for an RFC 5626 CRLFCRLF keep-alive (answer it with
    :data:`PONG`).  A single CRLF between messages is skipped.  A stream that
    cannot be framed (no or bad Content-Length, too large) raises
    :class:`fastsip.ParseError`; the connection should then be closed.
    """

    cdef bytearray _buf
    cdef Limits lim
    cdef Py_ssize_t _searched    # bytes at the start of _buf known to hold no header end
    cdef Py_ssize_t _need        # length of the message at the start of _buf, 0: not known yet

    def __init__(self, *, Py_ssize_t max_size=65535):
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self._buf = bytearray()
        self.lim = (<Parser>_default_parser).lim
        self.lim.max_size = max_size

    @property
    def buffered(self):
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def feed(self, data):
        cdef list out = []
        cdef bytearray buf = self._buf
        cdef Py_ssize_t end, lf, total
        cdef Msg m
        cdef bytes head
        cdef int rc
        buf += data
        while buf:
            if self._need:
                if len(buf) < self._need:
                    break
                total = self._need
                out.append(bytes(buf[:total]))
                del buf[:total]
                self._need = self._searched = 0
                continue
            if buf[0] == 13 or buf[0] == 10:
                if buf.startswith(PING):
                    out.append(PING)
                    del buf[:4]
                    continue
                if len(buf) < 4 and PING.startswith(bytes(buf)):
                    break           # maybe the start of a ping
                del buf[:2 if buf.startswith(PONG) else 1]
                continue
            end = buf.find(b"\r\n\r\n", self._searched)
            lf = buf.find(b"\n\n", self._searched, end if end >= 0 else len(buf))
            if lf >= 0 and (end < 0 or lf < end):
                end, total = lf, lf + 2
            else:
                total = end + 4
            if end < 0:
                if len(buf) > self.lim.max_size:
                    raise _errors.MessageTooLarge(
                        f"header section exceeds max_size ({self.lim.max_size})", len(buf))
                self._searched = len(buf) - 3 if len(buf) > 3 else 0
                break
            head = bytes(buf[:total])
            rc = scan_message(head, len(head), &m, &self.lim)
            msg_release(&m)
            if rc != OK and rc != E_BODY_SHORT:
                raise_parse_error(rc, m.err_pos, head, &self.lim, &m)
            if m.content_length < 0:
                raise _errors.BadContentLength(
                    "Content-Length is required on stream transports", total, head)
            total += <Py_ssize_t>m.content_length
            if total > self.lim.max_size:
                raise _errors.MessageTooLarge(
                    f"message of {total} bytes exceeds max_size ({self.lim.max_size})", m.cl_pos,
                    head)
            self._need = total      # the rest of the loop waits for, then cuts, the message
        return out


# --------------------------------------------------------------------------
# Hashing and canonical forms (used by the store and the registrar)
# --------------------------------------------------------------------------

cdef inline uint64_t _rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef inline void _sipround(uint64_t* v) noexcept nogil:
    v[0] += v[1]; v[1] = _rotl(v[1], 13); v[1] ^= v[0]; v[0] = _rotl(v[0], 32)
    v[2] += v[3]; v[3] = _rotl(v[3], 16); v[3] ^= v[2]
    v[0] += v[3]; v[3] = _rotl(v[3], 21); v[3] ^= v[0]
    v[2] += v[1]; v[1] = _rotl(v[1], 17); v[1] ^= v[2]; v[2] = _rotl(v[2], 32)


cdef uint64_t hash_bytes(const char* p, Py_ssize_t n, uint64_t k0, uint64_t k1) noexcept nogil:
    """SipHash-1-3 of p[0:n] under the key (k0, k1); byte order fixed, so a
    fixed key gives the same value on every machine, process and run."""
    cdef uint64_t v[4]
    cdef uint64_t m, last = (<uint64_t>n) << 56
    cdef Py_ssize_t i = 0, j
    v[0] = k0 ^ <uint64_t>0x736f6d6570736575
    v[1] = k1 ^ <uint64_t>0x646f72616e646f6d
    v[2] = k0 ^ <uint64_t>0x6c7967656e657261
    v[3] = k1 ^ <uint64_t>0x7465646279746573
    while i + 8 <= n:
        m = 0
        for j in range(8):
            m |= (<uint64_t><unsigned char>p[i + j]) << (8 * j)
        v[3] ^= m
        _sipround(v)
        v[0] ^= m
        i += 8
    for j in range(n - i):
        last |= (<uint64_t><unsigned char>p[i + j]) << (8 * j)
    v[3] ^= last
    _sipround(v)
    v[0] ^= last
    v[2] ^= 0xff
    _sipround(v)
    _sipround(v)
    _sipround(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


cdef Py_ssize_t _put(char* out, Py_ssize_t at, Py_ssize_t cap, const char* src, Py_ssize_t n,
                     bint lower, bint unescape) noexcept nogil:
    """Append src[0:n] to out (lower-cased and/or %HH-unescaped); -1 when full."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    while i < n:
        c = src[i]
        if unescape and c == b'%' and i + 2 < n and HEXVAL[<unsigned char>src[i + 1]] >= 0 \
                and HEXVAL[<unsigned char>src[i + 2]] >= 0:
            c = HEXVAL[<unsigned char>src[i + 1]] * 16 + HEXVAL[<unsigned char>src[i + 2]]
            i += 2
        if at >= cap:
            return -1
        out[at] = LOWER[c] if lower else c
        at += 1
        i += 1
    return at


cdef Py_ssize_t canonical_aor(const char* buf, const UriSpans* u, char* out, Py_ssize_t cap,
                              int form) noexcept nogil:
    """A scanned SIP URI in canonical form: scheme, unescaped user, lower-case
    host; never parameters, headers or password.  ``form`` AOR_HOST is the
    address-of-record of RFC 3261 10.3 step 5 without the port (a phone that
    writes the registrar's host:port into To registers the same AOR as one
    that does not); AOR_USER keeps only the user (single-domain deployments;
    a URI without a user keeps its host); AOR_URI keeps the port (the prefix
    of the comparison form).  Returns the length, or -1 when it does not fit."""
    cdef Py_ssize_t at = 0
    cdef char digits[8]
    cdef int port = u.port, nd = 0
    at = _put(out, at, cap, b"sips:" if u.sips else b"sip:", 5 if u.sips else 4, False, False)
    if at >= 0 and u.user.off >= 0:
        at = _put(out, at, cap, buf + u.user.off, u.user.length, False, True)
        if form == AOR_USER:
            return at
        if at >= 0:
            at = _put(out, at, cap, b"@", 1, False, False)
    if at >= 0:
        at = _put(out, at, cap, buf + u.host.off, u.host.length, True, False)
    if at >= 0 and port >= 0 and form == AOR_URI:
        while True:
            digits[7 - nd] = <char>(48 + port % 10)
            nd += 1
            port //= 10
            if port == 0:
                break
        at = _put(out, at, cap, b":", 1, False, False)
        if at >= 0:
            at = _put(out, at, cap, digits + 8 - nd, nd, False, False)
    return at


cdef uint64_t _mix(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= <uint64_t>0xff51afd7ed558ccd
    h ^= h >> 33
    h *= <uint64_t>0xc4ceb9fe1a85ec53
    h ^= h >> 33
    return h


cdef uint64_t uri_key_hash(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """A hash of a URI in its comparison form (RFC 3261 19.1.4): for SIP/SIPS
    URIs scheme and host are case-insensitive, escapes are resolved, the user
    part is case-sensitive, and parameters compare case-insensitively in any
    order.  Two URIs equal by those rules get the same hash.  (Stricter than
    19.1.4 in one way: a parameter present in only one URI makes them differ.)
    Other schemes hash byte for byte."""
    cdef UriSpans u
    cdef Py_ssize_t err = 0, at, p, ps
    cdef char tmp[1024]
    cdef uint64_t h, params = 0
    if e - s > 1024 or scan_sip_uri(buf, s, e, &u, &err) != 0:
        return hash_bytes(buf + s, e - s, 0x5eed, 0xc0ffee)
    at = canonical_aor(buf, &u, tmp, 1024, AOR_URI)
    if at >= 0 and u.password.off >= 0:
        at = _put(tmp, at, 1024, b":", 1, False, False)
        if at >= 0:
            at = _put(tmp, at, 1024, buf + u.password.off, u.password.length, False, True)
    if at >= 0 and u.headers.off >= 0:
        at = _put(tmp, at, 1024, buf + u.headers.off - 1, u.headers.length + 1, False, True)
    if at < 0:
        return hash_bytes(buf + s, e - s, 0x5eed, 0xc0ffee)
    h = hash_bytes(tmp, at, 0x5eed, 0xc0ffee)
    # parameters: an order-independent sum of the hash of each (lower-cased) one
    p = u.params.off
    while p < u.params.off + u.params.length:
        p += 1
        ps = p
        while p < u.params.off + u.params.length and buf[p] != b';':
            p += 1
        at = _put(tmp, 0, 1024, buf + ps, p - ps, True, True)
        if at >= 0:
            params += _mix(hash_bytes(tmp, at, 0x5eed, 0xc0ffee))
    return h ^ _mix(params + <uint64_t>0x9e3779b97f4a7c15)


def uri_compare_key(uri):
    """An int equal for two URIs that RFC 3261 19.1.4 calls equal (see uri_key_hash)."""
    b = uri.encode("utf-8", "surrogateescape") if isinstance(uri, str) else bytes(uri)
    return uri_key_hash(b, 0, len(b))




cdef uint64_t aor_hash(const char* aor, Py_ssize_t n) noexcept nogil:
    """FNV-1a 64 of the AOR, then the MurmurHash3 finaliser: simple enough for
    the kernel's steering program (fastsip.server.steer) to compute the same."""
    cdef uint64_t h = <uint64_t>0xcbf29ce484222325
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>aor[i]) * <uint64_t>0x100000001b3
    return _mix(h)


def stable_hash(aor):
    """A 64-bit hash of an AOR that is the same in every process, run and machine."""
    b = aor.encode("utf-8", "surrogateescape") if isinstance(aor, str) else bytes(aor)
    return aor_hash(b, len(b))


def shard_of(aor, int n):
    """The shard (0 .. n-1) that owns ``aor`` among ``n`` workers."""
    if n <= 0:
        raise ValueError("n must be positive")
    return stable_hash(aor) % n


# --------------------------------------------------------------------------
# Credentials and challenges (RFC 7235 2.1, RFC 3261 25): the scan behind
# fastsip.auth.parse_credentials
# --------------------------------------------------------------------------

cdef unsigned char TCHAR[256]
cdef unsigned char T68[256]
memset(TCHAR, 0, 256)
memset(T68, 0, 256)
_set(TCHAR, b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~", 1)
_set(T68, b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+/", 1)
# qdtext that needs no second look: not a quote, backslash, control (but HTAB) or DEL
cdef unsigned char QPLAIN[256]
for _c in range(256):
    QPLAIN[_c] = (_c >= 32 or _c == 9) and _c not in (34, 92, 127)


cdef inline Py_ssize_t _skip_ows(const char* b, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    """Spaces, tabs and folds (a line break followed by a space or tab)."""
    while p < n:
        if b[p] == b' ' or b[p] == b'\t':
            p += 1
        elif b[p] == b'\n' and p + 1 < n and is_ws(b[p + 1]):
            p += 2
        elif b[p] == b'\r' and p + 2 < n and b[p + 1] == b'\n' and is_ws(b[p + 2]):
            p += 3
        else:
            break
    return p


cdef inline Py_ssize_t _skip_tchar(const char* b, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    while p < n and TCHAR[<unsigned char>b[p]]:
        p += 1
    return p


cdef Py_ssize_t _scan_qstring(const char* b, Py_ssize_t p, Py_ssize_t n, bint* escaped) noexcept nogil:
    """p at the opening quote; the index after the closing one, or -1.  qdtext
    excludes controls but HTAB; a quoted-pair escapes any byte but CR/LF."""
    cdef unsigned char c
    p += 1
    while p < n:
        while p < n and QPLAIN[<unsigned char>b[p]]:
            p += 1
        if p >= n:
            break
        c = b[p]
        if c == b'"':
            return p + 1
        if c == b'\\':
            if p + 1 >= n or b[p + 1] == b'\r' or b[p + 1] == b'\n':
                return -1
            escaped[0] = True
            p += 2
        elif c == b'\r' or c == b'\n':
            if _skip_ows(b, p, n) == p:
                return -1
            escaped[0] = True
            p = _skip_ows(b, p, n)
        elif c < 32 and c != 9 or c == 127:
            return -1
        else:
            p += 1
    return -1


cdef str _unquote_auth(const char* b, Py_ssize_t s, Py_ssize_t e):
    """The content of a quoted-string (s, e exclude the quotes): quoted-pairs
    resolved, folds dropped."""
    cdef bytearray out = bytearray()
    cdef Py_ssize_t p = s
    while p < e:
        if b[p] == b'\\':
            out.append(<unsigned char>b[p + 1])
            p += 2
        elif b[p] == b'\r' or b[p] == b'\n':
            p += 1
        else:
            out.append(<unsigned char>b[p])
            p += 1
    return bytes(out).decode("utf-8", "surrogateescape")


# Why a credentials value is malformed, by AuthErr.
AUTH_REASONS = ("", "empty credentials", "expected an auth-scheme",
                "expected whitespace after the auth-scheme", "expected a parameter name",
                "expected '=' after the parameter name", "unterminated or invalid quoted-string",
                "expected a token or quoted-string after '='", "expected ',' between parameters")


cdef int auth_scan_start(const char* b, Py_ssize_t n, AuthScan* st) noexcept nogil:
    """The auth-scheme and, when the rest is one, the token68 (else
    ``st.token68.off`` is -1 and ``st.pos`` is where the parameters start).
    0, or -1 with ``st.err`` and ``st.pos`` (the offset) set."""
    cdef Py_ssize_t p, s, e, q
    st.token68.off = -1
    st.token68.length = 0
    st.err = AE_OK
    p = _skip_ows(b, 0, n)
    s = p
    p = _skip_tchar(b, p, n)
    if p == s:
        st.err = AE_EMPTY if p == n else AE_SCHEME
        st.pos = p
        return -1
    st.scheme.off = s
    st.scheme.length = p - s
    e = p
    p = _skip_ows(b, p, n)
    st.pos = p
    if p == n:
        return 0
    if p == e:
        st.err = AE_WS_AFTER_SCHEME
        return -1
    q = p
    while q < n and T68[<unsigned char>b[q]]:
        q += 1
    if q > p:
        e = q
        while e < n and b[e] == b'=':
            e += 1
        if _skip_ows(b, e, n) == n:
            st.token68.off = p
            st.token68.length = e - p
            st.pos = n
    return 0


cdef int auth_next_name(const char* b, Py_ssize_t n, AuthScan* st, Span* name) noexcept nogil:
    """The next parameter name (empty list elements skipped): 1, 0 at the
    end, -1 when malformed (``st.err``, ``st.pos``)."""
    cdef Py_ssize_t p = st.pos, s
    while p < n and b[p] == b',':        # empty list element (RFC 7230 7)
        p = _skip_ows(b, p + 1, n)
    if p >= n:
        st.pos = p
        return 0
    s = p
    p = _skip_tchar(b, p, n)
    st.pos = p
    if p == s:
        st.err = AE_NAME
        return -1
    name.off = s
    name.length = p - s
    return 1


cdef int auth_param_value(const char* b, Py_ssize_t n, AuthScan* st, Span* value,
                          bint* escaped) noexcept nogil:
    """After a name: ``= value`` and the ``,`` or end that follows.  ``value``
    is the token, or the quoted-string's content; ``escaped`` says that
    content has quoted-pairs or folds to resolve (see ``_unquote_auth``).
    0, or -1 when malformed (``st.err``, ``st.pos``)."""
    cdef Py_ssize_t p, e
    p = _skip_ows(b, st.pos, n)
    escaped[0] = False
    if p >= n or b[p] != b'=':
        st.err = AE_EQ
        st.pos = p
        return -1
    p = _skip_ows(b, p + 1, n)
    if p < n and b[p] == b'"':
        e = _scan_qstring(b, p, n, escaped)
        if e < 0:
            st.err = AE_QSTRING
            st.pos = p
            return -1
        value.off = p + 1
        value.length = e - p - 2
    else:
        e = _skip_tchar(b, p, n)
        if e == p:
            st.err = AE_VALUE
            st.pos = p
            return -1
        value.off = p
        value.length = e - p
    p = _skip_ows(b, e, n)
    st.pos = p
    if p < n and b[p] != b',':
        st.err = AE_COMMA
        return -1
    return 0


def scan_credentials(bytes data):
    """Scan ``scheme [token68 | name=value *("," name=value)]``.

    Returns ``(scheme, params, token68)`` (params: lower-case name -> unquoted
    value), or ``(None, reason, offset)`` when malformed.  Linear time."""
    cdef const char* b = data
    cdef Py_ssize_t n = len(data)
    cdef AuthScan st
    cdef Span name, value
    cdef bint escaped
    cdef int r
    cdef dict params = {}
    if auth_scan_start(b, n, &st) < 0:
        return None, AUTH_REASONS[<int>st.err], st.pos
    scheme = _str(b, st.scheme.off, st.scheme.length)
    if st.token68.off >= 0:
        return scheme, params, _str(b, st.token68.off, st.token68.length)
    while True:
        r = auth_next_name(b, n, &st, &name)
        if r == 0:
            return scheme, params, None
        if r < 0:
            return None, AUTH_REASONS[<int>st.err], st.pos
        key = _str(b, name.off, name.length).lower()
        if key in params:
            return None, f"duplicate parameter {key[:40]!r}", name.off
        if auth_param_value(b, n, &st, &value, &escaped) < 0:
            return None, AUTH_REASONS[<int>st.err], st.pos
        params[key] = (_unquote_auth(b, value.off, value.off + value.length) if escaped
                       else _str(b, value.off, value.length))
