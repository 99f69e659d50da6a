

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
        cdef int j = conflicting(self._data, &self.m, htype)
        if j >= 0:
            raise _errors.BadHeader(f"conflicting {name} headers", self.m.hdrs[j].name_off,
                                    self._data)
        return self.m.first[htype]

    cdef str _value(self, int i):
        cdef Header* h = &self.m.hdrs[i]
        if h.folded:
            return _collapse_lws(self._data, h.val_off, h.val_len)
        return decode(self._data, h.val_off, h.val_len)

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
            out.append(decode(self._data, tok.off, tok.length))

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
            self._call_id = decode(buf, h.val_off, h.val_len)
        self._have |= HAVE_CALL_ID
        return self._call_id

    @property
    def cseq(self):
        """The CSeq (``.seq`` int, ``.method`` str) or None.  In a request the
        method must be the request's method."""
        cdef int i, rc
        cdef Header* h
        cdef Py_ssize_t p, s
        cdef int64_t seq
        cdef Span method
        cdef const char* buf
        if self._have & HAVE_CSEQ:
            return self._cseq
        i = self._index(HDR_CSEQ, "CSeq")
        if i >= 0:
            h = &self.m.hdrs[i]
            buf = self._data
            rc = scan_cseq(buf, h.val_off, h.val_off + h.val_len, &seq, &method, &p)
            if rc == CSEQ_TOO_LARGE:
                raise _errors.BadCSeq("CSeq number larger than 2**32-1", p, self._data)
            if rc == CSEQ_BAD:
                raise _errors.BadCSeq("bad CSeq", p, self._data)
            if rc == CSEQ_BAD_METHOD:
                raise _errors.BadCSeq("bad CSeq method", p, self._data)
            s = method.off
            p = method.off + method.length
            if self.m.status == 0 and (p - s != self.m.method.length or
                                       memcmp(buf + s, buf + self.m.method.off, p - s) != 0):
                raise _errors.BadCSeq("CSeq method differs from the request method", s,
                                      self._data)
            self._cseq = CSeq.new(seq, decode(buf, s, p - s))
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
        for i in range(self.m.first[htype], self.m.nheaders):
            if self.m.hdrs[i].htype == htype:
                try:
                    out.append(parse_credentials(self._value(i)))
                except _errors.BadCredentials as exc:
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
        return decode(self._data, self.m.uri.off, self.m.uri.length)

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
        return decode(self._data, self.m.reason.off, self.m.reason.length)

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
            out.append((decode(self.msg._data, h.name_off, h.name_len), self.msg._value(i)))
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
