"""The registrar's hot path: RFC 3261 10.3 from datagram bytes to reply bytes.

``RegistrarCore.handle`` scans the request with the parser's C functions (no
Python message object), decides with the rules of RFC 3261 10.3, changes the
store all-or-nothing, and writes the reply into a reusable C buffer.  Python
objects appear only for the reply bytes and on the rare paths (errors,
digest authentication).  The Python facade is ``fastsip.registrar``.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy

from fastsip._parser_c cimport (
    HDR_AUTHORIZATION, HDR_CALL_ID, HDR_CONTACT, HDR_CSEQ, HDR_EXPIRES, HDR_FROM, HDR_PATH,
    HDR_REQUIRE, HDR_SUPPORTED, HDR_TO, HDR_USER_AGENT, HDR_VIA, Header, Limits, Msg, NameAddr,
    OK, E_BODY_SHORT, E_VERSION, Span, UriSpans, ViaSpans, aor_hash, bad_call_id, canonical_aor,
    AOR_HOST, AOR_USER,
    hash_bytes, ieq,
    TokenIter, msg_release, next_header_token, parse_name_addr, parse_qvalue, parse_uint, parse_via,
    scan_message, scan_param, scan_sip_uri, skip_lws, uri_key_hash)
from fastsip._store_c cimport BindingIn, BindingRec, Store
from fastsip._auth_c cimport AuthCore, Cred, Field, scan_digest, set_bytes_field

from fastsip._parser_c import parse_uri
from fastsip._store_c import transport_code
from fastsip.auth import Authorize, BadCredentials, parse_credentials
from fastsip.errors import ParseError

from libc.stdio cimport snprintf
from libc.time cimport gmtime, time_t, tm


# Limits on what one binding may hold (400 names the limit when exceeded).
cdef enum:
    MAX_AOR = 255
    MAX_CONTACT_URI = 512
    MAX_CALL_ID = 255
    MAX_INSTANCE = 255
    MAX_PATH = 1024
    MAX_USER_AGENT = 255
    MAX_REQUEST_CONTACTS = 64
    MAX_LISTED = 256              # bindings one AOR may hold (the 200 lists them all)

cdef enum Action:
    A_NONE = 0
    A_ADD = 1
    A_UPDATE = 2
    A_REMOVE = 3

cdef struct ContactIn:
    Span uri
    Span instance        # unquoted content of +sip.instance
    uint64_t key
    int64_t expires      # seconds after clamping
    int64_t reg_id
    int16_t q
    int32_t match        # matching binding slot, -1 none
    uint8_t action


SUPPORTED_OPTIONS = ("path", "outbound")
cdef const char* HEXDIGITS = b"0123456789abcdef"
# the request methods counted by name in ``requests`` (others count as "other")
METHODS = frozenset(("REGISTER", "OPTIONS", "INVITE", "ACK", "BYE", "CANCEL", "PRACK", "UPDATE",
                     "SUBSCRIBE", "NOTIFY", "PUBLISH", "REFER", "MESSAGE", "INFO"))
cdef const char* WEEKDAYS = b"SunMonTueWedThuFriSat"
cdef const char* MONTHS = b"JanFebMarAprMayJunJulAugSepOctNovDec"


cdef class Reply:
    """A refusal decided before the reply is written: status, reason, extra headers."""
    cdef public int status
    cdef public str reason
    cdef public list headers

    def __init__(self, int status, str reason, list headers=None):
        self.status = status
        self.reason = reason
        self.headers = headers or []


cdef class RegistrarCore:
    """The sans-I/O registrar engine.  See :class:`fastsip.Registrar`."""

    cdef readonly Store store
    cdef readonly int min_expires, max_expires, default_expires, max_contacts
    cdef readonly object domains           # frozenset of lower-case str, or None for any
    cdef tuple _exact                      # bytes
    cdef tuple _suffixes                   # bytes like b".example.com"
    cdef frozenset _addresses              # bytes, lower-case
    cdef object _authorize_obj
    cdef AuthCore _auth_core               # the same object, when its check is Authorize's
    cdef readonly double last_now
    cdef int aor_form                      # AOR_HOST or AOR_USER (canonical_aor)
    cdef Limits lim
    cdef char* out
    cdef Py_ssize_t out_len, out_cap
    cdef ContactIn cin[MAX_REQUEST_CONTACTS]
    cdef int32_t listing[MAX_LISTED]
    cdef char date_buf[40]
    cdef Py_ssize_t date_len
    cdef long date_sec
    cdef bytes server_line
    # counters
    cdef uint64_t reply_counts[700]        # by status code
    cdef uint64_t register_count
    cdef dict other_requests               # method -> count, for all but REGISTER
    cdef readonly Py_ssize_t parse_errors

    def __cinit__(self):
        self.out_cap = 4096
        self.out = <char*>malloc(self.out_cap)
        if self.out == NULL:
            raise MemoryError()
        self.date_sec = -1

    def __dealloc__(self):
        free(self.out)

    def __init__(self, *, int min_expires=30, int max_expires=300, default_expires=3600,
                 int max_contacts=16, domains=None, addresses=(), authorize=None,
                 server="fastsip", bint track_changes=False, str aor_by="user@host"):
        self.aor_form = _aor_form(aor_by)
        self.configure(min_expires=min_expires, max_expires=max_expires,
                       default_expires=default_expires, max_contacts=max_contacts)
        self.store = Store(track_changes=track_changes)
        self.set_domains(domains)
        self._addresses = frozenset(a.lower().strip("[]").encode() for a in addresses)
        self.authorize = authorize
        self.lim.max_size = 65535
        self.lim.max_headers = 256
        self.lim.max_line = 8192
        self.lim.max_uri = 4096
        self.lim.max_contacts = MAX_REQUEST_CONTACTS
        self.server_line = f"Server: {server}\r\n".encode() if server else b""
        self.other_requests = {}
        self.last_now = 0.0

    @property
    def aor_by(self):
        """What keys a binding: "user@host" (the AOR without port or
        parameters, the default) or "user" (the user part alone: one domain)."""
        return "user" if self.aor_form == AOR_USER else "user@host"

    def aor_of(self, aor):
        """The key this registrar stores ``aor`` (a SIP URI as str or bytes)
        under, as str: ``sip:alice@Example.COM:5060;transport=tcp`` ->
        ``sip:alice@example.com`` (``sip:alice`` when keyed by user).  A
        string that is not a SIP URI is returned as it is."""
        return _aor_text(aor, self.aor_form)

    @property
    def authorize(self):
        """The :class:`fastsip.Authorize` (or any object with its ``check``), or None."""
        return self._authorize_obj

    @authorize.setter
    def authorize(self, value):
        self._authorize_obj = value
        # An Authorize whose check is not overridden is run on the header
        # bytes (the same compiled check, without parsing into Credentials).
        self._auth_core = value if isinstance(value, AuthCore) and \
            getattr(type(value), "check", None) is Authorize.check else None

    def configure(self, *, min_expires=None, max_expires=None, default_expires=None,
                  max_contacts=None):
        """Change the expiry and contact limits (None keeps a value), e.g. on a
        configuration reload; bindings already stored keep their expiry."""
        lo = self.min_expires if min_expires is None else int(min_expires)
        hi = self.max_expires if max_expires is None else int(max_expires)
        dflt = self.default_expires if default_expires is None else int(default_expires)
        most = self.max_contacts if max_contacts is None else int(max_contacts)
        if lo < 0 or hi < lo:
            raise ValueError("need 0 <= min_expires <= max_expires")
        if not 1 <= most <= MAX_LISTED:
            raise ValueError(f"max_contacts must be between 1 and {MAX_LISTED}")
        self.min_expires = lo
        self.max_expires = hi
        # RFC 3261 10.3 step 7: the default applies when the request names
        # none; like any value it is capped at max_expires.
        self.default_expires = max(lo, min(dflt, hi))
        self.max_contacts = most

    def set_domains(self, domains):
        """Set the served domains (None: any).  "*.example.com" serves subdomains."""
        if isinstance(domains, str):
            domains = [domains]
        if domains is None:
            self.domains = None
            self._exact = ()
            self._suffixes = ()
            return
        ds = [d.strip().lower() for d in domains]
        if not ds or any(not d or d == "*." for d in ds):
            raise ValueError("domains must be non-empty names")
        self.domains = frozenset(ds)
        self._exact = tuple(d.encode() for d in ds if not d.startswith("*."))
        self._suffixes = tuple(d[1:].encode() for d in ds if d.startswith("*."))

    cdef bint _serves(self, const char* host, Py_ssize_t n):
        """Is ``host`` a served domain (exact, case-insensitive, or under a *.suffix)?"""
        cdef bytes d
        cdef Py_ssize_t k
        if self.domains is None:
            return True
        for d in self._exact:
            if ieq(host, n, d, len(d)):
                return True
        for d in self._suffixes:
            k = len(d)
            if n > k and ieq(host + n - k, k, d, k):
                return True
        return False

    # -- the reply buffer ----------------------------------------------------

    cdef int _w(self, const char* p, Py_ssize_t n) except -1:
        cdef char* grown
        if self.out_len + n > self.out_cap:
            while self.out_len + n > self.out_cap:
                self.out_cap *= 2
            grown = <char*>realloc(self.out, self.out_cap)
            if grown == NULL:
                raise MemoryError()
            self.out = grown
        memcpy(self.out + self.out_len, p, n)
        self.out_len += n
        return 0

    cdef int _wb(self, bytes b) except -1:
        return self._w(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    cdef int _wint(self, int64_t v) except -1:
        cdef char digits[24]
        cdef int nd = 0
        if v < 0:
            self._w(b"-", 1)
            v = -v
        while True:
            digits[23 - nd] = <char>(48 + v % 10)
            nd += 1
            v //= 10
            if v == 0:
                break
        return self._w(digits + 24 - nd, nd)

    cdef int _copy_header(self, const char* buf, Msg* m, int htype, const char* name,
                          Py_ssize_t name_len) except -1:
        """Copy every header line of a type as ``Name: value`` (values as received)."""
        cdef int i
        cdef Header* h
        if m.first[htype] < 0:
            return 0
        for i in range(m.first[htype], m.nheaders):
            h = &m.hdrs[i]
            if h.htype == htype:
                self._w(name, name_len)
                self._w(buf + h.val_off, h.val_len)
                self._w(b"\r\n", 2)
        return 0

    cdef int _write_via(self, const char* buf, Msg* m, bytes host, int port) except -1:
        """Via lines as received, the top one with received= (and rport=, RFC 3581)."""
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
            return self._copy_header(buf, m, HDR_VIA, b"Via: ", 5)
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
        self._w(b"Via: ", 5)
        if rport_at >= 0:
            self._w(buf + h.val_off, rport_at - h.val_off)
            self._w(b"=", 1)
            self._wint(port)
            self._w(buf + rport_at, params_end - rport_at)
        else:
            self._w(buf + h.val_off, params_end - h.val_off)
        if not has_received and (rport_at >= 0 or not ieq(buf + v.host.off, v.host.length,
                                                          host, PyBytes_GET_SIZE(host))):
            self._w(b";received=", 10)
            self._wb(host)
        self._w(buf + params_end, end - params_end)
        self._w(b"\r\n", 2)
        for j in range(i + 1, m.nheaders):
            h = &m.hdrs[j]
            if h.htype == HDR_VIA:
                self._w(b"Via: ", 5)
                self._w(buf + h.val_off, h.val_len)
                self._w(b"\r\n", 2)
        return 0

    cdef int _write_date(self, double now) except -1:
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
        return self._w(self.date_buf, self.date_len)

    cdef int _start_reply(self, const char* buf, Msg* m, int status, bytes reason,
                          bytes src_host, int src_port, double now) except -1:
        """Status line and the headers every response copies (RFC 3261 8.2.6.2)."""
        cdef int i
        cdef Header* h
        cdef NameAddr to
        cdef Py_ssize_t err = 0
        cdef uint64_t tag
        cdef char hexd[16]
        self.out_len = 0
        self._w(b"SIP/2.0 ", 8)
        self._wint(status)
        self._w(b" ", 1)
        self._wb(reason)
        self._w(b"\r\n", 2)
        self._write_via(buf, m, src_host, src_port)
        self._copy_header(buf, m, HDR_FROM, b"From: ", 6)
        i = m.first[<int>HDR_TO]
        if i >= 0:
            h = &m.hdrs[i]
            self._w(b"To: ", 4)
            self._w(buf + h.val_off, h.val_len)
            if parse_name_addr(buf, h.val_off, h.val_off + h.val_len, &to, False, &err) >= 0 \
                    and to.p_tag.off < 0:
                # a To tag derived from the dialog identifiers: a retransmission
                # gets the same tag again
                tag = hash_bytes(buf + m.hdrs[m.first[<int>HDR_CALL_ID]].val_off,
                                 m.hdrs[m.first[<int>HDR_CALL_ID]].val_len, 0x746f, 0x746167) \
                    if m.first[<int>HDR_CALL_ID] >= 0 else 0
                for i in range(16):
                    hexd[i] = HEXDIGITS[(tag >> (4 * i)) & 15]
                self._w(b";tag=", 5)
                self._w(hexd, 16)
            self._w(b"\r\n", 2)
        self._copy_header(buf, m, HDR_CALL_ID, b"Call-ID: ", 9)
        self._copy_header(buf, m, HDR_CSEQ, b"CSeq: ", 6)
        return 0

    cdef bytes _finish(self, double now, int status):
        self._write_date(now)
        self._w(self.server_line, len(self.server_line))
        self._w(b"Content-Length: 0\r\n\r\n", 21)
        if 0 <= status < 700:
            self.reply_counts[status] += 1
        return PyBytes_FromStringAndSize(self.out, self.out_len)

    cdef bytes _reply(self, const char* buf, Msg* m, int status, str reason, list headers,
                      bytes src_host, int src_port, double now):
        """A reply without bindings (errors, challenges), with extra headers."""
        self._start_reply(buf, m, status, reason.encode("utf-8", "replace"), src_host, src_port,
                          now)
        for name, value in headers or ():
            self._wb(f"{name}: {value}\r\n".encode("utf-8", "replace"))
        return self._finish(now, status)

    cdef bytes _malformed(self, const char* buf, Msg* m, int rc, bytes src_host, int src_port,
                          double now):
        """The answer to a request whose scan failed (rc): 505 for another SIP
        version, else 400; counted as a parse error."""
        self.parse_errors += 1
        if rc == E_VERSION:
            return self._reply(buf, m, 505, "Version Not Supported", None, src_host, src_port, now)
        if rc == E_BODY_SHORT:
            return self._reply(buf, m, 400, "Content-Length larger than the body", None,
                               src_host, src_port, now)
        return self._reply(buf, m, 400, "Bad Request (malformed message)", None, src_host,
                           src_port, now)

    # -- the REGISTER logic ----------------------------------------------------

    cpdef object handle(self, bytes data, tuple source, double now, str transport="udp",
                        int64_t conn_id=-1):
        """Process one datagram: the reply bytes, or None when it is not for this
        registrar (not a REGISTER request, or a domain it does not serve)."""
        cdef Msg m
        cdef object result
        cdef const char* buf = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef int rc
        self.last_now = now
        rc = scan_message(buf, n, &m, &self.lim)
        try:
            if m.status != 0 or m.method.length == 0 or not (
                    m.method.length == 8 and memcmp(buf + m.method.off, b"REGISTER", 8) == 0):
                if rc != OK:
                    self.parse_errors += 1
                return None
            self.register_count += 1
            result = self._register(data, buf, &m, rc, _host_bytes(source[0]), source[1], now,
                                    transport, conn_id)
        finally:
            msg_release(&m)
        return result

    cdef object _register(self, bytes data, const char* buf, Msg* m, int rc, bytes src_host,
                          int src_port, double now, str transport, int64_t conn_id):
        cdef UriSpans ruri, to_uri
        cdef NameAddr to, na
        cdef ViaSpans via
        cdef bint outbound = False
        cdef uint8_t tcode
        cdef Py_ssize_t err = 0, pos, end, aor_len, k, s, i, ncontacts = 0
        cdef int j, hi, status
        cdef Header* h
        cdef char aor[MAX_AOR + 1]
        cdef int64_t cseq, hdr_expires = -1, e
        cdef int32_t a, slot, added = 0, removed = 0, live = 0
        cdef ContactIn* c
        cdef bint star = False, retransmission = False
        cdef Span call_id
        cdef BindingRec* br

        if rc != OK:
            return self._malformed(buf, m, rc, src_host, src_port, now)

        # 1. The Request-URI must be a SIP URI naming a domain we serve or us.
        rc = scan_sip_uri(buf, m.uri.off, m.uri.off + m.uri.length, &ruri, &err)
        if rc == -2:
            return self._reply(buf, m, 416, "Unsupported URI Scheme", None, src_host, src_port, now)
        if rc != 0:
            self.parse_errors += 1
            return self._reply(buf, m, 400, "Bad Request-URI", None, src_host, src_port, now)
        missing = _missing_header(m)
        if missing is not None:
            return self._reply(buf, m, 400, missing, None, src_host, src_port, now)
        h = &m.hdrs[m.first[<int>HDR_VIA]]
        if parse_via(buf, h.val_off, h.val_off + h.val_len, &via, &err) < 0:
            self.parse_errors += 1
            return self._reply(buf, m, 400, "Bad Via header", None, src_host, src_port, now)
        # 5 (first half). The AOR comes from To, which must be a SIP or SIPS URI.
        h = &m.hdrs[m.first[<int>HDR_TO]]
        if parse_name_addr(buf, h.val_off, h.val_off + h.val_len, &to, False, &err) < 0:
            self.parse_errors += 1
            return self._reply(buf, m, 400, "Bad To header", None, src_host, src_port, now)
        rc = scan_sip_uri(buf, to.uri.off, to.uri.off + to.uri.length, &to_uri, &err)
        if rc != 0:
            return self._reply(buf, m, 400, "To must hold a SIP or SIPS URI" if rc == -2 else
                               "Bad To URI", None, src_host, src_port, now)
        if not self._serves(buf + to_uri.host.off, to_uri.host.length):
            return None
        if self.domains is not None and not self._serves(buf + ruri.host.off, ruri.host.length) \
                and PyBytes_FromStringAndSize(buf + ruri.host.off, ruri.host.length).lower() \
                .strip(b"[]") not in self._addresses:
            return None

        # 2. Require: every option tag must be one we support.
        unsupported = self._unsupported(data, m)
        if unsupported is None:
            return self._reply(buf, m, 400, "Bad Require header", None, src_host, src_port, now)
        if unsupported:
            return self._reply(buf, m, 420, "Bad Extension", [("Unsupported", unsupported)],
                               src_host, src_port, now)

        # CSeq and Call-ID: well-formed, in their limits.
        h = &m.hdrs[m.first[<int>HDR_CSEQ]]
        pos = h.val_off
        end = h.val_off + h.val_len
        while pos < end and buf[pos] >= b'0' and buf[pos] <= b'9':
            pos += 1
        cseq = parse_uint(buf, h.val_off, pos, -1)
        s = skip_lws(buf, pos, end)
        if cseq < 0 or s == pos or end - s != 8 or memcmp(buf + s, b"REGISTER", 8) != 0:
            self.parse_errors += 1
            return self._reply(buf, m, 400, "Bad CSeq header", None, src_host, src_port, now)
        h = &m.hdrs[m.first[<int>HDR_CALL_ID]]
        call_id.off = h.val_off
        call_id.length = h.val_len
        if bad_call_id(buf, call_id.off, call_id.off + call_id.length) >= 0:
            self.parse_errors += 1
            return self._reply(buf, m, 400, "Bad Call-ID header", None, src_host, src_port, now)
        if call_id.length > MAX_CALL_ID:
            return self._reply(buf, m, 400, f"Call-ID longer than {MAX_CALL_ID} bytes", None,
                               src_host, src_port, now)
        k = -1
        for hi in range(m.nheaders):
            if m.hdrs[hi].htype == HDR_PATH:
                k += m.hdrs[hi].val_len + 1     # stored one per line
        if k > MAX_PATH:
            return self._reply(buf, m, 400, f"Path longer than {MAX_PATH} bytes", None,
                               src_host, src_port, now)
        if self._conflict(buf, m, HDR_CALL_ID) or self._conflict(buf, m, HDR_CSEQ) or \
                self._conflict(buf, m, HDR_TO) or self._conflict(buf, m, HDR_FROM):
            self.parse_errors += 1
            return self._reply(buf, m, 400, "Conflicting Call-ID, CSeq, To or From headers",
                               None, src_host, src_port, now)

        # 3-4. Authentication, then authorization (the AOR's user and domain).
        if self._authorize_obj is not None:
            refusal = self._authorize(data, buf, m, &to_uri, now)
            if refusal is not None:
                return self._reply(buf, m, (<Reply>refusal).status, (<Reply>refusal).reason,
                                   (<Reply>refusal).headers, src_host, src_port, now)

        # 5. The canonical AOR.
        aor_len = canonical_aor(buf, &to_uri, aor, MAX_AOR, self.aor_form)
        if aor_len < 0:
            return self._reply(buf, m, 400, f"AOR longer than {MAX_AOR} bytes", None, src_host,
                               src_port, now)

        # Expires header: delta-seconds; malformed counts as 3600 (RFC 3261 10.2.1.1).
        j = m.first[<int>HDR_EXPIRES]
        if j >= 0:
            h = &m.hdrs[j]
            hdr_expires = parse_uint(buf, h.val_off, h.val_off + h.val_len, 0xFFFFFFFF)
            if hdr_expires < 0:
                hdr_expires = 3600

        # 6-7. Every Contact value, with its expiry decided.
        j = m.first[<int>HDR_CONTACT]
        if j >= 0:
            for hi in range(j, m.nheaders):
                h = &m.hdrs[hi]
                if h.htype != HDR_CONTACT:
                    continue
                pos = h.val_off
                end = h.val_off + h.val_len
                while pos < end:
                    pos = parse_name_addr(buf, pos, end, &na, True, &err)
                    if pos < 0 or (pos == end and buf[pos - 1] == b','):
                        self.parse_errors += 1
                        return self._reply(buf, m, 400, "Bad Contact header", None, src_host,
                                           src_port, now)
                    if ncontacts == MAX_REQUEST_CONTACTS:
                        return self._reply(buf, m, 400,
                                           f"More than {MAX_REQUEST_CONTACTS} Contact values",
                                           None, src_host, src_port, now)
                    if na.star:
                        star = True
                    refusal = self._contact(buf, &na, &self.cin[ncontacts], hdr_expires)
                    if refusal is not None:
                        return self._reply(buf, m, (<Reply>refusal).status,
                                           (<Reply>refusal).reason, (<Reply>refusal).headers,
                                           src_host, src_port, now)
                    ncontacts += 1

        a = self.store.find(aor, aor_len)
        if a >= 0:
            self._drop_expired(a, now)
            self.store.release_if_empty(a)
            if self.store.aors[a].live == 0:
                a = -1

        if star:
            # Contact: * must stand alone, with Expires: 0 (RFC 3261 10.3 step 6).
            if ncontacts != 1 or hdr_expires != 0 or m.first[<int>HDR_EXPIRES] < 0:
                return self._reply(buf, m, 400, "Contact: * needs Expires: 0 and no other Contact",
                                   None, src_host, src_port, now)
            if a >= 0:
                slot = self.store.aors[a].first
                while slot >= 0:
                    br = &self.store.b[slot]
                    if self._same_call_id(buf, call_id, br) and <int64_t>br.cseq >= cseq:
                        return self._reply(buf, m, 400, "CSeq not higher than the binding's",
                                           None, src_host, src_port, now)
                    slot = br.next
                slot = self.store.aors[a].first
                while slot >= 0:
                    k = self.store.b[slot].next
                    self.store.remove_binding(slot)
                    slot = <int32_t>k
                self.store.release_if_empty(a)
            return self._ok(buf, m, -1, src_host, src_port, now, False)

        # 7. Below the minimum: 423 with Min-Expires, nothing changes.
        for i in range(ncontacts):
            e = self.cin[i].expires
            if self.cin[i].reg_id >= 0 and self.cin[i].instance.length > 0 and e > 0:
                outbound = True
            if 0 < e < self.min_expires:
                return self._reply(buf, m, 423, "Interval Too Brief",
                                   [("Min-Expires", str(self.min_expires))], src_host, src_port,
                                   now)

        # Match each contact with the AOR's bindings: same URI (19.1.4), or the
        # same +sip.instance and reg-id (RFC 5626: the flow's binding moves).
        for i in range(ncontacts):
            c = &self.cin[i]
            c.match = -1
            if a >= 0:
                slot = self.store.aors[a].first
                while slot >= 0:
                    br = &self.store.b[slot]
                    if br.key_hash == c.key or (c.instance.length > 0 and
                                                br.reg_id == c.reg_id and
                                                self._same_instance(buf, c, br)):
                        c.match = slot
                        break
                    slot = br.next
            for k in range(i):      # a contact repeated in one request: the last one counts
                if self.cin[k].action != A_NONE and (
                        self.cin[k].key == c.key or
                        (c.match >= 0 and self.cin[k].match == c.match) or
                        (c.instance.length > 0 and self.cin[k].reg_id == c.reg_id and
                         self.cin[k].instance.length == c.instance.length and
                         memcmp(buf + self.cin[k].instance.off, buf + c.instance.off,
                                c.instance.length) == 0)):
                    self.cin[k].action = A_NONE
                    if self.cin[k].match < 0:
                        added -= 1
            if c.match >= 0:
                br = &self.store.b[c.match]
                if self._same_call_id(buf, call_id, br):
                    if cseq < <int64_t>br.cseq:
                        return self._reply(buf, m, 400, "CSeq lower than the binding's", None,
                                           src_host, src_port, now)
                    if cseq == <int64_t>br.cseq:
                        retransmission = True
                c.action = A_REMOVE if c.expires == 0 else A_UPDATE
            else:
                c.action = A_NONE if c.expires == 0 else A_ADD
                if c.action == A_ADD:
                    added += 1
        if retransmission:
            # A request already processed (its reply may have been lost): the
            # same answer, nothing changes.
            return self._ok(buf, m, a, src_host, src_port, now, outbound)
        for i in range(ncontacts):
            if self.cin[i].action == A_REMOVE:
                removed += 1
        live = self.store.aors[a].count if a >= 0 else 0
        if live - removed + added > self.max_contacts:
            return self._reply(buf, m, 503, f"Too many contacts for this AOR "
                               f"(max_contacts={self.max_contacts})", None, src_host, src_port,
                               now)

        # All checks passed: commit every change.
        if ncontacts:
            tcode = 0 if transport == "udp" else transport_code(transport)  # before any change
            a = self.store.find_or_add(aor, aor_len)
            self._commit(buf, m, a, ncontacts, call_id, <uint32_t>cseq, src_host, src_port,
                         tcode, conn_id, now)
            self.store.release_if_empty(a)
            if self.store.aors[a].live == 0:
                a = -1
        return self._ok(buf, m, a, src_host, src_port, now, outbound)

    cdef object _contact(self, const char* buf, NameAddr* na, ContactIn* c, int64_t hdr_expires):
        """Check one Contact value and decide its expiry; a Reply when refused."""
        cdef UriSpans u
        cdef Py_ssize_t err = 0, e
        cdef int64_t v
        cdef int q
        c.uri = na.uri
        c.instance.off = -1
        c.instance.length = 0
        c.reg_id = -1
        c.q = -1
        c.action = A_NONE
        c.expires = 0
        if na.star:
            return None
        if na.uri.length > MAX_CONTACT_URI:
            return Reply(400, f"Contact URI longer than {MAX_CONTACT_URI} bytes")
        if scan_sip_uri(buf, na.uri.off, na.uri.off + na.uri.length, &u, &err) == -1:
            self.parse_errors += 1
            return Reply(400, "Bad Contact URI")
        c.key = uri_key_hash(buf, na.uri.off, na.uri.off + na.uri.length)
        if na.p_expires.off >= 0:
            v = parse_uint(buf, na.p_expires.off, na.p_expires.off + na.p_expires.length,
                           0xFFFFFFFF)
            if v < 0:
                v = 3600    # malformed: RFC 3261 10.2.1.1
        elif hdr_expires >= 0:
            v = hdr_expires
        else:
            v = self.default_expires
        c.expires = v if v <= self.max_expires else self.max_expires
        if na.p_q.off >= 0:
            q = parse_qvalue(buf, na.p_q.off, na.p_q.off + na.p_q.length)
            if q < 0:
                self.parse_errors += 1
                return Reply(400, "Bad q parameter in Contact")
            c.q = <int16_t>q
        if na.p_instance.off >= 0:
            c.instance = na.p_instance
            if na.p_instance.length >= 2 and buf[na.p_instance.off] == b'"':
                c.instance.off += 1
                c.instance.length -= 2
            if c.instance.length > MAX_INSTANCE:
                return Reply(400, f"+sip.instance longer than {MAX_INSTANCE} bytes")
        if na.p_regid.off >= 0:
            c.reg_id = parse_uint(buf, na.p_regid.off, na.p_regid.off + na.p_regid.length, -1)
            if c.reg_id < 0:
                self.parse_errors += 1
                return Reply(400, "Bad reg-id parameter in Contact")
        return None

    cdef bint _same_call_id(self, const char* buf, Span call_id, BindingRec* br):
        return br.call_id_len == call_id.length and \
            memcmp(br.blob + br.uri_len, buf + call_id.off, call_id.length) == 0

    cdef bint _same_instance(self, const char* buf, ContactIn* c, BindingRec* br):
        return br.instance_len == c.instance.length and memcmp(
            br.blob + br.uri_len + br.call_id_len, buf + c.instance.off, c.instance.length) == 0

    cdef bint _conflict(self, const char* buf, Msg* m, int htype):
        """A single-valued header that occurs again with another value."""
        cdef int i = m.first[htype], j
        cdef Header* a
        cdef Header* b
        a = &m.hdrs[i]
        for j in range(i + 1, m.nheaders):
            b = &m.hdrs[j]
            if b.htype == htype and (b.val_len != a.val_len or
                                     memcmp(buf + a.val_off, buf + b.val_off, a.val_len) != 0):
                return True
        return False

    cdef void _drop_expired(self, int32_t a, double now) noexcept:
        cdef int32_t slot = self.store.aors[a].first, nxt
        while slot >= 0:
            nxt = self.store.b[slot].next
            if self.store.b[slot].expires_at <= now:
                self.store.remove_binding(slot)
                self.store.n_expired += 1
            slot = nxt

    cdef int _commit(self, const char* buf, Msg* m, int32_t a, Py_ssize_t ncontacts,
                     Span call_id, uint32_t cseq, bytes src_host, int src_port, uint8_t tcode,
                     int64_t conn_id, double now) except -1:
        cdef BindingIn bi
        cdef Py_ssize_t i
        cdef ContactIn* c
        cdef int j
        cdef Header* h
        cdef bytes path = b""
        cdef list entries
        j = m.first[<int>HDR_PATH]
        if j >= 0:
            entries = []
            for i in range(j, m.nheaders):
                h = &m.hdrs[i]
                if h.htype == HDR_PATH:
                    entries.append(buf[h.val_off:h.val_off + h.val_len].replace(b"\r\n", b" ")
                                   .replace(b"\n", b" "))
            path = b"\n".join(entries)[:MAX_PATH]
        bi.call_id = buf + call_id.off
        bi.call_id_len = call_id.length
        bi.cseq = cseq
        bi.conn_id = conn_id
        bi.transport = tcode
        bi.src_port = <uint16_t>src_port
        bi.src_host = PyBytes_AS_STRING(src_host)
        bi.src_host_len = PyBytes_GET_SIZE(src_host)
        bi.path = PyBytes_AS_STRING(path)
        bi.path_len = PyBytes_GET_SIZE(path)
        j = m.first[<int>HDR_USER_AGENT]
        if j >= 0:
            h = &m.hdrs[j]
            bi.ua = buf + h.val_off
            bi.ua_len = h.val_len if h.val_len <= MAX_USER_AGENT else MAX_USER_AGENT
        else:
            bi.ua = NULL
            bi.ua_len = 0
        for i in range(ncontacts):
            c = &self.cin[i]
            if c.action == A_NONE:
                continue
            if c.action == A_REMOVE:
                self.store.remove_binding(c.match)
                continue
            bi.expires_at = now + c.expires
            bi.key_hash = c.key
            bi.reg_id = c.reg_id
            bi.q = c.q
            bi.uri = buf + c.uri.off
            bi.uri_len = c.uri.length
            bi.instance = buf + c.instance.off if c.instance.off >= 0 else NULL
            bi.instance_len = c.instance.length
            if c.action == A_UPDATE:
                self.store.update_binding(c.match, &bi)
            else:
                self.store.add_binding(a, &bi)
        return 0

    cdef bytes _ok(self, const char* buf, Msg* m, int32_t a, bytes src_host, int src_port,
                   double now, bint outbound):
        """200 OK listing every current binding with its remaining time, highest
        q first (RFC 3261 10.3 step 8), Path echoed when the UA supports it, and
        Require: outbound when the request registered an outbound flow (RFC 5626 6)."""
        cdef int32_t slot
        cdef Py_ssize_t n = 0, i, k, cap = MAX_LISTED
        cdef BindingRec* br
        cdef double left
        cdef int j
        cdef Header* h
        self._start_reply(buf, m, 200, b"OK", src_host, src_port, now)
        if a >= 0:
            slot = self.store.aors[a].first
            while slot >= 0 and n < cap:
                if self.store.b[slot].expires_at > now:
                    # insertion sort by q, descending (bindings without q count as 1.0)
                    k = n
                    while k > 0 and self._q(self.listing[k - 1]) < self._q(slot):
                        self.listing[k] = self.listing[k - 1]
                        k -= 1
                    self.listing[k] = slot
                    n += 1
                slot = self.store.b[slot].next
        for i in range(n):
            br = &self.store.b[self.listing[i]]
            self._w(b"Contact: <", 10)
            self._w(br.blob, br.uri_len)
            self._w(b">;expires=", 10)
            left = br.expires_at - now
            self._wint(<int64_t>(left + 0.5))
            if br.q >= 0:
                self._w(b";q=", 3)
                self._write_q(br.q)
            if br.instance_len:
                self._w(b";+sip.instance=\"", 16)
                self._w(br.blob + br.uri_len + br.call_id_len, br.instance_len)
                self._w(b"\"", 1)
            if br.reg_id >= 0:
                self._w(b";reg-id=", 8)
                self._wint(br.reg_id)
            self._w(b"\r\n", 2)
        if m.first[<int>HDR_PATH] >= 0 and self._supports_path(buf, m):
            self._copy_header(buf, m, HDR_PATH, b"Path: ", 6)
        if outbound:
            self._w(b"Require: outbound\r\n", 19)
        return self._finish(now, 200)

    cdef int _write_q(self, int q) except -1:
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
        return self._w(d, n)

    cdef inline int _q(self, int32_t slot):
        cdef int16_t q = self.store.b[slot].q
        return 1000 if q < 0 else q

    cdef bint _supports_path(self, const char* buf, Msg* m):
        """Does a Supported header list the option tag ``path``?"""
        cdef TokenIter it
        cdef Span tok
        it.htype = HDR_SUPPORTED
        it.i = -1
        while next_header_token(buf, m, &it, &tok) > 0:
            if tok.length == 4 and ieq(buf + tok.off, 4, b"path", 4):
                return True
        return False

    cdef object _unsupported(self, bytes data, Msg* m):
        """The Require option tags we do not support, comma-separated ("" if none);
        None when a Require header is not a token list."""
        cdef TokenIter it
        cdef Span tok
        cdef list out = []
        cdef int rc
        it.htype = HDR_REQUIRE
        it.i = -1
        while True:
            rc = next_header_token(data, m, &it, &tok)
            if rc <= 0:
                return None if rc < 0 else ", ".join(out)
            tag = data[tok.off:tok.off + tok.length].decode("utf-8", "replace")
            if tag.lower() not in SUPPORTED_OPTIONS:
                out.append(tag)

    cdef object _authorize(self, bytes data, const char* buf, Msg* m, UriSpans* to_uri,
                           double now):
        """Digest authentication and the AOR policy: None, or the refusal.

        With an Authorize, its compiled check runs on spans of the
        Authorization values (``fastsip._auth_c.scan_digest``); a value that
        needs more than spans (bytes above 0x7F, quoted-pairs, folds in a
        quoted-string) sends the request through ``parse_credentials`` and
        ``Authorize.check``, which end in the same check."""
        cdef AuthCore core = self._auth_core
        cdef Cred c, chosen
        cdef Field rf, method, ruri
        cdef int i, rc, alg = 0, outcome
        cdef Header* h
        if core is None:
            return self._authorize_parsed(data, buf, m, to_uri, now)
        aor_domain = PyBytes_FromStringAndSize(buf + to_uri.host.off, to_uri.host.length).decode(
            "utf-8", "surrogateescape")
        realm = core.realm_for(aor_domain)
        realm_bytes = core.realm_field(realm, &rf)     # keeps rf's bytes alive
        if m.first[<int>HDR_AUTHORIZATION] >= 0:
            for i in range(m.first[<int>HDR_AUTHORIZATION], m.nheaders):
                h = &m.hdrs[i]
                if h.htype != HDR_AUTHORIZATION:
                    continue
                rc = scan_digest(buf + h.val_off, h.val_len, &c)
                if rc > 0:
                    return self._authorize_parsed(data, buf, m, to_uri, now)
                if rc < 0:
                    return Reply(400, "Bad Authorization header")
                if not alg:
                    alg = core.selects(&c, &rf)
                    if alg:
                        chosen = c
        aor_user = "" if to_uri.user.off < 0 else _unescape(
            PyBytes_FromStringAndSize(buf + to_uri.user.off, to_uri.user.length))
        set_bytes_field(&method, b"REGISTER", 8)
        # compared only, never hashed: the raw bytes (decoded on a mismatch)
        set_bytes_field(&ruri, buf + m.uri.off, m.uri.length)
        outcome = core.verify(&chosen if alg else NULL, alg, &method, &ruri, realm, &rf, aor_user,
                              aor_domain, now)
        if outcome == 0:
            return None
        return _refusal(core._result(outcome, realm, now, None, aor_user))

    cdef object _authorize_parsed(self, bytes data, const char* buf, Msg* m, UriSpans* to_uri,
                                  double now):
        """The same through ``parse_credentials`` and ``authorize.check``."""
        creds = []
        cdef int i
        cdef Header* h
        if m.first[<int>HDR_AUTHORIZATION] >= 0:
            for i in range(m.first[<int>HDR_AUTHORIZATION], m.nheaders):
                h = &m.hdrs[i]
                if h.htype == HDR_AUTHORIZATION:
                    value = data[h.val_off:h.val_off + h.val_len].decode("utf-8",
                                                                        "surrogateescape")
                    try:
                        creds.append(parse_credentials(value))
                    except BadCredentials:
                        return Reply(400, "Bad Authorization header")
        aor_user = "" if to_uri.user.off < 0 else _unescape(
            data[to_uri.user.off:to_uri.user.off + to_uri.user.length])
        aor_domain = data[to_uri.host.off:to_uri.host.off + to_uri.host.length].decode(
            "utf-8", "surrogateescape")
        request_uri = data[m.uri.off:m.uri.off + m.uri.length].decode("utf-8", "surrogateescape")
        result = self._authorize_obj.check("REGISTER", request_uri, creds, aor_user, aor_domain,
                                           now)
        if result.ok:
            return None
        return _refusal(result)

    cpdef object serve(self, bytes data, tuple source, double now, str transport="udp",
                       int64_t conn_id=-1):
        """The edge dispatcher: what a registrar server answers to any datagram.

        REGISTER goes to :meth:`handle`; a REGISTER for a domain not served gets
        404; OPTIONS gets 200; other requests 405 with Allow; responses and ACK
        get nothing; malformed input gets 400 when a reply can be addressed (a
        request line was read), else nothing.  Never raises for bad input.
        """
        return self._serve(data, _host_bytes(source[0]), source[1], now, transport, conn_id, 0, 1)

    def serve_shard(self, bytes data, bytes src_host, int src_port, double now, str transport,
                    int64_t conn_id, int shard, int nshards):
        """:meth:`serve` for one shard of ``nshards``: a REGISTER whose AOR
        ``shard_of`` gives to another shard is not served but answered with
        that shard's number (an int).  Otherwise the reply bytes or None, as
        :meth:`serve`.  The source host comes as ASCII bytes.  One scan of the
        message decides both, which is why the server's receive loop calls this
        rather than ``aor_key`` and then ``serve``."""
        return self._serve(data, src_host, src_port, now, transport, conn_id, shard, nshards)

    cdef object _serve(self, bytes data, bytes src_host, int src_port, double now,
                       str transport, int64_t conn_id, int shard, int nshards):
        cdef Msg m
        cdef const char* buf = PyBytes_AS_STRING(data)
        cdef int rc, owner
        cdef object reply
        cdef UriSpans ruri
        cdef Py_ssize_t err = 0
        cdef char aor[MAX_AOR + 1]
        cdef Py_ssize_t aor_len
        self.last_now = now
        rc = scan_message(buf, PyBytes_GET_SIZE(data), &m, &self.lim)
        try:
            if m.status != 0:
                if rc != OK:
                    self.parse_errors += 1
                return None
            if m.method.length == 0:
                self.parse_errors += 1
                return None
            if m.method.length == 8 and memcmp(buf + m.method.off, b"REGISTER", 8) == 0:
                if nshards > 1:
                    aor_len = _request_aor(buf, &m, aor, self.aor_form)
                    if aor_len >= 0:
                        owner = aor_hash(aor, aor_len) % <uint64_t>nshards
                        if owner != shard:
                            return owner
                self.register_count += 1
                reply = self._register(data, buf, &m, rc, src_host, src_port, now, transport,
                                       conn_id)
                if reply is None:
                    reply = self._reply(buf, &m, 404, "Not Found (domain not served here)", None,
                                        src_host, src_port, now)
                return reply
            method = PyBytes_FromStringAndSize(buf + m.method.off, m.method.length).decode("ascii")
            if method not in METHODS:
                method = "other"        # one counter, however many names a sender invents
            self.other_requests[method] = self.other_requests.get(method, 0) + 1
            if method == "ACK":
                return None
            # RFC 3261 8.2: a request this server does not register still gets
            # the checks every UAS makes, in this order.
            if rc != OK:
                return self._malformed(buf, &m, rc, src_host, src_port, now)
            missing = _missing_header(&m)
            if missing is not None:
                return self._reply(buf, &m, 400, missing, None, src_host, src_port, now)
            rc = scan_sip_uri(buf, m.uri.off, m.uri.off + m.uri.length, &ruri, &err)
            if rc == -2:
                return self._reply(buf, &m, 416, "Unsupported URI Scheme", None, src_host,
                                   src_port, now)
            if method != "OPTIONS":
                return self._reply(buf, &m, 405, "Method Not Allowed",
                                   [("Allow", "REGISTER, OPTIONS")], src_host, src_port, now)
            unsupported = self._unsupported(data, &m)
            if unsupported is None:
                return self._reply(buf, &m, 400, "Bad Require header", None, src_host,
                                   src_port, now)
            if unsupported:
                return self._reply(buf, &m, 420, "Bad Extension", [("Unsupported", unsupported)],
                                   src_host, src_port, now)
            return self._reply(buf, &m, 200, "OK",
                               [("Allow", "REGISTER, OPTIONS"),
                                ("Supported", ", ".join(SUPPORTED_OPTIONS)),
                                ("Accept", "application/sdp")], src_host, src_port, now)
        finally:
            msg_release(&m)

    def respond(self, bytes data, tuple source, double now, int status, str reason,
                headers=None):
        """A response to the request ``data`` (Via, From, To with a tag, Call-ID
        and CSeq copied, RFC 3261 8.2.6), or None when ``data`` is no request."""
        cdef Msg m
        cdef const char* buf = PyBytes_AS_STRING(data)
        scan_message(buf, PyBytes_GET_SIZE(data), &m, &self.lim)
        try:
            if m.status != 0 or m.method.length == 0:
                return None
            return self._reply(buf, &m, status, reason, list(headers or ()),
                               _host_bytes(source[0]), source[1], now)
        finally:
            msg_release(&m)

    # -- queries (lookups never change the store) -------------------------------

    def lookup(self, aor, now=None):
        """The bindings of ``aor`` valid at ``now`` (default: the latest time seen)."""
        return self.store.lookup(self.aor_of(aor), self.last_now if now is None else now)

    def stats(self):
        """Counters for metrics: bindings, AORs, expired, parse errors, replies by code."""
        return {"bindings": self.store.n_bindings, "aors": self.store.n_live_aors,
                "expired": self.store.n_expired, "parse_errors": self.parse_errors,
                "replies": {code: self.reply_counts[code] for code in range(100, 700)
                            if self.reply_counts[code]},
                "requests": dict(self.other_requests, **(
                    {"REGISTER": self.register_count} if self.register_count else {}))}


cdef Reply _refusal(result):
    """The reply for a failed ``AuthResult``."""
    reason = {401: "Unauthorized", 403: "Forbidden"}.get(result.status, result.reason)
    return Reply(result.status, reason, list(result.headers))


cdef object _missing_header(Msg* m):
    """Which header every request needs is missing ("Missing X header"), or None."""
    for htype, name in ((HDR_VIA, "Via"), (HDR_FROM, "From"), (HDR_TO, "To"),
                        (HDR_CALL_ID, "Call-ID"), (HDR_CSEQ, "CSeq")):
        if m.first[<int>htype] < 0:
            return f"Missing {name} header"
    return None


cdef str _unescape(bytes raw):
    if b"%" not in raw:
        return raw.decode("utf-8", "surrogateescape")
    return parse_uri(b"sip:" + raw + b"@h").user


cdef int _aor_form(str by) except -1:
    if by == "user@host":
        return AOR_HOST
    if by == "user":
        return AOR_USER
    raise ValueError(f'aor_by must be "user@host" or "user", not {by!r}')


cdef object _aor_text(object aor, int form):
    """``RegistrarCore.aor_of``: the canonical AOR of a URI given as str or bytes."""
    cdef bytes b = aor.encode("utf-8", "surrogateescape") if isinstance(aor, str) else bytes(aor)
    cdef UriSpans u
    cdef Py_ssize_t err = 0, n
    cdef char out[MAX_AOR + 1]
    if scan_sip_uri(b, 0, len(b), &u, &err) != 0:
        return aor if isinstance(aor, str) else b.decode("utf-8", "surrogateescape")
    n = canonical_aor(b, &u, out, MAX_AOR, form)
    if n < 0:
        return b.decode("utf-8", "surrogateescape")
    return PyBytes_FromStringAndSize(out, n).decode("utf-8", "surrogateescape")


cdef bytes _host_bytes(host):
    """A source host (str or bytes) as the bytes the reply's Via carries."""
    return host.encode() if isinstance(host, str) else bytes(host)


cdef Py_ssize_t _request_aor(const char* buf, Msg* m, char* aor, int form) noexcept:
    """The canonical AOR of a scanned request's To URI into ``aor`` (MAX_AOR
    bytes): its length, or -1 when To is missing or not a SIP URI."""
    cdef NameAddr to
    cdef UriSpans u
    cdef Py_ssize_t err = 0
    cdef Header* h
    if m.first[<int>HDR_TO] < 0:
        return -1
    h = &m.hdrs[m.first[<int>HDR_TO]]
    if parse_name_addr(buf, h.val_off, h.val_off + h.val_len, &to, False, &err) < 0:
        return -1
    if scan_sip_uri(buf, to.uri.off, to.uri.off + to.uri.length, &u, &err) != 0:
        return -1
    return canonical_aor(buf, &u, aor, MAX_AOR, form)


def aor_key(bytes data, str by="user@host"):
    """The canonical AOR (bytes) of a REGISTER datagram, or None when ``data`` is
    not a REGISTER request with a SIP To URI.  Workers shard on it.  ``by``:
    "user@host" or "user", as ``RegistrarCore.aor_by``."""
    cdef int form = _aor_form(by)
    cdef Msg m
    cdef Limits lim
    cdef Py_ssize_t n
    cdef char aor[MAX_AOR + 1]
    lim.max_size = 65535
    lim.max_headers = 256
    lim.max_line = 8192
    lim.max_uri = 4096
    lim.max_contacts = MAX_REQUEST_CONTACTS
    scan_message(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &m, &lim)
    try:
        if m.status != 0 or not (m.method.length == 8 and
                                 memcmp(PyBytes_AS_STRING(data) + m.method.off, b"REGISTER", 8) == 0):
            return None
        n = _request_aor(PyBytes_AS_STRING(data), &m, aor, form)
        return None if n < 0 else PyBytes_FromStringAndSize(aor, n)
    finally:
        msg_release(&m)
