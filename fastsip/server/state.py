"""Embedded persistence: one SQLite file (WAL), one row per AOR, and a change log in front.

A row holds the AOR, the latest expiry among its bindings (so that loading
can skip dead rows in SQL) and the bindings as one record (docs/record.md),
the bytes the store writes in C for its change feed and reads back in C
(``Store.load_record``): no Python object per binding on either path.
``meta.format`` names that encoding.  A row that does not decode is skipped
and logged, never fatal.

Workers do not write SQLite while they serve: each flush appends the worker's
changed AORs to its change log (``ChangeLog``: one checksummed frame, in the
directory ``PATH.changes``), and the supervisor folds the logs into the file
every ``--fold-interval`` seconds (:class:`Folder`: the last change of each
AOR, in AOR order, one transaction; then the WAL is synced and the folded
segments deleted), before it starts or restarts a worker, and at stop.
Where the writer in C is not available, a worker writes its rows straight
into the file (``StateFile.write``: one ``executemany``, in AOR order).

A file of the previous format (``marshal4-rows13``: marshal of 13-field
lists) is converted when it is opened, in one transaction, and the log says
so.

At start a worker loads the rows whose AOR hashes to its shard
(``shard_of(aor, workers)``) and whose bindings have not expired, so
changing ``--workers`` between runs re-shards on load.  Rows are read under
the registrar's canonical AOR (``RegistrarCore.aor_of``): a row written under
another form (earlier builds kept the port of To in the AOR; ``--aor-by``
may have changed) is merged into its AOR and the file rewritten that way.
"""
from __future__ import annotations

import marshal
import os
import sqlite3
import struct
import time
import zlib
from operator import itemgetter

import fastsip
from fastsip.core._core import decode_record, encode_record, uri_compare_key
from fastsip.server import logs
from fastsip.server._io_c import ChangeLog, SqlWriter

LOG = logs.LOG

SCHEMA = """
CREATE TABLE IF NOT EXISTS aors (
    aor        TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,      -- the latest expiry among the bindings (wall clock)
    bindings   BLOB NOT NULL       -- the AOR's record (docs/record.md)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
"""
FORMAT = "record1"
OLD_FORMAT = "marshal4-rows13"
UPSERT = "INSERT OR REPLACE INTO aors (aor, bindings, expires_at) VALUES (?, ?, ?)"
DELETE = "DELETE FROM aors WHERE aor = ?"
CONVERT_BATCH = 10000       # rows of an old file read at a time while converting it
SEGMENT_BYTES = 64 << 20    # a worker starts a new change-log segment past this size
FOLD_BYTES = 64 << 20       # frames a fold writes per transaction (and holds in memory)
#: a change-log frame's head (docs/record.md): magic, version, 0, rows, payload bytes,
#: the payload's CRC-32, the CRC-32 of the 20 bytes before
FRAME = struct.Struct("<4sHHIIII")
MAGIC = b"FSCL"


def binding_from_row(r) -> fastsip.Binding:
    """A Binding from a row of the previous format (``marshal4-rows13``), to convert it."""
    uri, expires_at, q, call_id, cseq, host, port, transport, conn_id, path, instance, reg_id, ua = r
    return fastsip.Binding(uri, expires_at, q=q, call_id=call_id, cseq=cseq, source=(host, port),
                           transport=transport, conn_id=conn_id, path=tuple(path),
                           instance=instance, reg_id=reg_id, user_agent=ua)


def row_of(aor: str, bindings) -> tuple:
    """The row ``(aor, record, expires_at)`` of ``aor`` holding ``bindings``
    (Binding objects), as ``Store.change_records`` gives it: what
    :meth:`StateFile.write` takes."""
    bindings = list(bindings)
    if not bindings:
        return (aor, None, 0.0)
    return (aor, encode_record(bindings), max(b.expires_at for b in bindings))


def sqlite_library() -> bytes | None:
    """The path of the SQLite library that Python's sqlite3 module loaded, as
    ``/proc/self/maps`` shows it (None elsewhere, or when it is linked in)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and b"/libsqlite3." in fields[5]:
                    return fields[5].rstrip(b"\n")
    except OSError:
        pass
    return None


def sql_writer(path: str, checkpoints: bool = True):
    """The C writer of the state file at ``path`` (``_io_c.SqlWriter``, opened
    after :class:`StateFile` made the file), or None where it cannot use the
    SQLite library Python's sqlite3 module loaded: ``StateFile.write`` then."""
    library = sqlite_library()
    if library is None:
        return None
    try:
        return SqlWriter(path, library, checkpoints=checkpoints)
    except OSError as exc:
        LOG.info("state file: the writer in C is not available (%s): writing from Python", exc)
        return None


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
        fmt = self._format()
        if fmt == OLD_FORMAT:
            self._exec_retry(self._convert)
        elif fmt != FORMAT:
            raise ValueError(f"state file {path}: format {fmt!r}, this fastsip writes {FORMAT!r}")
        self.db.create_function("fastsip_shard", 2, fastsip.shard_of, deterministic=True)
        self.rows_written = 0
        self.errors = 0

    def _format(self) -> str:
        return self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]

    def _exec_retry(self, fn, tries=5):
        for i in range(tries):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or i == tries - 1:
                    raise
                time.sleep(0.05 * (i + 1))

    def _convert(self) -> None:
        """Rewrite a file of the previous format (marshal of 13-field rows) with
        records, in one transaction (another process that got there first
        leaves nothing to do).  Rows that do not decode are dropped (they could
        not load either); the log says how many rows were converted and dropped."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._format() != OLD_FORMAT:
                db.execute("COMMIT")
                return
            converted = dropped = 0
            last = ""
            while True:
                rows = db.execute("SELECT aor, bindings FROM aors WHERE aor > ? ORDER BY aor "
                                  "LIMIT ?", (last, CONVERT_BATCH)).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                records, bad = [], []
                for aor, blob in rows:
                    try:
                        bindings = [binding_from_row(r) for r in marshal.loads(blob)]
                        records.append((encode_record(bindings), aor))
                    except (ValueError, TypeError, EOFError, OverflowError):
                        bad.append((aor,))
                db.executemany("UPDATE aors SET bindings = ? WHERE aor = ?", records)
                db.executemany("DELETE FROM aors WHERE aor = ?", bad)
                converted += len(records)
                dropped += len(bad)
            db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (FORMAT,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        LOG.info("state file %s: converted %d rows from format %s to %s%s", self.path,
                 converted, OLD_FORMAT, FORMAT,
                 f" ({dropped} rows that did not decode dropped)" if dropped else "")

    def load(self, shard: int, shards: int, now: float, key=None):
        """Yield (aor, record) for this shard's rows with bindings still alive at
        ``now`` (the record may still hold expired ones: ``Store.load_record``
        skips them).  ``key``: the canonical form of an AOR (default: as
        stored).  Rows stored under another form come last, each merged with
        the row of its canonical AOR (a contact in both keeps the later
        expiry); the file is then rewritten to hold the merged row alone.  A
        row of those that does not decode is counted in ``errors`` and logged."""
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
            yield aor, blob
        for k, olds in moved.items():
            merged = {}
            for stored in [k] + olds:
                row = self.db.execute("SELECT bindings FROM aors WHERE aor = ?",
                                      (stored,)).fetchone()
                for b in self._live(stored, row[0], now) if row else ():
                    ck = uri_compare_key(b.uri)
                    if ck not in merged or merged[ck].expires_at < b.expires_at:
                        merged[ck] = b
            bindings = list(merged.values())
            self.write([row_of(k, bindings)] + [(old, None, 0.0) for old in olds])
            if bindings:
                yield k, encode_record(bindings)

    def _live(self, aor, blob, now):
        """The bindings of a record still alive at ``now`` ([] for one that does not decode)."""
        try:
            return [b for b in decode_record(blob)[1] if b.expires_at > now]
        except (ValueError, TypeError) as exc:
            self.errors += 1
            LOG.warning("state file %s: the row of %s does not decode (%s): skipped",
                        self.path, aor, exc)
            return []

    def write(self, rows) -> int:
        """Write ``[(aor, record or None, expires_at)]`` (``Store.change_records``)
        in one transaction: a record replaces the AOR's row, None deletes it.
        When an AOR is in ``rows`` more than once, its last entry counts.  The
        records go in AOR order, in one ``executemany``.  Returns the rows
        written or deleted."""
        upserts = [r for r in rows if r[1] is not None]
        deletes = None
        if len(upserts) < len(rows):
            last = {r[0]: r for r in rows}
            if len(last) < len(rows):           # an AOR twice: its last change wins
                upserts = [r for r in last.values() if r[1] is not None]
            deletes = [(aor,) for aor, record, _ in last.values() if record is None]
        upserts.sort(key=itemgetter(0))

        def tx():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(UPSERT, upserts)
                if deletes:
                    self.db.executemany(DELETE, deletes)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        self._exec_retry(tx)
        n = len(upserts) + (len(deletes) if deletes else 0)
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


# -- the change log ---------------------------------------------------------------------------

def log_dir(path: str) -> str:
    """The directory of the change logs of the state file ``path``."""
    return path + ".changes"


def segment_path(path: str, index: int) -> str:
    """A new change-log segment of worker ``index`` (named so that a later one sorts later)."""
    return os.path.join(log_dir(path), f"{index}-{time.time_ns():020d}.log")


def change_log(path: str, index: int):
    """Worker ``index``'s change log of the state file ``path`` (a new segment), or
    None where the supervisor could not fold it (no writer in C: :func:`sql_writer`)."""
    probe = sql_writer(path, checkpoints=False)
    if probe is None:
        return None
    probe.close()
    os.makedirs(log_dir(path), exist_ok=True)
    return ChangeLog(segment_path(path, index))


def read_frames(data: bytes) -> tuple[list, int, int, str | None]:
    """The whole frames at the start of ``data``: (payloads, rows, bytes they take,
    why the rest was not read: None when nothing is left, else "incomplete" or
    "corrupt")."""
    payloads, rows, pos, n = [], 0, 0, len(data)
    view = memoryview(data)
    while pos < n:
        if pos + FRAME.size > n:
            return payloads, rows, pos, "incomplete"
        magic, version, _zero, count, size, crc, head_crc = FRAME.unpack_from(data, pos)
        if magic != MAGIC or version != 1 or zlib.crc32(view[pos:pos + 20]) != head_crc:
            return payloads, rows, pos, "corrupt"
        end = pos + FRAME.size + size
        if end > n:
            return payloads, rows, pos, "incomplete"
        payload = view[pos + FRAME.size:end]
        if zlib.crc32(payload) != crc:
            return payloads, rows, pos, "corrupt"
        payloads.append(payload)
        rows += count
        pos = end
    return payloads, rows, pos, None


class Folder:
    """The supervisor's side of the change logs: ``fold`` writes what the workers
    appended since the last fold into the SQLite file."""

    def __init__(self, path: str, sql) -> None:
        self.path = path
        self.dir = log_dir(path)
        self.sql = sql                  # SqlWriter on the file (checkpoints=False)
        self.file = StateFile(path, checkpoints=False)
        self.offsets: dict[str, int] = {}   # segment -> bytes of it already folded
        self.read = 0                   # changes read from the logs (the metric)
        os.makedirs(self.dir, exist_ok=True)

    def segments(self) -> list[tuple[int, str]]:
        """The segments, ``(worker index, name)``, oldest first per worker."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            head, _, tail = name.partition("-")
            if head.isdigit() and tail.endswith(".log"):
                out.append((int(head), name))
        return out

    def fold(self, index: int | None = None, final: bool = False) -> int:
        """Write the changes appended since the last fold (of worker ``index``'s
        segments, or every worker's) into the file, sync the WAL, then delete the
        segments read to their end: one transaction per ``FOLD_BYTES`` of frames.
        ``final``: their workers have stopped, so every segment is read to its end
        and deleted (a frame cut short or damaged at the end, where a worker was
        killed mid-write, is dropped and logged).  Returns the changes read.  On an
        error nothing more is deleted, and the next fold reads the same frames again."""
        total = 0
        while True:
            rows, more = self._fold_some(index, final)
            total += rows
            if not more:
                return total

    def _fold_some(self, index, final) -> tuple[int, bool]:
        """One transaction of ``fold``: (changes read, whether frames were left for
        another because of ``FOLD_BYTES``)."""
        segs = [s for s in self.segments() if index is None or s[0] == index]
        newest = {}
        for i, name in segs:
            newest[i] = name
        payloads, rows, moved, gone = [], 0, {}, []
        budget, more = FOLD_BYTES, False
        for i, name in segs:
            start = self.offsets.get(name, 0)
            took_all = False
            with open(os.path.join(self.dir, name), "rb") as f:
                f.seek(start)
                data = f.read(budget)
                if len(data) == budget and f.read(1):   # more than this fold takes
                    if payloads or read_frames(data)[1]:
                        more = True         # the rest waits for the next transaction
                    else:                   # not one whole frame within it: the segment
                        f.seek(start)
                        data = f.read()
                        took_all = True
            got, n, used, problem = read_frames(data)
            payloads += got
            rows += n
            budget -= used
            # a segment still written to is read again from its first frame not read
            done = (final or newest[i] != name) and not more
            if problem is not None and done:
                LOG.warning("state file: change log %s: %d bytes at %d %s: dropped", name,
                            len(data) - used, start + used,
                            "cut short" if problem == "incomplete" else "damaged")
            if done:
                gone.append(name)
            else:
                moved[name] = start + used
            if more or took_all:    # (later segments wait for the next transaction ...
                more = more or n > 0        # ... if this one made progress: no endless retry)
                break
        if rows:
            self.sql.apply(b"".join(payloads), rows)
            self.file.checkpoint()
            self._sync_wal()
        self.offsets.update(moved)
        self.read += rows
        for name in gone:
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
            self.offsets.pop(name, None)
        return rows, more

    def _sync_wal(self) -> None:
        """The folded rows on disk before their segments go (the checkpoint may
        not have synced every frame of the WAL while a reader held it back)."""
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """After the last fold: the directory goes when it is empty."""
        self.file.close()
        self.sql.close()
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
