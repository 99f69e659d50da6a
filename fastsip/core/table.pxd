# The binding table (table.pyx): the store's memory and the registrar's API.
#
# The store only stores: AOR records in an open-addressing hash table,
# binding records in a slab, and an expiry heap.  It never decides anything
# about SIP; the registrar does (see decide.pyx).


cdef struct BindingRec:
    double expires_at
    uint64_t key_hash    # hash of the contact URI in its comparison form (RFC 3261 19.1.4)
    uint32_t gen         # bumped on every change; heap entries with an older gen are stale
    uint32_t cseq
    int32_t aor          # owning AOR slot, -1 when the slot is free
    int32_t next         # next binding of the same AOR (or next free slot), -1 ends
    int64_t reg_id       # -1: none
    int64_t conn_id      # stream connection the binding arrived on, -1: none
    int16_t q            # thousandths, -1: none
    uint8_t transport    # Transport
    uint8_t _pad
    uint16_t src_port
    # variable fields, stored one after another in `blob`
    uint16_t uri_len
    uint16_t call_id_len
    uint16_t instance_len
    uint16_t path_len
    uint16_t ua_len
    uint16_t src_host_len
    int32_t flow         # its entry in the flow index (FlowRec), -1: not a flow binding
    char* blob


cdef struct AorRec:     # 32 bytes
    uint64_t hash        # keyed table hash
    uint32_t name_at     # where its name starts in the table's `names` (name_of())
    int32_t first        # first binding slot, -1 when none
    int32_t count
    int32_t next_free
    uint16_t name_len    # at most MAX_NAME (the registrar's AORs: at most MAX_AOR)
    uint8_t dirty        # changed since the last changes() call
    uint8_t live
    uint8_t busy         # a shared store's write of it is under way (kept while empty)
    uint8_t pinned       # a shared store's empty AOR whose version is known (kept while empty)
    uint8_t unverified   # a shared store's copy read, not written here: maybe not replicated


# The flow index: conn_id -> the flow bindings of that stream connection
# (is_flow), a doubly linked list of FlowRec per connection, its head found
# through an open-addressing table of ConnBucket.  Only flow bindings have a
# FlowRec; BindingRec.flow sits in what was padding.
cdef struct FlowRec:
    int64_t conn_id
    int32_t slot         # the binding
    int32_t prev         # previous entry of the same connection, -1: the head
    int32_t next         # next entry of the same connection (of the free list when free), -1 ends


cdef struct ConnBucket:
    int64_t conn_id
    int32_t head         # first FlowRec of the connection, -1: empty bucket
    int32_t count        # its flow bindings


cdef struct HeapEntry:
    double t
    uint32_t gen
    int32_t slot


cdef enum:
    MAX_NAME = 65535     # bytes of an AOR the table holds (AorRec.name_len)


cdef enum Transport:
    T_UDP = 0
    T_TCP = 1
    T_TLS = 2
    T_SCTP = 3
    T_WS = 4
    T_WSS = 5


cdef class BindingTable:
    cdef AorRec* aors
    cdef int32_t n_aors_cap      # records made ready (free or in use); the rest of
    cdef int32_t n_aors_room     # the n_aors_room allocated is never touched (no RSS)
    cdef int32_t aor_free
    cdef char* names             # the AORs' names one after another (AorRec.name_at)
    cdef Py_ssize_t names_len    # bytes in use: live names and those of freed AORs
    cdef Py_ssize_t names_cap
    cdef Py_ssize_t names_dead   # bytes of freed AORs' names, reclaimed by _name_room
    cdef int32_t* table          # AOR slot + 1 per bucket (0 empty, -1 deleted)
    cdef Py_ssize_t table_cap
    cdef Py_ssize_t table_used   # live + deleted buckets
    cdef BindingRec* b
    cdef int32_t b_cap           # records made ready, of b_room allocated (as AORs)
    cdef int32_t b_room
    cdef int32_t b_free
    cdef HeapEntry* heap
    cdef Py_ssize_t heap_len
    cdef Py_ssize_t heap_cap
    cdef uint64_t k0, k1
    cdef readonly Py_ssize_t n_aors          # AOR records (an emptied one lingers until changes())
    cdef readonly Py_ssize_t n_live_aors     # AORs that hold at least one binding
    cdef readonly Py_ssize_t n_bindings
    cdef readonly Py_ssize_t n_expired
    cdef int32_t* dirty
    cdef Py_ssize_t n_dirty, dirty_cap
    cdef bint track_changes
    cdef uint64_t* versions      # per AOR slot, its version in a shared location (shared=True)
    cdef FlowRec* flows
    cdef int32_t flows_cap
    cdef int32_t flow_free
    cdef ConnBucket* conns
    cdef Py_ssize_t conns_cap     # a power of two
    cdef readonly Py_ssize_t n_conns          # connections that hold a flow binding
    cdef readonly Py_ssize_t n_flows          # flow bindings (in the flow index)
    cdef readonly Py_ssize_t n_flow_removed   # removed because their connection closed

    cdef uint64_t prefetch(self, const char* aor, Py_ssize_t n) noexcept
    cdef void prefetch_record(self, uint64_t h) noexcept
    cdef int32_t find(self, const char* aor, Py_ssize_t n) noexcept
    cdef int32_t find_hashed(self, const char* aor, Py_ssize_t n, uint64_t h) noexcept
    cdef int32_t find_or_add(self, const char* aor, Py_ssize_t n) except -2
    cdef int32_t add_binding(self, int32_t aor, const BindingIn* bi) except -2
    cdef int update_binding(self, int32_t slot, const BindingIn* bi) except -1
    cdef int remove_binding(self, int32_t slot) except -1
    cdef void touch(self, int32_t aor) noexcept
    cdef void binding_in(self, int32_t slot, BindingIn* out) noexcept
    cdef void release_if_empty(self, int32_t aor) noexcept
    cdef void _init_aor_slab(self, int32_t start) noexcept
    cdef int _more_aors(self) except -1
    cdef void _init_b_slab(self, int32_t start) noexcept
    cdef int _grow_table(self) except -1
    cdef int _name_room(self, Py_ssize_t n) except -1
    cdef const char* name_of(self, int32_t aor) noexcept
    cdef void _drop_aor(self, int32_t slot) noexcept
    cdef int _fill(self, BindingRec* r, const BindingIn* bi) except -1
    cdef char* _blob(self, const BindingIn* bi) except NULL
    cdef void _set(self, BindingRec* r, const BindingIn* bi, char* blob) noexcept
    cdef int32_t _link(self, int32_t aor, const BindingIn* bi, char* blob) noexcept
    cdef int _reserve(self, int32_t bindings) except -1
    cdef void _drop_expired(self, int32_t aor, double now) noexcept
    cdef void purge(self, const char* aor, Py_ssize_t n, double now) noexcept
    cdef int32_t purge_at(self, int32_t a, double now) noexcept
    cdef int view(self, const char* aor, Py_ssize_t n, double now, AorView* out) noexcept
    cdef int view_at(self, int32_t a, double now, AorView* out) noexcept
    cdef int apply(self, const char* aor, Py_ssize_t n, const Plan* p, const AorView* v,
                   double now) except -1
    cdef int32_t apply_at(self, int32_t a, const char* aor, Py_ssize_t n, const Plan* p,
                          const AorView* v, double now) except -2
    cdef int _push(self, double t, uint32_t gen, int32_t slot) except -1
    cdef void _pop(self) noexcept
    cdef int _compact_heap(self) except -1
    cdef Py_ssize_t _conn_bucket(self, int64_t conn_id) noexcept
    cdef int _reserve_flows(self, int32_t n) except -1
    cdef void _flow_link(self, int32_t slot, int64_t conn_id) noexcept
    cdef void _flow_unlink(self, int32_t slot) noexcept
    cdef Py_ssize_t close_connection(self, int64_t conn_id, double now) noexcept
    cdef bytes encode(self, int32_t a, uint64_t version, double* latest)
    cdef Py_ssize_t record_length(self, int32_t a, double* latest) noexcept
    cdef void record_into(self, int32_t a, uint64_t version, char* out) noexcept
    cdef bint is_busy(self, const char* aor, Py_ssize_t n) noexcept
    cdef uint64_t version_of(self, const char* aor, Py_ssize_t n) noexcept
    cdef bint is_unverified(self, const char* aor, Py_ssize_t n) noexcept
    cdef int end_flows(self, int32_t a, int64_t conn_id, bytes host, int port) except -1
