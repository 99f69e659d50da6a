# Included by _io_c.pyx: a worker's acknowledged records (--cluster), kept in C.
#
# The shared location (fastsip/server/shared.py) remembers, per AOR, the last record
# this worker had acknowledged, for RECENT seconds: a failover that loses it (the
# stored version went backwards) is answered by writing it again.  Every acknowledged
# write stores one, so this is a table in C (an open-addressed hash on the AOR, one
# malloc'd block per entry for the AOR and its record), filled by WriteGroup.done from
# the group's buffer: no bytes object, tuple or number per write.  Python reads it
# only after a failover or on a conflict (get, aors).  Entries are never deleted one
# by one: prune rebuilds the table without the old ones, every RECENT / 2 seconds.

from libc.math cimport INFINITY
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc


ctypedef struct RecentEntry:
    uint64_t hash                       # 0: an empty place
    char* blob                          # the AOR, then its record
    Py_ssize_t aor_len
    Py_ssize_t rec_len                  # -1: none (the write deleted the key)
    uint64_t version
    long long pxat
    double t                            # when it was acknowledged


cdef inline uint64_t _recent_hash(const char* p, Py_ssize_t n) noexcept:
    """FNV-1a of the AOR; never 0 (the mark of an empty place)."""
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>p[i]) * 1099511628211ULL
    return h if h else 1


cdef class Recent:
    """AOR -> ``(version, record, pxat, t)``: the record this worker last had
    acknowledged for the AOR (``record`` None: the key was deleted), at ``t``
    (see ``_recent.pxi``)."""

    cdef RecentEntry* e
    cdef Py_ssize_t cap                 # places, a power of 2
    cdef Py_ssize_t n                   # entries

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.e != NULL:
            for i in range(self.cap):
                free(self.e[i].blob)
            free(self.e)

    def __len__(self):
        return self.n

    cdef RecentEntry* _place(self, const char* aor, Py_ssize_t n, uint64_t h) noexcept:
        """The AOR's entry, or the empty place where it would go (the table is
        never full: see _grow)."""
        cdef Py_ssize_t mask = self.cap - 1, i = <Py_ssize_t>(h & <uint64_t>mask)
        cdef RecentEntry* x
        while True:
            x = &self.e[i]
            if x.hash == 0 or (x.hash == h and x.aor_len == n and memcmp(x.blob, aor, n) == 0):
                return x
            i = (i + 1) & mask

    cdef int _rebuild(self, Py_ssize_t cap, double before) except -1:
        """Move the entries acknowledged at ``before`` or later into a table of
        ``cap`` places; free the others."""
        cdef RecentEntry* old = self.e
        cdef Py_ssize_t old_cap = self.cap, i
        cdef RecentEntry* x
        cdef RecentEntry* e = <RecentEntry*>calloc(cap, sizeof(RecentEntry))
        if e == NULL:
            raise MemoryError()
        self.e, self.cap, self.n = e, cap, 0
        for i in range(old_cap):
            x = &old[i]
            if x.hash == 0:
                continue
            if x.t < before:
                free(x.blob)
                continue
            self._place(x.blob, x.aor_len, x.hash)[0] = x[0]
            self.n += 1
        free(old)
        return 0

    cdef int put_c(self, const char* aor, Py_ssize_t aor_len, uint64_t version,
                   const char* record, Py_ssize_t rec_len, long long pxat,
                   double t) except -1:
        """Remember ``record`` (``rec_len`` bytes; -1: none) as the AOR's acknowledged
        one, at ``t``."""
        cdef uint64_t h = _recent_hash(aor, aor_len)
        cdef RecentEntry* x
        cdef Py_ssize_t size = aor_len + (rec_len if rec_len > 0 else 0)
        cdef char* blob
        if (self.n + 1) * 2 > self.cap:         # at most half full: short probes
            self._rebuild(self.cap * 2 if self.cap else 1024, -INFINITY)
        x = self._place(aor, aor_len, h)
        blob = <char*>realloc(x.blob, size if size else 1)
        if blob == NULL:
            raise MemoryError()
        if x.hash == 0:
            memcpy(blob, aor, aor_len)
            x.hash, x.aor_len = h, aor_len
            self.n += 1
        x.blob = blob
        if rec_len > 0:
            memcpy(blob + aor_len, record, rec_len)
        x.rec_len, x.version, x.pxat, x.t = rec_len, version, pxat, t
        return 0

    def put(self, bytes aor not None, uint64_t version, record, long long pxat, double t):
        """Remember ``record`` (bytes, or None: the key was deleted) as the AOR's
        acknowledged one, at ``t``."""
        cdef bytes rec = <bytes?>record if record is not None else None
        self.put_c(PyBytes_AS_STRING(aor), PyBytes_GET_SIZE(aor), version,
                   NULL if rec is None else PyBytes_AS_STRING(rec),
                   -1 if rec is None else PyBytes_GET_SIZE(rec), pxat, t)

    def get(self, bytes aor not None):
        """``(version, record, pxat, t)`` for the AOR, or None."""
        cdef RecentEntry* x
        if self.n == 0:
            return None
        x = self._place(PyBytes_AS_STRING(aor), PyBytes_GET_SIZE(aor),
                        _recent_hash(PyBytes_AS_STRING(aor), PyBytes_GET_SIZE(aor)))
        if x.hash == 0:
            return None
        return (x.version, None if x.rec_len < 0 else
                PyBytes_FromStringAndSize(x.blob + x.aor_len, x.rec_len), x.pxat, x.t)

    def aors(self, double since):
        """The AORs acknowledged at ``since`` or later."""
        cdef Py_ssize_t i
        cdef list out = []
        for i in range(self.cap):
            if self.e[i].hash != 0 and self.e[i].t >= since:
                out.append(PyBytes_FromStringAndSize(self.e[i].blob, self.e[i].aor_len))
        return out

    def prune(self, double before):
        """Forget the entries acknowledged before ``before`` (too old to be written
        again); one pass in C.  Returns how many went."""
        cdef Py_ssize_t had = self.n, cap = self.cap
        if had == 0:
            return 0
        while cap > 1024 and cap // 8 >= had:  # shrink a table that emptied out
            cap //= 2
        self._rebuild(cap, before)
        return had - self.n
