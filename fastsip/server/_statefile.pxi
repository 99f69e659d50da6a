# The state file's writer in C (included by _io_c.pyx).
#
# A flush writes the store's changed AORs (its change list, in C) straight into
# the SQLite file through SQLite's C API: each AOR's record is encoded into one
# reused buffer and bound with its name as it is in the store, so no Python
# object is made per AOR (Store.change_records + sqlite3's executemany made a
# str, a bytes, a float and a tuple per AOR, and bound them again).  The schema,
# the loading and everything else stay with fastsip/server/state.py.
#
# SQLite is not linked at build time (no header or -dev package needed): the
# library that Python's own sqlite3 module loaded is looked up in the process
# (dlopen with RTLD_NOLOAD, so it is that very copy: two copies of SQLite in one
# process would break each other's POSIX locks) and its functions taken with
# dlsym.  Where that fails, SqlWriter raises OSError and the Python writer is
# used instead (StateWriter).

import os

from libc.stdlib cimport qsort
from libc.string cimport strncpy
from posix.dlfcn cimport RTLD_NOW, dlerror, dlopen, dlsym


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


cdef struct RowHead:                    # a staged row in SqlWriter.batch, then its bytes
    double latest                       # the latest expiry among its bindings
    uint32_t record_len                 # 0: the AOR has no binding left: delete its row
    uint16_t name_len


@cython.final
cdef class SqlWriter:
    """Writes a :class:`~fastsip.Store`'s changed AORs into the state file made by
    ``fastsip.server.state.StateFile`` (the same rows: AOR, latest expiry,
    record), in C.  ``library``: the path of the SQLite library Python's sqlite3
    module loaded (OSError when it cannot be used).

    In two steps, so that SQLite's time is not the receive loop's: ``stage``
    (with the store, in the loop's thread) encodes changed AORs into one batch,
    names and records one after another, and forgets them in the store;
    ``commit`` writes the batch in one transaction with the GIL released (from
    another thread, or right after: ``write``).  A batch whose commit failed stays
    staged, and the next ``commit`` tries it again: nothing is dropped."""

    cdef void* db
    cdef void* upsert
    cdef void* delete
    cdef char* batch
    cdef Py_ssize_t batch_len, batch_cap
    cdef readonly Py_ssize_t staged         # rows in the batch (not committed yet)
    cdef Named* names
    cdef Py_ssize_t names_cap
    cdef readonly Py_ssize_t rows_written
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
        free(self.batch)
        free(self.names)

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

    def stage(self, Store store, Py_ssize_t limit):
        """Encode the first ``limit`` of ``store``'s changed AORs into the batch,
        in AOR order (neighbouring keys share B-tree pages), and forget them in
        the store (``Store.drain_head``).  Returns how many; 0 while a batch is
        staged (commit it first)."""
        cdef Py_ssize_t n = min(limit, store.n_dirty), i, size
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
            self.batch_len += sizeof(RowHead)
            memcpy(self.batch + self.batch_len, nm.name, nm.len)
            self.batch_len += nm.len
            if size:
                store.record_into(nm.slot, 0, self.batch + self.batch_len)
                self.batch_len += size
            self.batch_len = (self.batch_len + 7) & ~7      # the next RowHead aligned
        store.drain_head(n)
        self.staged = n
        return n

    def commit(self):
        """Write the staged batch in one transaction, the GIL released; returns the
        rows written (0: none staged).  On an error (OSError) the transaction is
        rolled back and the batch stays staged for the next call."""
        cdef int rc
        if self.db == NULL:
            raise OSError("state file: closed")
        if not self.staged:
            return 0
        with nogil:
            rc = self._commit_batch()
        if rc != SQ_DONE:
            raise OSError(f"state file: {(<bytes>self.err).decode('utf-8', 'replace')}")
        n = self.staged
        self.rows_written += n
        self.staged = 0
        return n

    cdef int _commit_batch(self) noexcept nogil:
        """BEGIN, every row of the batch, COMMIT: SQ_DONE, or SQLite's error code
        (its message in ``err``) after a ROLLBACK."""
        cdef Py_ssize_t pos = 0, i
        cdef const RowHead* h
        cdef const char* name
        cdef void* stmt
        cdef int rc = _sq.exec_(self.db, b"BEGIN IMMEDIATE", NULL, NULL, NULL)
        if rc != SQ_OK:
            return self._failed(rc, False)
        for i in range(self.staged):
            h = <const RowHead*>(self.batch + pos)
            name = self.batch + pos + sizeof(RowHead)
            pos += sizeof(RowHead) + h.name_len
            if h.record_len:
                stmt = self.upsert
                _sq.bind_blob(stmt, 2, self.batch + pos, <int>h.record_len, NULL)
                _sq.bind_double(stmt, 3, h.latest)
                pos += h.record_len
            else:
                stmt = self.delete
            pos = (pos + 7) & ~7
            _sq.bind_text(stmt, 1, name, h.name_len, NULL)
            rc = _sq.step(stmt)
            _sq.reset(stmt)
            if rc != SQ_DONE:
                return self._failed(rc, True)
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
