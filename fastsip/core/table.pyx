# The binding table: AOR -> bindings, hashed lookup, and an expiry heap.
#
# Memory layout (no Python object per binding):
#
# * AOR records live in a slab (``aors``) and are found through an
#   open-addressing hash table of slot numbers, keyed by SipHash-1-3 with a
#   random per-process key (so crafted AORs cannot pile into one bucket).
#   Their names sit one after another in one block (``names``), not in a
#   malloc each (which costs 8 bytes of header and rounds up to 16).
# * Both slabs double when full, but records are written (put on the free
#   list) only READY at a time as they are needed: the pages of the unused
#   end of a slab are never touched, so they cost no RSS.
# * Binding records live in a second slab (``b``); the bindings of one AOR are a
#   linked list through ``next``.  The variable-length fields (URI, Call-ID,
#   +sip.instance, Path, User-Agent, source host) share one malloc'd blob.
# * The expiry heap holds ``(expires_at, gen, slot)``.  A refresh pushes a new
#   entry and bumps the binding's ``gen``; popped entries whose gen no longer
#   matches are stale and skipped, so nothing is ever removed from the middle.
# * The flow index: conn_id -> the flow bindings of that stream connection
#   (``is_flow``), so that a closed connection's are removed without a scan.
#   Each flow binding has a FlowRec (its ``flow``), linked with the others of
#   its connection; a table of ConnBucket finds a connection's first one.  It is
#   kept where a binding's fields are set (``_set``) and where a binding is
#   removed (``remove_binding``): adding, refreshing, expiring, purging.
#
# The store decides nothing about SIP: the registrar (``the registrar``) does.
#

cdef extern from *:
    void __builtin_prefetch(const void* p) noexcept nogil
cdef enum:
    MIN_TABLE = 64
    MIN_CONNS = 64
    MIN_NAMES = 1024
    READY = 128          # records made ready at a time (AORs, bindings)


cdef bint invalid_host(const char* uri, Py_ssize_t n) noexcept nogil:
    """Is ``uri`` a SIP URI whose host is under the ``.invalid`` top-level domain
    (RFC 6761)?  Browsers register such contacts over WebSocket (RFC 7118 5):
    they are reachable only through the connection they came over."""
    cdef UriSpans u
    cdef Py_ssize_t err = 0, k
    if scan_sip_uri(uri, 0, n, &u, &err) != 0:
        return False
    k = u.host.length
    if k and uri[u.host.off + k - 1] == b'.':       # a fully qualified "x.invalid."
        k -= 1
    return ieq(uri + u.host.off, k, b"invalid", 7) or \
        (k > 8 and ieq(uri + u.host.off + k - 8, 8, b".invalid", 8))


cdef bint is_flow(const BindingIn* bi) noexcept nogil:
    """Does the binding ``bi`` live only as long as its stream connection?  It came
    over one (TCP, TLS, WS, WSS: a connection id), without Path (the far end is
    the UA, not an edge proxy that keeps the flow, RFC 5626 5.2), and it is an
    RFC 5626 flow (``+sip.instance`` with ``reg-id``) or its contact's host is
    under ``.invalid`` (RFC 7118 5)."""
    if bi.conn_id < 0 or bi.transport == T_UDP or bi.path_len:
        return False
    if bi.instance_len > 0 and bi.reg_id >= 0:
        return True
    return invalid_host(bi.uri, bi.uri_len)


cdef class BindingTable:
    """The memory of the store: the AOR table, the binding slab, the expiry
    heap, the change list, and the registrar's API (purge, view, apply).
    :class:`Store` adds the Python API."""

    def __cinit__(self):
        cdef Py_ssize_t i
        cdef bytes key = os.urandom(16)
        self.k0 = hash_bytes(key, 8, 1, 2)
        self.k1 = hash_bytes(key + b"k1", 10, 3, 4)
        self.n_aors_cap = self.n_aors_room = 16
        self.aors = <AorRec*>malloc(self.n_aors_cap * sizeof(AorRec))
        self.aor_free = -1
        self.table_cap = MIN_TABLE
        self.table = <int32_t*>malloc(self.table_cap * sizeof(int32_t))
        self.names_cap = MIN_NAMES
        self.names = <char*>malloc(self.names_cap)
        self.b_cap = self.b_room = 16
        self.b = <BindingRec*>malloc(self.b_cap * sizeof(BindingRec))
        self.heap_cap = 64
        self.heap = <HeapEntry*>malloc(self.heap_cap * sizeof(HeapEntry))
        self.dirty_cap = 64
        self.dirty = <int32_t*>malloc(self.dirty_cap * sizeof(int32_t))
        self.flows_cap = MAX_REQUEST_CONTACTS
        self.flows = <FlowRec*>malloc(self.flows_cap * sizeof(FlowRec))
        self.conns_cap = MIN_CONNS
        self.conns = <ConnBucket*>malloc(self.conns_cap * sizeof(ConnBucket))
        if not (self.aors and self.names and self.table and self.b and self.heap and self.dirty and
                self.flows and self.conns):
            raise MemoryError()
        self.aor_free = -1
        self.b_free = -1
        self.flow_free = -1
        self._init_aor_slab(0)
        self._init_b_slab(0)
        for i in range(self.table_cap):
            self.table[i] = 0
        for i in range(self.flows_cap - 1, -1, -1):
            self.flows[i].next = self.flow_free
            self.flow_free = <int32_t>i
        for i in range(self.conns_cap):
            self.conns[i].head = -1

    def __init__(self, *, bint track_changes=False, bint shared=False):
        """``track_changes``: remember changed AORs for :meth:`changes` (persistence).
        ``shared``: the table is a cache of a shared location (fastsip.cluster): it
        keeps each AOR's version there and a busy mark while a write of it is under
        way."""
        cdef int32_t i
        self.track_changes = track_changes
        if shared and self.versions == NULL:
            self.versions = <uint64_t*>malloc(self.n_aors_room * sizeof(uint64_t))
            if self.versions == NULL:
                raise MemoryError()
            for i in range(self.n_aors_room):
                self.versions[i] = 0

    cdef void _init_b_slab(self, int32_t start) noexcept:
        cdef int32_t i
        for i in range(self.b_cap - 1, start - 1, -1):
            self.b[i].aor = -1
            self.b[i].gen = 0
            self.b[i].flow = -1
            self.b[i].blob = NULL
            self.b[i].next = self.b_free
            self.b_free = i

    def __dealloc__(self):
        cdef int32_t i
        if self.b != NULL:
            for i in range(self.b_cap):
                if self.b[i].aor >= 0:
                    free(self.b[i].blob)
        free(self.aors)
        free(self.names)
        free(self.versions)
        free(self.table)
        free(self.b)
        free(self.heap)
        free(self.dirty)
        free(self.flows)
        free(self.conns)

    # -- the AOR table -----------------------------------------------------

    cdef uint64_t prefetch(self, const char* aor, Py_ssize_t n) noexcept:
        """The AOR's hash, for ``find_hashed``; its bucket is asked of the memory
        now, so that the work done before the lookup hides the cache miss (a new
        AOR's bucket, or any in a table larger than the cache, is not in it)."""
        cdef uint64_t h = hash_bytes(aor, n, self.k0, self.k1)
        __builtin_prefetch(&self.table[h & <uint64_t>(self.table_cap - 1)])
        return h

    cdef void prefetch_record(self, uint64_t h) noexcept:
        """The second step of ``prefetch``, once the bucket is in: the record of
        the AOR in it (the one looked for, unless another shares its bucket)."""
        cdef int32_t v = self.table[h & <uint64_t>(self.table_cap - 1)]
        if v > 0:
            __builtin_prefetch(&self.aors[v - 1])

    cdef int32_t find(self, const char* aor, Py_ssize_t n) noexcept:
        return self.find_hashed(aor, n, hash_bytes(aor, n, self.k0, self.k1))

    cdef int32_t find_hashed(self, const char* aor, Py_ssize_t n, uint64_t h) noexcept:
        """The AOR's slot, -1 when it has none; ``h``: its hash (``prefetch``)."""
        cdef Py_ssize_t mask = self.table_cap - 1, i = <Py_ssize_t>(h & mask)
        cdef int32_t v
        cdef AorRec* a
        while True:
            v = self.table[i]
            if v == 0:
                return -1
            if v > 0:
                a = &self.aors[v - 1]
                if a.hash == h and a.name_len == n and \
                        memcmp(self.names + a.name_at, aor, n) == 0:
                    return v - 1
            i = (i + 1) & mask

    cdef int _grow_table(self) except -1:
        """Rehash into a table twice the live size (this also drops tombstones)."""
        cdef Py_ssize_t cap = MIN_TABLE, i, j, mask
        cdef int32_t* t
        while cap < 4 * (self.n_aors + 1):
            cap *= 2
        t = <int32_t*>malloc(cap * sizeof(int32_t))
        if t == NULL:
            raise MemoryError()
        for i in range(cap):
            t[i] = 0
        mask = cap - 1
        for i in range(self.n_aors_cap):
            if self.aors[i].live:
                j = <Py_ssize_t>(self.aors[i].hash & mask)
                while t[j] != 0:
                    j = (j + 1) & mask
                t[j] = i + 1
        free(self.table)
        self.table = t
        self.table_cap = cap
        self.table_used = self.n_aors
        return 0

    cdef int32_t find_or_add(self, const char* aor, Py_ssize_t n) except -2:
        cdef int32_t slot = self.find(aor, n)
        cdef uint64_t h
        cdef Py_ssize_t mask, j
        cdef AorRec* a
        if slot >= 0:
            return slot
        if n > MAX_NAME:
            raise ValueError(f"AOR longer than {MAX_NAME} bytes")
        if (self.table_used + 1) * 10 > self.table_cap * 7:
            self._grow_table()
        if self.aor_free < 0:
            self._more_aors()
        self._name_room(n)
        slot = self.aor_free
        a = &self.aors[slot]
        self.aor_free = a.next_free
        a.name_at = <uint32_t>self.names_len
        a.name_len = <uint16_t>n
        memcpy(self.names + self.names_len, aor, n)
        self.names_len += n
        h = hash_bytes(aor, n, self.k0, self.k1)
        a.hash = h
        a.first = -1
        a.count = 0
        a.dirty = 0
        a.live = 1
        a.busy = 0
        a.pinned = 0
        a.unverified = 0
        if self.versions != NULL:
            self.versions[slot] = 0
        mask = self.table_cap - 1
        j = <Py_ssize_t>(h & mask)
        while self.table[j] > 0:
            j = (j + 1) & mask
        if self.table[j] == 0:
            self.table_used += 1
        self.table[j] = slot + 1
        self.n_aors += 1
        return slot

    cdef int _name_room(self, Py_ssize_t n) except -1:
        """Room for a name of ``n`` bytes at the end of ``names``.  When the
        names of freed AORs are a quarter of it, the live ones are copied into a
        new block with half as much again free (in slot order; this reads every
        AOR record, as _compact_heap reads every binding), else the block
        doubles.  So under churn the block holds 1 to 1.5 times the bytes of
        the live names (a malloc each adds 8 and rounds up to 16: 48 bytes for a
        26-byte name).  Offsets are 32 bits: the block is at most 4 GiB."""
        cdef Py_ssize_t live = self.names_len - self.names_dead, cap
        cdef char* t
        cdef int32_t i
        if self.names_len + n <= self.names_cap:
            return 0
        if 4 * self.names_dead >= self.names_len:
            cap = (live + n) * 3 // 2 + MIN_NAMES
            if cap > (<Py_ssize_t>1 << 32):
                raise MemoryError()
            t = <char*>malloc(cap)
            if t == NULL:
                raise MemoryError()
            live = 0
            for i in range(self.n_aors_cap):
                if self.aors[i].live:
                    memcpy(t + live, self.names + self.aors[i].name_at, self.aors[i].name_len)
                    self.aors[i].name_at = <uint32_t>live
                    live += self.aors[i].name_len
            free(self.names)
            self.names = t
            self.names_len = live
            self.names_dead = 0
        else:
            cap = self.names_cap
            while cap < self.names_len + n:
                cap *= 2
            if cap > (<Py_ssize_t>1 << 32):
                raise MemoryError()
            t = <char*>realloc(self.names, cap)
            if t == NULL:
                raise MemoryError()
            self.names = t
        self.names_cap = cap
        return 0

    cdef const char* name_of(self, int32_t aor) noexcept:
        """The name of the AOR slot ``aor`` (``name_len`` bytes): valid until an
        AOR is added."""
        return self.names + self.aors[aor].name_at

    cdef int _more_aors(self) except -1:
        """Make READY more AOR records ready, doubling the slab (and the
        versions) when all of it is."""
        cdef AorRec* grown
        cdef uint64_t* grown_v
        cdef int32_t i = self.n_aors_cap
        if i == self.n_aors_room:
            grown = <AorRec*>realloc(self.aors, 2 * self.n_aors_room * sizeof(AorRec))
            if grown == NULL:
                raise MemoryError()
            self.aors = grown
            if self.versions != NULL:
                grown_v = <uint64_t*>realloc(self.versions,
                                             2 * self.n_aors_room * sizeof(uint64_t))
                if grown_v == NULL:
                    raise MemoryError()
                self.versions = grown_v
            self.n_aors_room *= 2
        self.n_aors_cap = min(self.n_aors_room, i + READY)
        self._init_aor_slab(i)
        return 0

    cdef void _init_aor_slab(self, int32_t start) noexcept:
        cdef int32_t i
        for i in range(self.n_aors_cap - 1, start - 1, -1):
            self.aors[i].live = 0
            self.aors[i].next_free = self.aor_free
            self.aor_free = i

    cdef void _drop_aor(self, int32_t slot) noexcept:
        """Free an AOR record that holds no binding (its bucket becomes a tombstone)."""
        cdef AorRec* a = &self.aors[slot]
        cdef Py_ssize_t mask = self.table_cap - 1, j = <Py_ssize_t>(a.hash & mask)
        while self.table[j] != slot + 1:
            j = (j + 1) & mask
        self.table[j] = -1
        if a.name_at + a.name_len == self.names_len:
            self.names_len -= a.name_len        # the newest name: its room is free again
        else:
            self.names_dead += a.name_len
        a.live = 0
        a.next_free = self.aor_free
        self.aor_free = slot
        self.n_aors -= 1

    cdef void touch(self, int32_t aor) noexcept:
        """Remember that ``aor`` changed (for changes())."""
        cdef int32_t* grown
        if not self.track_changes or self.aors[aor].dirty:
            return
        if self.n_dirty == self.dirty_cap:
            grown = <int32_t*>realloc(self.dirty, 2 * self.dirty_cap * sizeof(int32_t))
            if grown == NULL:
                return          # keeps the old list; the AOR is flushed with the next batch
            self.dirty = grown
            self.dirty_cap *= 2
        self.aors[aor].dirty = 1
        self.dirty[self.n_dirty] = aor
        self.n_dirty += 1

    cdef void binding_in(self, int32_t slot, BindingIn* out) noexcept:
        """The stored binding ``slot`` as a BindingIn (its strings point into the
        table: valid until the binding changes)."""
        cdef BindingRec* r = &self.b[slot]
        cdef const char* p = r.blob
        out.expires_at = r.expires_at
        out.key_hash = r.key_hash
        out.cseq = r.cseq
        out.reg_id = r.reg_id
        out.conn_id = r.conn_id
        out.q = r.q
        out.transport = r.transport
        out.src_port = r.src_port
        out.uri, out.uri_len = p, r.uri_len
        p += r.uri_len
        out.call_id, out.call_id_len = p, r.call_id_len
        p += r.call_id_len
        out.instance, out.instance_len = p, r.instance_len
        p += r.instance_len
        out.path, out.path_len = p, r.path_len
        p += r.path_len
        out.ua, out.ua_len = p, r.ua_len
        p += r.ua_len
        out.src_host, out.src_host_len = p, r.src_host_len

    cdef bytes encode(self, int32_t a, uint64_t version, double* latest):
        """The bindings of the AOR slot ``a`` as one record (docs/record.md) with
        ``version``, written in C; the latest expiry among them in ``latest``."""
        cdef bytes rec = PyBytes_FromStringAndSize(NULL, self.record_length(a, latest))
        self.record_into(a, version, PyBytes_AS_STRING(rec))
        return rec

    cdef Py_ssize_t record_length(self, int32_t a, double* latest) noexcept:
        """The size of the AOR slot ``a``'s record; the latest expiry among its
        bindings in ``latest``."""
        cdef Py_ssize_t size = RECORD_HEAD
        cdef int32_t s = self.aors[a].first
        cdef BindingIn bi
        latest[0] = -INFINITY
        while s >= 0:
            self.binding_in(s, &bi)
            size += record_size(&bi)
            if bi.expires_at > latest[0]:
                latest[0] = bi.expires_at
            s = self.b[s].next
        return size

    cdef void record_into(self, int32_t a, uint64_t version, char* out) noexcept:
        """Write the AOR slot ``a``'s record with ``version`` into ``out``
        (``record_length`` bytes)."""
        cdef int32_t s = self.aors[a].first
        cdef BindingIn bi
        cdef char* p = record_put_head(out, version, <uint32_t>self.aors[a].count)
        while s >= 0:
            self.binding_in(s, &bi)
            p = record_put_binding(p, &bi)
            s = self.b[s].next

    cdef uint64_t version_of(self, const char* aor, Py_ssize_t n) noexcept:
        """The AOR's version in the shared location as the cache knows it (0: none)."""
        cdef int32_t a = self.find(aor, n)
        return self.versions[a] if a >= 0 and self.versions != NULL else 0

    cdef int end_flows(self, int32_t a, int64_t conn_id, bytes host, int port) except -1:
        """Remove from the AOR slot ``a`` the flow bindings of the stream connection
        ``conn_id`` from ``host``:``port``; returns how many went."""
        cdef int32_t s = self.aors[a].first, nxt
        cdef int n = 0
        cdef BindingRec* r
        cdef Py_ssize_t hl = len(host)
        cdef const char* h = host
        while s >= 0:
            nxt = self.b[s].next
            r = &self.b[s]
            if r.flow >= 0 and r.conn_id == conn_id and r.src_port == port and \
                    r.src_host_len == hl and memcmp(r.blob + r.uri_len + r.call_id_len +
                                                    r.instance_len + r.path_len + r.ua_len,
                                                    h, hl) == 0:
                self.remove_binding(s)
                n += 1
            s = nxt
        return n

    cdef bint is_unverified(self, const char* aor, Py_ssize_t n) noexcept:
        cdef int32_t a = self.find(aor, n)
        return a >= 0 and self.aors[a].unverified

    cdef bint is_busy(self, const char* aor, Py_ssize_t n) noexcept:
        cdef int32_t a = self.find(aor, n)
        return a >= 0 and self.aors[a].busy

    cdef void release_if_empty(self, int32_t aor) noexcept:
        cdef AorRec* a = &self.aors[aor]
        if a.live and a.count == 0 and not a.dirty and not a.busy and not a.pinned:
            self._drop_aor(aor)

    # -- bindings ------------------------------------------------------------

    cdef char* _blob(self, const BindingIn* bi) except NULL:
        """The variable fields of a binding in one malloc'd block."""
        cdef Py_ssize_t total = (bi.uri_len + bi.call_id_len + bi.instance_len + bi.path_len
                                 + bi.ua_len + bi.src_host_len)
        cdef char* blob
        cdef char* p
        if bi.uri_len > 65535 or bi.call_id_len > 65535 or bi.instance_len > 65535 or \
                bi.path_len > 65535 or bi.ua_len > 65535 or bi.src_host_len > 65535:
            raise ValueError("binding field longer than 65535 bytes")
        blob = <char*>malloc(total if total > 0 else 1)
        if blob == NULL:
            raise MemoryError()
        p = blob
        memcpy(p, bi.uri, bi.uri_len); p += bi.uri_len
        memcpy(p, bi.call_id, bi.call_id_len); p += bi.call_id_len
        memcpy(p, bi.instance, bi.instance_len); p += bi.instance_len
        memcpy(p, bi.path, bi.path_len); p += bi.path_len
        memcpy(p, bi.ua, bi.ua_len); p += bi.ua_len
        memcpy(p, bi.src_host, bi.src_host_len)
        return blob

    cdef void _set(self, BindingRec* r, const BindingIn* bi, char* blob) noexcept:
        """A binding record's fields from ``bi``, its variable part ``blob`` (owned
        now), and its place in the flow index (room reserved: ``_reserve_flows``)."""
        cdef int32_t slot = <int32_t>(r - self.b)
        cdef bint flow = is_flow(bi)
        if r.flow >= 0 and not (flow and self.flows[r.flow].conn_id == bi.conn_id):
            self._flow_unlink(slot)         # no flow binding now, or of another connection
        if flow and r.flow < 0:
            self._flow_link(slot, bi.conn_id)
        free(r.blob)
        r.blob = blob
        r.uri_len = <uint16_t>bi.uri_len
        r.call_id_len = <uint16_t>bi.call_id_len
        r.instance_len = <uint16_t>bi.instance_len
        r.path_len = <uint16_t>bi.path_len
        r.ua_len = <uint16_t>bi.ua_len
        r.src_host_len = <uint16_t>bi.src_host_len
        r.expires_at = bi.expires_at
        r.key_hash = bi.key_hash
        r.cseq = bi.cseq
        r.reg_id = bi.reg_id
        r.conn_id = bi.conn_id
        r.q = bi.q
        r.transport = bi.transport
        r.src_port = bi.src_port
        r.gen += 1

    cdef int _fill(self, BindingRec* r, const BindingIn* bi) except -1:
        self._set(r, bi, self._blob(bi))
        return 0

    cdef int _push(self, double t, uint32_t gen, int32_t slot) except -1:
        cdef HeapEntry* grown
        cdef HeapEntry e
        cdef Py_ssize_t i, parent
        if self.heap_len == self.heap_cap:
            grown = <HeapEntry*>realloc(self.heap, 2 * self.heap_cap * sizeof(HeapEntry))
            if grown == NULL:
                raise MemoryError()
            self.heap = grown
            self.heap_cap *= 2
        e.t = t
        e.gen = gen
        e.slot = slot
        i = self.heap_len
        self.heap_len += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self.heap[parent].t <= t:
                break
            self.heap[i] = self.heap[parent]
            i = parent
        self.heap[i] = e
        return 0

    cdef void _pop(self) noexcept:
        cdef HeapEntry last
        cdef Py_ssize_t i = 0, child, n
        self.heap_len -= 1
        n = self.heap_len
        if n == 0:
            return
        last = self.heap[n]
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and self.heap[child + 1].t < self.heap[child].t:
                child += 1
            if self.heap[child].t >= last.t:
                break
            self.heap[i] = self.heap[child]
            i = child
        self.heap[i] = last

    cdef int _compact_heap(self) except -1:
        """Rebuild the heap from live bindings when stale entries dominate it."""
        cdef int32_t i
        self.heap_len = 0
        for i in range(self.b_cap):
            if self.b[i].aor >= 0:
                self._push(self.b[i].expires_at, self.b[i].gen, i)
        return 0

    cdef int _reserve(self, int32_t bindings) except -1:
        """Room for ``bindings`` more binding records and heap entries, so that
        adding them cannot fail."""
        cdef BindingRec* grown
        cdef HeapEntry* heap
        cdef int32_t i
        while self.b_cap - self.n_bindings < bindings:
            if self.b_cap == self.b_room:
                grown = <BindingRec*>realloc(self.b, 2 * self.b_room * sizeof(BindingRec))
                if grown == NULL:
                    raise MemoryError()
                self.b = grown
                self.b_room *= 2
            i = self.b_cap
            self.b_cap = min(self.b_room, i + READY)
            self._init_b_slab(i)
        while self.heap_cap - self.heap_len < bindings:
            heap = <HeapEntry*>realloc(self.heap, 2 * self.heap_cap * sizeof(HeapEntry))
            if heap == NULL:
                raise MemoryError()
            self.heap = heap
            self.heap_cap *= 2
        self._reserve_flows(bindings)
        return 0

    cdef int32_t _link(self, int32_t aor, const BindingIn* bi, char* blob) noexcept:
        """A new binding at the tail of ``aor``'s list (room reserved)."""
        cdef int32_t slot = self.b_free, tail
        cdef BindingRec* r = &self.b[slot]
        self.b_free = r.next
        r.blob = NULL
        self._set(r, bi, blob)
        r.aor = aor
        r.next = -1
        # at the tail: the AOR's bindings stay in registration order
        tail = self.aors[aor].first
        if tail < 0:
            self.aors[aor].first = slot
        else:
            while self.b[tail].next >= 0:
                tail = self.b[tail].next
            self.b[tail].next = slot
        self.aors[aor].count += 1
        if self.aors[aor].count == 1:
            self.n_live_aors += 1
        self.n_bindings += 1
        self._push(r.expires_at, r.gen, slot)
        self.touch(aor)
        return slot

    cdef int32_t add_binding(self, int32_t aor, const BindingIn* bi) except -2:
        cdef char* blob = self._blob(bi)
        cdef int32_t slot
        try:
            self._reserve(1)
        except MemoryError:
            free(blob)
            raise
        slot = self._link(aor, bi, blob)
        if self.heap_len > 2 * self.n_bindings + 1024:
            self._compact_heap()
        return slot

    cdef int update_binding(self, int32_t slot, const BindingIn* bi) except -1:
        cdef BindingRec* r = &self.b[slot]
        self._reserve_flows(1)
        self._fill(r, bi)
        self._push(r.expires_at, r.gen, slot)
        if self.heap_len > 2 * self.n_bindings + 1024:
            self._compact_heap()
        self.touch(r.aor)
        return 0

    cdef int remove_binding(self, int32_t slot) except -1:
        cdef BindingRec* r = &self.b[slot]
        cdef int32_t aor = r.aor, p
        p = self.aors[aor].first
        if p == slot:
            self.aors[aor].first = r.next
        else:
            while self.b[p].next != slot:
                p = self.b[p].next
            self.b[p].next = r.next
        self.aors[aor].count -= 1
        if self.aors[aor].count == 0:
            self.n_live_aors -= 1
        self.n_bindings -= 1
        if r.flow >= 0:
            self._flow_unlink(slot)
        free(r.blob)
        r.blob = NULL
        r.gen += 1
        r.aor = -1
        r.next = self.b_free
        self.b_free = slot
        self.touch(aor)
        return 0

    # -- the flow index ------------------------------------------------------

    cdef Py_ssize_t _conn_bucket(self, int64_t conn_id) noexcept:
        """The bucket of ``conn_id``, or the empty one where it would go."""
        cdef Py_ssize_t mask = self.conns_cap - 1
        cdef Py_ssize_t i = <Py_ssize_t>(_mix(<uint64_t>conn_id) & <uint64_t>mask)
        while self.conns[i].head >= 0 and self.conns[i].conn_id != conn_id:
            i = (i + 1) & mask
        return i

    cdef int _reserve_flows(self, int32_t n) except -1:
        """Room for ``n`` more flow bindings, all of one connection (the bindings
        one request writes), so that indexing them cannot fail."""
        cdef FlowRec* grown
        cdef ConnBucket* old = self.conns
        cdef ConnBucket* t
        cdef Py_ssize_t old_cap = self.conns_cap, cap = old_cap, i, j, mask
        cdef int32_t k
        while self.flows_cap - self.n_flows < n:
            grown = <FlowRec*>realloc(self.flows, 2 * self.flows_cap * sizeof(FlowRec))
            if grown == NULL:
                raise MemoryError()
            self.flows = grown
            for k in range(2 * self.flows_cap - 1, self.flows_cap - 1, -1):
                self.flows[k].next = self.flow_free
                self.flow_free = k
            self.flows_cap *= 2
        # at most half full, with one more connection
        while 2 * (self.n_conns + 1) > cap:
            cap *= 2
        if cap == old_cap:
            return 0
        t = <ConnBucket*>malloc(cap * sizeof(ConnBucket))
        if t == NULL:
            raise MemoryError()
        for i in range(cap):
            t[i].head = -1
        self.conns = t
        self.conns_cap = cap
        mask = cap - 1
        for i in range(old_cap):
            if old[i].head >= 0:
                j = <Py_ssize_t>(_mix(<uint64_t>old[i].conn_id) & <uint64_t>mask)
                while t[j].head >= 0:
                    j = (j + 1) & mask
                t[j] = old[i]
        free(old)
        return 0

    cdef void _flow_link(self, int32_t slot, int64_t conn_id) noexcept:
        """Index the binding ``slot`` as a flow binding of ``conn_id`` (room reserved)."""
        cdef int32_t f = self.flow_free
        cdef Py_ssize_t i = self._conn_bucket(conn_id)
        cdef ConnBucket* c = &self.conns[i]
        self.flow_free = self.flows[f].next
        if c.head < 0:
            c.conn_id = conn_id
            c.count = 0
            self.n_conns += 1
        else:
            self.flows[c.head].prev = f
        self.flows[f].conn_id = conn_id
        self.flows[f].slot = slot
        self.flows[f].prev = -1
        self.flows[f].next = c.head
        c.head = f
        c.count += 1
        self.b[slot].flow = f
        self.n_flows += 1

    cdef void _flow_unlink(self, int32_t slot) noexcept:
        """Take the binding ``slot`` out of the flow index.  A connection left
        with none loses its bucket (the entries after it shift back, so the
        table has no tombstones)."""
        cdef int32_t f = self.b[slot].flow
        cdef FlowRec* e = &self.flows[f]
        cdef Py_ssize_t i = self._conn_bucket(e.conn_id), j, home, mask = self.conns_cap - 1
        if e.prev >= 0:
            self.flows[e.prev].next = e.next
        else:
            self.conns[i].head = e.next
        if e.next >= 0:
            self.flows[e.next].prev = e.prev
        self.conns[i].count -= 1
        e.next = self.flow_free
        self.flow_free = f
        self.b[slot].flow = -1
        self.n_flows -= 1
        if self.conns[i].head >= 0:
            return
        self.n_conns -= 1
        j = i
        while True:                 # backward-shift deletion (linear probing)
            j = (j + 1) & mask
            if self.conns[j].head < 0:
                break
            home = <Py_ssize_t>(_mix(<uint64_t>self.conns[j].conn_id) & <uint64_t>mask)
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                self.conns[i] = self.conns[j]
                i = j
        self.conns[i].head = -1

    cdef Py_ssize_t close_connection(self, int64_t conn_id, double now) noexcept:
        """Remove the flow bindings of the stream connection ``conn_id`` (it
        closed), whatever AORs they belong to; AORs left empty are released
        like expiry releases them.  Costs O(its flow bindings).  Returns how
        many were valid at ``now``; those that had lapsed are counted as
        expired."""
        cdef Py_ssize_t i = self._conn_bucket(conn_id), removed = 0
        cdef int32_t f, nxt, slot, aor
        if self.conns[i].head < 0:
            return 0
        f = self.conns[i].head
        while f >= 0:
            nxt = self.flows[f].next
            slot = self.flows[f].slot
            aor = self.b[slot].aor
            if self.b[slot].expires_at > now:
                removed += 1
            else:
                self.n_expired += 1
            self.remove_binding(slot)       # unlinks f; the entries after it stay put
            self.release_if_empty(aor)
            f = nxt
        self.n_flow_removed += removed
        return removed

    # -- the registrar's API: a read view, and applying a plan ---------------

    cdef void _drop_expired(self, int32_t aor, double now) noexcept:
        """Remove ``aor``'s bindings that expired at ``now`` (the heap would later)."""
        cdef int32_t slot = self.aors[aor].first, nxt
        while slot >= 0:
            nxt = self.b[slot].next
            if self.b[slot].expires_at <= now:
                self.remove_binding(slot)
                self.n_expired += 1
            slot = nxt

    cdef void purge(self, const char* aor, Py_ssize_t n, double now) noexcept:
        """Drop ``aor``'s bindings that expired at ``now``, and the AOR when none is left."""
        self.purge_at(self.find(aor, n), now)

    cdef int32_t purge_at(self, int32_t a, double now) noexcept:
        """``purge`` of the AOR in slot ``a`` (-1: none); returns its slot, or -1
        when it held nothing more and went."""
        if a < 0:
            return -1
        self._drop_expired(a, now)
        self.release_if_empty(a)
        return a if self.aors[a].live else -1

    cdef int view(self, const char* aor, Py_ssize_t n, double now, AorView* out) noexcept:
        """The bindings of ``aor`` valid at ``now`` (at most MAX_LISTED), in
        registration order, as pointers into the store: valid until it changes."""
        return self.view_at(self.find(aor, n), now, out)

    cdef int view_at(self, int32_t a, double now, AorView* out) noexcept:
        """``view`` of the AOR in slot ``a`` (-1: none, an empty view)."""
        cdef int32_t slot
        cdef BindingRec* r
        cdef BindingView* b
        out.n = 0
        if a < 0:
            return 0
        slot = self.aors[a].first
        while slot >= 0 and out.n < MAX_LISTED:
            r = &self.b[slot]
            if r.expires_at > now:
                b = &out.b[out.n]
                b.id = slot
                b.expires_at = r.expires_at
                b.key_hash = r.key_hash
                b.cseq = r.cseq
                b.reg_id = r.reg_id
                b.q = r.q
                b.uri = r.blob
                b.uri_len = r.uri_len
                b.call_id = r.blob + r.uri_len
                b.call_id_len = r.call_id_len
                b.instance = r.blob + r.uri_len + r.call_id_len
                b.instance_len = r.instance_len
                out.n += 1
            slot = r.next
        return 0

    cdef int apply(self, const char* aor, Py_ssize_t n, const Plan* p, const AorView* v,
                   double now) except -1:
        """Apply a plan decided on the view ``v`` of ``aor`` (taken at ``now``, the
        store unchanged since), all or nothing: what can fail (memory, a field
        too long) happens before the first change.  Bindings of the AOR that
        expired by ``now`` are dropped too."""
        self.apply_at(self.find(aor, n), aor, n, p, v, now)
        return 0

    cdef int32_t apply_at(self, int32_t a, const char* aor, Py_ssize_t n, const Plan* p,
                          const AorView* v, double now) except -2:
        """``apply`` to the AOR ``aor`` found in slot ``a`` (-1: not in the store; it
        is added if the plan adds a binding); returns its slot after, -1 if none."""
        cdef int i, nwrite = 0
        cdef int32_t slot
        cdef const Change* ch
        cdef char* blobs[MAX_REQUEST_CONTACTS]
        if p.retransmission:
            return a
        for i in range(p.nchanges):
            if p.changes[i].action != A_REMOVE:
                nwrite += 1
        if nwrite:
            if a < 0:
                a = self.find_or_add(aor, n)
            try:
                self._reserve(nwrite)
                for i in range(p.nchanges):
                    blobs[i] = NULL
                for i in range(p.nchanges):
                    if p.changes[i].action != A_REMOVE:
                        blobs[i] = self._blob(&p.changes[i].b)
            except BaseException:
                for i in range(p.nchanges):
                    free(blobs[i])
                self.release_if_empty(a)
                raise
        if a < 0:
            return -1
        # from here on nothing fails
        self._drop_expired(a, now)
        if p.remove_all:
            for i in range(v.n):
                self.remove_binding(v.b[i].id)
        for i in range(p.nchanges):
            ch = &p.changes[i]
            if ch.action == A_REMOVE:
                self.remove_binding(v.b[ch.target].id)
            elif ch.action == A_UPDATE:
                slot = v.b[ch.target].id
                self._set(&self.b[slot], &ch.b, blobs[i])
                self._push(self.b[slot].expires_at, self.b[slot].gen, slot)
                self.touch(a)
            else:
                self._link(a, &ch.b, blobs[i])
        if self.heap_len > 2 * self.n_bindings + 1024:
            self._compact_heap()
        self.release_if_empty(a)
        return a if self.aors[a].live else -1
