# Typed header values: Address (name-addr), Via, CSeq, SipURI, built lazily
# from the scanner's spans.

cdef str _collapse_lws(const char* buf, Py_ssize_t off, Py_ssize_t n):
    """A folded value with each run of LWS that holds a line break made one SP."""
    cdef Py_ssize_t i = off, j, end = off + n
    cdef bytearray out = bytearray()
    while i < end:
        if buf[i] == b'\r' or buf[i] == b'\n':
            while len(out) and (out[len(out) - 1] == 32 or out[len(out) - 1] == 9):
                out.pop()
            j = i
            while j < end and is_lws(buf[j]):
                j += 1
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
        key = decode(buf, name.off, name.length).lower()
        d[key] = None if value.off < 0 else unquote(buf, value.off, value.length)
    return d


cdef object _uri_params_dict(const char* buf, Span params):
    """';a=b;c' from a URI (already validated) -> {name.lower(): value or None}."""
    d = {}
    if params.length <= 0:
        return d
    for part in PyBytes_FromStringAndSize(buf + params.off + 1, params.length - 1).split(b";"):
        name, eq, value = part.partition(b"=")
        d[unescape(name, len(name)).lower()] = unescape(value, len(value)) if eq else None
    return d


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
        return decode(self._data, self.na.uri.off, self.na.uri.length)

    @property
    def display_name(self):
        """The display name (unquoted) or None."""
        cdef const char* b = self._data
        if self.na.display.off < 0:
            return None
        if self.na.quoted:
            return unquote(b, self.na.display.off, self.na.display.length)
        return " ".join(decode(b, self.na.display.off, self.na.display.length).split())

    @property
    def params(self):
        """Header parameters: {lower-case name: unquoted value or None}."""
        return _params_dict(self._data, self.na.params)

    @property
    def tag(self):
        if self.na.p_tag.off < 0:
            return None
        return unquote(self._data, self.na.p_tag.off, self.na.p_tag.length)

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
        return unquote(self._data, self.na.p_instance.off, self.na.p_instance.length)

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
        return decode(self._data, self.na.raw.off, self.na.raw.length)

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
        return (decode(self._data, self.v.protocol.off, self.v.protocol.length) + "/"
                + decode(self._data, self.v.version.off, self.v.version.length))

    @property
    def transport(self):
        return decode(self._data, self.v.transport.off, self.v.transport.length).upper()

    @property
    def host(self):
        return decode(self._data, self.v.host.off, self.v.host.length)

    @property
    def port(self):
        return None if self.v.port < 0 else self.v.port

    @property
    def branch(self):
        if self.v.branch.off < 0:
            return None
        return unquote(self._data, self.v.branch.off, self.v.branch.length)

    @property
    def params(self):
        return _params_dict(self._data, self.v.params)

    def __str__(self):
        return decode(self._data, self.v.raw.off, self.v.raw.length)

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
    r.text = decode(b, u.scheme.off, len(data) - u.scheme.off)
    r.scheme = "sips" if u.sips else "sip"
    r.user = None if u.user.off < 0 else unescape(b + u.user.off, u.user.length)
    r.password = None if u.password.off < 0 else unescape(b + u.password.off, u.password.length)
    r.host = decode(b, u.host.off, u.host.length)
    r.port = None if u.port < 0 else u.port
    r.params = _uri_params_dict(b, u.params)
    r.headers = {}
    if u.headers.off >= 0 and u.headers.length:
        for part in b[u.headers.off:u.headers.off + u.headers.length].split(b"&"):
            name, _, value = part.partition(b"=")
            r.headers[unescape(name, len(name))] = unescape(value, len(value))
    aor = "sip:"                            # sips: too (canonical_aor, RFC 5630 3.1.3)
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
