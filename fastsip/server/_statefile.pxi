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


@cython.final
cdef class SqlWriter:
    """Writes a :class:`~fastsip.Store`'s changed AORs into the state file made by
    ``fastsip.server.state.StateFile`` (the same rows: AOR, latest expiry,
    record), in C.  ``library``: the path of the SQLite library Python's sqlite3
    module loaded (OSError when it cannot be used)."""

    cdef void* db
    cdef void* upsert
    cdef void* delete
    cdef char* buf
    cdef Py_ssize_t buf_cap
    cdef Named* names
    cdef Py_ssize_t names_cap
    cdef readonly Py_ssize_t rows_written

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
        free(self.buf)
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
        """Write the first ``limit`` of ``store``'s changed AORs in one transaction,
        in AOR order (a record replaces the AOR's row; an AOR left with no binding
        loses it), then forget them (``Store.drain_head``).  Returns the rows
        written.  On an error (OSError) the transaction is rolled back and the
        changes stay, to be written by the next call."""
        cdef Py_ssize_t n = min(limit, store.n_dirty), i, size
        cdef Named* nm
        cdef AorRec* a
        cdef double latest
        cdef void* stmt
        cdef int rc
        if self.db == NULL:
            raise OSError("state file: closed")
        if n <= 0:
            return 0
        if n > self.names_cap:
            nm = <Named*>realloc(self.names, n * sizeof(Named))
            if nm == NULL:
                raise MemoryError()
            self.names, self.names_cap = nm, n
        for i in range(n):              # (the names stay put: nothing is added meanwhile)
            a = &store.aors[store.dirty[i]]
            self.names[i].name = store.name_of(store.dirty[i])
            self.names[i].len = a.name_len
            self.names[i].slot = store.dirty[i]
        qsort(self.names, n, sizeof(Named), _by_name)   # neighbouring keys share B-tree pages
        self._exec(b"BEGIN IMMEDIATE")
        try:
            for i in range(n):
                nm = &self.names[i]
                if store.aors[nm.slot].count:
                    size = store.record_length(nm.slot, &latest)
                    self._reserve(size)
                    store.record_into(nm.slot, 0, self.buf)
                    stmt = self.upsert
                    _sq.bind_blob(stmt, 2, self.buf, <int>size, NULL)
                    _sq.bind_double(stmt, 3, latest)
                else:
                    stmt = self.delete
                _sq.bind_text(stmt, 1, nm.name, <int>nm.len, NULL)
                rc = _sq.step(stmt)
                _sq.reset(stmt)
                if rc != SQ_DONE:
                    raise OSError(f"state file: {self._error()}")
            self._exec(b"COMMIT")
        except BaseException:
            _sq.exec_(self.db, b"ROLLBACK", NULL, NULL, NULL)
            raise
        store.drain_head(n)
        self.rows_written += n
        return n

    cdef int _reserve(self, Py_ssize_t size) except -1:
        cdef char* grown
        if size > self.buf_cap:
            grown = <char*>realloc(self.buf, size)
            if grown == NULL:
                raise MemoryError()
            self.buf, self.buf_cap = grown, size
        return 0
