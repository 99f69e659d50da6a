

# --------------------------------------------------------------------------
# Credentials and challenges (RFC 7235 2.1, RFC 3261 25): the scan behind
# fastsip.auth.parse_credentials
# --------------------------------------------------------------------------

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
    p = skip_lws(b, 0, n)
    s = p
    p = skip_tchar(b, p, n)
    if p == s:
        st.err = AE_EMPTY if p == n else AE_SCHEME
        st.pos = p
        return -1
    st.scheme.off = s
    st.scheme.length = p - s
    e = p
    p = skip_lws(b, p, n)
    st.pos = p
    if p == n:
        return 0
    if p == e:
        st.err = AE_WS_AFTER_SCHEME
        return -1
    q = p
    while q < n and CC[<unsigned char>b[q]] & C_T68:
        q += 1
    if q > p:
        e = q
        while e < n and b[e] == b'=':
            e += 1
        if skip_lws(b, e, n) == n:
            st.token68.off = p
            st.token68.length = e - p
            st.pos = n
    return 0


cdef int auth_next_name(const char* b, Py_ssize_t n, AuthScan* st, Span* name) noexcept nogil:
    """The next parameter name (empty list elements skipped): 1, 0 at the
    end, -1 when malformed (``st.err``, ``st.pos``)."""
    cdef Py_ssize_t p = st.pos, s
    while p < n and b[p] == b',':        # empty list element (RFC 7230 7)
        p = skip_lws(b, p + 1, n)
    if p >= n:
        st.pos = p
        return 0
    s = p
    p = skip_tchar(b, p, n)
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
    content has quoted-pairs or folds to resolve (see ``unquote``).
    0, or -1 when malformed (``st.err``, ``st.pos``)."""
    cdef Py_ssize_t p, e
    p = skip_lws(b, st.pos, n)
    escaped[0] = False
    if p >= n or b[p] != b'=':
        st.err = AE_EQ
        st.pos = p
        return -1
    p = skip_lws(b, p + 1, n)
    if p < n and b[p] == b'"':
        e = scan_quoted(b, p, n, False, escaped)
        if e < 0:
            st.err = AE_QSTRING
            st.pos = p
            return -1
        value.off = p + 1
        value.length = e - p - 2
    else:
        e = skip_tchar(b, p, n)
        if e == p:
            st.err = AE_VALUE
            st.pos = p
            return -1
        value.off = p
        value.length = e - p
    p = skip_lws(b, e, n)
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
    scheme = decode(b, st.scheme.off, st.scheme.length)
    if st.token68.off >= 0:
        return scheme, params, decode(b, st.token68.off, st.token68.length)
    while True:
        r = auth_next_name(b, n, &st, &name)
        if r == 0:
            return scheme, params, None
        if r < 0:
            return None, AUTH_REASONS[<int>st.err], st.pos
        key = decode(b, name.off, name.length).lower()
        if key in params:
            return None, f"duplicate parameter {key[:40]!r}", name.off
        if auth_param_value(b, n, &st, &value, &escaped) < 0:
            return None, AUTH_REASONS[<int>st.err], st.pos
        params[key] = (unquote(b, value.off - 1, value.length + 2) if escaped
                       else decode(b, value.off, value.length))


def _param(name):
    return property(lambda self: self.params.get(name), doc=f"The ``{name}`` parameter, or None.")


@cython.final
cdef class Credentials:
    """One parsed credentials (or challenge) value.

    ``scheme`` as written; ``params`` maps lower-case names to unquoted values.
    ``token68`` holds the blob of a token68 form (``Basic dXNlcjpwYXNz``),
    which has no params.  Compared by value.
    """
    cdef readonly str scheme
    cdef readonly dict params
    cdef readonly object token68

    def __init__(self, str scheme, params=None, token68=None):
        self.scheme = scheme
        self.params = {} if params is None else dict(params)
        self.token68 = token68

    def __eq__(self, other):
        if not isinstance(other, Credentials):
            return NotImplemented
        return (self.scheme, self.params, self.token68) == \
            ((<Credentials>other).scheme, (<Credentials>other).params, (<Credentials>other).token68)

    __hash__ = None     # params is a dict

    def __repr__(self):
        return f"Credentials(scheme={self.scheme!r}, params={self.params!r}, token68={self.token68!r})"

    username = _param("username")
    realm = _param("realm")
    nonce = _param("nonce")
    uri = _param("uri")
    response = _param("response")
    algorithm = _param("algorithm")
    qop = _param("qop")
    nc = _param("nc")
    cnonce = _param("cnonce")
    opaque = _param("opaque")


def parse_credentials(str value):
    """Parse ``scheme [token68 | name=value *("," name=value)]``.

    Grammar of RFC 7235 2.1 and RFC 3261 25: LWS (including folds) around
    ``=`` and ``,``, values are tokens or quoted-strings (backslash escapes,
    commas inside quotes), names are case-insensitive, empty list elements
    are skipped, a name may occur only once.  One challenge or credentials per
    value.  Raises ``BadCredentials`` (with the byte offset in the UTF-8 form
    of ``value``) on malformed input, nothing else on any ``str``; linear time.
    """
    data = value.encode("utf-8", "surrogatepass")
    scheme, params, token68 = scan_credentials(data)
    if scheme is None:
        raise _errors.BadCredentials(params, token68, data)
    return Credentials(scheme, params, token68)
