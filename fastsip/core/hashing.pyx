
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
    a URI without a user keeps its host); both write the scheme as ``sip:``,
    for sip: and sips: URIs that differ only by their scheme name the same
    resource (RFC 5630 3.1.3): a phone registering sips:alice over TLS is
    found by a lookup of sip:alice.  AOR_URI keeps the scheme and the port
    (the prefix of the comparison form, where sip and sips never match, RFC
    3261 19.1.4).  Returns the length, or -1 when it does not fit."""
    cdef Py_ssize_t at = 0
    cdef char digits[8]
    cdef int port = u.port, nd = 0
    if u.sips and form == AOR_URI:
        at = _put(out, at, cap, b"sips:", 5, False, False)
    else:
        at = _put(out, at, cap, b"sip:", 4, False, False)
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
