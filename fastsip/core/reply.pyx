
# --------------------------------------------------------------------------
# The reply writer: every response the core sends is written here, into one
# reusable buffer (RFC 3261 8.2.6: Via with received/rport, From, To with a
# tag, Call-ID, CSeq copied; a Date; no body).
# --------------------------------------------------------------------------

cdef const char* WEEKDAYS = b"SunMonTueWedThuFriSat"
cdef const char* MONTHS = b"JanFebMarAprMayJunJulAugSepOctNovDec"


@cython.final
cdef class ReplyWriter:
    """Writes responses to scanned requests; counts them by status."""

    def __cinit__(self):
        self.cap = 4096
        self.out = <char*>malloc(self.cap)
        if self.out == NULL:
            raise MemoryError()
        self.date_sec = -1

    def __dealloc__(self):
        free(self.out)

    def __init__(self, server="fastsip"):
        self.server_line = f"Server: {server}\r\n".encode() if server else b""

    cdef int w(self, const char* p, Py_ssize_t n) except -1:
        cdef char* grown
        if self.length + n > self.cap:
            while self.length + n > self.cap:
                self.cap *= 2
            grown = <char*>realloc(self.out, self.cap)
            if grown == NULL:
                raise MemoryError()
            self.out = grown
        memcpy(self.out + self.length, p, n)
        self.length += n
        return 0

    cdef int wint(self, int64_t v) except -1:
        cdef char digits[24]
        cdef int nd = 0
        if v < 0:
            self.w(b"-", 1)
            v = -v
        while True:
            digits[23 - nd] = <char>(48 + v % 10)
            nd += 1
            v //= 10
            if v == 0:
                break
        return self.w(digits + 24 - nd, nd)

    cdef int copy_header(self, const Req* rq, int htype, const char* name,
                         Py_ssize_t name_len) except -1:
        """Every header line of a type as ``Name: value`` (values as received)."""
        cdef int i
        cdef Header* h
        cdef Msg* m = rq.m
        if m.first[htype] < 0:
            return 0
        for i in range(m.first[htype], m.nheaders):
            h = &m.hdrs[i]
            if h.htype == htype:
                self.w(name, name_len)
                self.w(rq.buf + h.val_off, h.val_len)
                self.w(b"\r\n", 2)
        return 0

    cdef int via(self, const Req* rq) except -1:
        """Via lines as received, the top one with received= (and rport=, RFC 3581)."""
        cdef const char* buf = rq.buf
        cdef Msg* m = rq.m
        cdef int i = m.first[<int>HDR_VIA], j
        cdef Header* h
        cdef ViaSpans v
        cdef Span name, value
        cdef Py_ssize_t err = 0, end, pos, rport_at = -1, params_end
        cdef bint has_received = False
        if i < 0:
            return 0
        h = &m.hdrs[i]
        end = h.val_off + h.val_len
        if parse_via(buf, h.val_off, end, &v, &err) < 0:
            return self.copy_header(rq, HDR_VIA, b"Via: ", 5)
        pos = v.params.off
        params_end = v.params.off + v.params.length
        while pos < params_end and buf[pos] == b';':
            pos = scan_param(buf, pos, params_end, &name, &value, &err)
            if pos < 0:
                break
            if name.length == 5 and ieq(buf + name.off, 5, b"rport", 5) and value.off < 0:
                rport_at = name.off + 5
            elif name.length == 8 and ieq(buf + name.off, 8, b"received", 8):
                has_received = True
        self.w(b"Via: ", 5)
        if rport_at >= 0:
            self.w(buf + h.val_off, rport_at - h.val_off)
            self.w(b"=", 1)
            self.wint(rq.src_port)
            self.w(buf + rport_at, params_end - rport_at)
        else:
            self.w(buf + h.val_off, params_end - h.val_off)
        if not has_received and (rport_at >= 0 or not ieq(buf + v.host.off, v.host.length,
                                                          rq.src_host, rq.src_host_len)):
            self.w(b";received=", 10)
            self.w(rq.src_host, rq.src_host_len)
        self.w(buf + params_end, end - params_end)
        self.w(b"\r\n", 2)
        for j in range(i + 1, m.nheaders):
            h = &m.hdrs[j]
            if h.htype == HDR_VIA:
                self.w(b"Via: ", 5)
                self.w(buf + h.val_off, h.val_len)
                self.w(b"\r\n", 2)
        return 0

    cdef int date(self, double now) except -1:
        cdef time_t t
        cdef tm* g
        if not -1e15 < now < 1e15:      # NaN, infinite, or years gmtime cannot give: no Date
            return 0
        t = <time_t>now
        if <long>t != self.date_sec:
            g = gmtime(&t)
            if g == NULL:
                return 0
            # by hand, not strftime: %a and %b would follow the process's LC_TIME
            self.date_len = snprintf(self.date_buf, 40,
                                     b"Date: %.3s, %02d %.3s %04d %02d:%02d:%02d GMT\r\n",
                                     WEEKDAYS + 3 * g.tm_wday, g.tm_mday, MONTHS + 3 * g.tm_mon,
                                     g.tm_year + 1900, g.tm_hour, g.tm_min, g.tm_sec)
            self.date_sec = <long>t
        return self.w(self.date_buf, self.date_len)

    cdef int start(self, const Req* rq, int status, const char* reason,
                   Py_ssize_t reason_len) except -1:
        """The status line and the headers every response copies (RFC 3261 8.2.6.2)."""
        cdef const char* buf = rq.buf
        cdef Msg* m = rq.m
        cdef int i
        cdef Header* h
        cdef NameAddr to
        cdef Py_ssize_t err = 0
        cdef uint64_t tag
        cdef char hexd[16]
        self.length = 0
        self.w(b"SIP/2.0 ", 8)
        self.wint(status)
        self.w(b" ", 1)
        self.w(reason, reason_len)
        self.w(b"\r\n", 2)
        self.via(rq)
        self.copy_header(rq, HDR_FROM, b"From: ", 6)
        i = m.first[<int>HDR_TO]
        if i >= 0:
            h = &m.hdrs[i]
            self.w(b"To: ", 4)
            self.w(buf + h.val_off, h.val_len)
            if parse_name_addr(buf, h.val_off, h.val_off + h.val_len, &to, False, &err) >= 0 \
                    and to.p_tag.off < 0:
                # a To tag derived from the dialog identifiers: a retransmission
                # gets the same tag again
                tag = hash_bytes(buf + m.hdrs[m.first[<int>HDR_CALL_ID]].val_off,
                                 m.hdrs[m.first[<int>HDR_CALL_ID]].val_len, 0x746f, 0x746167) \
                    if m.first[<int>HDR_CALL_ID] >= 0 else 0
                for i in range(16):
                    hexd[i] = HEXDIGITS[(tag >> (4 * i)) & 15]
                self.w(b";tag=", 5)
                self.w(hexd, 16)
            self.w(b"\r\n", 2)
        self.copy_header(rq, HDR_CALL_ID, b"Call-ID: ", 9)
        self.copy_header(rq, HDR_CSEQ, b"CSeq: ", 6)
        return 0

    cdef Py_ssize_t finish(self, const Req* rq, int status) except -1:
        """Date, Server, an empty body: the reply's length (its bytes are
        ``out``, valid until the next reply is written)."""
        self.date(rq.now)
        self.w(self.server_line, len(self.server_line))
        self.w(b"Content-Length: 0\r\n\r\n", 21)
        if 0 <= status < 700:
            self.counts[status] += 1
        return self.length

    cdef bytes result(self):
        """The last reply written, as bytes."""
        return PyBytes_FromStringAndSize(self.out, self.length)

    cdef Py_ssize_t reply(self, const Req* rq, int status, object reason,
                          object headers) except -1:
        """A response without bindings (refusals, challenges, OPTIONS): ``reason``
        str or bytes, ``headers`` an iterable of (name, value) or None."""
        cdef bytes r = reason if type(reason) is bytes else \
            (<str>reason).encode("utf-8", "replace")
        self.start(rq, status, r, len(r))
        if headers is not None:
            for name, value in headers:
                self.wbytes(f"{name}: {value}\r\n".encode("utf-8", "replace"))
        return self.finish(rq, status)

    cdef int wbytes(self, bytes b) except -1:
        return self.w(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    cdef Py_ssize_t challenge(self, const Req* rq, list wire, const char* nonce,
                              Py_ssize_t nonce_len) except -1:
        """401 Unauthorized with one WWW-Authenticate per algorithm offered, all
        with the one ``nonce``: ``wire`` holds each header's bytes before and
        after the nonce, in turn (``AuthCore.challenge_parts``)."""
        cdef Py_ssize_t i
        self.start(rq, 401, b"Unauthorized", 12)
        for i in range(0, len(wire) - 1, 2):
            self.wbytes(<bytes>wire[i])
            self.w(nonce, nonce_len)
            self.wbytes(<bytes>wire[i + 1])
        return self.finish(rq, 401)

    cdef int by_q(self, const AorView* v, double now) noexcept:
        """The bindings of ``v`` valid at ``now`` into ``order``, highest q first
        (bindings without q count as 1.0), equal q in registration order (the
        view's): how many."""
        cdef int i, k, n = 0
        for i in range(v.n):
            if v.b[i].expires_at > now:
                # insertion sort, descending; stable: an equal q stays behind
                k = n
                while k > 0 and _q(&v.b[self.order[k - 1]]) < _q(&v.b[i]):
                    self.order[k] = self.order[k - 1]
                    k -= 1
                self.order[k] = i
                n += 1
        return n

    cdef Py_ssize_t ok(self, const Req* rq, const AorView* v, bint outbound,
                       bint path) except -1:
        """200 OK listing every binding of ``v`` with its remaining time, highest
        q first (RFC 3261 10.3 step 8), Path echoed when the UA supports it
        (``path``), and Require: outbound when the request registered an
        outbound flow (RFC 5626 6)."""
        cdef int i, n
        cdef const BindingView* b
        self.start(rq, 200, b"OK", 2)
        n = self.by_q(v, rq.now)
        for i in range(n):
            b = &v.b[self.order[i]]
            self.w(b"Contact: <", 10)
            self.w(b.uri, b.uri_len)
            self.w(b">;expires=", 10)
            self.wint(<int64_t>(b.expires_at - rq.now + 0.5))
            if b.q >= 0:
                self.w(b";q=", 3)
                self.qvalue(b.q)
            if b.instance_len:
                self.w(b";+sip.instance=\"", 16)
                self.w(b.instance, b.instance_len)
                self.w(b"\"", 1)
            if b.reg_id >= 0:
                self.w(b";reg-id=", 8)
                self.wint(b.reg_id)
            self.w(b"\r\n", 2)
        if path:
            self.copy_header(rq, HDR_PATH, b"Path: ", 6)
        if outbound:
            self.w(b"Require: outbound\r\n", 19)
        return self.finish(rq, 200)

    cdef Py_ssize_t moved(self, const Req* rq, const AorView* v, uint64_t skip,
                          Py_ssize_t limit) except -1:
        """302 Moved Temporarily (RFC 3261 8.3, 21.3.3) to the bindings of ``v``:
        one Contact each, ``<uri>;expires=N[;q=..]`` (N the seconds left, at
        least 1), highest q first, equal q in registration order.  Not listed:
        a binding whose contact is the Request-URI (``skip``, its
        ``uri_key_hash``: 8.3 forbids redirecting a request to it), and its
        +sip.instance, reg-id and Path (the registering UA's business with its
        registrar, not a target's).  At most ``limit`` bytes in all: the
        contacts that would not fit are left out, the lowest q first, and
        counted in ``omitted``; the highest one is always listed (only a request
        whose own copied headers are near the limit makes that exceed it, as
        any reply to it would).  None when nothing is left to list (no
        binding, or only the Request-URI): then 0, nothing written or counted."""
        cdef int i, j, n = self.by_q(v, rq.now), listed = 0
        cdef Py_ssize_t mark, tail = 40 + len(self.server_line) + 21     # finish(): at most
        cdef const BindingView* b
        cdef int64_t left
        self.omitted = 0
        self.start(rq, 302, b"Moved Temporarily", 17)
        for i in range(n):
            b = &v.b[self.order[i]]
            if b.key_hash == skip:
                continue
            mark = self.length
            self.w(b"Contact: <", 10)
            self.w(b.uri, b.uri_len)
            self.w(b">;expires=", 10)
            left = <int64_t>(b.expires_at - rq.now + 0.5)
            self.wint(left if left > 0 else 1)
            if b.q >= 0:
                self.w(b";q=", 3)
                self.qvalue(b.q)
            self.w(b"\r\n", 2)
            if listed and self.length + tail > limit:
                self.length = mark
                for j in range(i, n):
                    if v.b[self.order[j]].key_hash != skip:
                        self.omitted += 1
                break
            listed += 1
        if not listed:
            self.length = 0
            return 0
        return self.finish(rq, 302)

    cdef int qvalue(self, int q) except -1:
        """A qvalue from thousandths: 1000 -> "1", 500 -> "0.5", 125 -> "0.125"."""
        cdef char d[5]
        cdef int n = 1
        d[0] = <char>(48 + q // 1000)
        q %= 1000
        if q:
            d[1] = b'.'
            d[2] = <char>(48 + q // 100)
            d[3] = <char>(48 + q // 10 % 10)
            d[4] = <char>(48 + q % 10)
            n = 5
            while d[n - 1] == b'0':
                n -= 1
        return self.w(d, n)


cdef inline int _q(const BindingView* b) noexcept nogil:
    return 1000 if b.q < 0 else b.q


cdef inline void req_init(Req* rq, const char* buf, Py_ssize_t n, Msg* m, const char* src_host,
                          Py_ssize_t src_host_len, int src_port, double now, uint8_t transport,
                          int64_t conn_id) noexcept:
    """Fill a request struct (``buf`` and ``src_host`` must outlive it)."""
    rq.buf = buf
    rq.n = n
    rq.m = m
    rq.src_host = src_host
    rq.src_host_len = src_host_len
    rq.src_port = src_port
    rq.now = now
    rq.transport = transport
    rq.conn_id = conn_id


cdef ReplyWriter _writer = ReplyWriter(None)
cdef Limits _lim = default_limits()


def make_response(request, status, reason, headers=(), source=("0.0.0.0", 0), now=None):
    """A response to ``request`` (bytes): Via, From, To (with a tag), Call-ID and
    CSeq copied (RFC 3261 8.2.6), ``headers`` added, a Date, no body.  None when
    ``request`` is not a request.  ``now``: wall-clock seconds for the Date
    (None: the clock is read)."""
    cdef bytes data = bytes(request)
    cdef bytes host
    cdef Msg m
    cdef Req rq
    if now is None:
        import time
        now = time.time()
    scan_message(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &m, &_lim)
    try:
        if m.status != 0 or m.method.length == 0:
            return None
        host = _host_bytes(source[0])
        req_init(&rq, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &m,
                 PyBytes_AS_STRING(host), PyBytes_GET_SIZE(host), source[1], now, 0, -1)
        _writer.reply(&rq, status, reason, headers)
        return _writer.result()
    finally:
        msg_release(&m)


cdef bytes _host_bytes(host):
    """A source host (str or bytes) as the bytes the reply's Via carries."""
    return host.encode() if isinstance(host, str) else bytes(host)
