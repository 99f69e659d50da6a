# An AOR's bindings as one record: written and read in C, no Python object per
# binding.  The state file keeps one record per AOR row, and the layout is meant
# for a shared location too (a version for compare-and-set, readable by proxies).
#
# Layout (docs/record.md has it with a reader): little-endian, fixed-width.
#
#   head     u8 format version (1), u64 AOR version, u32 binding count
#   binding  f64 expires_at (absolute, Unix seconds), i64 reg_id (-1: none),
#            i64 conn_id (-1: none), u32 CSeq, i16 q in thousandths (-1: none),
#            u16 source port, u8 transport (TRANSPORTS order), then six strings,
#            each a u16 length and its bytes: contact URI, Call-ID,
#            +sip.instance, Path (its values joined by LF), User-Agent, source host
#
# A record is read whole or not at all: record_check walks it before anything
# is loaded, and a record that ends early, has bytes after its last binding or
# a value out of range is refused with the byte where it went wrong.

RECORD_ERRORS = ("", "truncated", "unknown format version", "transport out of range",
                 "q out of range", "empty contact URI", "bytes after the last binding",
                 "expiry not a number")


cdef inline void _put16(char* p, uint16_t v) noexcept nogil:
    p[0] = <char>(v & 0xFF)
    p[1] = <char>(v >> 8)


cdef inline void _put32(char* p, uint32_t v) noexcept nogil:
    _put16(p, <uint16_t>(v & 0xFFFF))
    _put16(p + 2, <uint16_t>(v >> 16))


cdef inline void _put64(char* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v & 0xFFFFFFFFu))
    _put32(p + 4, <uint32_t>(v >> 32))


cdef inline uint16_t _get16(const unsigned char* p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t _get32(const unsigned char* p) noexcept nogil:
    return <uint32_t>_get16(p) | (<uint32_t>_get16(p + 2) << 16)


cdef inline uint64_t _get64(const unsigned char* p) noexcept nogil:
    return <uint64_t>_get32(p) | (<uint64_t>_get32(p + 4) << 32)


cdef inline char* _put_str(char* p, const char* s, Py_ssize_t n) noexcept nogil:
    _put16(p, <uint16_t>n)
    if n:
        memcpy(p + 2, s, n)
    return p + 2 + n


cdef Py_ssize_t record_size(const BindingIn* b) noexcept nogil:
    """The bytes the binding ``b`` takes in a record (its strings are at most
    65535 bytes each, as the table holds them)."""
    return (RECORD_FIXED + 2 * RECORD_STRINGS + b.uri_len + b.call_id_len + b.instance_len
            + b.path_len + b.ua_len + b.src_host_len)


cdef char* record_put_head(char* p, uint64_t version, uint32_t count) noexcept nogil:
    """Write a record's head at ``p`` (RECORD_HEAD bytes); returns the end."""
    p[0] = <char>RECORD_VERSION
    _put64(p + 1, version)
    _put32(p + 9, count)
    return p + RECORD_HEAD


cdef char* record_put_binding(char* p, const BindingIn* b) noexcept nogil:
    """Write the binding ``b`` at ``p`` (record_size(b) bytes); returns the end."""
    cdef uint64_t bits
    memcpy(&bits, &b.expires_at, 8)
    _put64(p, bits)
    _put64(p + 8, <uint64_t>b.reg_id)
    _put64(p + 16, <uint64_t>b.conn_id)
    _put32(p + 24, b.cseq)
    _put16(p + 28, <uint16_t>b.q)
    _put16(p + 30, b.src_port)
    p[32] = <char>b.transport
    p += RECORD_FIXED
    p = _put_str(p, b.uri, b.uri_len)
    p = _put_str(p, b.call_id, b.call_id_len)
    p = _put_str(p, b.instance, b.instance_len)
    p = _put_str(p, b.path, b.path_len)
    p = _put_str(p, b.ua, b.ua_len)
    return _put_str(p, b.src_host, b.src_host_len)


cdef Py_ssize_t record_head(const char* p, Py_ssize_t n, uint64_t* version,
                            uint32_t* count) noexcept nogil:
    """Read a record's head: the position of its first binding, or a RecordError."""
    cdef const unsigned char* u = <const unsigned char*>p
    if n < 1:
        return REC_TRUNCATED
    if u[0] != RECORD_VERSION:
        return REC_VERSION
    if n < RECORD_HEAD:
        return REC_TRUNCATED
    version[0] = _get64(u + 1)
    count[0] = _get32(u + 9)
    return RECORD_HEAD


cdef Py_ssize_t record_next(const char* p, Py_ssize_t pos, Py_ssize_t n,
                            BindingIn* out) noexcept nogil:
    """Read the binding at ``pos`` into ``out``, its strings pointing into ``p``
    (``key_hash`` is left 0: the caller hashes the URI if it needs to).  Returns
    the position after it, or a RecordError."""
    cdef const unsigned char* u = <const unsigned char*>p
    cdef uint64_t bits
    cdef Py_ssize_t lens[RECORD_STRINGS]
    cdef const char* strs[RECORD_STRINGS]
    cdef int i
    if n - pos < RECORD_FIXED:
        return REC_TRUNCATED
    bits = _get64(u + pos)
    memcpy(&out.expires_at, &bits, 8)
    out.reg_id = <int64_t>_get64(u + pos + 8)
    out.conn_id = <int64_t>_get64(u + pos + 16)
    out.cseq = _get32(u + pos + 24)
    out.q = <int16_t>_get16(u + pos + 28)
    out.src_port = _get16(u + pos + 30)
    out.transport = u[pos + 32]
    out.key_hash = 0
    if out.expires_at != out.expires_at:
        return REC_EXPIRY
    if out.transport > T_WSS:
        return REC_TRANSPORT
    if out.q < -1 or out.q > 1000:
        return REC_Q
    pos += RECORD_FIXED
    for i in range(RECORD_STRINGS):
        if n - pos < 2:
            return REC_TRUNCATED
        lens[i] = _get16(u + pos)
        pos += 2
        if n - pos < lens[i]:
            return REC_TRUNCATED
        strs[i] = p + pos
        pos += lens[i]
    if lens[0] == 0:
        return REC_EMPTY_URI
    out.uri, out.uri_len = strs[0], lens[0]
    out.call_id, out.call_id_len = strs[1], lens[1]
    out.instance, out.instance_len = strs[2], lens[2]
    out.path, out.path_len = strs[3], lens[3]
    out.ua, out.ua_len = strs[4], lens[4]
    out.src_host, out.src_host_len = strs[5], lens[5]
    return pos


cdef Py_ssize_t record_check(const char* p, Py_ssize_t n, uint32_t* count,
                             Py_ssize_t* err_pos) noexcept nogil:
    """Walk a whole record: 0 if it reads (``count`` bindings), else a
    RecordError with ``err_pos`` the byte where the bad part starts."""
    cdef uint64_t version
    cdef Py_ssize_t pos = record_head(p, n, &version, count), nxt
    cdef uint32_t i
    cdef BindingIn b
    if pos < 0:
        err_pos[0] = 0
        return pos
    for i in range(count[0]):
        nxt = record_next(p, pos, n, &b)
        if nxt < 0:
            err_pos[0] = pos
            return nxt
        pos = nxt
    if pos != n:
        err_pos[0] = pos
        return REC_TRAILING
    return 0


cdef object record_error(Py_ssize_t code, Py_ssize_t pos):
    """The ValueError of a record that does not read."""
    return ValueError(f"bad record (byte {pos}): {RECORD_ERRORS[-code]}")


def encode_record(bindings, uint64_t version=0):
    """The record of an AOR holding ``bindings`` (:class:`Binding` objects), with
    the AOR version ``version`` (docs/record.md).  The store writes its own
    records in C (:meth:`Store.change_records`); this is for callers that have
    Binding objects."""
    cdef list keep = []
    cdef list items = list(bindings)
    cdef Py_ssize_t size = RECORD_HEAD, i, n = len(items)
    cdef BindingIn* ins
    cdef bytes out
    cdef char* p
    if n > 0xFFFFFFFF:
        raise ValueError("too many bindings for one record")
    ins = <BindingIn*>PyMem_Malloc((n if n else 1) * sizeof(BindingIn))
    if ins == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            binding_in_of(items[i], &ins[i], keep)
            if ins[i].uri_len > 65535 or ins[i].call_id_len > 65535 or \
                    ins[i].instance_len > 65535 or ins[i].path_len > 65535 or \
                    ins[i].ua_len > 65535 or ins[i].src_host_len > 65535:
                raise ValueError("binding field longer than 65535 bytes")
            size += record_size(&ins[i])
        out = PyBytes_FromStringAndSize(NULL, size)
        p = record_put_head(PyBytes_AS_STRING(out), version, <uint32_t>n)
        for i in range(n):
            p = record_put_binding(p, &ins[i])
        return out
    finally:
        PyMem_Free(ins)


def decode_record(record):
    """``(AOR version, [Binding])`` of a record; ValueError naming the byte for
    one that does not read."""
    cdef bytes data = record if type(record) is bytes else bytes(record)
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos, err_pos = 0, code
    cdef uint64_t version = 0
    cdef uint32_t count = 0, i
    cdef BindingIn b
    code = record_check(p, n, &count, &err_pos)
    if code < 0:
        raise record_error(code, err_pos)
    pos = record_head(p, n, &version, &count)
    out = []
    for i in range(count):
        pos = record_next(p, pos, n, &b)
        out.append(binding_from_in(&b))
    return version, out
