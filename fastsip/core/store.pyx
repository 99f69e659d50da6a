# The store callers use: Store (the binding table's Python API) and Binding,
# one binding as a Python object (made only when asked for).

TRANSPORTS = ("udp", "tcp", "tls", "sctp", "ws", "wss")
_TRANSPORT_CODE = {name: i for i, name in enumerate(TRANSPORTS)}


def transport_code(str name):
    """The store's number for a transport name (case-insensitive); ValueError if unknown."""
    try:
        return _TRANSPORT_CODE[name.lower()]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}") from None


cdef bytes _b(text):
    """str -> UTF-8 bytes as received (surrogateescape); a lone surrogate that is
    no escaped byte still encodes (surrogatepass) instead of raising."""
    if not isinstance(text, str):
        return bytes(text)
    try:
        return (<str>text).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return (<str>text).encode("utf-8", "surrogatepass")


cdef inline str _s(const char* p, Py_ssize_t n):
    return p[:n].decode("utf-8", "surrogateescape")


@cython.final
@cython.freelist(32)
cdef class Binding:
    """One contact bound to an AOR.

    ``uri`` contact URI; ``expires_at`` absolute wall-clock time (s);
    ``q`` float or None; ``call_id``/``cseq`` of the REGISTER that set it;
    ``source`` (host, port) and ``transport`` it came from (for NAT traversal),
    ``conn_id`` the stream connection (-1 for none); ``path`` tuple of Path
    entries (RFC 3327); ``instance``/``reg_id`` (RFC 5626); ``user_agent``.
    """

    cdef readonly str uri, call_id, transport
    cdef readonly double expires_at
    cdef readonly object q, source, path, instance, reg_id, user_agent
    cdef readonly uint32_t cseq
    cdef readonly int64_t conn_id

    def __init__(self, uri, expires_at, q=None, call_id="", cseq=0, source=("", 0),
                 transport="udp", conn_id=-1, path=(), instance=None, reg_id=None,
                 user_agent=None):
        transport_code(transport)
        if q is not None and not 0.0 <= q <= 1.0:
            raise ValueError("q must be between 0 and 1")
        self.uri = uri
        self.expires_at = expires_at
        self.q = q
        self.call_id = call_id
        self.cseq = cseq
        self.source = (source[0], int(source[1]))
        self.transport = transport.lower()
        self.conn_id = conn_id
        self.path = tuple(path)
        self.instance = instance
        self.reg_id = reg_id
        self.user_agent = user_agent

    def expires_in(self, now):
        """Whole seconds left at ``now`` (0 when due)."""
        left = self.expires_at - now
        return int(left) if left > 0 else 0

    def as_dict(self):
        return dict(uri=self.uri, expires_at=self.expires_at, q=self.q, call_id=self.call_id,
                    cseq=self.cseq, source=list(self.source), transport=self.transport,
                    conn_id=self.conn_id, path=list(self.path), instance=self.instance,
                    reg_id=self.reg_id, user_agent=self.user_agent)

    def __eq__(self, other):
        if not isinstance(other, Binding):
            return NotImplemented
        return self.as_dict() == (<Binding>other).as_dict()

    def __repr__(self):
        return f"<Binding {self.uri} expires_at={self.expires_at:.0f}>"


cdef Binding binding_from_in(const BindingIn* b):
    """A :class:`Binding` of the fields ``b`` points to (the one place a stored
    or recorded binding becomes a Python object)."""
    cdef Binding out = Binding.__new__(Binding)
    out.uri = _s(b.uri, b.uri_len)
    out.call_id = _s(b.call_id, b.call_id_len)
    out.instance = _s(b.instance, b.instance_len) if b.instance_len else None
    out.path = tuple(_s(b.path, b.path_len).split("\n")) if b.path_len else ()
    out.user_agent = _s(b.ua, b.ua_len) if b.ua_len else None
    out.source = (_s(b.src_host, b.src_host_len), b.src_port)
    out.expires_at = b.expires_at
    out.q = None if b.q < 0 else b.q / 1000.0
    out.cseq = b.cseq
    out.transport = TRANSPORTS[b.transport]
    out.conn_id = b.conn_id
    out.reg_id = None if b.reg_id < 0 else b.reg_id
    return out


cdef int binding_in_of(Binding bd, BindingIn* bi, list keep) except -1:
    """Point ``bi`` at the fields of ``bd`` (UTF-8 bytes kept alive in ``keep``);
    ``key_hash`` is left 0."""
    cdef bytes uri = _b(bd.uri), call_id = _b(bd.call_id), instance = _b(bd.instance or "")
    cdef bytes path = _b("\n".join(bd.path)), ua = _b(bd.user_agent or "")
    cdef bytes host = _b(bd.source[0])
    keep.extend((uri, call_id, instance, path, ua, host))
    bi.expires_at = bd.expires_at
    bi.key_hash = 0
    bi.cseq = bd.cseq
    bi.reg_id = -1 if bd.reg_id is None else bd.reg_id
    bi.conn_id = bd.conn_id
    bi.q = -1 if bd.q is None else <int16_t>(bd.q * 1000 + 0.5)
    bi.transport = transport_code(bd.transport)
    bi.src_port = bd.source[1]
    bi.uri, bi.uri_len = uri, len(uri)
    bi.call_id, bi.call_id_len = call_id, len(call_id)
    bi.instance, bi.instance_len = instance, len(instance)
    bi.path, bi.path_len = path, len(path)
    bi.ua, bi.ua_len = ua, len(ua)
    bi.src_host, bi.src_host_len = host, len(host)
    return 0


cdef uint64_t record_version(bytes record) except? 0:
    """The AOR version in a record's head (docs/record.md)."""
    cdef uint64_t version
    cdef uint32_t count
    if record_head(PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record), &version, &count) < 0:
        raise ValueError("bad record (byte 0): shorter than its head")
    return version


cdef class Store(BindingTable):
    """AOR -> bindings.  Python callers use lookup/bindings/changes/load/
    remove_aor/expire; the registrar uses the table's cdef API."""

    cdef object make_binding(self, int32_t slot):
        cdef BindingIn bi
        self.binding_in(slot, &bi)
        return binding_from_in(&bi)

    # -- Python API ----------------------------------------------------------

    def __len__(self):
        return self.n_bindings

    cdef int32_t _find_str(self, aor) except -2:
        cdef bytes key = _b(aor)
        return self.find(key, len(key))

    def lookup(self, aor, double now=float("-inf")):
        """The bindings of ``aor`` still valid at ``now``, in registration order."""
        cdef int32_t a = self._find_str(aor), s
        out = []
        if a < 0:
            return out
        s = self.aors[a].first
        while s >= 0:
            if self.b[s].expires_at > now:
                out.append(self.make_binding(s))
            s = self.b[s].next
        return out

    def bindings(self, double now=float("-inf")):
        """Every (aor, Binding) valid at ``now``."""
        cdef int32_t i, s
        out = []
        for i in range(self.n_aors_cap):
            if self.aors[i].live:
                aor = _s(self.name_of(i), self.aors[i].name_len)
                s = self.aors[i].first
                while s >= 0:
                    if self.b[s].expires_at > now:
                        out.append((aor, self.make_binding(s)))
                    s = self.b[s].next
        return out

    def aor_names(self):
        """Every AOR that holds a binding."""
        cdef int32_t i
        return [_s(self.name_of(i), self.aors[i].name_len)
                for i in range(self.n_aors_cap) if self.aors[i].live and self.aors[i].count]

    def changes(self):
        """AORs changed since the last call (of this or :meth:`change_records`),
        each with its current bindings as :class:`Binding` objects (an empty
        list: the AOR has none left).  Needs track_changes=True."""
        cdef Py_ssize_t k
        cdef int32_t a, s
        out = []
        for k in range(self.n_dirty):
            a = self.dirty[k]
            rows = []
            s = self.aors[a].first
            while s >= 0:
                rows.append(self.make_binding(s))
                s = self.b[s].next
            out.append((_s(self.name_of(a), self.aors[a].name_len), rows))
        self._drain()
        return out

    @property
    def n_changed(self):
        """AORs changed since the last call of :meth:`changes` or :meth:`change_records`
        (or written by the state file's writer in C)."""
        return self.n_dirty

    def change_records(self):
        """The change feed: the AORs changed since the last call (of this or
        :meth:`changes`), each as ``(aor, record, expires_at)``: its bindings as
        one record (docs/record.md, AOR version 0) written in C, with no Python
        object per binding, and the latest expiry among them.  An AOR left
        with no binding gives ``(aor, None, 0.0)``.  Needs track_changes=True."""
        cdef Py_ssize_t k
        cdef int32_t a
        cdef double latest
        cdef list out = []
        for k in range(self.n_dirty):
            a = self.dirty[k]
            name = _s(self.name_of(a), self.aors[a].name_len)
            if self.aors[a].count == 0:
                out.append((name, None, 0.0))
                continue
            out.append((name, self.encode(a, 0, &latest), latest))
        self._drain()
        return out

    cdef void _drain(self) noexcept:
        """Forget the changed AORs (they were handed out): AORs left empty go."""
        self.drain_head(self.n_dirty)

    cdef void drain_head(self, Py_ssize_t n) noexcept:
        """Forget the first ``n`` changed AORs (they were written): AORs left
        empty go; the later changes stay, in order."""
        cdef Py_ssize_t k
        cdef int32_t a
        if n > self.n_dirty:
            n = self.n_dirty
        for k in range(n):
            a = self.dirty[k]
            self.aors[a].dirty = 0
            self.release_if_empty(a)
        self.n_dirty -= n
        if self.n_dirty:
            memmove(self.dirty, self.dirty + n, self.n_dirty * sizeof(int32_t))

    def clear_changes(self):
        """Forget the changed AORs without reading them (e.g. what was just
        loaded from where it is stored); returns how many there were."""
        cdef Py_ssize_t n = self.n_dirty
        self._drain()
        return n

    def mark_changed(self, aor):
        """Count ``aor`` as changed (it is in the next :meth:`changes` or
        :meth:`change_records`), e.g. to have its stored copy rewritten.  False
        when the store has no such AOR or does not track changes."""
        cdef int32_t a = self._find_str(aor)
        if a < 0 or not self.track_changes:
            return False
        self.touch(a)
        return True

    cdef int _load_in(self, int32_t a, const BindingIn* bi, object drop_flows) except -1:
        """Add ``bi`` (its key_hash set) to the AOR ``a``, replacing the binding
        with the same contact URI: 1, or 0 when it is a flow binding that
        ``drop_flows`` says is gone (see :meth:`load`)."""
        cdef int32_t s
        if drop_flows is not False and is_flow(bi) and (
                drop_flows is True or drop_flows(bi.conn_id)):
            return 0
        s = self.aors[a].first
        while s >= 0 and self.b[s].key_hash != bi.key_hash:
            s = self.b[s].next
        if s >= 0:
            self.update_binding(s, bi)
        else:
            self.add_binding(a, bi)
        return 1

    def load(self, aor, bindings, *, drop_flows=False):
        """Add bindings to ``aor`` as they are (bulk load at start-up).  A binding
        with the same contact URI as one already there replaces it.  Flow
        bindings (those that live only as long as their stream connection, see
        :meth:`connection_closed`) whose connection is gone are not loaded:
        ``drop_flows`` True says every connection is gone (as after a restart),
        a callable ``gone(conn_id) -> bool`` says which.  Returns how many
        bindings were loaded."""
        cdef bytes key = _b(aor)
        cdef int32_t a = self.find_or_add(key, len(key))
        cdef BindingIn bi
        cdef list keep
        cdef Py_ssize_t loaded = 0
        try:
            for bd in bindings:
                keep = []
                binding_in_of(bd, &bi, keep)
                bi.key_hash = uri_key_hash(bi.uri, 0, bi.uri_len)
                loaded += self._load_in(a, &bi, drop_flows)
        finally:
            self.release_if_empty(a)     # a bad Binding must not leave an empty AOR behind
        return loaded

    def load_record(self, aor, record, double now=float("-inf"), *, drop_flows=False):
        """Load ``record`` (docs/record.md, as :meth:`change_records` writes it)
        into ``aor``, read in C: no Python object per binding.  Bindings expired
        at ``now`` are skipped; a binding with the same contact URI as one
        already there replaces it; flow bindings whose connection is gone are
        left out (``drop_flows``, as for :meth:`load`).  The record is checked
        whole first: one that does not read raises ValueError, naming the byte,
        and loads nothing.  Returns (bindings loaded, flow bindings left out)."""
        cdef bytes data = record if type(record) is bytes else bytes(record)
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos, err_pos = 0, code
        cdef Py_ssize_t loaded = 0, dropped = 0
        cdef uint64_t version
        cdef uint32_t count = 0, i
        cdef BindingIn bi
        cdef bytes key
        cdef int32_t a
        code = record_check(p, n, &count, &err_pos)
        if code < 0:
            raise record_error(code, err_pos)
        key = _b(aor)
        a = self.find_or_add(key, len(key))
        pos = record_head(p, n, &version, &count)
        try:
            for i in range(count):
                pos = record_next(p, pos, n, &bi)
                if bi.expires_at <= now:
                    continue
                bi.key_hash = uri_key_hash(bi.uri, 0, bi.uri_len)
                if self._load_in(a, &bi, drop_flows):
                    loaded += 1
                else:
                    dropped += 1
        finally:
            self.release_if_empty(a)
        return loaded, dropped

    def remove_aor(self, aor, contact=None):
        """Remove every binding of ``aor`` (or only the one whose URI equals
        ``contact`` by RFC 3261 comparison); returns how many went."""
        cdef int32_t a = self._find_str(aor), s, nxt
        cdef uint64_t key = 0
        cdef int n = 0
        cdef bytes c
        if a < 0:
            return 0
        if contact is not None:
            c = _b(contact)
            key = uri_key_hash(c, 0, len(c))
        s = self.aors[a].first
        while s >= 0:
            nxt = self.b[s].next
            if contact is None or self.b[s].key_hash == key:
                self.remove_binding(s)
                n += 1
            s = nxt
        self.release_if_empty(a)
        return n

    # -- a cache of a shared location (shared=True, fastsip.cluster) -----------

    def cache_version(self, aor):
        """The version of ``aor`` in the shared location as this cache knows
        it; 0 when it holds no copy (0 is never a stored version)."""
        cdef int32_t a = self._find_str(aor)
        return 0 if a < 0 or self.versions == NULL else self.versions[a]

    def cache_put(self, aor, record, double now):
        """Make this cache's copy of ``aor`` what ``record`` says (as read from
        the shared location; None: the key is absent): its bindings valid at
        ``now`` and its version, kept even when none is valid (or there is no
        key: version 0), so that the next request is decided on it and the
        next write expects that version.  Ends a write under way (busy)."""
        cdef int32_t a
        self._unmark(aor)
        self.remove_aor(aor)
        if record is not None:
            self.load_record(aor, record, now)
        key = _b(aor)
        a = self.find_or_add(key, len(key))
        self.versions[a] = 0 if record is None else record_version(record)
        self.aors[a].pinned = self.aors[a].count == 0
        self.aors[a].unverified = 1

    def cache_drop(self, aor):
        """Forget this cache's copy of ``aor`` (invalidated, or a write of it
        failed): the next request reads it again.  Ends a write under way."""
        self._unmark(aor)
        self.remove_aor(aor)

    def cache_done(self, aor):
        """The write of ``aor`` staged by the registrar is acknowledged (a
        replica took it): the copy here is the stored one, and safe."""
        cdef bytes key = _b(aor)
        self.done_c(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))

    cdef void done_c(self, const char* aor, Py_ssize_t n) noexcept:
        """``cache_done`` in C (the server's queue of staged writes, fastsip/server)."""
        cdef int32_t a = self.find(aor, n)
        if a >= 0:
            self.aors[a].busy = 0
            self.aors[a].pinned = 0
            self.aors[a].unverified = 0
            self.release_if_empty(a)

    def cache_busy(self, aor):
        """Is a write of ``aor`` under way?"""
        cdef int32_t a = self._find_str(aor)
        return a >= 0 and self.aors[a].busy != 0

    def cache_clear(self):
        """Forget every copy that no write is under way for (the invalidations
        that keep them true were lost with a connection); returns how many AORs
        went."""
        cdef int32_t i
        cdef Py_ssize_t n = 0
        for i in range(self.n_aors_cap):
            if self.aors[i].live and not self.aors[i].busy:
                self.aors[i].pinned = 0
                self.cache_drop(_s(self.name_of(i), self.aors[i].name_len))
                n += 1
        return n

    cdef int32_t _unmark(self, aor) except -2:
        cdef int32_t a = self._find_str(aor)
        if a >= 0:
            self.aors[a].busy = 0
            self.aors[a].pinned = 0
        return a

    def expire(self, double now, Py_ssize_t max_work=10000):
        """Remove bindings due at ``now``; pops at most ``max_work`` heap entries
        (live or stale) so that a mass expiry is spread over calls.  Returns how
        many bindings were removed."""
        cdef Py_ssize_t work = 0, removed = 0
        cdef HeapEntry e
        cdef BindingRec* r
        cdef int32_t aor
        while self.heap_len and self.heap[0].t <= now and work < max_work:
            e = self.heap[0]
            self._pop()
            work += 1
            r = &self.b[e.slot]
            if r.aor >= 0 and r.gen == e.gen:
                aor = r.aor
                self.remove_binding(e.slot)
                self.release_if_empty(aor)
                removed += 1
        self.n_expired += removed
        return removed

    def connection_closed(self, int64_t conn_id, double now):
        """The stream connection ``conn_id`` closed: remove its flow bindings, of
        whatever AOR.  A flow binding came over a stream connection (TCP, TLS,
        WS, WSS) without Path and is an RFC 5626 flow (``+sip.instance`` with
        ``reg-id``) or has a contact at a ``.invalid`` host (RFC 7118 5, the
        browsers' WebSocket contacts); other bindings that came over the
        connection stay.  Costs O(its flow bindings): the store keeps an index
        of them.  Returns how many valid at ``now`` were removed (counted in
        ``n_flow_removed``; lapsed ones count as expired).  The AORs changed are
        in the next :meth:`changes`."""
        return self.close_connection(conn_id, now)

    def flow_connections(self):
        """The connection ids that hold flow bindings (for a server that lost
        several connections at once, e.g. with a worker)."""
        cdef Py_ssize_t i
        return [self.conns[i].conn_id for i in range(self.conns_cap) if self.conns[i].head >= 0]

    def flow_bindings(self, int64_t conn_id):
        """The flow bindings of the stream connection ``conn_id`` as
        (aor, Binding), the latest indexed first (whether valid or lapsed)."""
        cdef Py_ssize_t i = self._conn_bucket(conn_id)
        cdef int32_t f = self.conns[i].head, s, a
        out = []
        while f >= 0:
            s = self.flows[f].slot
            a = self.b[s].aor
            out.append((_s(self.name_of(a), self.aors[a].name_len), self.make_binding(s)))
            f = self.flows[f].next
        return out

    @property
    def heap_size(self):
        """Entries in the expiry heap (live and stale)."""
        return self.heap_len

    def next_expiry(self):
        """The earliest time in the expiry heap (maybe stale), or None."""
        return self.heap[0].t if self.heap_len else None
