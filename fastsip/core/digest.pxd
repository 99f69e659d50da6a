# C-level interface of the digest check (digest.pyx), for the registrar.
#
# A credentials value is held as Fields: pointers to its parameter values,
# either into the datagram (the registrar's scan of an Authorization header)
# or into str objects (Authorize.check on parsed Credentials).  Nothing is
# copied and no dict is built.


# MD5 and SHA-256 from OpenSSL's libcrypto (the one Python's hashlib loads):
# the context functions, which hash in place; the one-shot MD5() and SHA256()
# of OpenSSL 3 go through its provider lookup and cost more per call.  They
# are deprecated in 3.0 but kept; asking for the 1.1.1 API declares them
# without the deprecation warning.
cdef extern from *:
    """
    #define OPENSSL_API_COMPAT 10101
    #include <openssl/md5.h>
    #include <openssl/sha.h>
    """
    ctypedef struct MD5_CTX:
        pass
    ctypedef struct SHA256_CTX:
        pass
    int MD5_Init(MD5_CTX* c) nogil
    int MD5_Update(MD5_CTX* c, const void* data, size_t n) nogil
    int MD5_Final(unsigned char* md, MD5_CTX* c) nogil
    int SHA256_Init(SHA256_CTX* c) nogil
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n) nogil
    int SHA256_Final(unsigned char* md, SHA256_CTX* c) nogil


cdef enum FieldId:
    F_USERNAME = 0
    F_REALM
    F_NONCE
    F_URI
    F_RESPONSE
    F_ALGORITHM
    F_QOP
    F_NC
    F_CNONCE
    F_COUNT


cdef struct Field:
    const char* p        # the value as UTF-8, lone surrogates passed (what is compared)
    Py_ssize_t n         # -1 when the parameter is absent
    const char* h        # the value as hashed (surrogateescape); NULL if that cannot encode it
    Py_ssize_t hn
    void* s              # the str the value came from (borrowed), or NULL


cdef struct Cred:
    Field scheme
    Field f[<int>F_COUNT]




cdef struct CountEntry:
    uint64_t hash
    char* key            # the nonce, then the user
    Py_ssize_t nonce_len
    Py_ssize_t key_len
    uint64_t highest     # the highest nonce-count seen
    uint64_t* seen       # bit i: count highest - i was seen (i < replay_window)
    Py_ssize_t nwords
    double issued
    int32_t older        # LRU neighbours, -1 at the ends
    int32_t newer
    int32_t chain        # next entry in the bucket, or next free entry


cdef class NonceCounts:
    cdef CountEntry* e
    cdef int32_t cap, n, free_list, oldest, newest
    cdef int32_t* buckets
    cdef uint64_t nbuckets
    cdef uint64_t k0, k1
    cdef double evicted_upto

    cdef int32_t _find(self, const Field* nonce, const Field* user, uint64_t h) noexcept
    cdef int32_t _add(self, const Field* nonce, const Field* user, uint64_t h) except -2
    cdef void _unlink(self, int32_t i) noexcept
    cdef void _append(self, int32_t i) noexcept
    cdef void _remove(self, int32_t i) noexcept
    cdef int _grow_buckets(self) except -1
    cdef int is_new(self, const Field* nonce, const Field* user, uint64_t nc, double issued,
                    double now, uint64_t window, Py_ssize_t max_entries, double ttl) except -1


cdef struct Ha1Entry:
    uint64_t hash        # 0: an empty slot
    char* key            # the user's UTF-8, then the realm's
    Py_ssize_t user_len
    Py_ssize_t realm_len
    uint32_t held        # bit 1 << ALG_MD5: md5 is set; 1 << ALG_SHA256: sha256 is
    char md5[32]         # lower-case hex HA1s
    char sha256[64]


cdef class Ha1Table:
    cdef Ha1Entry* e
    cdef uint64_t cap                    # a power of two, at least twice n
    cdef Py_ssize_t n
    cdef uint64_t k0, k1

    cdef uint64_t _hash(self, const char* u, Py_ssize_t ul, const char* r,
                        Py_ssize_t rl) noexcept
    cdef const char* find(self, const Field* user, const Field* realm, int alg) noexcept


cdef enum:
    NONCE_LEN = 43       # a nonce's base64url digits (AuthCore.nonce_into)


cdef class AuthCore:
    cdef object _realm
    cdef bint _has_realm                 # bool(_realm): realm_for needs no Python call
    cdef public object policy
    cdef object _ttl_obj
    cdef double ttl
    cdef object _algorithms
    cdef bint _one_algorithm             # len(_algorithms) == 1 (offered)
    cdef uint32_t alg_mask
    cdef object _window_obj
    cdef uint64_t window
    cdef object _max_obj
    cdef Py_ssize_t max_entries
    cdef object _secret_obj
    cdef SHA256_CTX _inner, _outer       # SHA-256 states after the HMAC key pads
    cdef bint _keyed                     # _inner and _outer are set (_secret)
    cdef bytes _dom_key                  # the last ASCII AOR domain (host_of) ...
    cdef object _dom_host                # ... and its host
    cdef bytes _own_key                  # the last ASCII AOR domain own_aor weighed ...
    cdef object _own_realm               # ... against this realm ...
    cdef bint _own_result                # ... and whether its host is the realm
    cdef object _rstr                    # the last realm and its Field
    cdef list _rkeep
    cdef Field _rfield
    cdef NonceCounts counts
    cdef Ha1Table ha1s                   # the users file's HA1s, or None (_ha1 is asked)
    cdef readonly FailureBudget failures
    cdef object _qop                     # the qop setting (a tuple of str)
    cdef object _chal_realm, _chal_offered   # the last challenge's key ...
    cdef tuple _chal_last                # ... and its parts (challenge_parts)
    cdef dict _chal_cache                # (realm, offered) -> parts

    cdef object host_of(self, const Field* aor_domain)
    cdef object realm_for(self, const Field* aor_domain)
    cdef int own_aor(self, const Field* user, object realm, const Field* aor_user,
                     const Field* aor_domain) except -1
    cdef list realm_field(self, object realm, Field* out)
    cdef int selects(self, const Cred* c, const Field* realm) noexcept
    cdef int mac16(self, const char* head, const Field* realm, unsigned char* out) except -1
    cdef int nonce_into(self, object realm, double now, char* out) except -1
    cdef object offered(self, object realm, const Field* user)
    cdef tuple challenge_parts(self, object realm, object offered)
    cdef int nonce_issued(self, const Field* nonce, const Field* realm, double* issued) except -1
    cdef int verify(self, const Cred* c, int alg, const Field* method, const Field* ruri,
                    object realm, const Field* rf, const Field* aor_user,
                    const Field* aor_domain, double now) except -1
