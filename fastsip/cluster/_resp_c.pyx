# cython: language_level=3
"""What the worker sends Redis, made in C: a key's Redis Cluster slot and the
``FCALL fastsip_cas`` command of a staged write (``fastsip/server/shared.py``),
one ``bytes`` each, without a Python object per argument."""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint16_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef uint16_t CRC16_TABLE[256]


cdef void _fill_table() noexcept:
    """CRC-16/XMODEM (polynomial 0x1021, initial 0), by byte: what Redis Cluster
    hashes keys with."""
    cdef int i, b
    cdef uint16_t crc
    for i in range(256):
        crc = <uint16_t>(i << 8)
        for b in range(8):
            crc = <uint16_t>((crc << 1) ^ 0x1021) if crc & 0x8000 else <uint16_t>(crc << 1)
        CRC16_TABLE[i] = crc


_fill_table()


cdef inline uint16_t _crc16(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef uint16_t crc = 0
    cdef Py_ssize_t i
    for i in range(n):
        crc = <uint16_t>((crc << 8) ^ CRC16_TABLE[((crc >> 8) ^ p[i]) & 0xFF])
    return crc


cdef int _slot(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t s, e
    for s in range(n):
        if p[s] == b'{':
            for e in range(s + 1, n):
                if p[e] == b'}':
                    if e > s + 1:
                        return _crc16(p + s + 1, e - s - 1) & 16383
                    break
            break
    return _crc16(p, n) & 16383


def key_slot(bytes key):
    """The Redis Cluster slot (0..16383) of ``key``: CRC16 of its hash tag, the
    part between the first "{" and the next "}" when that is not empty, else of
    the whole key (the Redis Cluster specification)."""
    return _slot(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))


cdef inline Py_ssize_t _digits(unsigned long long n) noexcept:
    cdef Py_ssize_t d = 1
    while n >= 10:
        n //= 10
        d += 1
    return d


cdef inline char* _decimal(char* p, unsigned long long n) noexcept:
    """``n`` in decimal at ``p`` (no printf: this runs for every write); returns the end."""
    cdef Py_ssize_t d = _digits(n), i
    for i in range(d - 1, -1, -1):
        p[i] = <char>(48 + n % 10)
        n //= 10
    return p + d


cdef inline Py_ssize_t _arg_size(Py_ssize_t n) noexcept:
    """The size of ``$N\r\nDATA\r\n``."""
    return 1 + _digits(n) + 2 + n + 2


cdef char* _arg(char* p, const char* data, Py_ssize_t n) noexcept:
    """``$N\r\nDATA\r\n`` at ``p``; returns the end."""
    p[0] = b'$'
    p = _decimal(p + 1, n)
    p[0] = b'\r'
    p[1] = b'\n'
    p += 2
    if n and data != NULL:
        memcpy(p, data, n)
    p += n
    p[0] = b'\r'
    p[1] = b'\n'
    return p + 2


cdef char* HEAD = b"*7\r\n$5\r\nFCALL\r\n$11\r\nfastsip_cas\r\n$1\r\n1\r\n"
cdef Py_ssize_t HEAD_LEN = 40            # strlen(HEAD)


cdef Py_ssize_t cas_size(Py_ssize_t aor_len, uint64_t expected, Py_ssize_t record_len,
                         long long pxat_ms) noexcept:
    """The size of ``cas_write``'s command (``pxat_ms`` >= 0)."""
    return (HEAD_LEN + _arg_size(aor_len + 7) + _arg_size(8 if expected else 0)
            + _arg_size(record_len) + _arg_size(_digits(<unsigned long long>pxat_ms)))


cdef Py_ssize_t cas_record_at(Py_ssize_t aor_len, uint64_t expected,
                              Py_ssize_t record_len) noexcept:
    """Where RECORD starts in ``cas_write``'s command (for a caller that writes
    the record there itself)."""
    return (HEAD_LEN + _arg_size(aor_len + 7) + _arg_size(8 if expected else 0)
            + 1 + _digits(record_len) + 2)


cdef int cas_write(char* p, const char* aor, Py_ssize_t aor_len, uint64_t expected,
                   const char* record, Py_ssize_t record_len, long long pxat_ms,
                   bint slot) noexcept:
    """Write ``FCALL fastsip_cas 1 KEY EXPECTED RECORD PXAT`` (``cas_size`` bytes)
    at ``p``; returns the key's slot when ``slot`` is true (else 0: the caller knows
    it from ``cas_slot``).  See ``pack_cas``.  ``record`` NULL with a length: its
    room is left for the caller to fill (at ``cas_record_at``)."""
    cdef Py_ssize_t nk = aor_len + 7
    cdef char ver[8]
    cdef char px[24]
    cdef Py_ssize_t npx = _decimal(px, <unsigned long long>pxat_ms) - px
    cdef int i, s = 0
    cdef char* key
    for i in range(8):
        ver[i] = <char>((expected >> (8 * i)) & 0xFF)
    memcpy(p, HEAD, HEAD_LEN)
    p += HEAD_LEN
    p[0] = b'$'                                 # the key, fs:r:{AOR}, written in place
    p = _decimal(p + 1, nk)
    p[0] = b'\r'
    p[1] = b'\n'
    p += 2
    key = p
    memcpy(p, b"fs:r:{", 6)
    memcpy(p + 6, aor, aor_len)
    p[6 + aor_len] = b'}'
    p[nk] = b'\r'
    p[nk + 1] = b'\n'
    p += nk + 2
    if slot:
        s = _slot(<const unsigned char*>key, nk)
    p = _arg(p, ver, 8 if expected else 0)
    p = _arg(p, record, record_len)
    _arg(p, px, npx)
    return s


cdef int cas_slot(const char* aor, Py_ssize_t aor_len) noexcept:
    """The slot of the AOR's key ``fs:r:{AOR}`` (as ``cas_write`` returns it);
    -1 when memory is short."""
    cdef char stack[512]
    cdef char* key = stack
    cdef int slot
    if aor_len + 7 > <Py_ssize_t>sizeof(stack):
        key = <char*>malloc(aor_len + 7)
        if key == NULL:
            return -1
    memcpy(key, b"fs:r:{", 6)
    memcpy(key + 6, aor, aor_len)
    key[6 + aor_len] = b'}'
    slot = _slot(<const unsigned char*>key, aor_len + 7)
    if key != stack:
        free(key)
    return slot


def pack_cas(bytes aor, uint64_t expected, record, long long pxat_ms):
    """``(slot, command)``: the slot of the AOR's key ``fs:r:{AOR}`` and the
    command ``FCALL fastsip_cas 1 KEY EXPECTED RECORD PXAT`` in RESP
    (``fastsip/cluster/library.lua``): EXPECTED the version as 8 little-endian
    bytes, empty for 0 (no key); RECORD empty (None) to delete the key."""
    cdef Py_ssize_t na = PyBytes_GET_SIZE(aor)
    cdef Py_ssize_t nr = 0 if record is None else PyBytes_GET_SIZE(<bytes?>record)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, cas_size(na, expected, nr, pxat_ms))
    cdef int slot = cas_write(PyBytes_AS_STRING(out), PyBytes_AS_STRING(aor), na, expected,
                              NULL if record is None else PyBytes_AS_STRING(record), nr,
                              pxat_ms, True)
    return slot, out
