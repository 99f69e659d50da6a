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


cdef Limits default_limits() noexcept nogil:
    """The limits the registrar scans with (a Parser's defaults, but at most
    MAX_REQUEST_CONTACTS Contact values)."""
    cdef Limits lim
    lim.max_size = 65535
    lim.max_headers = 256
    lim.max_line = 8192
    lim.max_uri = 4096
    lim.max_contacts = MAX_REQUEST_CONTACTS
    return lim
