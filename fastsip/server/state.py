"""Embedded persistence: one SQLite file (WAL), one row per AOR.

Every worker opens the same file and writes only its own shard's AORs, in
short transactions (``busy_timeout`` covers the moments another worker holds
the write lock).  A row holds the AOR, the latest expiry among its bindings
(so that loading can skip dead rows in SQL) and the bindings, a list of
13-field lists (``binding_row``) in Python's ``marshal`` format (version 4:
str, float, int, None and lists only), which costs a third of JSON's time on
the write path.  ``meta.format`` names that encoding; a row that does not
decode is skipped and counted, never fatal.

At start a worker loads the rows whose AOR hashes to its shard
(``shard_of(aor, workers)``) and whose bindings have not expired, so
changing ``--workers`` between runs re-shards on load.  Rows are read under
the registrar's canonical AOR (``RegistrarCore.aor_of``): a row written under
another form (earlier builds kept the port of To in the AOR; ``--aor-by``
may have changed) is merged into its AOR and the file rewritten that way.
"""
from __future__ import annotations

import marshal
import sqlite3
import time

import fastsip
from fastsip.core._core import uri_compare_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS aors (
    aor        TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,      -- the latest expiry among the bindings (wall clock)
    bindings   BLOB NOT NULL       -- marshal (version 4) of [binding_row(b), ...]
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
"""
FORMAT = "marshal4-rows13"


def binding_row(b) -> list:
    """A Binding as a JSON-able list (the order is the file format)."""
    src = b.source or ("", 0)
    return [b.uri, b.expires_at, b.q, b.call_id, b.cseq, src[0], src[1], b.transport, b.conn_id,
            list(b.path or ()), b.instance, b.reg_id, b.user_agent]


def binding_from_row(r) -> fastsip.Binding:
    uri, expires_at, q, call_id, cseq, host, port, transport, conn_id, path, instance, reg_id, ua = r
    return fastsip.Binding(uri, expires_at, q=q, call_id=call_id, cseq=cseq, source=(host, port),
                           transport=transport, conn_id=conn_id, path=tuple(path),
                           instance=instance, reg_id=reg_id, user_agent=ua)


def _dumps(bindings) -> bytes:
    return marshal.dumps([binding_row(b) for b in bindings], 4)


class StateFile:
    """One worker's connection to the state file."""

    def __init__(self, path: str, busy_timeout: float = 5.0, checkpoints: bool = True):
        self.path = path
        self.db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if not checkpoints:
            # the supervisor checkpoints (checkpoint()): a worker's write never copies the WAL
            self.db.execute("PRAGMA wal_autocheckpoint=0")
        self._exec_retry(lambda: self.db.executescript(SCHEMA))
        self._exec_retry(lambda: self.db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)", (FORMAT,)))
        fmt = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]
        if fmt != FORMAT:
            raise ValueError(f"state file {path}: format {fmt!r}, this fastsip writes {FORMAT!r}")
        self.db.create_function("fastsip_shard", 2, fastsip.shard_of, deterministic=True)
        self.rows_written = 0
        self.errors = 0

    def _exec_retry(self, fn, tries=5):
        for i in range(tries):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or i == tries - 1:
                    raise
                time.sleep(0.05 * (i + 1))

    def load(self, shard: int, shards: int, now: float, key=None):
        """Yield (aor, [Binding]) for this shard's rows with bindings still alive
        at ``now``.  ``key``: the canonical form of an AOR (default: as stored).
        Rows stored under another form come last, each merged with the row of
        its canonical AOR (a contact in both keeps the later expiry); the file
        is then rewritten to hold the merged row alone."""
        canon = key or (lambda aor: aor)
        self.db.create_function("fastsip_canonical_shard", 2,
                                lambda aor, n: fastsip.shard_of(canon(aor), n))
        cur = self.db.execute(
            "SELECT aor, bindings FROM aors WHERE expires_at > ? "
            "AND fastsip_canonical_shard(aor, ?) = ?", (now, shards, shard))
        moved = {}          # canonical AOR -> [stored keys]
        for aor, blob in cur:
            k = canon(aor)
            if k != aor:
                moved.setdefault(k, []).append(aor)
                continue
            live = self._live(blob, now)
            if live:
                yield aor, live
        for k, olds in moved.items():
            merged = {}
            for stored in [k] + olds:
                row = self.db.execute("SELECT bindings FROM aors WHERE aor = ?",
                                      (stored,)).fetchone()
                for b in self._live(row[0], now) if row else ():
                    ck = uri_compare_key(b.uri)
                    if ck not in merged or merged[ck].expires_at < b.expires_at:
                        merged[ck] = b
            bindings = list(merged.values())
            self.write([(k, bindings)] + [(old, []) for old in olds])
            if bindings:
                yield k, bindings

    def _live(self, blob, now):
        """The bindings of a row still alive at ``now`` ([] for a row that does not decode)."""
        try:
            return [binding_from_row(r) for r in marshal.loads(blob) if r[1] > now]
        except (ValueError, TypeError, EOFError):
            self.errors += 1
            return []

    def write(self, changes) -> int:
        """Write ``[(aor, [Binding] or [])]`` in one transaction; returns rows touched."""
        upserts = []
        deletes = []
        for aor, bindings in changes:
            if bindings:
                upserts.append((aor, max(b.expires_at for b in bindings), _dumps(bindings)))
            else:
                deletes.append((aor,))

        def tx():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if upserts:
                    self.db.executemany(
                        "INSERT OR REPLACE INTO aors (aor, expires_at, bindings) VALUES (?, ?, ?)",
                        upserts)
                if deletes:
                    self.db.executemany("DELETE FROM aors WHERE aor = ?", deletes)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        self._exec_retry(tx)
        n = len(upserts) + len(deletes)
        self.rows_written += n
        return n

    def purge_expired(self, now: float, limit: int = 5000) -> int:
        """Delete up to ``limit`` rows whose every binding has expired (all shards may do it)."""
        cur = self._exec_retry(lambda: self.db.execute(
            "DELETE FROM aors WHERE aor IN (SELECT aor FROM aors WHERE expires_at <= ? LIMIT ?)",
            (now, limit)))
        return cur.rowcount

    def checkpoint(self, mode: str = "PASSIVE"):
        """Copy the WAL into the database file (the supervisor does it, off the workers' path)."""
        return self.db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()

    def close(self):
        try:
            self.db.close()
        except sqlite3.Error:
            pass
