"""The state file: the flush path and the load path, the previous code beside this
one, in one run (issue #11: ≤ 2 µs per changed AOR for the flush).

    python3 -m pytest bench/bench_state.py -s --benchmark-columns=min,median,rounds

flush/new     Store.change_records (one record per AOR, made in C) + StateFile.write
              (one transaction: the records in AOR order by one executemany)
flush/old     the previous path, kept here as it was (fastsip 995be28): Store.changes
              (a Binding per binding) + marshal of 13-field rows + INSERT OR REPLACE
feed/new      Store.change_records alone (no SQLite)
feed/old      Store.changes + the marshal rows alone (no SQLite)
load/new      StateWriter.load: the shard's rows -> Store.load_record (C)
load/old      the previous load: marshal.loads -> a Binding per binding -> Store.load

Each flush round takes CHANGED AORs (a random sample, 1 or 2 bindings each, ~220
bytes of record) of a file holding FILE_AORS (10,000: every row changes; 100,000:
one in ten), in a WAL file checkpointed between rounds as the supervisor does.
The setup of a round (marking the AORs changed, the checkpoint) is not timed.
Loading reads a file of 100,000 AORs (150,000 bindings).  With -s, the last test
prints µs per changed AOR and bindings loaded per second (the best round and the
median) and the gain (old time / new time, from the best rounds).
"""
import marshal
import os
import random
import sqlite3
import time

import pytest

from fastsip import Binding, Registrar, Store, shard_of
from fastsip.server.state import StateFile
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


def keep(benchmark, key, per, rate=False):
    """Record min and median of a finished benchmark: µs per ``per`` items, or items/s."""
    if benchmark.stats is None:
        return
    s = benchmark.stats.stats
    if rate:
        RESULTS[key] = (per / s.min, per / s.median)       # the fastest round: the most per s
    else:
        RESULTS[key] = (s.min / per * 1e6, s.median / per * 1e6)


# -- flush ----------------------------------------------------------------------------------

@pytest.mark.parametrize("file_aors", [10_000, 100_000])
def test_flush_new(benchmark, tmp_path, file_aors):
    benchmark.group = f"flush: {CHANGED} changed AORs of {file_aors}"
    store, f = new_file(str(tmp_path / "new.db"), file_aors)

    def flush():
        return f.write(store.change_records())
    assert benchmark.pedantic(flush, setup=rounds_setup(store, f.checkpoint, file_aors),
                              rounds=ROUNDS, iterations=1) == CHANGED
    keep(benchmark, (f"flush, file of {file_aors}", "new"), CHANGED)
    f.close()


@pytest.mark.parametrize("file_aors", [10_000, 100_000])
def test_flush_old(benchmark, tmp_path, file_aors):
    benchmark.group = f"flush: {CHANGED} changed AORs of {file_aors}"
    store, db = old_file(str(tmp_path / "old.db"), file_aors)
    benchmark.pedantic(lambda: old_write(db, store.changes()),
                       setup=rounds_setup(store, lambda: db.execute(
                           "PRAGMA wal_checkpoint(PASSIVE)"), file_aors),
                       rounds=ROUNDS, iterations=1)
    keep(benchmark, (f"flush, file of {file_aors}", "old"), CHANGED)
    assert db.execute("SELECT count(*) FROM aors").fetchone() == (file_aors,)
    db.close()


def test_feed_new(benchmark):
    benchmark.group = f"feed: {CHANGED} changed AORs, no SQLite"
    store = Store(track_changes=True)
    for i in range(CHANGED):
        store.load(aor(i), bindings_of(i))
    out = benchmark.pedantic(store.change_records, setup=rounds_setup(store, lambda: None,
                                                                      CHANGED),
                             rounds=ROUNDS, iterations=1)
    assert len(out) == CHANGED and 200 < sum(len(r[1]) for r in out) / CHANGED < 260
    keep(benchmark, ("feed (no SQLite)", "new"), CHANGED)


def test_feed_old(benchmark):
    benchmark.group = f"feed: {CHANGED} changed AORs, no SQLite"
    store = Store(track_changes=True)
    for i in range(CHANGED):
        store.load(aor(i), bindings_of(i))
    out = benchmark.pedantic(lambda: old_rows(store.changes()),
                             setup=rounds_setup(store, lambda: None, CHANGED),
                             rounds=ROUNDS, iterations=1)
    assert len(out[0]) == CHANGED
    keep(benchmark, ("feed (no SQLite)", "old"), CHANGED)


# -- load -----------------------------------------------------------------------------------

LOAD_BINDINGS = sum(len(bindings_of(i)) for i in range(LOAD_AORS))


@pytest.fixture(scope="module")
def load_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    new_store, f = new_file(str(d / "new.db"), LOAD_AORS)
    f.close()
    old_store, db = old_file(str(d / "old.db"), LOAD_AORS)
    db.close()
    return str(d / "new.db"), str(d / "old.db")


def test_load_new(benchmark, load_files):
    benchmark.group = f"load: {LOAD_AORS} AORs, {LOAD_BINDINGS} bindings"
    path = load_files[0]

    def load():
        reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
        w = StateWriter(path, 0, 1, reg, None)
        out = w.load(NOW)
        w.file.close()
        return out
    assert benchmark.pedantic(load, rounds=5, iterations=1) == (LOAD_AORS, LOAD_BINDINGS)
    keep(benchmark, (f"load, {LOAD_AORS} AORs (bindings/s)", "new"), LOAD_BINDINGS, rate=True)


def test_load_old(benchmark, load_files):
    benchmark.group = f"load: {LOAD_AORS} AORs, {LOAD_BINDINGS} bindings"
    path = load_files[1]

    def load():
        reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
        db = sqlite3.connect(path, isolation_level=None)
        out = old_load(db, reg.store, reg.aor_of, NOW)
        db.close()
        return out
    assert benchmark.pedantic(load, rounds=5, iterations=1) == LOAD_BINDINGS
    keep(benchmark, (f"load, {LOAD_AORS} AORs (bindings/s)", "old"), LOAD_BINDINGS, rate=True)


def test_summary():
    if len(RESULTS) < 8:
        pytest.skip("run the benchmarks above first (not with --benchmark-disable)")
    print(f"\nload average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'':38s} {'new min':>9s} {'median':>9s} {'old min':>9s} {'median':>9s} "
          f"{'gain':>8s}")
    for group in dict.fromkeys(g for g, _ in RESULTS):
        new, old = RESULTS[(group, "new")], RESULTS[(group, "old")]
        if "bindings/s" in group:       # a rate: the best round is the highest
            print(f"{group:38s} {new[0]:9.0f} {new[1]:9.0f} {old[0]:9.0f} {old[1]:9.0f} "
                  f"{new[0] / old[0]:7.1f}x")
        else:
            print(f"{group + ' µs/AOR':38s} {new[0]:9.2f} {new[1]:9.2f} {old[0]:9.2f} "
                  f"{old[1]:9.2f} {old[0] / new[0]:7.1f}x")
    feed = RESULTS[("feed (no SQLite)", "new")][0]
    for group in dict.fromkeys(g for g, _ in RESULTS if g.startswith("flush")):
        print(f"{group}: SQLite's share of the new flush {RESULTS[(group, 'new')][0] - feed:.2f} "
              f"µs/AOR (the flush less the feed, minima)")
