# The digest check behind ``fastsip.auth.Authorize`` (RFC 3261 22, RFC 7616).
#
# ``AuthCore`` is the base class of ``Authorize``: it holds the settings the
# check reads, the nonce signing key and the nonce-count table, and runs the
# checks of docs/auth.md ("Order of checks") on ``Field`` spans.  There is one
# check: ``Authorize.check`` fills the spans from parsed ``Credentials`` (str
# values), the registrar fills them straight from the Authorization header
# bytes (``scan_digest``), and both call ``AuthCore.verify``.  The HA1s of a
# users file are in a C table (``Ha1Table``) and the challenges' text is
# remembered here, so a 401 and a check need no Python call on the server's
# path.  What may vary per deployment stays in Python and is called back:
# ``Authorize._ha1`` (users in other forms, and an unknown user),
# ``algorithms_for`` (with more than one algorithm), the ``policy`` (unless it
# is ``own_aor_only``), and an overridden ``challenge``.
#
# Hashing calls OpenSSL's libcrypto in C (digest.pxd).  Text is hashed as
# ``fastsip.auth._bytes`` does: UTF-8 with U+DC80..U+DCFF as the original bytes
# (surrogateescape), or with surrogates passed when some part of the text has a
# surrogate that is no escaped byte.
#
cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)


# Supported algorithms, in the order of the codes below (code = index + 1).
ALGORITHMS = ("SHA-256", "SHA-256-sess", "MD5", "MD5-sess")
cdef enum:
    ALG_SHA256 = 1
    ALG_SHA256_SESS = 2
    ALG_MD5 = 3
    ALG_MD5_SESS = 4
cdef const char* ALG_LOWER[5]
ALG_LOWER[:] = [b"", b"sha-256", b"sha-256-sess", b"md5", b"md5-sess"]
cdef Py_ssize_t ALG_LEN[5]
ALG_LEN[:] = [0, 7, 12, 3, 8]
_BASE_NAME = (None, "SHA-256", "SHA-256", "MD5", "MD5")

cdef inline bint is_sess(int alg) noexcept nogil:
    return alg == ALG_SHA256_SESS or alg == ALG_MD5_SESS

cdef inline bint is_sha256(int alg) noexcept nogil:
    return alg == ALG_SHA256 or alg == ALG_SHA256_SESS

cdef inline Py_ssize_t hex_len(int alg) noexcept nogil:
    return 64 if is_sha256(alg) else 32


# Outcomes of verify: the low byte is the step that failed (docs/auth.md),
# the bits above carry what the reason names (missing parameters, algorithm).
cdef enum Outcome:
    R_OK = 0
    R_REQUIRED = 1          # 401: no usable credentials
    R_INCOMPLETE = 2        # 400, << 8: bit mask of the missing parameters
    R_BAD_QOP = 3           # 400
    R_NO_NC = 4             # 400
    R_BAD_NC = 5            # 400
    R_SESS_NO_QOP = 6       # 400, << 8: the algorithm
    R_URI = 7               # 400
    R_UNKNOWN_NONCE = 8     # 401
    R_WRONG = 9             # 401
    R_EXPIRED = 10          # 401 stale
    R_REPLAYED = 11         # 401 stale
    R_FORBIDDEN = 12        # 403

_REQUIRED = ("username", "nonce", "uri", "response")
_OUTCOMES = (
    (0, "authenticated", False),
    (401, "authentication required", False),
    (400, "credentials lack {}", False),
    (400, "unsupported qop in credentials", False),
    (400, "qop=auth credentials lack nc or cnonce", False),
    (400, "nc is not 8 hex digits", False),
    (400, "{} credentials lack qop=auth", False),
    (400, "digest uri does not match the Request-URI", False),
    (401, "unknown nonce", False),
    (401, "wrong credentials", False),
    (401, "nonce expired", True),
    (401, "nonce count replayed", True),
    (403, "user may not register this AOR", False),
)
# the status and stale flag of each outcome, for C callers
cdef int OUTCOME_STATUS[16]
cdef bint OUTCOME_STALE[16]
for _i, (_status, _reason, _stale) in enumerate(_OUTCOMES):
    OUTCOME_STATUS[_i] = _status
    OUTCOME_STALE[_i] = _stale


def _outcome(int code):
    """``(status, reason, stale)`` of a ``verify`` outcome."""
    status, reason, stale = _OUTCOMES[code & 255]
    if code & 255 == R_INCOMPLETE:
        reason = reason.format(", ".join(n for i, n in enumerate(_REQUIRED) if code >> 8 >> i & 1))
    elif code & 255 == R_SESS_NO_QOP:
        reason = reason.format(ALGORITHMS[(code >> 8) - 1])
    return status, reason, stale


# --------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------

cdef const char* FIELD_NAMES[9]
FIELD_NAMES[:] = [b"username", b"realm", b"nonce", b"uri", b"response", b"algorithm", b"qop",
                  b"nc", b"cnonce"]
_FIELD_NAMES = ("username", "realm", "nonce", "uri", "response", "algorithm", "qop", "nc",
                "cnonce")

cdef unsigned char B64URL[256]     # value + 1 of a base64url digit, 0 for other bytes
memset(B64URL, 0, 256)
for _i, _c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
    B64URL[ord(_c)] = _i + 1


cdef inline void clear_field(Field* f) noexcept nogil:
    f.p = NULL
    f.n = -1
    f.h = NULL
    f.hn = -1
    f.s = NULL


cdef void set_bytes_field(Field* f, const char* p, Py_ssize_t n) noexcept nogil:
    """A value given as bytes that decode as themselves (ASCII)."""
    f.p = p
    f.n = n
    f.h = p
    f.hn = n
    f.s = NULL


cdef int set_str_field(Field* f, object s, list keep) except -1:
    """A value given as str (None: absent); encodings other than the str's own
    ASCII data are kept alive in ``keep``."""
    if s is None:
        clear_field(f)
        return 0
    if not isinstance(s, str):
        raise TypeError(f"credential values must be str, not {type(s).__name__}")
    f.s = <void*>s
    if type(s) is str and PyUnicode_IS_ASCII(s):
        f.p = f.h = <const char*>PyUnicode_DATA(s)
        f.n = f.hn = PyUnicode_GET_LENGTH(s)
        return 0
    passed = s.encode("utf-8", "surrogatepass")
    keep.append(passed)
    f.p = PyBytes_AS_STRING(passed)
    f.n = PyBytes_GET_SIZE(passed)
    try:
        escaped = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:      # a surrogate that is no escaped byte
        f.h = NULL
        f.hn = -1
    else:
        keep.append(escaped)
        f.h = PyBytes_AS_STRING(escaped)
        f.hn = PyBytes_GET_SIZE(escaped)
    return 0


cdef int set_any_field(Field* f, object o, list keep) except -1:
    """``set_str_field`` for a str; any other object (a caller of ``check`` may
    pass one for a custom policy) is only carried along: ``field_str`` gives it
    back and comparisons in C leave it to Python."""
    if type(o) is str or isinstance(o, str):
        return set_str_field(f, o, keep)
    clear_field(f)
    if o is not None:
        f.s = <void*>o
    return 0


cdef object field_str(const Field* f):
    """The value as str: the one it came from, or the bytes decoded as the
    registrar has always decoded header bytes (UTF-8, surrogateescape)."""
    if f.s != NULL:
        return <object>f.s
    if f.n < 0:
        return None
    return PyUnicode_DecodeUTF8(f.p, f.n, "surrogateescape")


cdef bint field_ascii(const Field* f) noexcept nogil:
    """A present value of ASCII bytes only.  Two such values are equal as str
    exactly when their bytes are (whether they came from a str or from the
    wire), so they can be compared in C; anything else is compared in Python."""
    cdef Py_ssize_t i
    if f.n < 0 or f.p == NULL:
        return False
    for i in range(f.n):
        if <unsigned char>f.p[i] >= 0x80:
            return False
    return True


cdef inline bint same(const Field* a, const Field* b) noexcept nogil:
    return a.n == b.n and memcmp(a.p, b.p, a.n) == 0


cdef bint field_ieq(const Field* f, const char* lower, Py_ssize_t n) noexcept nogil:
    """``value.lower() == lower`` for an ASCII ``lower`` (only U+0130 and
    U+212A lower-case into ASCII, to text no such name matches)."""
    cdef Py_ssize_t i
    if f.n != n:
        return False
    for i in range(n):
        if LOWER[<unsigned char>f.p[i]] != <unsigned char>lower[i]:
            return False
    return True


cdef int alg_code(const Field* f) noexcept nogil:
    """The supported algorithm a credentials ``algorithm`` names (absent: MD5), or 0."""
    cdef int a
    if f.n < 0:
        return ALG_MD5
    for a in range(1, 5):
        if field_ieq(f, ALG_LOWER[a], ALG_LEN[a]):
            return a
    return 0


def _canonical_algorithm(name):
    """The supported algorithm ``name`` stands for (None means MD5), or None."""
    cdef Field f
    cdef list keep = []
    set_str_field(&f, name, keep)
    a = alg_code(&f)
    return ALGORITHMS[a - 1] if a else None


cdef int field_id(const char* p, Py_ssize_t n) noexcept nogil:
    cdef int i
    cdef Py_ssize_t k
    cdef const char* name
    for i in range(<int>F_COUNT):
        name = FIELD_NAMES[i]
        k = 0
        while k < n and name[k] and LOWER[<unsigned char>p[k]] == <unsigned char>name[k]:
            k += 1
        if k == n and name[k] == 0:
            return i
    return -1


cdef bint names_ieq(const char* a, const char* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if LOWER[<unsigned char>a[i]] != LOWER[<unsigned char>b[i]]:
            return False
    return True


cdef enum:
    MAX_OTHER_PARAMS = 16


cdef int scan_digest(const char* b, Py_ssize_t n, Cred* c) noexcept nogil:
    """One Authorization value into ``c``, with the grammar of
    ``parse_credentials`` (the same scan: credentials.pyx, ``auth_*``).

    0: scanned; -1: malformed (``parse_credentials`` raises, 400); 1: the value
    needs ``parse_credentials`` itself (a byte above 0x7F, a quoted-pair or fold
    inside a quoted-string, or many parameters of other names)."""
    cdef AuthScan st
    cdef Span name, value
    cdef bint escaped
    cdef int r, fid, i, nother = 0
    cdef uint32_t seen = 0
    cdef Span other[<int>MAX_OTHER_PARAMS]
    cdef Py_ssize_t k = 0
    cdef uint64_t w, high = 0
    while k + 8 <= n:
        memcpy(&w, b + k, 8)
        high |= w
        k += 8
    while k < n:
        high |= <unsigned char>b[k]
        k += 1
    if high & HIGH_BITS:
        return 1
    clear_field(&c.scheme)
    for i in range(<int>F_COUNT):
        clear_field(&c.f[i])
    if auth_scan_start(b, n, &st) < 0:
        return -1
    set_bytes_field(&c.scheme, b + st.scheme.off, st.scheme.length)
    if st.token68.off >= 0:
        return 0
    while True:
        r = auth_next_name(b, n, &st, &name)
        if r == 0:
            return 0
        if r < 0:
            return -1
        fid = field_id(b + name.off, name.length)
        if fid >= 0:
            if seen >> fid & 1:
                return -1           # duplicate parameter
            seen |= 1u << fid
        else:
            for i in range(nother):
                if other[i].length == name.length and names_ieq(b + other[i].off, b + name.off,
                                                                name.length):
                    return -1
            if nother == MAX_OTHER_PARAMS:
                return 1
            other[nother] = name
            nother += 1
        if auth_param_value(b, n, &st, &value, &escaped) < 0:
            return -1
        if escaped:
            return 1
        if fid >= 0:
            set_bytes_field(&c.f[fid], b + value.off, value.length)


# --------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------

cdef inline void to_hex(const unsigned char* d, Py_ssize_t n, char* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[2 * i] = HEXDIGITS[d[i] >> 4]
        out[2 * i + 1] = HEXDIGITS[d[i] & 15]


cdef void digest_into(int alg, const void* p, Py_ssize_t n, unsigned char* out) noexcept nogil:
    """The MD5 or SHA-256 (by ``alg``) of ``n`` bytes at ``p`` into ``out``."""
    cdef MD5_CTX m
    cdef SHA256_CTX s
    if is_sha256(alg):
        SHA256_Init(&s)
        SHA256_Update(&s, p, <size_t>n)
        SHA256_Final(out, &s)
    else:
        MD5_Init(&m)
        MD5_Update(&m, p, <size_t>n)
        MD5_Final(out, &m)


cdef enum:
    HASH_TEXT = 512         # a text up to this long is joined on the stack


cdef int hash_parts(int alg, const Field** parts, int k, char* hexout) except -1:
    """The hex hash of the parts joined with ":" (as _hex_hash(f"{a}:{b}...") does)."""
    cdef bint escaped = True
    cdef Py_ssize_t total = k - 1, pos = 0, n
    cdef int i
    cdef char stack[<int>HASH_TEXT]
    cdef char* w = stack
    cdef const char* p
    cdef unsigned char d[32]
    for i in range(k):
        if parts[i].h == NULL:
            escaped = False
    for i in range(k):
        total += parts[i].hn if escaped else parts[i].n
    if total > HASH_TEXT:
        w = <char*>PyMem_Malloc(total)
        if w == NULL:
            raise MemoryError()
    for i in range(k):
        if i:
            w[pos] = b':'
            pos += 1
        p = parts[i].h if escaped else parts[i].p
        n = parts[i].hn if escaped else parts[i].n
        memcpy(w + pos, p, n)
        pos += n
    digest_into(alg, w, total, d)
    if w != stack:
        PyMem_Free(w)
    to_hex(d, hex_len(alg) // 2, hexout)
    return 0


# HA2 = H(method:uri) depends on the request line only: a small direct-mapped
# memo of it (exact keys), per process.
cdef enum:
    HA2_SLOTS = 64
    HA2_TEXT = 240

cdef struct Ha2Slot:
    uint64_t hash
    int alg
    Py_ssize_t n            # 0: empty
    char text[<int>HA2_TEXT]
    char hexd[64]

cdef Ha2Slot HA2[<int>HA2_SLOTS]
memset(HA2, 0, sizeof(HA2))


cdef int ha2_hex(int alg, const Field* method, const Field* uri, char* out) except -1:
    cdef const Field* parts[2]
    cdef bint escaped = method.h != NULL and uri.h != NULL
    cdef Py_ssize_t mn = method.hn if escaped else method.n
    cdef Py_ssize_t un = uri.hn if escaped else uri.n
    cdef Py_ssize_t n = mn + 1 + un
    cdef char text[<int>HA2_TEXT]
    cdef uint64_t h
    cdef Ha2Slot* slot
    cdef int sha = is_sha256(alg)
    parts[0] = method
    parts[1] = uri
    if n > HA2_TEXT:
        return hash_parts(alg, parts, 2, out)
    memcpy(text, method.h if escaped else method.p, mn)
    text[mn] = b':'
    memcpy(text + mn + 1, uri.h if escaped else uri.p, un)
    h = hash_bytes(text, n, 0x68613200, <uint64_t>sha)
    slot = &HA2[h & (HA2_SLOTS - 1)]
    if slot.n == n and slot.hash == h and slot.alg == sha and memcmp(slot.text, text, n) == 0:
        memcpy(out, slot.hexd, hex_len(alg))
        return 0
    hash_parts(alg, parts, 2, out)
    memcpy(slot.text, text, n)
    memcpy(slot.hexd, out, hex_len(alg))
    slot.hash = h
    slot.alg = sha
    slot.n = n
    return 0


cdef int expected_response(int alg, const Field* ha1, const Field* nonce, const Field* qop,
                           const Field* nc, const Field* cnonce, const Field* method,
                           const Field* uri, char* out) except -1:
    """The hex ``response`` (RFC 7616 3.4.1, RFC 2617, RFC 2069) from the
    lower-case hex HA1 of the base algorithm; ``qop`` absent: RFC 2069 form."""
    cdef char sess_hex[64]
    cdef char ha2[64]
    cdef Field sess_key, ha2_f
    cdef const Field* parts[6]
    if is_sess(alg):
        parts[0] = ha1
        parts[1] = nonce
        parts[2] = cnonce
        hash_parts(alg, parts, 3, sess_hex)
        set_bytes_field(&sess_key, sess_hex, hex_len(alg))
        ha1 = &sess_key
    ha2_hex(alg, method, uri, ha2)
    set_bytes_field(&ha2_f, ha2, hex_len(alg))
    parts[0] = ha1
    parts[1] = nonce
    if qop.n < 0:
        parts[2] = &ha2_f
        return hash_parts(alg, parts, 3, out)
    parts[2] = nc
    parts[3] = cnonce
    parts[4] = qop
    parts[5] = &ha2_f
    return hash_parts(alg, parts, 6, out)


def response_digest(str algorithm, str ha1, str method, str uri, str nonce, qop=None, nc=None,
                    cnonce=None):
    """The hex digest ``response`` for a canonical ``algorithm`` and the
    lower-case hex ``ha1`` of its base algorithm (``fastsip.auth.digest_response``
    checks the arguments and derives ``ha1``)."""
    cdef Field f_ha1, f_method, f_uri, f_nonce, f_qop, f_nc, f_cnonce
    cdef list keep = []
    cdef char out[64]
    cdef int alg = ALGORITHMS.index(algorithm) + 1
    set_str_field(&f_ha1, ha1, keep)
    set_str_field(&f_method, method, keep)
    set_str_field(&f_uri, uri, keep)
    set_str_field(&f_nonce, nonce, keep)
    set_str_field(&f_qop, qop, keep)
    set_str_field(&f_nc, nc, keep)
    set_str_field(&f_cnonce, cnonce, keep)
    expected_response(alg, &f_ha1, &f_nonce, &f_qop, &f_nc, &f_cnonce, &f_method, &f_uri, out)
    return PyUnicode_DecodeUTF8(out, hex_len(alg), NULL)


cdef bint ct_equal(const char* a, const char* b, Py_ssize_t n) noexcept nogil:
    """Equal, in time that does not depend on where they differ."""
    cdef unsigned char acc = 0
    cdef Py_ssize_t i
    for i in range(n):
        acc |= <unsigned char>a[i] ^ <unsigned char>b[i]
    return acc == 0


# --------------------------------------------------------------------------
# Hosts, URIs and the default policy
# --------------------------------------------------------------------------

def _host(hostport):
    """The lower-case host of ``host[:port]`` (IPv6 references kept in brackets)."""
    host = hostport.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] or host
    return host.partition(":")[0] if host.count(":") == 1 else host


cdef object own_aor_only_host(auth_user, realm, aor_user, host):
    return auth_user == aor_user and host == realm.lower()


def _quote(text):
    """``text`` as a quoted-string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def own_aor_only(auth_user, realm, aor_user, aor_domain) -> bool:
    """The default policy: a user may register only its own AOR.

    True when the authenticated user is the AOR user and the realm is the AOR
    domain (compared case-insensitively, ignoring a port on the domain).
    """
    return own_aor_only_host(auth_user, realm, aor_user, _host(aor_domain))


cdef uint64_t uri_hash(const Field* f) noexcept nogil:
    """The digest uri (or the Request-URI) in its comparison form, hashed
    (``uri_key_hash``, RFC 3261 19.1.4); blanks and a pair of <> around it
    (Net::SIP's Request-URI over TCP) do not count."""
    cdef Py_ssize_t s = 0, e = f.n
    while s < e and is_lws(f.p[s]):
        s += 1
    while e > s and is_lws(f.p[e - 1]):
        e -= 1
    if e - s >= 2 and f.p[s] == b'<' and f.p[e - 1] == b'>':
        s += 1
        e -= 1
    return uri_key_hash(f.p, s, e)


# --------------------------------------------------------------------------
# The nonce-count table
# --------------------------------------------------------------------------

cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15     # mixes the user's hash into the nonce's


@cython.final
cdef class NonceCounts:
    """The nonce-counts an ``AuthCore`` remembers: (nonce, user) -> the highest
    count, a bitmap of the ``replay_window`` counts below it, and the nonce's
    issue time; least recently used first (docs/auth.md, "Replay protection")."""

    def __cinit__(self):
        cdef uint64_t i
        self.e = NULL
        self.cap = self.n = 0
        self.free_list = self.oldest = self.newest = -1
        self.nbuckets = 64
        self.buckets = <int32_t*>PyMem_Malloc(self.nbuckets * sizeof(int32_t))
        if self.buckets == NULL:
            raise MemoryError()
        for i in range(self.nbuckets):
            self.buckets[i] = -1
        self.evicted_upto = -INFINITY
        k = os.urandom(16)
        self.k0 = int.from_bytes(k[:8], "little")
        self.k1 = int.from_bytes(k[8:], "little")

    def __dealloc__(self):
        cdef int32_t i = self.oldest
        while i >= 0:
            PyMem_Free(self.e[i].key)
            PyMem_Free(self.e[i].seen)
            i = self.e[i].newer
        PyMem_Free(self.e)
        PyMem_Free(self.buckets)

    def __len__(self):
        return self.n

    cdef int32_t _find(self, const Field* nonce, const Field* user, uint64_t h) noexcept:
        cdef int32_t i = self.buckets[h & (self.nbuckets - 1)]
        cdef CountEntry* x
        while i >= 0:
            x = &self.e[i]
            if x.hash == h and x.nonce_len == nonce.n and x.key_len == nonce.n + user.n \
                    and memcmp(x.key, nonce.p, nonce.n) == 0 \
                    and memcmp(x.key + nonce.n, user.p, user.n) == 0:
                return i
            i = x.chain
        return -1

    cdef int _grow_buckets(self) except -1:
        cdef uint64_t nb = self.nbuckets * 2, b
        cdef int32_t* buckets = <int32_t*>PyMem_Malloc(nb * sizeof(int32_t))
        cdef int32_t i
        if buckets == NULL:
            raise MemoryError()
        for b in range(nb):
            buckets[b] = -1
        i = self.oldest
        while i >= 0:
            b = self.e[i].hash & (nb - 1)
            self.e[i].chain = buckets[b]
            buckets[b] = i
            i = self.e[i].newer
        PyMem_Free(self.buckets)
        self.buckets = buckets
        self.nbuckets = nb
        return 0

    cdef int32_t _add(self, const Field* nonce, const Field* user, uint64_t h) except -2:
        cdef int32_t i
        cdef CountEntry* e
        cdef CountEntry* x
        cdef char* key
        cdef uint64_t* seen
        cdef uint64_t b
        if <uint64_t>self.n >= self.nbuckets:
            self._grow_buckets()
        key = <char*>PyMem_Malloc(nonce.n + user.n + 1)
        seen = <uint64_t*>PyMem_Malloc(sizeof(uint64_t))
        if key == NULL or seen == NULL:
            PyMem_Free(key)
            PyMem_Free(seen)
            raise MemoryError()
        if self.free_list >= 0:
            i = self.free_list
            self.free_list = self.e[i].chain
        else:
            if self.cap == self.n:
                e = <CountEntry*>PyMem_Realloc(self.e, (self.cap * 2 + 16) * sizeof(CountEntry))
                if e == NULL:
                    PyMem_Free(key)
                    PyMem_Free(seen)
                    raise MemoryError()
                self.e = e
                self.cap = self.cap * 2 + 16
            i = self.n      # no free entries: the first n are all in use
        x = &self.e[i]
        memcpy(key, nonce.p, nonce.n)
        memcpy(key + nonce.n, user.p, user.n)
        x.key = key
        x.nonce_len = nonce.n
        x.key_len = nonce.n + user.n
        x.hash = h
        x.seen = seen
        x.nwords = 1
        seen[0] = 1
        b = h & (self.nbuckets - 1)
        x.chain = self.buckets[b]
        self.buckets[b] = i
        x.older = x.newer = -1
        self.n += 1
        return i

    cdef void _unlink(self, int32_t i) noexcept:
        cdef CountEntry* x = &self.e[i]
        if x.older >= 0:
            self.e[x.older].newer = x.newer
        else:
            self.oldest = x.newer
        if x.newer >= 0:
            self.e[x.newer].older = x.older
        else:
            self.newest = x.older
        x.older = x.newer = -1

    cdef void _append(self, int32_t i) noexcept:
        cdef CountEntry* x = &self.e[i]
        x.older = self.newest
        x.newer = -1
        if self.newest >= 0:
            self.e[self.newest].newer = i
        else:
            self.oldest = i
        self.newest = i

    cdef void _remove(self, int32_t i) noexcept:
        cdef CountEntry* x = &self.e[i]
        cdef int32_t* link = &self.buckets[x.hash & (self.nbuckets - 1)]
        self._unlink(i)
        while link[0] != i:
            link = &self.e[link[0]].chain
        link[0] = x.chain
        PyMem_Free(x.key)
        PyMem_Free(x.seen)
        x.key = NULL
        x.seen = NULL
        x.chain = self.free_list
        self.free_list = i
        self.n -= 1

    cdef int is_new(self, const Field* nonce, const Field* user, uint64_t nc, double issued,
                    double now, uint64_t window, Py_ssize_t max_entries, double ttl) except -1:
        """Record nonce-count ``nc``: 1, or 0 if it was used or is too old.

        Sliding window as in IPsec (RFC 4303 3.4.3).  At most ``max_entries``
        entries, least recently used evicted first; a nonce issued no later
        than an evicted one and not in the table is refused, so eviction
        never re-opens a replay."""
        cdef uint64_t h = hash_bytes(nonce.p, nonce.n, self.k0, self.k1) \
            ^ hash_bytes(user.p, user.n, self.k1, self.k0) * GOLDEN
        cdef int32_t i = self._find(nonce, user, h)
        cdef CountEntry* x
        cdef uint64_t shift, age
        if i < 0:
            if issued <= self.evicted_upto:
                return 0
            i = self._add(nonce, user, h)
            x = &self.e[i]
            x.highest = nc
        else:
            self._unlink(i)
            x = &self.e[i]
            if nc > x.highest:
                shift = nc - x.highest
                if shift < window:
                    shift_in(x, shift, window)
                else:       # also keeps a huge jump from building a huge bitmap
                    if x.nwords > 1:
                        x.seen = <uint64_t*>PyMem_Realloc(x.seen, sizeof(uint64_t))
                        x.nwords = 1
                    x.seen[0] = 1
                x.highest = nc
            else:
                age = x.highest - nc
                if age >= window or test_bit(x, age):
                    self._append(i)
                    return 0
                set_bit(x, age)
        x.issued = issued
        self._append(i)
        # Drop expired nonces from the old end, then keep within the bound.
        while self.n:
            i = self.oldest
            if now - self.e[i].issued > ttl:
                self._remove(i)
            elif self.n > max_entries:
                if self.e[i].issued > self.evicted_upto:
                    self.evicted_upto = self.e[i].issued
                self._remove(i)
            else:
                break
        return 1


cdef inline bint test_bit(const CountEntry* x, uint64_t age) noexcept:
    cdef uint64_t w = age >> 6
    return w < <uint64_t>x.nwords and (x.seen[w] >> (age & 63)) & 1


cdef int grow_words(CountEntry* x, Py_ssize_t nw) except -1:
    cdef uint64_t* seen
    if nw <= x.nwords:
        return 0
    seen = <uint64_t*>PyMem_Realloc(x.seen, nw * sizeof(uint64_t))
    if seen == NULL:
        raise MemoryError()
    memset(seen + x.nwords, 0, (nw - x.nwords) * sizeof(uint64_t))
    x.seen = seen
    x.nwords = nw
    return 0


cdef int set_bit(CountEntry* x, uint64_t age) except -1:
    grow_words(x, <Py_ssize_t>(age >> 6) + 1)
    x.seen[age >> 6] |= (<uint64_t>1) << (age & 63)
    return 0


cdef int shift_in(CountEntry* x, uint64_t shift, uint64_t window) except -1:
    """seen = (seen << shift | 1) & ((1 << window) - 1), for 0 < shift < window.
    The bitmap grows to the bits it uses, as a Python int would."""
    cdef Py_ssize_t used = x.nwords, nw, j, src
    cdef uint64_t ws = shift >> 6, bs = shift & 63, v, bits
    while used > 1 and x.seen[used - 1] == 0:
        used -= 1
    bits = <uint64_t>used * 64 - <uint64_t>__builtin_clzll(x.seen[used - 1] | 1) + shift
    if bits > window:
        bits = window
    nw = <Py_ssize_t>((bits + 63) >> 6)
    grow_words(x, nw)
    j = nw - 1
    while j >= 0:
        src = j - <Py_ssize_t>ws
        v = 0
        if src >= 0:
            v = x.seen[src] << bs
            if bs and src >= 1:
                v |= x.seen[src - 1] >> (64 - bs)
        x.seen[j] = v
        j -= 1
    if x.nwords > nw:       # what was there is shifted past the window
        memset(x.seen + nw, 0, (x.nwords - nw) * sizeof(uint64_t))
    if <uint64_t>nw * 64 > window:
        x.seen[nw - 1] &= ((<uint64_t>1) << (window & 63)) - 1
    x.seen[0] |= 1
    return 0


# --------------------------------------------------------------------------
# The HA1 table
# --------------------------------------------------------------------------

@cython.final
cdef class Ha1Table:
    """The HA1s of an htdigest dict (``load_htdigest``: ``(user, realm)`` -> MD5
    hex, ``(user, realm, "SHA-256")`` -> SHA-256 hex) in C, one entry per user
    and realm, found by SipHash with a random key; keys are compared as UTF-8
    bytes (a file read as UTF-8 holds no lone surrogates, so equal bytes are
    equal str).  Built once from the dict; it does not follow later changes."""

    def __cinit__(self, dict users):
        cdef uint64_t cap = 16, h, i
        cdef Ha1Entry* x
        cdef Py_ssize_t ul, rl
        cdef bytes ub, rb, hb
        cdef int alg
        k = os.urandom(16)
        self.k0 = int.from_bytes(k[:8], "little")
        self.k1 = int.from_bytes(k[8:], "little")
        while cap < 2 * <uint64_t>len(users) + 2:
            cap *= 2
        self.e = <Ha1Entry*>PyMem_Malloc(cap * sizeof(Ha1Entry))
        if self.e == NULL:
            raise MemoryError()
        memset(self.e, 0, cap * sizeof(Ha1Entry))
        self.cap = cap
        for key, ha1 in users.items():
            if type(key) is not tuple or not (len(key) == 2 or (len(key) == 3 and
                                                                key[2] == "SHA-256")):
                raise ValueError("an HA1 table holds (user, realm[, 'SHA-256']) keys")
            alg = ALG_MD5 if len(key) == 2 else ALG_SHA256
            ub = (<str>key[0]).encode("utf-8")
            rb = (<str>key[1]).encode("utf-8")
            hb = (<str>ha1).lower().encode("ascii")
            if len(hb) != hex_len(alg):
                raise ValueError(f"an HA1 of {key[0]!r} has the wrong length")
            ul = len(ub)
            rl = len(rb)
            h = self._hash(ub, ul, rb, rl)
            i = h & (cap - 1)
            while self.e[i].hash and not (self.e[i].hash == h and self.e[i].user_len == ul
                                          and self.e[i].realm_len == rl
                                          and memcmp(self.e[i].key, <char*>ub, ul) == 0
                                          and memcmp(self.e[i].key + ul, <char*>rb, rl) == 0):
                i = (i + 1) & (cap - 1)
            x = &self.e[i]
            if not x.hash:
                x.key = <char*>PyMem_Malloc(ul + rl + 1)
                if x.key == NULL:
                    raise MemoryError()
                memcpy(x.key, <char*>ub, ul)
                memcpy(x.key + ul, <char*>rb, rl)
                x.user_len = ul
                x.realm_len = rl
                x.hash = h
                self.n += 1
            if alg == ALG_MD5:
                memcpy(x.md5, <char*>hb, 32)
            else:
                memcpy(x.sha256, <char*>hb, 64)
            x.held |= 1u << alg

    def __dealloc__(self):
        cdef uint64_t i
        if self.e != NULL:
            for i in range(self.cap):
                PyMem_Free(self.e[i].key)
            PyMem_Free(self.e)

    def __len__(self):
        """The number of (user, realm) entries."""
        return self.n

    cdef uint64_t _hash(self, const char* u, Py_ssize_t ul, const char* r,
                        Py_ssize_t rl) noexcept:
        return (hash_bytes(u, ul, self.k0, self.k1) ^ hash_bytes(r, rl, self.k1, self.k0)
                * GOLDEN) | 1       # never 0, which marks an empty slot

    cdef const char* find(self, const Field* user, const Field* realm, int alg) noexcept:
        """The hex HA1 of ``user`` in ``realm`` for the base algorithm of ``alg``
        (hex_len(alg) bytes), or NULL when the file holds none."""
        cdef uint64_t h = self._hash(user.p, user.n, realm.p, realm.n)
        cdef uint64_t i = h & (self.cap - 1)
        cdef Ha1Entry* x
        cdef int base = ALG_SHA256 if is_sha256(alg) else ALG_MD5
        while self.e[i].hash:
            x = &self.e[i]
            if x.hash == h and x.user_len == user.n and x.realm_len == realm.n \
                    and memcmp(x.key, user.p, user.n) == 0 \
                    and memcmp(x.key + user.n, realm.p, realm.n) == 0:
                if not (x.held >> base) & 1:
                    return NULL
                if base == ALG_SHA256:
                    return &x.sha256[0]
                return &x.md5[0]
            i = (i + 1) & (self.cap - 1)
        return NULL


# --------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------

@cython.final
cdef class AuthResult:
    """The outcome of ``Authorize.check``.

    ``status`` is 0 when ``ok``, else the response to send (401, 403, 400)
    with ``headers`` added to it.  ``user`` is the authenticated user name
    (also set on a 403: authenticated, but not allowed this AOR).
    """
    cdef readonly bint ok
    cdef readonly int status
    cdef readonly str reason
    cdef readonly object user
    cdef readonly list headers

    def __init__(self, bint ok, int status, str reason, user=None, headers=None):
        self.ok = ok
        self.status = status
        self.reason = reason
        self.user = user
        self.headers = [] if headers is None else list(headers)

    def __eq__(self, other):
        if not isinstance(other, AuthResult):
            return NotImplemented
        return self._key() == (<AuthResult>other)._key()

    __hash__ = None

    def _key(self):
        return (self.ok, self.status, self.reason, self.user, self.headers)

    def __repr__(self):
        return (f"AuthResult(ok={self.ok!r}, status={self.status!r}, reason={self.reason!r}, "
                f"user={self.user!r}, headers={self.headers!r})")


# Random bytes for nonces, drawn from os.urandom 4 KiB at a time (one system
# call per 512 nonces, not one each); each byte is used once and then cleared,
# and a forked child starts with an empty pool, so two workers never share one.
cdef enum:
    RAND_POOL_SIZE = 4096
cdef unsigned char RAND_POOL[<int>RAND_POOL_SIZE]
cdef Py_ssize_t RAND_POS = RAND_POOL_SIZE


def _empty_random_pool():
    global RAND_POS
    memset(RAND_POOL, 0, RAND_POOL_SIZE)
    RAND_POS = RAND_POOL_SIZE


os.register_at_fork(after_in_child=_empty_random_pool)


cdef int take_random(unsigned char* out, Py_ssize_t n) except -1:
    """``n`` (at most RAND_POOL_SIZE) bytes from os.urandom, through the pool."""
    global RAND_POS
    if RAND_POS + n > RAND_POOL_SIZE:
        fresh = os.urandom(RAND_POOL_SIZE)
        memcpy(RAND_POOL, PyBytes_AS_STRING(fresh), RAND_POOL_SIZE)
        RAND_POS = 0
    memcpy(out, RAND_POOL + RAND_POS, n)
    memset(RAND_POOL + RAND_POS, 0, n)
    RAND_POS += n
    return 0


cdef int64_t EXACT_MS = (<int64_t>1) << 53      # issue times a double holds exactly


cdef const char* B64URL_DIGITS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


cdef object _UNSET = object()


cdef class AuthCore:
    """Settings, nonce key and nonce-count table of a digest check, the check
    itself and the challenges; the base class of ``fastsip.auth.Authorize``,
    which supplies the users (``_ha1``, ``_dummy_ha1``, ``algorithms_for``)."""

    def __cinit__(self):
        self.counts = NonceCounts()
        self.failures = FailureBudget()
        self._rstr = _UNSET
        self._rkeep = []
        self.policy = own_aor_only
        self.ttl = 300.0
        self.window = 1024
        self.max_entries = 100_000
        self._qop = ()
        self._chal_realm = _UNSET
        self._chal_cache = {}

    # -- settings (plain attributes of Authorize, kept in C for the check) ----

    @property
    def realm(self):
        return self._realm

    @realm.setter
    def realm(self, value):
        self._realm = value
        self._has_realm = bool(value)       # (realm_for asks without Python)

    @property
    def nonce_ttl(self):
        return self._ttl_obj

    @nonce_ttl.setter
    def nonce_ttl(self, value):
        self.ttl = float(value)
        self._ttl_obj = value

    @property
    def algorithms(self):
        return self._algorithms

    @algorithms.setter
    def algorithms(self, value):
        cdef uint32_t mask = 0
        for a in value:
            if a in ALGORITHMS:
                mask |= 1u << (ALGORITHMS.index(a) + 1)
        self.alg_mask = mask
        self._algorithms = value
        self._one_algorithm = len(value) == 1
        self._forget_challenges()

    @property
    def qop(self):
        return self._qop

    @qop.setter
    def qop(self, value):
        self._qop = value
        self._forget_challenges()

    def _forget_challenges(self):
        """Drop the remembered challenge texts (the settings they show changed)."""
        self._chal_realm = self._chal_offered = _UNSET
        self._chal_last = None
        self._chal_cache = {}

    @property
    def replay_window(self):
        return self._window_obj

    @replay_window.setter
    def replay_window(self, value):
        # counts are below 2**32: any window above that acts as 2**32
        self.window = max(0, min(int(value), 1 << 32))
        self._window_obj = value

    @property
    def max_nonces(self):
        return self._max_obj

    @max_nonces.setter
    def max_nonces(self, value):
        self.max_entries = max(0, min(int(value), 1 << 62))
        self._max_obj = value

    @property
    def _secret(self):
        return self._secret_obj

    @_secret.setter
    def _secret(self, value):
        cdef unsigned char pad[64]
        cdef const unsigned char* k
        cdef Py_ssize_t n, i
        key = bytes(value)
        k = <const unsigned char*>PyBytes_AS_STRING(key)
        n = len(key)
        if n > 64:
            digest_into(ALG_SHA256, k, n, pad)
            key = PyBytes_FromStringAndSize(<char*>pad, 32)
            k = <const unsigned char*>PyBytes_AS_STRING(key)
            n = 32
        for i in range(64):
            pad[i] = (k[i] if i < n else 0) ^ 0x36
        SHA256_Init(&self._inner)
        SHA256_Update(&self._inner, pad, 64)
        for i in range(64):
            pad[i] = (k[i] if i < n else 0) ^ 0x5C
        SHA256_Init(&self._outer)
        SHA256_Update(&self._outer, pad, 64)
        memset(pad, 0, 64)
        self._keyed = True
        self._secret_obj = value

    def _load_ha1s(self, users):
        """Keep the HA1s of an htdigest dict (``load_htdigest``) in C for the
        check (None: ask ``_ha1`` for every user)."""
        self.ha1s = None if users is None else Ha1Table(users)

    @property
    def _ha1_table(self):
        """The HA1 table the check reads (``_load_ha1s``), or None."""
        return self.ha1s

    @property
    def _counts(self):
        """The nonce-count table (its ``len`` is the number of entries)."""
        return self.counts

    # -- realm, nonces ------------------------------------------------------

    cdef object host_of(self, const Field* aor_domain):
        """``_host(aor_domain)``, remembering the answer for the last ASCII domain
        (its bytes): one domain after another costs no Python object."""
        cdef bint ascii = field_ascii(aor_domain)
        cdef bytes key = self._dom_key
        if ascii and key is not None and PyBytes_GET_SIZE(key) == aor_domain.n and \
                memcmp(PyBytes_AS_STRING(key), aor_domain.p, aor_domain.n) == 0:
            return self._dom_host
        host = _host(field_str(aor_domain))
        if ascii:
            self._dom_key = PyBytes_FromStringAndSize(aor_domain.p, aor_domain.n)
            self._dom_host = host
        return host

    cdef object realm_for(self, const Field* aor_domain):
        """The realm to check and challenge with: ``realm`` or the AOR's host."""
        return self._realm if self._has_realm else self.host_of(aor_domain)

    cdef int own_aor(self, const Field* user, object realm, const Field* aor_user,
                     const Field* aor_domain) except -1:
        """``own_aor_only(user, realm, aor_user, aor_domain)`` on Fields: the user
        names compared in C when both are ASCII, the domain's host against
        ``realm.lower()`` remembered for the last realm and ASCII domain."""
        cdef bytes key
        if field_ascii(user) and field_ascii(aor_user):
            if not same(user, aor_user):
                return 0
        elif not (field_str(user) == field_str(aor_user)):
            return 0
        key = self._own_key
        if realm is self._own_realm and key is not None and field_ascii(aor_domain) and \
                PyBytes_GET_SIZE(key) == aor_domain.n and \
                memcmp(PyBytes_AS_STRING(key), aor_domain.p, aor_domain.n) == 0:
            return self._own_result
        result = self.host_of(aor_domain) == realm.lower()
        if field_ascii(aor_domain):
            self._own_key = PyBytes_FromStringAndSize(aor_domain.p, aor_domain.n)
            self._own_realm = realm
            self._own_result = bool(result)
        return bool(result)

    cdef list realm_field(self, object realm, Field* out):
        """``realm`` as a Field (remembered for the next call); the caller keeps
        the returned list alive while it uses ``out``."""
        if realm is not self._rstr:
            keep = [realm]
            set_str_field(&self._rfield, realm, keep)
            self._rkeep = keep
            self._rstr = realm
        out[0] = self._rfield
        return self._rkeep

    cdef int selects(self, const Cred* c, const Field* realm) noexcept:
        """Step 1 for one credentials value: Digest, our realm, an algorithm we
        offer.  The algorithm's code, or 0."""
        cdef int alg
        if not field_ieq(&c.scheme, b"digest", 6):
            return 0
        if c.f[<int>F_REALM].n < 0 or not same(&c.f[<int>F_REALM], realm):
            return 0
        alg = alg_code(&c.f[<int>F_ALGORITHM])
        if not (self.alg_mask >> alg) & 1:
            return 0
        return alg

    cdef int mac16(self, const char* head, const Field* realm, unsigned char* out) except -1:
        """The first 16 bytes of HMAC-SHA-256(secret, head[:16] | realm)."""
        cdef bint escaped = realm.h != NULL
        cdef SHA256_CTX c
        cdef unsigned char d[32]
        if not self._keyed:
            raise ValueError("no nonce secret set")
        c = self._inner
        SHA256_Update(&c, head, 16)
        SHA256_Update(&c, realm.h if escaped else realm.p,
                      <size_t>(realm.hn if escaped else realm.n))
        SHA256_Final(d, &c)
        c = self._outer
        SHA256_Update(&c, d, 32)
        SHA256_Final(d, &c)
        memcpy(out, d, 16)
        return 0

    def _mac(self, bytes head, realm):
        """The 16-byte MAC that signs a nonce ``head`` (issue time, random) for ``realm``."""
        cdef Field rf
        cdef list keep = []
        cdef unsigned char out[16]
        if len(head) != 16:
            raise ValueError("a nonce head is 16 bytes")
        set_str_field(&rf, realm, keep)
        self.mac16(head, &rf, out)
        return PyBytes_FromStringAndSize(<char*>out, 16)

    cdef int nonce_into(self, object realm, double now, char* out) except -1:
        """A fresh nonce for ``realm`` issued at ``now`` into ``out`` (NONCE_LEN
        bytes, docs/auth.md): 8 bytes of issue time (ms, big-endian, signed) | 8
        random bytes | the first 16 bytes of HMAC-SHA-256 over both and the realm,
        as 43 base64url digits (no padding)."""
        cdef unsigned char raw[33]
        cdef Field rf
        cdef double t = now * 1000.0
        cdef uint64_t ms
        cdef uint32_t acc
        cdef int i, j = 0
        if t != t:
            raise ValueError("cannot convert float NaN to integer")
        if not (-9.2e18 < t < 9.2e18):          # what int.to_bytes(8, signed=True) takes
            raise OverflowError(f"nonce issue time out of range: {now!r}")
        ms = <uint64_t><int64_t>t               # truncated toward zero, as int() does
        for i in range(8):
            raw[i] = <unsigned char>(ms >> (56 - 8 * i))
        take_random(raw + 8, 8)
        keep = self.realm_field(realm, &rf)     # keeps rf's bytes alive
        self.mac16(<const char*>raw, &rf, raw + 16)
        for i in range(0, 30, 3):
            acc = <uint32_t>raw[i] << 16 | <uint32_t>raw[i + 1] << 8 | raw[i + 2]
            out[j] = B64URL_DIGITS[acc >> 18]
            out[j + 1] = B64URL_DIGITS[(acc >> 12) & 63]
            out[j + 2] = B64URL_DIGITS[(acc >> 6) & 63]
            out[j + 3] = B64URL_DIGITS[acc & 63]
            j += 4
        acc = <uint32_t>raw[30] << 16 | <uint32_t>raw[31] << 8
        out[40] = B64URL_DIGITS[acc >> 18]
        out[41] = B64URL_DIGITS[(acc >> 12) & 63]
        out[42] = B64URL_DIGITS[(acc >> 6) & 63]
        return 0

    def _new_nonce(self, realm, double now):
        """A fresh nonce for ``realm`` issued at ``now``, as str (``nonce_into``)."""
        cdef char out[<int>NONCE_LEN]
        self.nonce_into(realm, now, out)
        return PyUnicode_DecodeASCII(out, NONCE_LEN, NULL)

    # -- challenges -----------------------------------------------------------

    cdef object offered(self, object realm, const Field* user):
        """The algorithms a 401 offers ``user`` (the user part of the AOR in To;
        NULL: all of them): ``algorithms_for``, which with one algorithm
        configured can only answer that one and is not asked (nor is the
        user's str made)."""
        algorithms = self._algorithms
        if user == NULL or self._one_algorithm:
            return algorithms
        return self.algorithms_for(field_str(user), realm)

    cdef tuple challenge_parts(self, object realm, object offered):
        """What surrounds the nonce in the challenges for ``realm`` offering
        ``offered``: ``(text, text stale, wire, wire stale)``.  ``text``: one
        ``(head, tail)`` of str per algorithm (``challenge``); ``wire``: the same
        as the reply writer writes them, a flat list of bytes, head then tail
        per header (``WWW-Authenticate: `` ... CRLF, ``ReplyWriter.challenge``).
        The last key is remembered, and 64 others."""
        if (realm is self._chal_realm or realm == self._chal_realm) and \
                (offered is self._chal_offered or offered == self._chal_offered):
            return self._chal_last
        key = (realm, offered)
        parts = self._chal_cache.get(key)
        if parts is None:
            qop = f', qop="{",".join(self._qop)}"' if self._qop else ""
            text = []
            for stale in (False, True):
                tail = qop + ", stale=true" if stale else qop
                text.append([(f'Digest realm={_quote(realm)}, nonce="', f'", algorithm={alg}{tail}')
                             for alg in offered])
            wire = [[b for head, tail in pairs
                     for b in (f"WWW-Authenticate: {head}".encode("utf-8", "replace"),
                               f"{tail}\r\n".encode("utf-8", "replace"))]
                    for pairs in text]
            parts = (text[0], text[1], wire[0], wire[1])
            if len(self._chal_cache) >= 64:
                self._chal_cache.clear()
            self._chal_cache[key] = parts
        self._chal_realm = realm
        self._chal_offered = offered
        self._chal_last = parts
        return parts

    def challenge(self, realm, double now, bint stale=False, user=None):
        """WWW-Authenticate values, one per algorithm of ``algorithms_for(user,
        realm)``, in ``algorithms`` order (``user``: the user part of the AOR in
        To; None offers them all), with one fresh nonce.  The registrar writes
        the same 401 in C (``ReplyWriter.challenge``) unless a subclass
        overrides this method."""
        cdef Field uf
        cdef list keep = []
        nonce = self._new_nonce(realm, now)
        if user is not None:
            set_any_field(&uf, user, keep)
        offered = self.offered(realm, &uf if user is not None else NULL)
        parts = self.challenge_parts(realm, offered)[1 if stale else 0]
        return [head + nonce + tail for head, tail in parts]

    cdef int nonce_issued(self, const Field* nonce, const Field* realm, double* issued) except -1:
        """Step 4: 1 and the issue time if we signed ``nonce`` for ``realm``, else 0.
        A nonce is 43 base64url digits (32 bytes, unpadded)."""
        cdef unsigned char raw[33]
        cdef unsigned char mac[16]
        cdef uint32_t acc
        cdef int i, j
        cdef uint64_t bits = 0
        cdef int64_t ms
        if nonce.n != 43:
            return 0
        for i in range(43):
            if not B64URL[<unsigned char>nonce.p[i]]:
                return 0
        # 4 digits -> 3 bytes; the last 3 digits give 2 bytes (2 bits unused)
        j = 0
        for i in range(0, 44, 4):
            acc = (B64URL[<unsigned char>nonce.p[i]] - 1u) << 18
            acc |= (B64URL[<unsigned char>nonce.p[i + 1]] - 1u) << 12
            acc |= (B64URL[<unsigned char>nonce.p[i + 2]] - 1u) << 6
            if i + 3 < 43:
                acc |= B64URL[<unsigned char>nonce.p[i + 3]] - 1u
            raw[j] = <unsigned char>(acc >> 16)
            raw[j + 1] = <unsigned char>(acc >> 8)
            if j + 2 < 33:
                raw[j + 2] = <unsigned char>acc
            j += 3
        self.mac16(<const char*>raw, realm, mac)
        if not ct_equal(<const char*>raw + 16, <const char*>mac, 16):
            return 0
        for i in range(8):
            bits = (bits << 8) | raw[i]
        ms = <int64_t>bits
        if -EXACT_MS <= ms <= EXACT_MS:             # C integers: no Python int per check
            issued[0] = <double>ms / 1000.0
        else:       # as int / 1000 rounds it
            issued[0] = (<object>ms) / 1000
        return 1

    cdef int verify(self, const Cred* c, int alg, const Field* method, const Field* ruri,
                    object realm, const Field* rf, const Field* aor_user,
                    const Field* aor_domain, double now) except -1:
        """Steps 2-8 of docs/auth.md for the credentials step 1 chose (``c``,
        NULL when none): an Outcome (0: authenticated).  ``aor_user`` and
        ``aor_domain`` (of the To URI) are Fields: the default policy compares
        them in C, and only another policy is given them as str."""
        cdef const Field* f
        cdef int missing = 0, i
        cdef bint qop, match
        cdef double issued = 0
        cdef uint64_t nc = 0
        cdef char expected[64]
        cdef char ha1_buf[128]
        cdef Field ha1_f
        cdef Py_ssize_t n, k
        cdef list keep
        cdef const char* ha1p
        cdef bint known, allowed
        if c == NULL:
            return R_REQUIRED
        f = &c.f[0]
        # bits in the order of _REQUIRED
        missing = ((f[<int>F_USERNAME].n < 0) | (f[<int>F_NONCE].n < 0) << 1
                   | (f[<int>F_URI].n < 0) << 2 | (f[<int>F_RESPONSE].n < 0) << 3)
        if missing:
            return R_INCOMPLETE | missing << 8
        qop = f[<int>F_QOP].n >= 0
        if qop:
            if not field_ieq(&f[<int>F_QOP], b"auth", 4):
                return R_BAD_QOP
            if f[<int>F_NC].n < 0 or f[<int>F_CNONCE].n < 0:
                return R_NO_NC
            if f[<int>F_NC].n != 8:
                return R_BAD_NC
            for k in range(8):
                i = HEXVAL[<unsigned char>f[<int>F_NC].p[k]]
                if i < 0:
                    return R_BAD_NC
                nc = nc << 4 | <uint64_t>i
        elif is_sess(alg):
            return R_SESS_NO_QOP | alg << 8
        if not same(&f[<int>F_URI], ruri) and uri_hash(&f[<int>F_URI]) != uri_hash(ruri):
            return R_URI

        if not self.nonce_issued(&f[<int>F_NONCE], rf, &issued):
            return R_UNKNOWN_NONCE

        # An unknown user costs the same work as a wrong password and gets
        # the same answer.  The users file's HA1s are in C (ha1s); a user
        # it does not hold is asked of _ha1 (which then finds none).
        ha1p = NULL
        if self.ha1s is not None:
            ha1p = self.ha1s.find(&f[<int>F_USERNAME], rf, alg)
        if ha1p != NULL:
            known = True
            set_bytes_field(&ha1_f, ha1p, hex_len(alg))
        else:
            user = field_str(&f[<int>F_USERNAME])
            base = _BASE_NAME[alg]
            ha1 = self._ha1(user, realm, base)
            known = ha1 is not None
            if not known:
                ha1 = self._dummy_ha1(user, realm, base)
            if type(ha1) is str and PyUnicode_IS_ASCII(ha1) and PyUnicode_GET_LENGTH(ha1) <= 128:
                n = PyUnicode_GET_LENGTH(ha1)
                for k in range(n):
                    ha1_buf[k] = <char>LOWER[(<unsigned char*>PyUnicode_DATA(ha1))[k]]
                set_bytes_field(&ha1_f, ha1_buf, n)
            else:
                keep = [ha1.lower()]        # (set_str_field borrows the str: kept here)
                set_str_field(&ha1_f, keep[0], keep)
        expected_response(alg, &ha1_f, &f[<int>F_NONCE], &f[<int>F_QOP], &f[<int>F_NC],
                          &f[<int>F_CNONCE], method, &f[<int>F_URI], expected)
        # the response as lower-case ASCII (nothing else lower-cases to a hex digit)
        n = hex_len(alg)
        match = f[<int>F_RESPONSE].n == n
        if match:
            for k in range(n):
                ha1_buf[k] = <char>LOWER[<unsigned char>f[<int>F_RESPONSE].p[k]]
            match = ct_equal(ha1_buf, expected, n)
        if not (match and known):
            return R_WRONG

        # Clock skew between workers aside, a nonce from the future is as
        # suspect as an old one.
        if fabs(now - issued) > self.ttl:
            return R_EXPIRED
        if qop and not self.counts.is_new(&f[<int>F_NONCE], &f[<int>F_USERNAME], nc, issued, now,
                                          self.window, self.max_entries, self.ttl):
            return R_REPLAYED
        policy = self.policy
        if policy is own_aor_only:
            allowed = self.own_aor(&f[<int>F_USERNAME], realm, aor_user, aor_domain)
        else:
            allowed = policy(field_str(&f[<int>F_USERNAME]), realm, field_str(aor_user),
                             field_str(aor_domain))
        if not allowed:
            return R_FORBIDDEN
        return R_OK

    def check(self, method, request_uri, credentials, aor_user, aor_domain, double now):
        """Check a request's credentials (a list of ``Credentials``); see
        docs/auth.md for the order.  Returns an :class:`AuthResult`."""
        outcome, realm, user = self._check(method, request_uri, credentials, aor_user,
                                           aor_domain, now)
        return self._result(outcome, realm, now, user, aor_user)

    def _result(self, outcome, realm, now, user, aor_user):
        """The AuthResult of an outcome of ``verify`` (``aor_user``: the user
        named in To, whose algorithms a 401 offers through ``challenge``)."""
        status, reason, stale = _outcome(outcome)
        if status == 401:
            headers = [("WWW-Authenticate", v)
                       for v in self.challenge(realm, now, stale, aor_user)]
            return AuthResult(False, 401, reason, None, headers)
        return AuthResult(status == 0, status, reason, user if status in (0, 403) else None)

    def _check(self, method, request_uri, credentials, aor_user, aor_domain, double now):
        """``Authorize.check`` on parsed credentials: ``(outcome, realm, user)``."""
        cdef Cred c
        cdef Field rf, mf, uf, au, ad
        cdef int alg = 0, i
        cdef list keep = []
        set_any_field(&au, aor_user, keep)
        set_any_field(&ad, aor_domain, keep)
        realm = self.realm_for(&ad)
        keep.append(self.realm_field(realm, &rf))
        params = None
        for creds in credentials or ():
            params = creds.params
            set_str_field(&c.scheme, creds.scheme, keep)
            set_str_field(&c.f[<int>F_REALM], params.get("realm"), keep)
            set_str_field(&c.f[<int>F_ALGORITHM], params.get("algorithm"), keep)
            alg = self.selects(&c, &rf)
            if alg:
                break
        if not alg:
            return self.verify(NULL, 0, NULL, NULL, realm, &rf, &au, &ad, now), \
                realm, None
        for i in range(<int>F_COUNT):
            if i != F_REALM and i != F_ALGORITHM:
                set_str_field(&c.f[i], params.get(_FIELD_NAMES[i]), keep)
        set_str_field(&mf, method, keep)
        set_str_field(&uf, request_uri, keep)
        code = self.verify(&c, alg, &mf, &uf, realm, &rf, &au, &ad, now)
        return code, realm, params.get("username")
