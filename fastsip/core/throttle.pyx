
# --------------------------------------------------------------------------
# The failure budget of digest authentication: online password guessing is
# slowed to ``limit`` tries per ``backoff`` seconds per source, and a user's
# password to ``limit`` tries per ``backoff`` seconds from the sources that
# got it wrong, while the right password from elsewhere keeps working.
# --------------------------------------------------------------------------

@cython.final
cdef class FailureBudget:
    """Failed digest attempts per source address and per user (named in To).

    A source whose attempts fail ``limit`` times within ``backoff`` seconds is
    refused (403) for ``backoff`` seconds, whatever it sends.  A user whose
    attempts fail ``limit`` times within ``backoff`` seconds, from any
    sources, is refused for ``backoff`` seconds to the sources that failed for
    it; a source that has not failed for the user may still try, so the right
    password from another place keeps working and a guesser spread over many
    addresses gets one try from each.  ``limit`` 0 turns the budget off.  At
    most ``max_entries`` sources and as many users are remembered (the oldest
    are forgotten first).  ``events()`` returns the throttles begun since the
    last call, for the server's log."""

    def __init__(self, int limit=10, double backoff=60.0, Py_ssize_t max_entries=100_000):
        self.configure(limit, backoff, max_entries)

    def configure(self, int limit=10, double backoff=60.0, Py_ssize_t max_entries=100_000):
        """Set the budget; what was counted is forgotten."""
        if limit < 0 or backoff <= 0 or max_entries < 1:
            raise ValueError("need limit >= 0, backoff > 0 and max_entries >= 1")
        self.limit = limit
        self.backoff = backoff
        self.max_entries = max_entries
        self.sources = {}
        self.users = {}
        self.events = []
        self.refusing_until = -INFINITY

    def __len__(self):
        return len(self.sources) + len(self.users)

    cdef bint watching(self, double now) noexcept:
        """Could ``refuses`` say yes at ``now``?  Only while some refusal lasts
        (``refusing_until``, the latest end of one): the common case is no, and
        then a request makes no Python object for the budget, even after
        failures that were counted but refused nothing."""
        return self.limit > 0 and self.refusing_until > now

    cdef bint refuses(self, bytes host, str user, double now):
        e = self.sources.get(host)
        if e is not None and e[2] > now:
            return True
        u = self.users.get(user)
        return u is not None and u[2] > now and host in u[3]

    cdef int failed(self, bytes host, str user, double now) except -1:
        """Count one failure of ``host`` for ``user``."""
        if self.limit <= 0:
            return 0
        e = _entry(self.sources, host, now, self.backoff, self.max_entries, False)
        e[0] += 1
        if e[0] >= self.limit and e[2] <= now:
            e[2] = now + self.backoff
            self.refusing_until = max(self.refusing_until, e[2])
            self.events.append(("source", host.decode("ascii", "replace"), e[2]))
        u = _entry(self.users, user, now, self.backoff, self.max_entries, True)
        u[0] += 1
        if len(u[3]) < 1024:
            u[3].add(host)
        if u[0] >= self.limit and u[2] <= now:
            u[2] = now + self.backoff
            self.refusing_until = max(self.refusing_until, u[2])
            self.events.append(("user", user, u[2]))
        return 0

    def record_failure(self, host, str user, double now):
        """Python callers: count one failure (``host`` str or bytes)."""
        self.failed(host.encode() if isinstance(host, str) else bytes(host), user, now)

    def is_refused(self, host, str user, double now):
        """Python callers: would ``host`` be refused for ``user`` at ``now``?"""
        return self.refuses(host.encode() if isinstance(host, str) else bytes(host), user, now)

    def events_since(self):
        """The throttles begun since the last call: [(kind, key, until)], kind
        "source" (key: the address) or "user"."""
        out, self.events = self.events, []
        return out


cdef list _entry(dict table, key, double now, double backoff, Py_ssize_t most, bint with_hosts):
    """``table[key]``, a new window when the last one is over (and not refusing)."""
    e = table.get(key)
    if e is not None and (now - <double>e[1] <= backoff or <double>e[2] > now):
        return e
    if e is None and len(table) >= most:
        _forget(table, now, backoff)
    e = [0, now, 0.0, set()] if with_hosts else [0, now, 0.0]
    table[key] = e
    return e


cdef void _forget(dict table, double now, double backoff):
    """Make room: drop the entries whose window and refusal are over, else the oldest."""
    stale = [k for k, e in table.items() if now - <double>e[1] > backoff and <double>e[2] <= now]
    for k in stale:
        del table[k]
    if not stale:
        del table[next(iter(table))]
