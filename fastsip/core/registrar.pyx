
# --------------------------------------------------------------------------
# The registrar: RegistrarCore runs a REGISTER through the steps of RFC 3261
# 10.3 (decide.pyx reads and decides, the store applies the plan, the reply
# writer answers) and dispatches every other datagram (serve); with
# ``redirect`` on it is also the location service's redirect server (RFC 3261
# 8.3): other requests to a registered AOR get 302 to its contacts.  Python
# objects appear only for the reply bytes and on the rare paths (refusals,
# digest authentication).  The Python faces are fastsip.registrar and
# fastsip.core.netsip.
# --------------------------------------------------------------------------

SUPPORTED_OPTIONS = ("path", "outbound")
# the request methods counted by name in ``requests`` (others count as "other")
METHODS = frozenset(("REGISTER", "OPTIONS", "INVITE", "ACK", "BYE", "CANCEL", "PRACK", "UPDATE",
                     "SUBSCRIBE", "NOTIFY", "PUBLISH", "REFER", "MESSAGE", "INFO"))
_ALLOW = [("Allow", "REGISTER, OPTIONS")]
# shared mode (fastsip.cluster): what serve_shard returns instead of a reply
STAGED = SV_STAGED   # the REGISTER's write is staged (RegistrarCore.staged); answer when done
WAIT = SV_WAIT       # its AOR has a write under way (waiting_aor); serve it again when done
READ = SV_READ       # its AOR is not in the cache (waiting_aor): read it, then serve it again
_RETRY_LATER = [("Retry-After", "60")]
_OPTIONS_HEADERS = [("Allow", "REGISTER, OPTIONS"), ("Supported", ", ".join(SUPPORTED_OPTIONS)),
                    ("Accept", "application/sdp")]


cdef class RegistrarCore:
    """The sans-I/O registrar engine.  See :class:`fastsip.Registrar`."""

    # (its attributes are declared in registrar.pxd)

    def __init__(self, *, int min_expires=30, int max_expires=300, default_expires=3600,
                 int max_contacts=16, domains=None, addresses=(), authorize=None,
                 server="fastsip", bint track_changes=False, str aor_by="user@host",
                 int64_t max_bindings=0, bint shared=False, bint redirect=False):
        self.aor_form = _aor_form(aor_by)
        self.shared = shared
        self.staged_record_len = -1
        self.configure(min_expires=min_expires, max_expires=max_expires,
                       default_expires=default_expires, max_contacts=max_contacts,
                       max_bindings=max_bindings, redirect=redirect)
        self.store = Store(track_changes=track_changes and not shared, shared=shared)
        self.set_domains(domains)
        self._addresses = frozenset(a.lower().strip("[]").encode() for a in addresses)
        self.authorize = authorize
        self.lim = default_limits()
        self.writer = ReplyWriter(server)
        self.other_requests = {}
        self.auth_failures = {}
        self.redirects = {}
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
        self._budget = (<AuthCore>value).failures if isinstance(value, AuthCore) else None
        self._auth_core = value if isinstance(value, AuthCore) and \
            getattr(type(value), "check", None) is AuthCore.check else None
        # ... and its 401 written in C, unless its challenges are its own
        self._c_challenge = self._auth_core is not None and \
            getattr(type(value), "challenge", None) is AuthCore.challenge and \
            getattr(type(value), "_result", None) is AuthCore._result
        # its user list, for a redirect's 404 to an unknown user
        self._knows = getattr(value, "knows", None) if value is not None else None

    def configure(self, *, min_expires=None, max_expires=None, default_expires=None,
                  max_contacts=None, max_bindings=None, redirect=None):
        """Change the expiry and contact limits (None keeps a value), e.g. on a
        configuration reload; bindings already stored keep their expiry.
        ``max_bindings``: the most bindings the store may hold (0: no limit);
        a REGISTER that would add beyond it gets 503 and changes nothing.
        ``redirect``: answer requests other than REGISTER, ACK and OPTIONS
        (INVITE, MESSAGE, SUBSCRIBE, ...) for an AOR of a served domain with
        302 to its contacts, 480 when it has none, 404 for a domain not served
        or a user the Authorize does not know (RFC 3261 8.3, docs/server.md);
        off (the default): 405, as a registrar alone."""
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
        self.settings.min_expires = lo
        self.settings.max_expires = hi
        self.settings.default_expires = self.default_expires
        self.settings.max_contacts = most
        if max_bindings is not None:
            if max_bindings < 0:
                raise ValueError("max_bindings must be >= 0 (0: no limit)")
            self.settings.max_bindings = max_bindings
        if redirect is not None:
            self.redirect = bool(redirect)

    @property
    def max_bindings(self):
        """The most bindings the store may hold (0: no limit)."""
        return self.settings.max_bindings

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

    # -- answering ---------------------------------------------------------

    cdef Py_ssize_t _refuse(self, const Req* rq, int refusal, object headers=None) except SV_ERROR:
        """The reply for a Refusal (REFUSALS), counted as a parse error where it is one."""
        status, reason, parse_error = REFUSALS[refusal]
        if parse_error:
            self.parse_errors += 1
        return self.writer.reply(rq, status, reason, headers)

    cdef Py_ssize_t _malformed(self, const Req* rq, int rc) except SV_ERROR:
        """The answer to a request whose scan failed (rc): 505 for another SIP
        version, else 400; counted as a parse error."""
        self.parse_errors += 1
        if rc == E_VERSION:
            return self.writer.reply(rq, 505, b"Version Not Supported", None)
        if rc == E_BODY_SHORT:
            return self.writer.reply(rq, 400, b"Content-Length larger than the body", None)
        return self.writer.reply(rq, 400, b"Bad Request (malformed message)", None)

    # -- REGISTER --------------------------------------------------------------

    cpdef object handle(self, bytes data, tuple source, double now, str transport="udp",
                        int64_t conn_id=-1):
        """Process one datagram: the reply bytes, or None when it is not for this
        registrar (not a REGISTER request, or a domain it does not serve)."""
        cdef Msg m
        cdef Req rq
        cdef int rc
        cdef bytes host = _host_bytes(source[0])
        cdef const char* buf = PyBytes_AS_STRING(data)
        self.last_now = now
        rc = scan_message(buf, PyBytes_GET_SIZE(data), &m, &self.lim)
        try:
            if m.status != 0 or m.method.length == 0 or not (
                    m.method.length == 8 and memcmp(buf + m.method.off, b"REGISTER", 8) == 0):
                if rc != OK:
                    self.parse_errors += 1
                return None
            self.register_count += 1
            req_init(&rq, buf, PyBytes_GET_SIZE(data), &m, PyBytes_AS_STRING(host),
                     PyBytes_GET_SIZE(host), source[1], now, _transport(transport), conn_id)
            return self._result(self._register(&rq, rc))
        finally:
            msg_release(&m)

    cdef Py_ssize_t _register(self, Req* rq, int rc) except SV_ERROR:
        """RFC 3261 10.3 for one scanned REGISTER: the reply's length (its bytes
        in the writer), SV_NONE when its domain is not served here, SV_WAIT,
        SV_READ or SV_STAGED in shared mode."""
        cdef RegisterIn* reg = &self.reg
        cdef const char* buf = rq.buf
        cdef bytes path
        cdef const AorView* listing
        cdef uint64_t expected = 0
        cdef object unsupported
        cdef Store st
        cdef int32_t a
        cdef uint64_t h
        if rc != OK:
            return self._malformed(rq, rc)
        # 1 and 5 (first half): the Request-URI, the headers, the To URI.
        rc = read_target(rq, reg)
        if rc:
            return self._refuse(rq, rc)
        if not self._serves(buf + reg.to_uri.host.off, reg.to_uri.host.length):
            return SV_NONE
        # The AOR now, its bucket fetched while the dialog and contacts are read.
        reg.aor_len = canonical_aor(buf, &reg.to_uri, reg.aor, MAX_AOR, self.aor_form)
        st = self.store
        h = st.prefetch(reg.aor, reg.aor_len) if reg.aor_len >= 0 else 0
        if self.domains is not None and \
                not self._serves(buf + reg.ruri.host.off, reg.ruri.host.length) and \
                PyBytes_FromStringAndSize(buf + reg.ruri.host.off, reg.ruri.host.length) \
                .lower().strip(b"[]") not in self._addresses:
            return SV_NONE
        # 2. Require: every option tag must be one we support.
        if rq.m.first[<int>HDR_REQUIRE] >= 0:
            unsupported = _unsupported(buf, rq.m)
            if unsupported is None:
                return self._refuse(rq, RF_BAD_REQUIRE)
            if unsupported:
                return self._refuse(rq, RF_EXTENSION, [("Unsupported", unsupported)])
        rc = read_dialog(rq, reg)
        if rc:
            return self._refuse(rq, rc)
        # 3-4. Authentication, then authorization (the AOR's user and domain).
        if self._authorize_obj is not None and not self._trusted:
            r = self._authenticate(rq)
            if r:
                return r
        # 5-7. The AOR and the contacts, then the decision on its bindings.
        if reg.aor_len < 0:
            return self._refuse(rq, RF_LONG_AOR)
        st.prefetch_record(h)
        rc = read_contacts(rq, reg)
        if rc:
            return self._refuse(rq, rc)
        a = st.find_hashed(reg.aor, reg.aor_len, h)     # the AOR's one lookup: its slot is passed on
        if self.shared and a >= 0 and st.aors[a].busy:
            self.waiting_aor = PyBytes_FromStringAndSize(reg.aor, reg.aor_len)
            return SV_WAIT
        a = st.purge_at(a, rq.now)              # its lapsed bindings go first
        st.view_at(a, rq.now, &self.before)
        rc = decide(buf, reg, &self.settings, &self.before, self.store.n_bindings, rq.now,
                    &self.plan)
        if rc == RF_TOO_BRIEF:
            return self._refuse(rq, rc, [("Min-Expires", str(self.min_expires))])
        if rc == RF_FULL:
            self.full_refusals += 1
            return self._refuse(rq, rc, _RETRY_LATER)
        if rc == RF_TOO_MANY:
            return self.writer.reply(rq, 503, f"Too many contacts for this AOR "
                                     f"(max_contacts={self.max_contacts})", None)
        if rc:
            return self._refuse(rq, rc)
        # 8. Apply the plan, answer with the AOR's bindings.
        if self.shared and not (self.plan.nchanges or self.plan.remove_all) and a < 0:
            # A cache miss, and an answer that would only list the bindings: read
            # them first.  (A change is decided on the empty view and stored only
            # if there is no key: the compare-and-set checks it.)
            self.waiting_aor = PyBytes_FromStringAndSize(reg.aor, reg.aor_len)
            return SV_READ
        listing = &self.before
        if self.shared and self.plan.retransmission and a >= 0 and st.aors[a].unverified:
            # A retransmission of what a copy read from the shared location holds:
            # that write may not have reached a replica (its writer got no WAIT
            # and answered 500).  Write it again, so that its WAIT says it did.
            return self._stage(a, reg.aor, reg.aor_len, st.versions[a], rq.now,
                               self.writer.ok(rq, listing, self.plan.outbound,
                                              rq.m.first[<int>HDR_PATH] >= 0 and
                                              _supports_path(rq)))
        if not self.plan.retransmission and (self.plan.nchanges or self.plan.remove_all):
            if self.shared:
                expected = st.versions[a] if a >= 0 else 0      # before apply drops it
            path = _path(rq)
            plan_common(&self.plan, rq, reg, path)
            a = st.apply_at(a, reg.aor, reg.aor_len, &self.plan, &self.before, rq.now)
            st.view_at(a, rq.now, &self.after)
            listing = &self.after
            if self.shared:
                return self._stage(a, reg.aor, reg.aor_len, expected, rq.now, self.writer.ok(
                    rq, listing, self.plan.outbound,
                    rq.m.first[<int>HDR_PATH] >= 0 and _supports_path(rq)))
        return self.writer.ok(rq, listing, self.plan.outbound,
                              rq.m.first[<int>HDR_PATH] >= 0 and _supports_path(rq))

    cdef Py_ssize_t _stage(self, int32_t a, const char* aor, Py_ssize_t aor_len,
                           uint64_t expected, double now, Py_ssize_t reply) except SV_ERROR:
        """Shared mode: the plan is applied to the cache (whose version of the AOR
        was ``expected``); stage its write (the AOR's new record with the next
        version, see ``staged``) with the reply just written (``reply``: its
        length; 0: no reply), mark the AOR busy until the write is done, and return
        SV_STAGED instead of the reply.  ``a``: the AOR's slot, -1 when the plan
        left it with nothing and the store let it go (it is added back, busy)."""
        cdef Store st = self.store
        if a < 0:
            a = st.find_or_add(aor, aor_len)
        cdef uint64_t version = <uint64_t>(now * 1e6)
        cdef double latest = 0.0
        cdef Py_ssize_t record_len = -1
        if version <= expected:
            version = expected + 1
        if st.aors[a].count:
            # only its length now: the record is written where it goes
            # (staged_record_into), without a bytes object in the compiled path
            record_len = st.record_length(a, &latest)
        st.versions[a] = version
        st.aors[a].busy = 1
        st.aors[a].pinned = 0
        if aor_len > MAX_AOR:
            raise ValueError("AOR too long to stage")
        memcpy(self.staged_aor, aor, aor_len)
        self.staged_aor_len = aor_len
        self.staged_expected = expected
        self.staged_version = version
        self.staged_latest = latest
        self.staged_slot = a
        self.staged_record_len = record_len
        self.staged_reply = reply if reply > 0 else 0
        return SV_STAGED

    cdef const char* staged_reply_bytes(self) noexcept:
        """The staged write's reply (``staged_reply`` bytes), in the writer's buffer:
        valid until the next request is served."""
        return self.writer.out

    cdef void staged_record_into(self, char* out) noexcept:
        """Write the staged write's record (``staged_record_len`` bytes, not -1) at
        ``out``, from the AOR's copy: valid until the next request is served."""
        self.store.record_into(self.staged_slot, self.staged_version, out)

    @property
    def staged(self):
        """Shared mode: the write the last STAGED left, ``(aor, expected, version,
        record, latest, reply)`` (``record`` None: delete the key; ``reply`` None:
        none), to be read before the next request is served."""
        cdef bytes record = None
        if self.staged_record_len >= 0:
            record = PyBytes_FromStringAndSize(NULL, self.staged_record_len)
            self.staged_record_into(PyBytes_AS_STRING(record))
        return (PyBytes_FromStringAndSize(self.staged_aor, self.staged_aor_len),
                self.staged_expected, self.staged_version, record, self.staged_latest,
                PyBytes_FromStringAndSize(self.writer.out, self.staged_reply)
                if self.staged_reply > 0 else None)

    cdef Py_ssize_t _authenticate(self, const Req* rq) except SV_ERROR:
        """Digest authentication and the AOR policy, behind the failure budget:
        0 when they pass, else the length of the refusal written.  Failures
        are counted by reason; wrong passwords and forged nonces spend the
        budget of the source and of the user named in To.  A 401 is written in
        C (``_challenge``) unless the Authorize overrides ``challenge``.

        The AOR's user and domain stay Fields over the datagram (the user's
        %HH escapes resolved into ``ubuf``): the compiled check compares them
        in C, and their str (``field_str``) is made only for what is asked in
        Python (the budget once it is watching, another policy, a parsed
        Authorization, more than one algorithm to offer)."""
        cdef const char* buf = rq.buf
        cdef UriSpans* to_uri = &self.reg.to_uri
        cdef FailureBudget budget = self._budget
        cdef AuthCore core = self._auth_core
        cdef bytes host = None
        cdef int outcome = V_PARSED, code = 0
        cdef Field aor_user, aor_domain
        cdef char ubuf[<int>TO_USER_BUF]
        cdef Py_ssize_t n
        cdef list keep = None
        if to_uri.user.off < 0:
            set_bytes_field(&aor_user, b"", 0)
        elif memchr(buf + to_uri.user.off, b'%', to_uri.user.length) == NULL:
            set_bytes_field(&aor_user, buf + to_uri.user.off, to_uri.user.length)
        else:
            n = unescape_into(buf + to_uri.user.off, to_uri.user.length, ubuf, TO_USER_BUF)
            if n >= 0:
                set_bytes_field(&aor_user, ubuf, n)
            else:                   # too long to resolve on the stack: as str (kept alive)
                keep = [unescape(buf + to_uri.user.off, to_uri.user.length)]
                set_str_field(&aor_user, keep[0], keep)
        set_bytes_field(&aor_domain, buf + to_uri.host.off, to_uri.host.length)
        if budget is not None and budget.watching(rq.now):
            host = PyBytes_FromStringAndSize(rq.src_host, rq.src_host_len)
            if budget.refuses(host, field_str(&aor_user), rq.now):
                self._failed("throttled")
                return self.writer.reply(rq, REFUSALS[RF_THROTTLED][0], REFUSALS[RF_THROTTLED][1],
                                         None)
        realm = result = label = None
        if core is not None:
            realm = core.realm_for(&aor_domain)
            outcome = self._verify(core, rq, realm, &aor_user, &aor_domain)
        if outcome == R_OK:
            return 0
        if outcome == R_REQUIRED and self._c_challenge:
            # a first request: nothing failed, nothing to count
            return self._challenge(core, rq, realm, False, &aor_user)
        if outcome == V_PARSED:
            result = self._authorize_parsed(rq, field_str(&aor_user), field_str(&aor_domain))
            if result is None:
                return 0
            if type(result) is not tuple and not (
                    result.status == 401 and result.reason == "authentication required"):
                label = _FAILURE_LABEL.get(result.reason,
                                           "other" if result.status != 400 else "bad")
        elif outcome != V_MALFORMED:
            code = outcome & 255
            label = _OUTCOME_LABEL[code]        # None for a first request: nothing failed
        if outcome == V_MALFORMED or type(result) is tuple:
            self._failed("bad")
            return self.writer.reply(rq, REFUSALS[RF_BAD_AUTHORIZATION][0],
                                     REFUSALS[RF_BAD_AUTHORIZATION][1], None)
        if label is not None:
            self._failed(label)
            if budget is not None and label in _SPENDS_BUDGET:
                if host is None:
                    host = PyBytes_FromStringAndSize(rq.src_host, rq.src_host_len)
                budget.failed(host, field_str(&aor_user), rq.now)
        if result is None:
            if OUTCOME_STATUS[code] == 401 and self._c_challenge:
                return self._challenge(core, rq, realm, OUTCOME_STALE[code], &aor_user)
            result = core._result(outcome, realm, rq.now, None, field_str(&aor_user))
        status, reason, headers = _refusal(result)
        return self.writer.reply(rq, status, reason, headers)

    cdef Py_ssize_t _challenge(self, AuthCore core, const Req* rq, object realm, bint stale,
                               const Field* aor_user) except SV_ERROR:
        """The 401 of ``core.challenge(realm, now, stale, aor_user)``, written
        without the list of values: a nonce made into a buffer and the
        remembered text around it."""
        cdef char nonce[<int>NONCE_LEN]
        core.nonce_into(realm, rq.now, nonce)
        parts = core.challenge_parts(realm, core.offered(realm, aor_user))
        return self.writer.challenge(rq, <list>(<tuple>parts)[3 if stale else 2], nonce,
                                     NONCE_LEN)

    cdef void _failed(self, str label):
        self.auth_failures[label] = self.auth_failures.get(label, 0) + 1

    cdef int _verify(self, AuthCore core, const Req* rq, object realm, const Field* aor_user,
                     const Field* aor_domain) except -1:
        """The compiled check on spans of the Authorization values
        (``scan_digest``): an Outcome of ``AuthCore.verify`` (R_OK: passed),
        V_MALFORMED (a value that does not scan: 400), or V_PARSED: a value
        needs more than spans (bytes above 0x7F, quoted-pairs, folds in a
        quoted-string) and the request goes through ``parse_credentials`` and
        ``check``, which end in the same check."""
        cdef const char* buf = rq.buf
        cdef Msg* m = rq.m
        cdef Cred c, chosen
        cdef Field rf, method, ruri
        cdef int i, rc, alg = 0
        cdef Header* h
        realm_bytes = core.realm_field(realm, &rf)     # keeps rf's bytes alive
        if m.first[<int>HDR_AUTHORIZATION] >= 0:
            for i in range(m.first[<int>HDR_AUTHORIZATION], m.nheaders):
                h = &m.hdrs[i]
                if h.htype != HDR_AUTHORIZATION:
                    continue
                rc = scan_digest(buf + h.val_off, h.val_len, &c)
                if rc > 0:
                    return V_PARSED
                if rc < 0:
                    return V_MALFORMED
                if not alg:
                    alg = core.selects(&c, &rf)
                    if alg:
                        chosen = c
        set_bytes_field(&method, b"REGISTER", 8)
        # compared only, never hashed: the raw bytes (decoded on a mismatch)
        set_bytes_field(&ruri, buf + m.uri.off, m.uri.length)
        return core.verify(&chosen if alg else NULL, alg, &method, &ruri, realm, &rf, aor_user,
                           aor_domain, rq.now)

    cdef object _authorize_parsed(self, const Req* rq, aor_user, aor_domain):
        """The same through ``parse_credentials`` and ``authorize.check``."""
        cdef int i
        cdef Header* h
        cdef Msg* m = rq.m
        creds = []
        if m.first[<int>HDR_AUTHORIZATION] >= 0:
            for i in range(m.first[<int>HDR_AUTHORIZATION], m.nheaders):
                h = &m.hdrs[i]
                if h.htype == HDR_AUTHORIZATION:
                    try:
                        creds.append(parse_credentials(decode(rq.buf, h.val_off, h.val_len)))
                    except _errors.BadCredentials:
                        return REFUSALS[RF_BAD_AUTHORIZATION][:2] + (None,)
        request_uri = decode(rq.buf, m.uri.off, m.uri.length)
        result = self._authorize_obj.check("REGISTER", request_uri, creds, aor_user, aor_domain,
                                           rq.now)
        if result.ok:
            return None
        return result

    # -- every datagram --------------------------------------------------------

    cpdef object serve(self, bytes data, tuple source, double now, str transport="udp",
                       int64_t conn_id=-1):
        """The edge dispatcher: what a registrar server answers to any datagram.

        REGISTER goes to :meth:`handle`; a REGISTER for a domain not served gets
        404; OPTIONS gets 200; other requests 405 with Allow, or with
        ``redirect`` on what a redirect server answers (302, 480, 404, 481:
        see ``_redirect``); responses and ACK get nothing; malformed input gets
        400 when a reply can be addressed (a request line was read), else
        nothing.  Never raises for bad input.
        """
        cdef bytes host = _host_bytes(source[0])
        return self._result(self.serve_c(
            PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), PyBytes_AS_STRING(host),
            PyBytes_GET_SIZE(host), source[1], now, _transport(transport), conn_id, 0, 1, NULL))

    def serve_shard(self, bytes data not None, bytes src_host not None, int src_port, double now,
                    str transport, int64_t conn_id, int shard, int nshards):
        """:meth:`serve` for one shard of ``nshards``: a REGISTER whose AOR (of
        its To URI) ``shard_of`` gives to another shard is not served but
        answered with that shard's number (an int); with ``redirect`` on, so is
        a request to redirect whose Request-URI's AOR is another shard's (its To
        may name someone else).  Otherwise the reply bytes or None, as
        :meth:`serve`; a request handed to its owner is served there with
        ``shard, nshards = 0, 1``, never handed on.  The source host comes as
        ASCII bytes.  One scan of the message decides both, which is why the
        server's receive loop calls this rather than ``aor_key`` and then
        ``serve``.  (The server's compiled loop calls the same code as
        ``serve_c``, without the bytes.)"""
        return self._result(self.serve_c(
            PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), PyBytes_AS_STRING(src_host),
            PyBytes_GET_SIZE(src_host), src_port, now, _transport(transport), conn_id, shard,
            nshards, NULL))

    cdef object _result(self, Py_ssize_t r):
        """What ``serve_shard`` returns for ``serve_c``'s ``r``: the reply's bytes,
        None, the owner shard, or STAGED, WAIT or READ (shared mode)."""
        if r > 0:
            return PyBytes_FromStringAndSize(self.writer.out, r)
        if r == SV_NONE:
            return None
        if r <= SV_SHARD:
            return SV_SHARD - r
        return r

    cdef Py_ssize_t serve_c(self, const char* buf, Py_ssize_t n, const char* host,
                            Py_ssize_t host_len, int port, double now, uint8_t transport,
                            int64_t conn_id, int shard, int nshards,
                            const char** reply) except SV_ERROR:
        """``serve_shard`` in C, for the server's loop: the request is ``n``
        bytes at ``buf``, its source ``host`` (ASCII, ``host_len`` bytes) and
        ``port``; ``transport`` a Transport code.  Returns the reply's length
        (> 0) and points ``reply`` (when not NULL) at its bytes, which stay
        valid until the next call; SV_NONE for no reply; SV_SHARD - k when the
        request is shard k's; SV_STAGED, SV_WAIT or SV_READ in shared mode.
        ``buf`` and ``host`` are only read during the call.  No Python object
        is made for a REGISTER that is answered 200 (nor for most refusals)."""
        cdef Py_ssize_t r = self._serve(buf, n, host, host_len, port, now, transport, conn_id,
                                        shard, nshards)
        if r > 0 and reply != NULL:
            reply[0] = self.writer.out
        return r

    cdef Py_ssize_t _serve(self, const char* buf, Py_ssize_t size, const char* src_host,
                           Py_ssize_t host_len, int src_port, double now, uint8_t transport,
                           int64_t conn_id, int shard, int nshards) except SV_ERROR:
        cdef Msg m
        cdef Req rq
        cdef int rc, owner
        cdef Py_ssize_t reply
        cdef object method, unsupported
        cdef UriSpans ruri
        cdef Py_ssize_t err = 0
        cdef char aor[MAX_AOR + 1]
        cdef Py_ssize_t aor_len
        self.last_now = now
        rc = scan_message(buf, size, &m, &self.lim)
        try:
            if m.status != 0:
                if rc != OK:
                    self.parse_errors += 1
                return SV_NONE
            if m.method.length == 0:
                self.parse_errors += 1
                return SV_NONE
            req_init(&rq, buf, size, &m, src_host, host_len, src_port, now, transport, conn_id)
            if m.method.length == 8 and memcmp(buf + m.method.off, b"REGISTER", 8) == 0:
                if nshards > 1:
                    aor_len = _request_aor(buf, &m, aor, self.aor_form)
                    if aor_len >= 0:
                        owner = aor_hash(aor, aor_len) % <uint64_t>nshards
                        if owner != shard:
                            return SV_SHARD - owner
                if not self._trusted:       # (served again: counted the first time)
                    self.register_count += 1
                reply = self._register(&rq, rc)
                if reply == SV_NONE:
                    reply = self._refuse(&rq, RF_NOT_FOUND)
                return reply
            method = PyUnicode_DecodeASCII(buf + m.method.off, m.method.length, NULL)
            if method not in METHODS:
                method = "other"        # one counter, however many names a sender invents
            if self.redirect and nshards > 1 and rc == OK and method != "ACK" and \
                    method != "OPTIONS" and method != "CANCEL":
                # a request to redirect belongs to the shard of its Request-URI's AOR
                owner = _target_shard(buf, &m, self.aor_form, nshards)
                if owner >= 0 and owner != shard:
                    return SV_SHARD - owner
            if not self._trusted:
                self.other_requests[method] = self.other_requests.get(method, 0) + 1
            if method == "ACK":
                return SV_NONE
            # RFC 3261 8.2: a request this server does not register still gets
            # the checks every UAS makes, in this order.
            if rc != OK:
                return self._malformed(&rq, rc)
            rc = missing_header(&m)
            if rc:
                return self._refuse(&rq, rc)
            if scan_sip_uri(buf, m.uri.off, m.uri.off + m.uri.length, &ruri, &err) == -2:
                return self._refuse(&rq, RF_URI_SCHEME)
            if method != "OPTIONS":
                if self.redirect:
                    return self._redirect(&rq, method)
                return self._refuse(&rq, RF_METHOD, _ALLOW)
            unsupported = _unsupported(buf, &m)
            if unsupported is None:
                return self._refuse(&rq, RF_BAD_REQUIRE)
            if unsupported:
                return self._refuse(&rq, RF_EXTENSION, [("Unsupported", unsupported)])
            return self.writer.reply(&rq, 200, b"OK", _OPTIONS_HEADERS)
        finally:
            msg_release(&m)

    def serve_again(self, bytes data, src_host, int src_port, double now, str transport="udp",
                    int64_t conn_id=-1):
        """Shared mode: serve a request again that waited (WAIT), whose AOR was
        read (READ) or whose write met a newer version (the cache now holds
        it): as ``serve_shard`` for one shard, without authenticating or
        counting it again (it passed once; a second check would take its nonce
        count for a replay)."""
        self._trusted = True
        try:
            return self.serve_shard(data, src_host, src_port, now, transport, conn_id, 0, 1)
        finally:
            self._trusted = False

    def stage_closed(self, bytes aor, int64_t conn_id, bytes host, int port, double now):
        """Shared mode: the stream connection ``conn_id`` (from ``host``:``port``)
        closed; end its flow bindings in the copy of ``aor`` and stage that write
        (STAGED, the write in ``staged`` with no reply), or WAIT / READ as
        ``serve_shard`` (``waiting_aor``), or None when the copy holds none of them.
        The connection's peer must match too: connection ids are this node's own,
        and another node's flow in the same record may carry the same number."""
        cdef Store st = self.store
        cdef int32_t a = st.find(aor, len(aor))
        cdef uint64_t expected
        self.waiting_aor = aor
        if a < 0:
            return READ
        if st.aors[a].busy:
            return WAIT
        expected = st.versions[a]
        if not st.end_flows(a, conn_id, host, port):
            return None
        return self._result(self._stage(st.find(aor, len(aor)), aor, len(aor), expected, now, 0))

    # -- the redirect server (RFC 3261 8.3) ---------------------------------------

    cdef Py_ssize_t _redirect(self, Req* rq, str method) except SV_ERROR:
        """A request this server redirects (``redirect`` on: any method but
        REGISTER, ACK and OPTIONS), past the checks of RFC 3261 8.2 that
        ``_serve`` made (400, 505, 416).  In order:

        - CANCEL: 481.  A redirect server keeps no transaction: it answers an
          INVITE at once with a final response and never a provisional one, so
          a CANCEL (which RFC 3261 9.1 lets a UAC send only after a provisional
          response) matches nothing here (9.2: 481).  It is never redirected;
        - a Request-URI that does not parse: 400 (8.2.2.1);
        - its host not a served domain (with ``aor_by="user"``, nor one of
          ``addresses``): 404 (8.2.2.1), as is an AOR too long to be registered
          and, when the Authorize has a user list (``knows``), a user it does
          not know;
        - Require: 420 with Unsupported (8.2.2.3);
        - a To tag (a request within a dialog: none was made here): 481 (12.2.2);
        - the AOR's bindings (``_location``): 302 to them (``ReplyWriter.moved``,
          within MAX_DATAGRAM bytes), 480 when it has none, 404 when the only
          contact is the Request-URI itself (8.3).

        Every outcome is counted in ``redirects``."""
        cdef const char* buf = rq.buf
        cdef Msg* m = rq.m
        cdef UriSpans ruri
        cdef NameAddr to
        cdef Header* h
        cdef Py_ssize_t err = 0, n
        cdef char aor[MAX_AOR + 1]
        cdef Py_ssize_t reply
        cdef int found
        if method == "CANCEL":
            self._redirected("cancel")
            return self.writer.reply(rq, 481, b"Call/Transaction Does Not Exist", None)
        if scan_sip_uri(buf, m.uri.off, m.uri.off + m.uri.length, &ruri, &err) != 0:
            return self._refuse(rq, RF_BAD_RURI)
        if not self._serves(buf + ruri.host.off, ruri.host.length) and not (
                self.aor_form == AOR_USER and PyBytes_FromStringAndSize(
                    buf + ruri.host.off, ruri.host.length).lower().strip(b"[]") in self._addresses):
            self._redirected("not_found")
            return self._refuse(rq, RF_NOT_FOUND)
        n = canonical_aor(buf, &ruri, aor, MAX_AOR, self.aor_form)
        if n < 0:
            self._redirected("not_found")
            return self.writer.reply(rq, 404, b"Not Found", None)
        if self._knows is not None and not self._knows(
                "" if ruri.user.off < 0 else unescape(buf + ruri.user.off, ruri.user.length),
                decode(buf, ruri.host.off, ruri.host.length)):
            self._redirected("unknown_user")
            return self.writer.reply(rq, 404, b"Not Found", None)
        unsupported = _unsupported(buf, m)
        if unsupported is None:
            return self._refuse(rq, RF_BAD_REQUIRE)
        if unsupported:
            return self._refuse(rq, RF_EXTENSION, [("Unsupported", unsupported)])
        h = &m.hdrs[m.first[<int>HDR_TO]]
        if parse_name_addr(buf, h.val_off, h.val_off + h.val_len, &to, False, &err) < 0:
            return self._refuse(rq, RF_BAD_TO)
        if to.p_tag.off >= 0:
            self._redirected("in_dialog")
            return self.writer.reply(rq, 481, b"Call/Transaction Does Not Exist", None)
        found = self._location(aor, n, rq.now, &self.located)
        if found == -2:
            self.waiting_aor = PyBytes_FromStringAndSize(aor, n)
            return SV_READ
        if found == 0:
            self._redirected("unavailable")
            return self.writer.reply(rq, 480, b"Temporarily Unavailable", None)
        reply = self.writer.moved(rq, &self.located,
                                  uri_key_hash(buf, m.uri.off, m.uri.off + m.uri.length),
                                  MAX_DATAGRAM)
        if reply == 0:
            self._redirected("loop")
            return self.writer.reply(rq, 404, b"Not Found", None)
        if self.writer.omitted:
            self.redirects_truncated += 1
        self._redirected("moved")
        return reply

    cdef int _location(self, const char* aor, Py_ssize_t n, double now, AorView* out) except -1:
        """The bindings of the canonical AOR ``aor`` (``n`` bytes) valid at
        ``now``, into ``out`` in registration order; returns how many.  The one
        place a redirect looks an AOR up: today this registrar's store (its
        lapsed bindings are dropped first, as a REGISTER does).  Shared mode:
        -2 when the cache has no copy of the AOR (it must be read first)."""
        cdef int32_t a = self.store.find(aor, n)
        if self.shared and a < 0:
            return -2
        self.store.view_at(self.store.purge_at(a, now), now, out)
        return out.n

    cdef void _redirected(self, str outcome):
        self.redirects[outcome] = self.redirects.get(outcome, 0) + 1

    # -- queries (lookups never change the store) -------------------------------

    def lookup(self, aor, now=None):
        """The bindings of ``aor`` valid at ``now`` (default: the latest time seen)."""
        return self.store.lookup(self.aor_of(aor), self.last_now if now is None else now)

    def connection_closed(self, int64_t conn_id, double now):
        """The stream connection ``conn_id`` closed (or its keep-alives stopped):
        remove its flow bindings (RFC 5626 flows and ``.invalid`` contacts that
        came over it without Path, see :meth:`Store.connection_closed`) from
        this registrar's store, whatever their AOR.  Returns how many were
        removed; the AORs changed are in ``store.changes()``.  A server whose
        workers hold shards calls it in every worker: a request handed over
        from another worker's connection binds in the owner's store."""
        return self.store.close_connection(conn_id, now)

    def stats(self):
        """Counters for metrics: bindings, AORs, expired, flow bindings (held, and
        removed with their connection), parse errors, replies by code, requests
        by method, redirect outcomes (moved, unavailable, not_found,
        unknown_user, loop, in_dialog, cancel) and 302s that left contacts out."""
        return {"bindings": self.store.n_bindings, "aors": self.store.n_live_aors,
                "expired": self.store.n_expired, "parse_errors": self.parse_errors,
                "flow_bindings": self.store.n_flows,
                "flow_bindings_removed": self.store.n_flow_removed,
                "max_bindings_refused": self.full_refusals,
                "auth_failures": dict(self.auth_failures),
                "redirects": dict(self.redirects),
                "redirects_truncated": self.redirects_truncated,
                "replies": {code: self.writer.counts[code] for code in range(100, 700)
                            if self.writer.counts[code]},
                "requests": dict(self.other_requests, **(
                    {"REGISTER": self.register_count} if self.register_count else {}))}


# failed digest attempts by reason (AuthResult.reason -> label); those in
# _SPENDS_BUDGET are what password guessing and nonce forging produce
_FAILURE_LABEL = {"wrong credentials": "wrong", "unknown nonce": "unknown_nonce",
                  "nonce expired": "stale", "nonce count replayed": "replayed",
                  "user may not register this AOR": "forbidden"}
_SPENDS_BUDGET = frozenset(("wrong", "unknown_nonce"))
# the same label by Outcome of AuthCore.verify (None: R_OK, and R_REQUIRED, a
# first request, where nothing failed)
_OUTCOME_LABEL = tuple(
    None if code in (R_OK, R_REQUIRED) else
    _FAILURE_LABEL.get(reason, "other" if status != 400 else "bad")
    for code, (status, reason, stale) in enumerate(_OUTCOMES))

# what _verify returns besides an Outcome
cdef enum:
    TO_USER_BUF = 256       # a To user with %HH escapes resolved on the stack up to this
    V_PARSED = -2           # check the parsed credentials instead
    V_MALFORMED = -3        # an Authorization value that does not scan (400)


cdef tuple _refusal(result):
    """(status, reason, headers) for a failed ``AuthResult``."""
    reason = {401: "Unauthorized", 403: "Forbidden"}.get(result.status, result.reason)
    return result.status, reason, result.headers


cdef uint8_t _transport(str name) except 255:
    return 0 if name == "udp" else transport_code(name)


cdef bytes _path(const Req* rq):
    """The request's Path values, one per line (as the store keeps them)."""
    cdef int i
    cdef Header* h
    cdef Msg* m = rq.m
    if m.first[<int>HDR_PATH] < 0:
        return b""
    entries = []
    for i in range(m.first[<int>HDR_PATH], m.nheaders):
        h = &m.hdrs[i]
        if h.htype == HDR_PATH:
            entries.append(rq.buf[h.val_off:h.val_off + h.val_len].replace(b"\r\n", b" ")
                           .replace(b"\n", b" "))
    return b"\n".join(entries)[:MAX_PATH]


cdef void plan_common(Plan* p, const Req* rq, const RegisterIn* reg, bytes path) noexcept:
    """What every binding a plan writes shares: the request's Call-ID, CSeq,
    source, transport, connection, Path and User-Agent (pointers into the
    request and ``path``, which must outlive the plan's application)."""
    cdef int i, j = rq.m.first[<int>HDR_USER_AGENT]
    cdef BindingIn* b
    cdef Header* h
    for i in range(p.nchanges):
        b = &p.changes[i].b
        b.call_id = rq.buf + reg.call_id.off
        b.call_id_len = reg.call_id.length
        b.cseq = <uint32_t>reg.cseq
        b.conn_id = rq.conn_id
        b.transport = rq.transport
        b.src_port = <uint16_t>rq.src_port
        b.src_host = rq.src_host
        b.src_host_len = rq.src_host_len
        b.path = PyBytes_AS_STRING(path)
        b.path_len = PyBytes_GET_SIZE(path)
        if j >= 0:
            h = &rq.m.hdrs[j]
            b.ua = rq.buf + h.val_off
            b.ua_len = h.val_len if h.val_len <= MAX_USER_AGENT else MAX_USER_AGENT
        else:
            b.ua = NULL
            b.ua_len = 0


cdef bint _supports_path(const Req* rq) noexcept:
    """Does a Supported header list the option tag ``path``?"""
    cdef TokenIter it
    cdef Span tok
    it.htype = HDR_SUPPORTED
    it.i = -1
    while next_header_token(rq.buf, rq.m, &it, &tok) > 0:
        if tok.length == 4 and ieq(rq.buf + tok.off, 4, b"path", 4):
            return True
    return False


cdef object _unsupported(const char* buf, Msg* m):
    """The Require option tags we do not support, comma-separated ("" if none);
    None when a Require header is not a token list."""
    cdef TokenIter it
    cdef Span tok
    cdef list out = []
    cdef int rc
    it.htype = HDR_REQUIRE
    it.i = -1
    while True:
        rc = next_header_token(buf, m, &it, &tok)
        if rc <= 0:
            return None if rc < 0 else ", ".join(out)
        tag = buf[tok.off:tok.off + tok.length].decode("utf-8", "replace")
        if tag.lower() not in SUPPORTED_OPTIONS:
            out.append(tag)


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


cdef int _target_shard(const char* buf, Msg* m, int form, int nshards) noexcept:
    """The shard of a request's Request-URI's canonical AOR, or -1 when the
    request lacks a header every request needs or its Request-URI is no SIP
    URI with an AOR (then the receiving shard answers it)."""
    cdef UriSpans u
    cdef Py_ssize_t err = 0, n
    cdef char aor[MAX_AOR + 1]
    if missing_header(m) != RF_NONE or \
            scan_sip_uri(buf, m.uri.off, m.uri.off + m.uri.length, &u, &err) != 0:
        return -1
    n = canonical_aor(buf, &u, aor, MAX_AOR, form)
    if n < 0:
        return -1
    return <int>(aor_hash(aor, n) % <uint64_t>nshards)


def aor_key(bytes data, str by="user@host"):
    """The canonical AOR (bytes) of a REGISTER datagram, or None when ``data`` is
    not a REGISTER request with a SIP To URI.  Workers shard on it.  ``by``:
    "user@host" or "user", as ``RegistrarCore.aor_by``."""
    cdef int form = _aor_form(by)
    cdef Msg m
    cdef Py_ssize_t n
    cdef char aor[MAX_AOR + 1]
    scan_message(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &m, &_lim)
    try:
        if m.status != 0 or not (m.method.length == 8 and
                                 memcmp(PyBytes_AS_STRING(data) + m.method.off, b"REGISTER", 8) == 0):
            return None
        n = _request_aor(PyBytes_AS_STRING(data), &m, aor, form)
        return None if n < 0 else PyBytes_FromStringAndSize(aor, n)
    finally:
        msg_release(&m)
