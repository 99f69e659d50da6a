# The registrar (registrar.pyx).  Declared here so that the server's compiled
# loop (fastsip/server/_io_c.pyx) can cimport RegistrarCore and call serve_c,
# the C entry of serve_shard: a receive buffer and a source host in, the reply
# in the writer's buffer out, no Python object per datagram.

# What serve_c (and the steps under it) return besides a reply's length (> 0).
cdef enum:
    SV_NONE = 0           # no reply (a response, an ACK, input no reply can address)
    SV_STAGED = -1        # shared mode: the write is staged (STAGED)
    SV_WAIT = -2          # shared mode: the AOR has a write under way (WAIT)
    SV_READ = -3          # shared mode: the AOR must be read first (READ)
    SV_ERROR = -4         # an exception is set
    SV_SHARD = -16        # SV_SHARD - k: the request belongs to shard k (nshards <= 2**16)


cdef class RegistrarCore:
    cdef readonly Store store
    cdef readonly int min_expires, max_expires, default_expires, max_contacts
    cdef readonly object domains           # frozenset of lower-case str, or None for any
    cdef tuple _exact                      # bytes
    cdef tuple _suffixes                   # bytes like b".example.com"
    cdef frozenset _addresses              # bytes, lower-case
    cdef object _authorize_obj
    cdef AuthCore _auth_core               # the same object, when its check is AuthCore's
    cdef FailureBudget _budget             # its failure budget, or None
    cdef bint _c_challenge                 # _auth_core's challenges are AuthCore's: 401s in C
    cdef readonly dict auth_failures       # reason -> failed digest attempts
    cdef readonly bint redirect            # other requests to a served AOR get 302 (_redirect)
    cdef object _knows                     # authorize.knows(user, domain): the user list, or None
    cdef readonly double last_now
    cdef int aor_form                      # AOR_HOST or AOR_USER (canonical_aor)
    cdef Settings settings
    cdef Limits lim
    cdef ReplyWriter writer
    cdef RegisterIn reg                    # the REGISTER being decided
    cdef AorView before                    # its AOR's bindings, decided on
    cdef AorView after                     # ... and after the plan was applied
    cdef AorView located                   # a redirected request's AOR's bindings (_location)
    cdef Plan plan
    # counters (the writer counts replies by status)
    cdef uint64_t register_count
    cdef dict other_requests               # method -> count, for all but REGISTER
    cdef readonly Py_ssize_t parse_errors
    cdef readonly uint64_t full_refusals   # 503 for max_bindings
    cdef readonly bint shared              # the store caches a shared location (fastsip.cluster)
    cdef bint _trusted                     # serve_again: authentication already passed
    # shared: the write a REGISTER waits for (_stage; ``staged`` is its Python form), kept
    # in C so that the server's loop queues it without a Python object (fastsip/server)
    cdef char staged_aor[MAX_AOR + 1]
    cdef Py_ssize_t staged_aor_len
    cdef uint64_t staged_expected          # the version decided against (0: no key)
    cdef uint64_t staged_version           # the version it writes
    cdef double staged_latest              # its latest binding's expiry
    cdef int32_t staged_slot               # the AOR's slot in the store, whose record it writes
    cdef Py_ssize_t staged_record_len      # that record's length; -1: none, the key goes
    cdef Py_ssize_t staged_reply           # the reply's length in the writer's buffer; 0: none
    cdef readonly object waiting_aor       # shared: the busy AOR a REGISTER waits on (WAIT)
    cdef dict redirects                    # outcome -> count, for requests redirect answers
    cdef uint64_t redirects_truncated      # 302s that left contacts out (MAX_DATAGRAM)

    # the C entry of serve_shard (for the server's loop)
    cdef Py_ssize_t serve_c(self, const char* buf, Py_ssize_t n, const char* host,
                            Py_ssize_t host_len, int port, double now, uint8_t transport,
                            int64_t conn_id, int shard, int nshards,
                            const char** reply) except SV_ERROR
    cdef object _result(self, Py_ssize_t r)
    cdef Py_ssize_t _serve(self, const char* buf, Py_ssize_t size, const char* src_host,
                           Py_ssize_t host_len, int src_port, double now, uint8_t transport,
                           int64_t conn_id, int shard, int nshards) except SV_ERROR

    cdef bint _serves(self, const char* host, Py_ssize_t n)
    cdef Py_ssize_t _refuse(self, const Req* rq, int refusal, object headers=*) except SV_ERROR
    cdef Py_ssize_t _malformed(self, const Req* rq, int rc) except SV_ERROR
    cpdef object handle(self, bytes data, tuple source, double now, str transport=*,
                        int64_t conn_id=*)
    cdef Py_ssize_t _register(self, Req* rq, int rc) except SV_ERROR
    cdef Py_ssize_t _stage(self, int32_t a, const char* aor, Py_ssize_t aor_len,
                           uint64_t expected, double now, Py_ssize_t reply) except SV_ERROR
    cdef const char* staged_reply_bytes(self) noexcept
    cdef void staged_record_into(self, char* out) noexcept
    cdef Py_ssize_t _authenticate(self, const Req* rq) except SV_ERROR
    cdef Py_ssize_t _challenge(self, AuthCore core, const Req* rq, object realm, bint stale,
                               const Field* aor_user) except SV_ERROR
    cdef void _failed(self, str label)
    cdef int _verify(self, AuthCore core, const Req* rq, object realm, const Field* aor_user,
                     const Field* aor_domain) except -1
    cdef object _authorize_parsed(self, const Req* rq, aor_user, aor_domain)
    cpdef object serve(self, bytes data, tuple source, double now, str transport=*,
                       int64_t conn_id=*)
    cdef Py_ssize_t _redirect(self, Req* rq, str method) except SV_ERROR
    cdef int _location(self, const char* aor, Py_ssize_t n, double now, AorView* out) except -1
    cdef void _redirected(self, str outcome)
