# The state file's writers in C (included by _io_c.pyx).
#
# A worker's flush takes the store's changed AORs (its change list, in C) and
# encodes each one's name and record into one reused batch (_Staged.stage), with
# no Python object per AOR.  ChangeLog appends the batch to the worker's change
# log as one checksummed frame (one writev); the supervisor folds the frames into
# the SQLite file every few seconds (SqlWriter.apply: the last change of each
# AOR, in AOR order, one transaction, through SQLite's C API).  SqlWriter.commit
# writes a staged batch into SQLite directly (the benchmarks' comparison, and the
# tests').  The frame layout is in docs/record.md; the schema, the loading, the
# folding's bookkeeping and everything else stay with fastsip/server/state.py.
#
# SQLite is not linked at build time (no header or -dev package needed): the
# library that Python's own sqlite3 module loaded is looked up in the process
# (dlopen with RTLD_NOLOAD, so it is that very copy: two copies of SQLite in one
# process would break each other's POSIX locks) and its functions taken with
# dlsym.  Where that fails, SqlWriter raises OSError and the Python writer is
# used instead (StateWriter).

import os

from libc.stdlib cimport malloc, qsort
from libc.string cimport strncpy
from posix.dlfcn cimport RTLD_NOW, dlerror, dlopen, dlsym
from posix.fcntl cimport O_APPEND, O_CLOEXEC, O_CREAT, O_EXCL, O_WRONLY
from posix.fcntl cimport open as c_open
from posix.unistd cimport close as c_close
from posix.unistd cimport fdatasync, ftruncate
from posix.uio cimport iovec, writev


cdef extern from "<dlfcn.h>":
    int RTLD_NOLOAD


ctypedef int (*sq_open_t)(const char*, void**, int, const char*) noexcept nogil
ctypedef int (*sq_close_t)(void*) noexcept nogil
ctypedef int (*sq_exec_t)(void*, const char*, void*, void*, char**) noexcept nogil
ctypedef int (*sq_prepare_t)(void*, const char*, int, void**, const char**) noexcept nogil
ctypedef int (*sq_bind_text_t)(void*, int, const char*, int, void*) noexcept nogil
ctypedef int (*sq_bind_blob_t)(void*, int, const void*, int, void*) noexcept nogil
ctypedef int (*sq_bind_double_t)(void*, int, double) noexcept nogil
ctypedef int (*sq_stmt_t)(void*) noexcept nogil
ctypedef const char* (*sq_errmsg_t)(void*) noexcept nogil
ctypedef int (*sq_busy_timeout_t)(void*, int) noexcept nogil

cdef enum:
    SQ_OK = 0
    SQ_DONE = 101
    SQ_OPEN_READWRITE = 0x2

cdef struct SqliteApi:
    sq_open_t open_v2
    sq_close_t close_v2
    sq_exec_t exec_
    sq_prepare_t prepare_v2
    sq_bind_text_t bind_text
    sq_bind_blob_t bind_blob
    sq_bind_double_t bind_double
    sq_stmt_t step
    sq_stmt_t reset
    sq_stmt_t finalize
    sq_errmsg_t errmsg
    sq_busy_timeout_t busy_timeout

cdef SqliteApi _sq
cdef bint _sq_loaded = False


cdef void* _sym(void* lib, const char* name) except NULL:
    cdef void* f = dlsym(lib, name)
    if f == NULL:
        raise OSError(f"SQLite has no {name.decode()}")
    return f


cdef int _load_sqlite(bytes library) except -1:
    """Take SQLite's functions from ``library``, already loaded in this process."""
    global _sq_loaded
    cdef void* lib
    if _sq_loaded:
        return 0
    lib = dlopen(library, RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        raise OSError(f"{library.decode(errors='replace')} is not loaded: "
                      f"{(<bytes>dlerror()).decode(errors='replace')}")
    _sq.open_v2 = <sq_open_t>_sym(lib, b"sqlite3_open_v2")
    _sq.close_v2 = <sq_close_t>_sym(lib, b"sqlite3_close_v2")
    _sq.exec_ = <sq_exec_t>_sym(lib, b"sqlite3_exec")
    _sq.prepare_v2 = <sq_prepare_t>_sym(lib, b"sqlite3_prepare_v2")
    _sq.bind_text = <sq_bind_text_t>_sym(lib, b"sqlite3_bind_text")
    _sq.bind_blob = <sq_bind_blob_t>_sym(lib, b"sqlite3_bind_blob")
    _sq.bind_double = <sq_bind_double_t>_sym(lib, b"sqlite3_bind_double")
    _sq.step = <sq_stmt_t>_sym(lib, b"sqlite3_step")
    _sq.reset = <sq_stmt_t>_sym(lib, b"sqlite3_reset")
    _sq.finalize = <sq_stmt_t>_sym(lib, b"sqlite3_finalize")
    _sq.errmsg = <sq_errmsg_t>_sym(lib, b"sqlite3_errmsg")
    _sq.busy_timeout = <sq_busy_timeout_t>_sym(lib, b"sqlite3_busy_timeout")
    _sq_loaded = True
    return 0


cdef struct Named:
    const char* name
    Py_ssize_t len
    int32_t slot


cdef int _by_name(const void* x, const void* y) noexcept nogil:
    cdef const Named* a = <const Named*>x
    cdef const Named* b = <const Named*>y
    cdef int c = memcmp(a.name, b.name, a.len if a.len < b.len else b.len)
    if c:
        return c
    return (a.len > b.len) - (a.len < b.len)


cdef struct RowHead:                    # a staged row in a batch, then its name and record
    double latest                       # the latest expiry among its bindings
    uint32_t record_len                 # 0: the AOR has no binding left: delete its row
    uint16_t name_len
    uint16_t zero


cdef struct Change:                     # a row of a batch, as SqlWriter writes it
    const char* name
    const char* record
    double latest
    uint32_t record_len
    uint16_t name_len
    bint skip                           # a later change of the same AOR follows
    Py_ssize_t order                    # its place in the batch


cdef int _by_name_then_order(const void* x, const void* y) noexcept nogil:
    cdef const Change* a = <const Change*>x
    cdef const Change* b = <const Change*>y
    cdef int c = memcmp(a.name, b.name, a.name_len if a.name_len < b.name_len else b.name_len)
    if c:
        return c
    if a.name_len != b.name_len:
        return (a.name_len > b.name_len) - (a.name_len < b.name_len)
    return (a.order > b.order) - (a.order < b.order)


cdef Py_ssize_t _changes_of(const char* buf, Py_ssize_t size, Py_ssize_t rows,
                            Change* out) noexcept nogil:
    """Read ``rows`` rows of a batch (``size`` bytes) into ``out``: the bytes read,
    or -1 when a row runs past the end."""
    cdef Py_ssize_t pos = 0, i
    cdef RowHead h
    for i in range(rows):
        if pos + <Py_ssize_t>sizeof(RowHead) > size:
            return -1
        memcpy(&h, buf + pos, sizeof(RowHead))
        pos += sizeof(RowHead)
        if pos + h.name_len + <Py_ssize_t>h.record_len > size:
            return -1
        out[i].name = buf + pos
        out[i].name_len = h.name_len
        pos += h.name_len
        out[i].record = buf + pos
        out[i].record_len = h.record_len
        out[i].latest = h.latest
        out[i].skip = False
        out[i].order = i
        pos = (pos + h.record_len + 7) & ~7
    return pos


cdef class _Staged:
    """A batch of a :class:`~fastsip.Store`'s changed AORs, each one's name and
    record encoded one after another (``stage``), for a writer to write."""

    cdef char* batch
    cdef Py_ssize_t batch_len, batch_cap
    cdef readonly Py_ssize_t staged         # rows in the batch (not written yet)
    cdef Named* names
    cdef Py_ssize_t names_cap
    cdef readonly Py_ssize_t rows_written

    def __dealloc__(self):
        free(self.batch)
        free(self.names)

    def stage(self, Store store, Py_ssize_t limit):
        """Encode the first ``limit`` of ``store``'s changed AORs into the batch,
        in AOR order (neighbouring keys share B-tree pages), and forget them in
        the store (``Store.drain_head``).  Returns how many; 0 while a batch is
        staged (commit it first)."""
        cdef Py_ssize_t n = min(limit, store.n_dirty), i, size, end
        cdef Named* nm
        cdef RowHead* h
        cdef int32_t slot
        cdef double latest
        if self.staged or n <= 0:
            return 0
        if n > self.names_cap:
            nm = <Named*>realloc(self.names, n * sizeof(Named))
            if nm == NULL:
                raise MemoryError()
            self.names, self.names_cap = nm, n
        for i in range(n):              # (the names stay put: nothing is added meanwhile)
            slot = store.dirty[i]
            self.names[i].name = store.name_of(slot)
            self.names[i].len = store.aors[slot].name_len
            self.names[i].slot = slot
        qsort(self.names, n, sizeof(Named), _by_name)
        self.batch_len = 0
        for i in range(n):
            nm = &self.names[i]
            size = store.record_length(nm.slot, &latest) if store.aors[nm.slot].count else 0
            self._reserve(sizeof(RowHead) + nm.len + size)
            h = <RowHead*>(self.batch + self.batch_len)
            h.latest = latest if size else 0.0
            h.record_len = <uint32_t>size
            h.name_len = <uint16_t>nm.len
            h.zero = 0
            self.batch_len += sizeof(RowHead)
            memcpy(self.batch + self.batch_len, nm.name, nm.len)
            self.batch_len += nm.len
            if size:
                store.record_into(nm.slot, 0, self.batch + self.batch_len)
                self.batch_len += size
            end = (self.batch_len + 7) & ~7         # the next RowHead aligned (zeros between)
            memset(self.batch + self.batch_len, 0, end - self.batch_len)
            self.batch_len = end
        store.drain_head(n)
        self.staged = n
        return n

    cdef int _reserve(self, Py_ssize_t more) except -1:
        """Room for ``more`` bytes at the end of the batch (and the padding after)."""
        cdef char* grown
        cdef Py_ssize_t need = self.batch_len + more + 8
        if need > self.batch_cap:
            need = max(need, 2 * self.batch_cap)
            grown = <char*>realloc(self.batch, need)
            if grown == NULL:
                raise MemoryError()
            self.batch, self.batch_cap = grown, need
        return 0


@cython.final
cdef class SqlWriter(_Staged):
    """Writes AOR rows into the state file made by
    ``fastsip.server.state.StateFile`` (the same rows: AOR, latest expiry,
    record), in C.  ``library``: the path of the SQLite library Python's sqlite3
    module loaded (OSError when it cannot be used).

    ``apply`` writes the rows of change-log frames (the supervisor's fold);
    ``stage`` then ``commit`` (or ``write``) a Store's changed AORs directly.
    Both in one transaction with the GIL released.  A batch whose commit failed
    stays staged, and the next ``commit`` tries it again: nothing is dropped."""

    cdef void* db
    cdef void* upsert
    cdef void* delete
    cdef char err[256]                      # SQLite's message of a failed commit

    def __cinit__(self, path, bytes library, int busy_timeout_ms=5000,
                  bint checkpoints=True):
        _load_sqlite(library)
        cdef bytes p = os.fsencode(path)
        if _sq.open_v2(p, &self.db, SQ_OPEN_READWRITE, NULL) != SQ_OK:
            msg = self._error()
            _sq.close_v2(self.db)
            self.db = NULL
            raise OSError(f"state file {path}: {msg}")
        _sq.busy_timeout(self.db, busy_timeout_ms)
        self._exec(b"PRAGMA synchronous=NORMAL")
        if not checkpoints:
            self._exec(b"PRAGMA wal_autocheckpoint=0")
        self.upsert = self._prepare(
            b"INSERT OR REPLACE INTO aors (aor, bindings, expires_at) VALUES (?, ?, ?)")
        self.delete = self._prepare(b"DELETE FROM aors WHERE aor = ?")

    def __dealloc__(self):
        self.close()

    def close(self):
        if self.db != NULL:
            _sq.finalize(self.upsert)
            _sq.finalize(self.delete)
            _sq.close_v2(self.db)
            self.db = self.upsert = self.delete = NULL

    cdef str _error(self):
        return (<bytes>_sq.errmsg(self.db)).decode("utf-8", "replace")

    cdef int _exec(self, const char* sql) except -1:
        if _sq.exec_(self.db, sql, NULL, NULL, NULL) != SQ_OK:
            raise OSError(f"state file: {self._error()}")
        return 0

    cdef void* _prepare(self, const char* sql) except NULL:
        cdef void* stmt = NULL
        if _sq.prepare_v2(self.db, sql, -1, &stmt, NULL) != SQ_OK:
            raise OSError(f"state file: {self._error()}")
        return stmt

    def write(self, Store store, Py_ssize_t limit):
        """``stage`` then ``commit``: returns the rows written."""
        self.stage(store, limit)
        return self.commit()

    def commit(self):
        """Write the staged batch in one transaction, the GIL released; returns the
        rows written (0: none staged).  On an error (OSError) the transaction is
        rolled back and the batch stays staged for the next call."""
        if not self.staged:
            if self.db == NULL:
                raise OSError("state file: closed")
            return 0
        n = self._write_rows(self.batch, self.batch_len, self.staged, False)
        self.staged = 0
        return n

    def apply(self, const unsigned char[::1] rows not None, Py_ssize_t count):
        """Write ``count`` rows of change-log frames (their payloads one after
        another, as ``stage`` lays them out) in one transaction, the GIL released:
        of an AOR that changed more than once, its last change; in AOR order.
        Returns the rows written.  ValueError when the rows do not parse; OSError
        (rolled back) when SQLite fails."""
        return self._write_rows(<const char*>&rows[0] if rows.shape[0] else NULL,
                                rows.shape[0], count, True)

    cdef Py_ssize_t _write_rows(self, const char* buf, Py_ssize_t size, Py_ssize_t count,
                                bint sort) except -1:
        cdef Change* changes
        cdef Py_ssize_t i, written = 0
        cdef int rc
        if self.db == NULL:
            raise OSError("state file: closed")
        if count <= 0:
            return 0
        changes = <Change*>malloc(count * sizeof(Change))
        if changes == NULL:
            raise MemoryError()
        try:
            if _changes_of(buf, size, count, changes) < 0:
                raise ValueError(f"change log: {count} rows do not fit in {size} bytes")
            with nogil:
                if sort:
                    qsort(changes, count, sizeof(Change), _by_name_then_order)
                    for i in range(count - 1):
                        changes[i].skip = (changes[i].name_len == changes[i + 1].name_len and
                                           memcmp(changes[i].name, changes[i + 1].name,
                                                  changes[i].name_len) == 0)
                rc = self._commit_changes(changes, count, &written)
            if rc != SQ_DONE:
                raise OSError(f"state file: {(<bytes>self.err).decode('utf-8', 'replace')}")
        finally:
            free(changes)
        self.rows_written += written
        return written

    cdef int _commit_changes(self, const Change* changes, Py_ssize_t count,
                             Py_ssize_t* written) noexcept nogil:
        """BEGIN, every change not skipped, COMMIT: SQ_DONE, or SQLite's error code
        (its message in ``err``) after a ROLLBACK."""
        cdef Py_ssize_t i
        cdef const Change* c
        cdef void* stmt
        cdef int rc = _sq.exec_(self.db, b"BEGIN IMMEDIATE", NULL, NULL, NULL)
        if rc != SQ_OK:
            return self._failed(rc, False)
        written[0] = 0
        for i in range(count):
            c = &changes[i]
            if c.skip:
                continue
            if c.record_len:
                stmt = self.upsert
                _sq.bind_blob(stmt, 2, c.record, <int>c.record_len, NULL)
                _sq.bind_double(stmt, 3, c.latest)
            else:
                stmt = self.delete
            _sq.bind_text(stmt, 1, c.name, c.name_len, NULL)
            rc = _sq.step(stmt)
            _sq.reset(stmt)
            if rc != SQ_DONE:
                return self._failed(rc, True)
            written[0] += 1
        rc = _sq.exec_(self.db, b"COMMIT", NULL, NULL, NULL)
        if rc != SQ_OK:
            return self._failed(rc, True)
        return SQ_DONE

    cdef int _failed(self, int rc, bint rollback) noexcept nogil:
        strncpy(self.err, _sq.errmsg(self.db), sizeof(self.err) - 1)
        self.err[sizeof(self.err) - 1] = 0
        if rollback:
            _sq.exec_(self.db, b"ROLLBACK", NULL, NULL, NULL)
        return rc


# -- the change log ------------------------------------------------------------------------

cdef uint32_t _crc_table[8][256]        # slicing by 8: ~4x the speed of a byte at a time


cdef void _crc_init() noexcept:
    cdef uint32_t c, n, k
    for n in range(256):
        c = n
        for k in range(8):
            c = ((<uint32_t>0xEDB88320UL) ^ (c >> 1)) if c & 1 else (c >> 1)
        _crc_table[0][n] = c
    for n in range(256):
        for k in range(1, 8):
            _crc_table[k][n] = (_crc_table[k - 1][n] >> 8) ^ _crc_table[0][_crc_table[k - 1][n] & 0xFF]


_crc_init()


cdef uint32_t _crc32(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """CRC-32 (IEEE 802.3, as zlib.crc32), eight bytes a step (little-endian hosts,
    as the record's layout)."""
    cdef uint32_t c = <uint32_t>0xFFFFFFFFUL, one, two
    while n >= 8:
        memcpy(&one, p, 4)
        memcpy(&two, p + 4, 4)
        one ^= c
        c = (_crc_table[7][one & 0xFF] ^ _crc_table[6][(one >> 8) & 0xFF] ^
             _crc_table[5][(one >> 16) & 0xFF] ^ _crc_table[4][one >> 24] ^
             _crc_table[3][two & 0xFF] ^ _crc_table[2][(two >> 8) & 0xFF] ^
             _crc_table[1][(two >> 16) & 0xFF] ^ _crc_table[0][two >> 24])
        p += 8
        n -= 8
    while n > 0:
        c = _crc_table[0][(c ^ p[0]) & 0xFF] ^ (c >> 8)
        p += 1
        n -= 1
    return ~c


cdef struct FrameHead:                  # docs/record.md, "The change log"
    char magic[4]                       # b"FSCL"
    uint16_t version                    # 1
    uint16_t zero
    uint32_t rows
    uint32_t payload_len
    uint32_t payload_crc                # CRC-32 of the payload
    uint32_t head_crc                   # CRC-32 of the 20 bytes before


def crc32(const unsigned char[::1] data not None):
    """The CRC-32 the change log's frames carry (equal to ``zlib.crc32``)."""
    return _crc32(&data[0] if data.shape[0] else NULL, data.shape[0])


@cython.final
cdef class ChangeLog(_Staged):
    """A worker's change log: ``stage`` a Store's changed AORs, then ``commit``
    appends them to the open segment file as one frame (one ``writev`` and an
    ``fdatasync``, the GIL released).  A write that fails (a full disk) is cut off the file again and
    the batch stays staged for the next ``commit``: the file always ends on a
    whole frame, and nothing is dropped.  ``open`` starts the next segment."""

    cdef int fd
    cdef readonly Py_ssize_t size           # bytes in the open segment
    cdef readonly object path

    def __cinit__(self, path):
        self.fd = -1
        self.open(path)

    def __dealloc__(self):
        self.close()

    def open(self, path):
        """Close the open segment (if any) and create ``path`` (it must not exist)."""
        cdef bytes p = os.fsencode(path)
        cdef int fd = c_open(p, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0o644)
        if fd < 0:
            raise OSError(errno, os.strerror(errno), path)
        self.close()
        self.fd, self.path, self.size = fd, path, 0

    def close(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def commit(self):
        """Append the staged batch as one frame; returns its rows (0: none staged).
        OSError when it cannot be written: the batch stays staged."""
        cdef int err = 0
        if self.fd < 0:
            raise OSError("change log: closed")
        if not self.staged:
            return 0
        with nogil:
            err = self._append()
        if err:
            raise OSError(err, f"change log {self.path}: {os.strerror(err)}")
        n = self.staged
        self.rows_written += n
        self.staged = 0
        return n

    cdef int _append(self) noexcept nogil:
        """One frame of the batch: 0, or errno (the file cut back to its last frame)."""
        cdef FrameHead h
        cdef iovec iov[2]
        cdef Py_ssize_t total = sizeof(FrameHead) + self.batch_len, done
        cdef int err
        memcpy(h.magic, b"FSCL", 4)
        h.version = 1
        h.zero = 0
        h.rows = <uint32_t>self.staged
        h.payload_len = <uint32_t>self.batch_len
        h.payload_crc = _crc32(<const unsigned char*>self.batch, self.batch_len)
        h.head_crc = _crc32(<const unsigned char*>&h, 20)
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(FrameHead)
        iov[1].iov_base = self.batch
        iov[1].iov_len = self.batch_len
        while True:
            done = writev(self.fd, iov, 2)
            if done >= 0 or errno != EINTR:
                break
        if done == total:
            self.size += total
            # on disk before the flush counts as written (a power loss loses no more);
            # if not, the batch stays staged and is appended again (an AOR's later
            # frame replaces its earlier one)
            return errno if fdatasync(self.fd) else 0
        err = errno if done < 0 else 28         # ENOSPC: a short write
        ftruncate(self.fd, self.size)           # no half frame left behind
        return err
