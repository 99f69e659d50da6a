"""The state file: the flush path and the load path, the previous code beside this
one, in one run (issue #11: ≤ 2 µs per changed AOR for the flush).

    python3 -m pytest bench/bench_state.py -s -q

flush   new: SqlWriter.write (the store's changed AORs encoded in C straight into
        SQLite's C API, in AOR order, one transaction: how a worker wrote before the
        change log, and how the supervisor's fold writes);
        py: Store.change_records (one record per AOR, made in C) + StateFile.write
        (one executemany; the writer where SqlWriter is not available);
        old: the previous path, kept here as it was (fastsip 995be28): Store.changes
        (a Binding per binding) + marshal of 13-field rows + INSERT OR REPLACE
feed    the same without SQLite: Store.change_records; Store.changes + the marshal rows
load    new: StateWriter.load, the shard's rows -> Store.load_record (C);
        old: marshal.loads -> a Binding per binding -> Store.load
pages   4 KiB against 32 KiB SQLite pages, each flush with its checkpoint
change log  ten flushes appended to a change log and one fold of them, against ten
        flushes into SQLite each with its checkpoint (the server's design before)

Each flush round takes CHANGED AORs (a random sample, 1 or 2 bindings each, ~220
bytes of record) of a file holding 10,000 (every row changes) or 100,000 AORs (one
in ten), in a WAL file checkpointed between rounds as the supervisor does; the
setup of a round (marking the AORs changed, the checkpoint) is not timed.  Loading
reads a file of 100,000 AORs (150,000 bindings).  Old and new rounds alternate, so
that both run under the same noise of a shared machine (pytest-benchmark would run
one after the other).  With -s the last test prints µs per changed AOR and bindings
loaded per second (the best round and the median) and the gain (old time / new
time, best rounds).
"""
import marshal
import os
import random
import sqlite3
import time

import pytest

from fastsip import Binding, Registrar, Store, shard_of
from fastsip.server._io_c import ChangeLog
from fastsip.server.state import Folder, StateFile, segment_path, sql_writer
from fastsip.server.timers import StateWriter

NOW = 1_764_115_200.0
CHANGED = 10_000
ROUNDS = 15
LOAD_AORS = 100_000
RESULTS = {}        # (group, "new" | "old") -> (min, median) in µs per AOR or bindings/s


def bindings_of(i):
    """AOR i's bindings: a softphone's UDP binding, and every other AOR a second phone."""
    out = []
    for k in range(1 + i % 2):
        host = f"192.0.2.{1 + k}"
        out.append(Binding(f"sip:user{i}@{host}:5060;transport=udp", NOW + 600 + i % 100,
                           call_id=f"{i:08x}-4c1f8e2a9b7d@{host}", cseq=1 + i % 1000,
                           source=(host, 5060 + k), transport="udp",
                           user_agent="BenchPhone/1.0"))
    return out


def aor(i):
    return f"sip:user{i}@example.com"


# -- the previous state file, as fastsip 995be28 wrote and read it -------------------------

OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS aors (aor TEXT PRIMARY KEY, expires_at REAL NOT NULL,
                                 bindings BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('format', 'marshal4-rows13');
"""


def old_binding_row(b):
    src = b.source or ("", 0)
    return [b.uri, b.expires_at, b.q, b.call_id, b.cseq, src[0], src[1], b.transport, b.conn_id,
            list(b.path or ()), b.instance, b.reg_id, b.user_agent]


def old_binding_from_row(r):
    uri, expires_at, q, call_id, cseq, host, port, transport, conn_id, path, instance, reg_id, ua = r
    return Binding(uri, expires_at, q=q, call_id=call_id, cseq=cseq, source=(host, port),
                   transport=transport, conn_id=conn_id, path=tuple(path), instance=instance,
                   reg_id=reg_id, user_agent=ua)


def old_rows(changes):
    upserts, deletes = [], []
    for name, bindings in changes:
        if bindings:
            upserts.append((name, max(b.expires_at for b in bindings),
                            marshal.dumps([old_binding_row(b) for b in bindings], 4)))
        else:
            deletes.append((name,))
    return upserts, deletes


def old_write(db, changes):
    upserts, deletes = old_rows(changes)
    db.execute("BEGIN IMMEDIATE")
    if upserts:
        db.executemany("INSERT OR REPLACE INTO aors (aor, expires_at, bindings) VALUES (?, ?, ?)",
                       upserts)
    if deletes:
        db.executemany("DELETE FROM aors WHERE aor = ?", deletes)
    db.execute("COMMIT")


def old_load(db, store, canon, now):
    """The previous StateFile.load + StateWriter.load (rows under their canonical AOR)."""
    db.create_function("fastsip_canonical_shard", 2, lambda a, n: shard_of(canon(a), n))
    loaded = 0
    for name, blob in db.execute("SELECT aor, bindings FROM aors WHERE expires_at > ? "
                                 "AND fastsip_canonical_shard(aor, ?) = ?", (now, 1, 0)):
        if canon(name) != name:
            continue
        live = [old_binding_from_row(r) for r in marshal.loads(blob) if r[1] > now]
        loaded += store.load(name, live, drop_flows=True)
    store.changes()
    return loaded


# -- the files ------------------------------------------------------------------------------

def new_file(path, n):
    """A state file of this build holding AORs 0..n-1 and a store holding the same."""
    store = Store(track_changes=True)
    for i in range(n):
        store.load(aor(i), bindings_of(i))
    f = StateFile(path, checkpoints=False)
    f.write(store.change_records())
    f.checkpoint("TRUNCATE")
    return store, f


def old_file(path, n):
    store = Store(track_changes=True)
    for i in range(n):
        store.load(aor(i), bindings_of(i))
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.executescript(OLD_SCHEMA)
    old_write(db, store.changes())
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store, db


def rounds_setup(store, checkpoint, n):
    """The untimed part of a round: CHANGED random AORs of n marked changed, the
    WAL checkpointed (the supervisor does it every second)."""
    rng = random.Random(n)

    def setup():
        checkpoint()
        for i in rng.sample(range(n), CHANGED):
            store.mark_changed(aor(i))
    return setup


def measure(key, per, pairs, rounds=ROUNDS, rate=False, clock=time.perf_counter):
    """Run the old and the new path alternately, ``rounds`` times each (the machine
    is shared: interleaving puts both under the same noise); ``pairs``: {"old" |
    "new": (setup, run)}, setup untimed.  Keeps the best round and the median:
    µs per ``per`` items, or items per second.  ``clock``: wall time, or
    ``time.process_time`` for the CPU time of the process (every thread)."""
    times = {side: [] for side in pairs}
    for _ in range(rounds):
        for side, (setup, run) in pairs.items():
            setup()
            t = clock()
            run()
            times[side].append(clock() - t)
    for side, ts in times.items():
        ts.sort()
        best, median = ts[0], ts[len(ts) // 2]
        RESULTS[(key, side)] = (per / best, per / median) if rate else (
            best / per * 1e6, median / per * 1e6)


# -- flush ----------------------------------------------------------------------------------

@pytest.mark.parametrize("file_aors", [10_000, 100_000])
def test_flush(tmp_path, file_aors):
    store, f = new_file(str(tmp_path / "new.db"), file_aors)
    sql = sql_writer(f.path, checkpoints=False)     # as in a worker: the supervisor checkpoints
    assert sql is not None, "the C writer cannot use Python's SQLite library here"
    py_store, py_f = new_file(str(tmp_path / "py.db"), file_aors)
    old_store, db = old_file(str(tmp_path / "old.db"), file_aors)
    written = []
    measure(f"flush, file of {file_aors}", CHANGED, {
        "new": (rounds_setup(store, f.checkpoint, file_aors),
                lambda: written.append(sql.write(store, CHANGED))),
        "py": (rounds_setup(py_store, py_f.checkpoint, file_aors),
               lambda: written.append(py_f.write(py_store.change_records()))),
        "old": (rounds_setup(old_store, lambda: db.execute("PRAGMA wal_checkpoint(PASSIVE)"),
                             file_aors),
                lambda: old_write(db, old_store.changes())),
    })
    assert written == [CHANGED] * 2 * ROUNDS
    for conn in (db, f.db, py_f.db):
        assert conn.execute("SELECT count(*) FROM aors").fetchone() == (file_aors,)
    sql.close()
    f.close()
    py_f.close()
    db.close()


def page_file(path, page_size, n):
    """A state file with pages of ``page_size`` bytes holding AORs 0..n-1, its
    store, and SqlWriter on it."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA journal_mode=WAL")           # fixes the page size
    db.close()
    store, f = new_file(path, n) if n else (Store(track_changes=True), StateFile(path))
    assert f.db.execute("PRAGMA page_size").fetchone() == (page_size,)
    return store, f, sql_writer(path, checkpoints=False)


def case_setup(store, existing, n, seed):
    """The untimed part of a round of a case: ``n`` of the file's ``existing`` AORs
    marked changed, at random (refreshes), or, with no file, ``n`` AORs never seen,
    in name order (new users)."""
    if existing:
        rng = random.Random(seed)

        def setup():
            for i in rng.sample(range(existing), n):
                store.mark_changed(aor(i))
        return setup
    start = [0]

    def setup():
        for i in range(start[0], start[0] + n):
            store.load(aor(i), bindings_of(i))
        start[0] += n
    return setup


PAGE_CASES = {          # (AORs in the file, AORs changed per flush)
    "new AORs in order": (0, CHANGED),
    "refreshes, dense": (100_000, CHANGED),
    "refreshes, sparse": (300_000, 1_000),
}


@pytest.mark.parametrize("case", list(PAGE_CASES))
def test_page_size(tmp_path, case):
    """Why the file keeps SQLite's 4 KiB pages ("new") rather than 32 KiB ("old"),
    each flush timed with the supervisor's checkpoint that follows it.  Larger
    pages win where a flush changes many neighbouring rows: AORs never seen, in
    name order (a benchmark's sequential users), or a tenth of the file at once.
    They lose where it matters, the steady state of an edge registrar: phones
    refresh at random over the expiry, so a flush of a large file changes rows
    far apart, and each costs a whole page in the WAL and again in the file."""
    existing, changed = PAGE_CASES[case]
    pairs, files = {}, []
    for side, size in (("new", 4096), ("old", 32768)):
        store, f, sql = page_file(str(tmp_path / f"{size}.db"), size, existing)
        files.append((f, sql))
        setup = case_setup(store, existing, changed, size)

        def run(store=store, f=f, sql=sql):
            assert sql.write(store, changed) == changed
            f.checkpoint("PASSIVE")
        pairs[side] = (setup, run)
    measure(f"pages 4 KiB (new) / 32 KiB (old), {case}", changed, pairs, rounds=6)
    for f, sql in files:
        assert f.db.execute("SELECT count(*) FROM aors").fetchone() == (existing or 6 * changed,)
        sql.close()
        f.close()


FOLD_FLUSHES = 10       # flushes per fold: --fold-interval 10 s / --flush-interval 1 s


@pytest.mark.parametrize("case", list(PAGE_CASES))
def test_change_log(tmp_path, case):
    """The state file's two designs, per changed AOR, over one fold's worth of flushes
    (ten): "new", each flush appended to the worker's change log (``ChangeLog``: stage,
    one frame, fdatasync) and one fold of the ten into SQLite (``Folder.fold``: the
    last change of each AOR in AOR order, one transaction, the checkpoint, the WAL
    synced); "old", each flush written straight into SQLite with the checkpoint after
    it (the design before the change log).  The cases of ``test_page_size``.  CPU
    time, not wall time: the appends' fdatasync waits for the disk on the worker's
    writer thread, which costs the server no CPU."""
    existing, changed = PAGE_CASES[case]
    per_round = FOLD_FLUSHES * changed
    pairs, closers = {}, []
    for side in ("new", "old"):
        path = str(tmp_path / f"{side}.db")
        store, f, sql = page_file(path, 4096, existing)
        setup = case_setup(store, existing, per_round, existing)
        if side == "new":
            os.makedirs(path + ".changes", exist_ok=True)
            log, folder = ChangeLog(segment_path(path, 0)), Folder(path, sql)

            def run(store=store, log=log, folder=folder):
                for _ in range(FOLD_FLUSHES):
                    assert log.stage(store, changed) == changed and log.commit() == changed
                assert folder.fold() == per_round
            closers += [log.close, folder.close]
        else:
            def run(store=store, f=f, sql=sql):
                for _ in range(FOLD_FLUSHES):
                    assert sql.write(store, changed) == changed
                    f.checkpoint("PASSIVE")
            closers.append(sql.close)
        closers.append(f.close)
        pairs[side] = (setup, run)
    measure(f"change log + fold (new) / SQLite per flush (old), {case}, CPU", per_round, pairs,
            rounds=5, clock=time.process_time)
    for close in closers:
        close()


def test_feed():
    store, old_store = Store(track_changes=True), Store(track_changes=True)
    for i in range(CHANGED):
        store.load(aor(i), bindings_of(i))
        old_store.load(aor(i), bindings_of(i))
    sizes = []
    measure("feed (no SQLite)", CHANGED, {
        "new": (rounds_setup(store, lambda: None, CHANGED),
                lambda: sizes.append(sum(len(r[1]) for r in store.change_records()))),
        "old": (rounds_setup(old_store, lambda: None, CHANGED),
                lambda: old_rows(old_store.changes())),
    })
    assert 200 < sizes[0] / CHANGED < 260           # bytes of record per AOR


# -- load -----------------------------------------------------------------------------------

LOAD_BINDINGS = sum(len(bindings_of(i)) for i in range(LOAD_AORS))


def test_load(tmp_path):
    new_path, old_path = str(tmp_path / "new.db"), str(tmp_path / "old.db")
    new_file(new_path, LOAD_AORS)[1].close()
    old_file(old_path, LOAD_AORS)[1].close()
    got = {}

    def load_new():
        reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
        w = StateWriter(new_path, 0, 1, reg, None)
        got["new"] = w.load(NOW)
        w.file.close()

    def load_old():
        reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
        db = sqlite3.connect(old_path, isolation_level=None)
        got["old"] = old_load(db, reg.store, reg.aor_of, NOW)
        db.close()
    measure(f"load, {LOAD_AORS} AORs (bindings/s)", LOAD_BINDINGS,
            {"new": (lambda: None, load_new), "old": (lambda: None, load_old)},
            rounds=5, rate=True)
    assert got == {"new": (LOAD_AORS, LOAD_BINDINGS), "old": LOAD_BINDINGS}


def test_summary():
    if len(RESULTS) < 20:
        pytest.skip("run the measurements above first")
    print(f"\nload average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}; old and new rounds "
          f"alternate")
    print(f"{'':38s} {'new best':>9s} {'median':>9s} {'old best':>9s} {'median':>9s} "
          f"{'gain':>8s}")
    for group in dict.fromkeys(g for g, _ in RESULTS):
        new, old = RESULTS[(group, "new")], RESULTS[(group, "old")]
        if "bindings/s" in group:       # a rate: the best round is the highest
            print(f"{group:38s} {new[0]:9.0f} {new[1]:9.0f} {old[0]:9.0f} {old[1]:9.0f} "
                  f"{new[0] / old[0]:7.1f}x")
        else:
            print(f"{group + ' µs/AOR':38s} {new[0]:9.2f} {new[1]:9.2f} {old[0]:9.2f} "
                  f"{old[1]:9.2f} {old[0] / new[0]:7.1f}x")
    for group in dict.fromkeys(g for g, _ in RESULTS if g.startswith("flush")):
        new, py = RESULTS[(group, "new")], RESULTS[(group, "py")]
        print(f"{group}: the Python writer (StateFile.write of Store.change_records) "
              f"{py[0]:.2f} best, {py[1]:.2f} median µs/AOR: the C writer {py[0] / new[0]:.2f}x "
              f"faster (best rounds)")
