# The lexer: character tables and the small scanners every other part uses
# (LWS, tokens, quoted strings, escapes, numbers).  Written once; everything
# in fastsip.core reads these tables and calls these functions.

# --------------------------------------------------------------------------
# Character classes
# --------------------------------------------------------------------------

cdef enum:
    C_TOKEN = 1      # RFC 3261 token
    C_WS = 2         # SP / HTAB
    C_LWS = 4        # SP / HTAB / CR / LF (for trimming a framed value)
    C_DIGIT = 8
    C_HEX = 16
    C_URIC = 32      # may appear in a URI (reserved / unreserved / escaped / [ ])
    C_SCHEME = 64    # scheme characters after the first
    C_WORD = 128     # Call-ID "word"
    C_TCHAR = 256    # RFC 7230 tchar (credentials and challenges)
    C_T68 = 512      # RFC 7235 token68
    C_QPLAIN = 1024  # qdtext that needs no second look: not '"', '\\', a control but HTAB, DEL

cdef enum:
    U_USER = 1       # user: unreserved / escaped / user-unreserved
    U_PASS = 2       # password
    U_HOST = 4       # hostname / IPv4 characters
    U_PARAM = 8      # uri-parameter name or value (paramchar)
    U_HDR = 16       # uri header name or value (hnv-unreserved / unreserved / escaped)
    U_IPV6 = 32      # inside [ ]
    U_PVAL = 64      # unquoted generic-param value: token / host characters

cdef int64_t U32MAX = 4294967295
cdef uint64_t HIGH_BITS = 0x8080808080808080     # the top bit of each of 8 bytes (ASCII tests)
cdef const char* HEXDIGITS = b"0123456789abcdef"
cdef uint16_t CC[256]
cdef unsigned char UC[256]
cdef unsigned char LOWER[256]
cdef signed char HEXVAL[256]


cdef void _set(uint16_t* table, bytes chars, uint16_t flag):
    cdef unsigned char c
    for c in chars:
        table[c] |= flag


cdef void _set8(unsigned char* table, bytes chars, unsigned char flag):
    cdef unsigned char c
    for c in chars:
        table[c] |= flag


cdef void _init_tables():
    cdef int i
    memset(CC, 0, sizeof(CC))
    memset(UC, 0, sizeof(UC))
    for i in range(256):
        LOWER[i] = i + 32 if 65 <= i <= 90 else i
        HEXVAL[i] = -1
        if (i >= 32 or i == 9) and i not in (34, 92, 127):
            CC[i] |= C_QPLAIN
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
    _set(CC, alnum + b"!#$%&'*+-.^_`|~", C_TCHAR)
    _set(CC, alnum + b"-._~+/", C_T68)
    _set8(UC, unreserved + b"%&=+$,;?/", U_USER)
    _set8(UC, unreserved + b"%&=+$,", U_PASS)
    _set8(UC, alnum + b"-._", U_HOST)
    _set8(UC, unreserved + b"%[]/:&+$", U_PARAM)
    _set8(UC, unreserved + b"%[]/?:+$", U_HDR)
    _set8(UC, b"0123456789abcdefABCDEF:.", U_IPV6)
    _set8(UC, alnum + b"-.!%*_+`'~[]:", U_PVAL)


_init_tables()


cdef inline bint is_token(unsigned char c) noexcept nogil:
    return CC[c] & C_TOKEN


cdef inline bint is_ws(unsigned char c) noexcept nogil:
    return CC[c] & C_WS


cdef inline bint is_lws(unsigned char c) noexcept nogil:
    return CC[c] & C_LWS


cdef Py_ssize_t skip_lws(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """Spaces, tabs and folds (a line break followed by a space or tab): LWS
    of RFC 3261 25.1.  Inside a framed header value every line break is a fold."""
    while pos < end:
        if buf[pos] == b' ' or buf[pos] == b'\t':
            pos += 1
        elif buf[pos] == b'\n' and pos + 1 < end and CC[<unsigned char>buf[pos + 1]] & C_WS:
            pos += 2
        elif buf[pos] == b'\r' and pos + 2 < end and buf[pos + 1] == b'\n' and \
                CC[<unsigned char>buf[pos + 2]] & C_WS:
            pos += 3
        else:
            break
    return pos


cdef Py_ssize_t skip_token(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    while pos < end and CC[<unsigned char>buf[pos]] & C_TOKEN:
        pos += 1
    return pos


cdef inline Py_ssize_t skip_tchar(const char* buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    while pos < end and CC[<unsigned char>buf[pos]] & C_TCHAR:
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
# Quoted strings and escapes
# --------------------------------------------------------------------------

cdef Py_ssize_t scan_quoted(const char* buf, Py_ssize_t pos, Py_ssize_t end, bint controls,
                            bint* escaped) noexcept nogil:
    """A quoted-string (RFC 3261 25.1, RFC 7230 3.2.6), ``pos`` at the opening
    quote: the index after the closing one, or -1.  qdtext excludes controls
    but HTAB (``controls`` tolerates them: SIP header values, where a NUL in a
    display name is kept); a quoted-pair escapes any byte but CR/LF; a fold
    counts as LWS.  ``escaped`` is set when the content has quoted-pairs or
    folds (see :func:`unquote`)."""
    cdef unsigned char c
    pos += 1
    while pos < end:
        while pos < end and CC[<unsigned char>buf[pos]] & C_QPLAIN:
            pos += 1
        if pos >= end:
            break
        c = buf[pos]
        if c == b'"':
            return pos + 1
        if c == b'\\':
            if pos + 1 >= end or buf[pos + 1] == b'\r' or buf[pos + 1] == b'\n':
                return -1
            escaped[0] = True
            pos += 2
        elif c == b'\r' or c == b'\n':
            if skip_lws(buf, pos, end) == pos:
                return -1
            escaped[0] = True
            pos = skip_lws(buf, pos, end)
        elif controls:
            pos += 1
        else:
            return -1       # a control but HTAB, or DEL
    return -1


cdef inline str decode(const char* buf, Py_ssize_t off, Py_ssize_t n):
    """Wire bytes as str (UTF-8, other bytes kept as surrogates)."""
    return PyUnicode_DecodeUTF8(buf + off, n, "surrogateescape")


cdef str unquote(const char* buf, Py_ssize_t off, Py_ssize_t n):
    """A quoted-string's content (``buf[off:off+n]`` with its quotes) with
    quoted-pairs resolved and fold line breaks dropped; unquoted text as is."""
    cdef Py_ssize_t i, e
    cdef bytearray out
    if n < 2 or buf[off] != b'"':
        return decode(buf, off, n)
    i = off + 1
    e = off + n - 1
    if memchr(buf + i, b'\\', e - i) == NULL and memchr(buf + i, b'\n', e - i) == NULL:
        return decode(buf, i, e - i)
    out = bytearray()
    while i < e:
        if buf[i] == b'\\' and i + 1 < e:
            i += 1
        elif buf[i] == b'\r' or buf[i] == b'\n':
            i += 1
            continue
        out.append(<unsigned char>buf[i])
        i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


cdef Py_ssize_t unescape_into(const char* b, Py_ssize_t n, char* out,
                              Py_ssize_t cap) noexcept nogil:
    """The bytes ``unescape`` decodes (%HH resolved, the same rule) into
    ``out``: their length, or -1 when more than ``cap`` are needed."""
    cdef Py_ssize_t i = 0, k = 0
    while i < n:
        if k == cap:
            return -1
        if b[i] == b'%' and i + 2 < n and HEXVAL[<unsigned char>b[i + 1]] >= 0 \
                and HEXVAL[<unsigned char>b[i + 2]] >= 0:
            out[k] = <char>(HEXVAL[<unsigned char>b[i + 1]] * 16 + HEXVAL[<unsigned char>b[i + 2]])
            i += 3
        else:
            out[k] = b[i]
            i += 1
        k += 1
    return k


cdef str unescape(const char* b, Py_ssize_t n):
    """%HH escapes resolved (a % without two hex digits stays as it is)."""
    cdef Py_ssize_t i = 0
    cdef bytearray out
    if memchr(b, b'%', n) == NULL:
        return decode(b, 0, n)
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
