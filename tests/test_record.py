"""The AOR record (docs/record.md): written by the store in C for its change feed,
read back in C into a store, and by the pure-Python reader the docs give; the
state file that keeps them (one executemany per flush, rows of the previous
format converted on open, rows that do not decode skipped)."""
import logging
import marshal
import math
import os
import re
import resource
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastsip import Binding, Registrar, Store
from fastsip.registrar import decode_record, encode_record
from fastsip.server import logs, state
from fastsip.server._io_c import ChangeLog, SqlWriter
from fastsip.server.state import (
    FORMAT,
    FRAME,
    OLD_FORMAT,
    Folder,
    StateFile,
    log_dir,
    row_of,
    sql_writer,
    sqlite_library,
)
from fastsip.server.timers import BAD_ROW_LINES, StateWriter
from test_flows import FLOW, UDP, WS, reg_over
from test_registrar import NOW, request

DOCS = Path(__file__).resolve().parent.parent / "docs" / "record.md"
FULL = Binding("sip:alice@[2001:db8::7]:5061;transport=tls", NOW + 600.25, q=0.725,
               call_id="a84b4c76e66710@pc33", cseq=4_294_967_295,
               source=("2001:db8::7", 65535), transport="tls", conn_id=(1 << 40) | 7,
               path=("<sip:edge1.example.com;lr>", "<sip:edge2.example.com;lr;ob>"),
               instance="<urn:uuid:00000000-0000-1000-8000-000a95a0e128>", reg_id=2,
               user_agent="Phone/1.0 (caf\u00e9) \udcff")      # a byte that was not UTF-8
BARE = Binding("sip:b@h", NOW + 30)                 # every optional field absent
EMPTY = Binding("sip:c@h", NOW + 60, q=0.0, call_id="", cseq=0, source=("", 0),
                transport="udp", conn_id=-1, path=(), instance=None, reg_id=None,
                user_agent=None)


def record_of(bindings, aor="sip:alice@example.com"):
    """The change feed's record of ``aor`` holding ``bindings`` (the C encoder)."""
    store = Store(track_changes=True)
    store.load(aor, bindings)
    [(name, record, latest)] = store.change_records()
    assert name == aor and latest == max(b.expires_at for b in bindings)
    return record


def docs_reader():
    """read_record as docs/record.md gives it."""
    [code] = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    namespace = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    return namespace["read_record"]


def as_reader_dict(b):
    """A Binding as the docs' reader gives it."""
    return dict(expires=b.expires_at, reg_id=-1 if b.reg_id is None else b.reg_id,
                conn_id=b.conn_id, cseq=b.cseq, q=b.q, source_port=b.source[1],
                transport=b.transport, contact=b.uri, call_id=b.call_id,
                instance=b.instance or "", path="\n".join(b.path), user_agent=b.user_agent or "",
                source_host=b.source[0])


# -- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("bindings", [[FULL], [BARE], [EMPTY], [FULL, BARE, EMPTY]],
                         ids=["full", "bare", "empty-strings", "three"])
def test_a_record_round_trips_every_field(bindings):
    record = record_of(bindings)
    assert decode_record(record) == (0, bindings)
    assert encode_record(bindings) == record                    # Binding objects, same bytes
    store = Store()
    assert store.load_record("sip:alice@example.com", record) == (len(bindings), 0)
    assert store.lookup("sip:alice@example.com") == bindings
    assert docs_reader()(record) == (0, [as_reader_dict(b) for b in bindings])


def test_the_layout_is_the_documented_one_byte_for_byte():
    b = FULL
    strings = [b.uri, b.call_id, b.instance, "\n".join(b.path), b.user_agent, b.source[0]]
    want = struct.pack("<BQI", 1, 7, 1) + struct.pack(
        "<dqqIhHB", b.expires_at, b.reg_id, b.conn_id, b.cseq, 725, 65535, 2)
    for s in strings:
        raw = s.encode("utf-8", "surrogateescape")
        want += struct.pack("<H", len(raw)) + raw
    assert encode_record([b], version=7) == want
    assert record_of([b]) == want[:1] + bytes(8) + want[9:]     # the feed writes version 0
    assert decode_record(want)[0] == 7


def test_256_bindings_in_one_record():
    many = [Binding(f"sip:u{i}@192.0.2.{i % 250}:{5060 + i}", NOW + i, cseq=i,
                    call_id=f"c{i}", source=("192.0.2.1", i)) for i in range(256)]
    record = record_of(many)
    assert struct.unpack_from("<I", record, 9) == (256,)
    assert decode_record(record) == (0, many)
    read = docs_reader()(record)[1]
    assert [r["contact"] for r in read] == [b.uri for b in many]
    store = Store()
    assert store.load_record("sip:a@x", record) == (256, 0) and store.lookup("sip:a@x") == many


def test_maximal_lengths():
    big = Binding("sip:" + "u" * 65531, NOW + 1, call_id="c" * 65535, source=("h" * 65535, 1),
                  path=("p" * 32767, "q" * 32767), instance="i" * 65535, reg_id=1,
                  user_agent="a" * 65535)
    record = record_of([big, BARE])
    assert len(record) == 13 + 45 * 2 + 6 * 65535 + len(BARE.uri)
    assert decode_record(record) == (0, [big, BARE])
    assert docs_reader()(record)[1][0] == as_reader_dict(big)
    store = Store()
    assert store.load_record("sip:a@x", record) == (2, 0)
    assert store.lookup("sip:a@x") == [big, BARE]


def test_encode_refuses_what_the_store_would():
    too_long = Binding("sip:" + "u" * 65532, NOW)
    with pytest.raises(ValueError, match="65535"):
        encode_record([too_long])
    with pytest.raises(ValueError, match="65535"):
        Store().load("sip:a@x", [too_long])
    with pytest.raises(TypeError):
        encode_record([("sip:a@h", NOW)])


def test_load_record_skips_the_expired_replaces_the_same_contact_and_drops_gone_flows():
    reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
    reg_over(reg, FLOW, "tcp", 7)
    reg_over(reg, WS, "ws", 8, expires=60)
    reg_over(reg, UDP, "udp", -1, expires=3600)
    [(aor, record, latest)] = reg.store.change_records()
    assert latest == NOW + 3600
    store = Store()
    store.load(aor, [Binding("sip:alice@192.0.2.7:5060", NOW + 5, cseq=9)])
    assert store.load_record(aor, record, NOW + 61, drop_flows=True) == (1, 1)
    [b] = store.lookup(aor)                  # the WS one had expired, the flow's connection is gone
    assert (b.uri, b.cseq, b.expires_at) == ("sip:alice@192.0.2.7:5060", 1, NOW + 3600)
    store = Store()
    assert store.load_record(aor, record, NOW, drop_flows=lambda conn: conn == 8) == (2, 1)
    assert store.flow_connections() == [7]
    store = Store()
    assert store.load_record(aor, record, NOW + 4000) == (0, 0) and store.n_aors == 0


# -- the change feed ------------------------------------------------------------------------

def feed(reg):
    """{aor: (contacts in the record, latest expiry)} of the next change_records()."""
    out = {}
    for aor, record, latest in reg.store.change_records():
        if record is None:
            assert latest == 0.0
            out[aor] = None
            continue
        version, bindings = decode_record(record)
        assert version == 0 and bindings == reg.store.lookup(aor)
        out[aor] = (sorted(b.uri for b in bindings), latest)
    return out


def test_the_feed_after_add_refresh_remove_expiry_and_star():
    reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
    a, b = "<sip:alice@192.0.2.7:5060>", "<sip:alice@192.0.2.8:5060>"
    reg.handle(request(contacts=(a, b), expires=600), ("192.0.2.7", 5060), NOW)
    reg.handle(request(user="bob", contacts=("<sip:bob@192.0.2.9>",), expires=300),
               ("192.0.2.9", 5060), NOW)
    assert feed(reg) == {"sip:alice@example.com": (["sip:alice@192.0.2.7:5060",
                                                    "sip:alice@192.0.2.8:5060"], NOW + 600),
                         "sip:bob@example.com": (["sip:bob@192.0.2.9"], NOW + 300)}
    assert feed(reg) == {}                                               # drained
    reg.handle(request(contacts=(a,), expires=900, cseq=2), ("192.0.2.7", 5060), NOW + 10)
    assert feed(reg) == {"sip:alice@example.com": (["sip:alice@192.0.2.7:5060",
                                                    "sip:alice@192.0.2.8:5060"], NOW + 910)}
    reg.handle(request(contacts=(b,), expires=0, cseq=3), ("192.0.2.7", 5060), NOW + 20)
    assert feed(reg) == {"sip:alice@example.com": (["sip:alice@192.0.2.7:5060"], NOW + 910)}
    assert reg.expire(NOW + 301) == 1
    assert feed(reg) == {"sip:bob@example.com": None}
    reg.handle(request(contacts=("*",), expires=0, cseq=4), ("192.0.2.7", 5060), NOW + 400)
    assert feed(reg) == {"sip:alice@example.com": None}
    assert reg.store.n_aors == 0                    # emptied AORs leave once the feed took them


def test_the_feed_after_a_connection_closes():
    reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
    reg_over(reg, FLOW, "tcp", 7)
    reg_over(reg, UDP, "udp", -1)
    reg_over(reg, WS, "ws", 7, user="bob")
    reg_over(reg, UDP, "udp", -1, user="carol")
    reg.store.clear_changes()
    assert reg.connection_closed(7, NOW) == 2
    assert feed(reg) == {"sip:alice@example.com": (["sip:alice@192.0.2.7:5060"], NOW + 600),
                         "sip:bob@example.com": None}          # carol did not change
    assert reg.store.n_aors == 2


def test_changes_and_change_records_drain_one_list():
    store = Store(track_changes=True)
    store.load("sip:a@x", [BARE])
    store.load("sip:b@x", [EMPTY])
    assert [aor for aor, _ in store.changes()] == ["sip:a@x", "sip:b@x"]
    assert store.change_records() == []
    store.remove_aor("sip:a@x")
    assert store.change_records() == [("sip:a@x", None, 0.0)] and store.changes() == []
    assert store.mark_changed("sip:b@x") and not store.mark_changed("sip:a@x")
    assert [aor for aor, _ in store.changes()] == ["sip:b@x"]
    assert store.mark_changed("sip:b@x") and store.clear_changes() == 1
    assert store.change_records() == []
    assert not Store().mark_changed("sip:b@x")              # no such AOR
    untracked = Store()
    untracked.load("sip:a@x", [BARE])
    assert not untracked.mark_changed("sip:a@x") and untracked.change_records() == []


# -- records that do not read ---------------------------------------------------------------

def test_every_truncation_is_refused_and_loads_nothing():
    record = record_of([FULL, BARE])
    for n in range(len(record)):
        store = Store()
        with pytest.raises(ValueError, match=r"bad record \(byte \d+\): truncated"):
            store.load_record("sip:a@x", record[:n])
        assert store.n_aors == 0 and len(store) == 0
        with pytest.raises(ValueError):
            decode_record(record[:n])


TWO = record_of([BARE, FULL])
SECOND = 13 + 45 + len(BARE.uri)        # where FULL's binding starts in TWO


def damaged(offset, value):
    """TWO with ``value`` (a struct format and a value) written at ``offset`` of
    the head (< 13), or of the second binding (13 + its offset)."""
    record = bytearray(TWO)
    struct.pack_into(value[0], record, offset if offset < 13 else SECOND + offset - 13, value[1])
    return bytes(record)


@pytest.mark.parametrize("record, reason, byte", [
    (damaged(0, ("<B", 2)), "unknown format version", 0),
    (b"garbage", "unknown format version", 0),
    (b"\x01" + bytes(11), "truncated", 0),
    (damaged(9, ("<I", 3)), "truncated", len(TWO)),
    (damaged(9, ("<I", 1)), "bytes after the last binding", SECOND),
    (damaged(13 + 32, ("<B", 6)), "transport out of range", SECOND),
    (damaged(13 + 28, ("<h", 1001)), "q out of range", SECOND),
    (damaged(13 + 28, ("<h", -2)), "q out of range", SECOND),
    (damaged(13, ("<d", math.nan)), "expiry not a number", SECOND),
    (encode_record([BARE]) + b"\0", "bytes after the last binding", SECOND),
    (struct.pack("<BQI", 1, 0, 1) + bytes(33) + bytes(12), "empty contact URI", 13),
], ids=["version", "not-a-record", "short-head", "count-high", "count-low", "transport",
        "q-high", "q-low", "nan", "trailing", "empty-uri"])
def test_damaged_records_name_what_and_where(record, reason, byte):
    store = Store()
    with pytest.raises(ValueError) as err:
        store.load_record("sip:a@x", record)
    assert str(err.value) == f"bad record (byte {byte}): {reason}"
    assert store.n_aors == 0
    with pytest.raises(ValueError):
        decode_record(record)


# -- the state file -------------------------------------------------------------------------

@pytest.fixture
def log_lines():
    """The server log's lines (its logger does not propagate once logs.setup ran)."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    handler = Keep(logging.INFO)
    old = logs.LOG.level
    logs.LOG.addHandler(handler)
    logs.LOG.setLevel(logging.INFO)
    yield lines
    logs.LOG.removeHandler(handler)
    logs.LOG.setLevel(old)


FOLDERS = {}        # state file -> its Folder (a supervisor keeps one: it knows what it read)


def fold(path, **kw):
    """What the supervisor does every --fold-interval: the change logs into the file;
    returns the rows read from them."""
    if path not in FOLDERS:
        FOLDERS[path] = Folder(path, sql_writer(path, checkpoints=False))
    return FOLDERS[path].fold(**kw)


def rows(path):
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT aor, bindings FROM aors").fetchall())
    finally:
        db.close()


def test_one_write_keeps_the_order_of_the_changes_of_an_aor(tmp_path):
    path = str(tmp_path / "s.db")
    f = StateFile(path)
    a, b = record_of([BARE]), record_of([FULL])
    assert f.write([("sip:a@x", a, BARE.expires_at), ("sip:b@x", b, FULL.expires_at),
                    ("sip:c@x", a, 1.0)]) == 3
    assert f.write([("sip:a@x", None, 0.0), ("sip:b@x", None, 0.0), ("sip:b@x", a, 2.0),
                    ("sip:d@x", None, 0.0), ("sip:c@x", b, 3.0), ("sip:c@x", None, 0.0)]) == 4
    assert rows(path) == {"sip:b@x": a}                  # the last change of each AOR counts
    assert f.db.execute("SELECT expires_at FROM aors WHERE aor = 'sip:b@x'").fetchone() == (2.0,)
    assert f.rows_written == 7
    f.close()


def writer_for(path, c_writer=True, **kw):
    """A registrar and its StateWriter; ``c_writer`` False: the Python writer (as
    where SqlWriter cannot share Python's SQLite library)."""
    reg = Registrar(min_expires=60, max_expires=3600, track_changes=True, **kw)
    writer = StateWriter(path, 0, 1, reg, SimpleNamespace(state_errors=0,
                                                          dropped_state_overflow=0))
    assert writer.sql is not None           # Linux: the writer in C is the default
    if not c_writer:
        writer.sql.close()
        writer.sql = None
    return reg, writer


@pytest.mark.parametrize("c_writer", [True, False], ids=["c-writer", "python-writer"])
def test_a_flush_writes_the_feed_and_a_restart_loads_it(tmp_path, c_writer):
    path = str(tmp_path / "s.db")
    reg, writer = writer_for(path, c_writer)
    reg_over(reg, FLOW, "tcp", 7)
    reg_over(reg, UDP, "udp", -1)
    reg_over(reg, UDP, "udp", -1, user="bob")
    writer.collect()
    assert writer.backlog == 2 and writer.busy          # alice and bob
    writer.write(None)
    assert writer.backlog == 0 and not writer.busy
    if c_writer:                                        # in the change log, not yet in the file
        assert rows(path) == {} and fold(path) == 2
    assert set(rows(path)) == {"sip:alice@example.com", "sip:bob@example.com"}
    reg.handle(request(user="bob", contacts=("*",), expires=0, cseq=2), ("192.0.2.7", 5060), NOW)
    writer.finish()
    if c_writer:
        assert fold(path, final=True) == 1
    assert set(rows(path)) == {"sip:alice@example.com"}
    assert writer.rows_written == 3
    reg2, writer2 = writer_for(path, c_writer)
    assert writer2.load(NOW) == (1, 1)                  # the flow's connection is gone
    assert [b.uri for b in reg2.lookup("sip:alice@example.com", NOW)] == [
        "sip:alice@192.0.2.7:5060"]
    assert writer2.backlog == 1                         # alice's row is rewritten
    writer2.finish()
    fold(path, final=True)
    assert decode_record(rows(path)["sip:alice@example.com"])[1] == reg2.store.lookup(
        "sip:alice@example.com")
    assert os.listdir(log_dir(path)) == []              # every segment folded is gone


def test_a_locked_file_does_not_stall_the_loop_and_loses_nothing(tmp_path):
    """While another process holds the state file's write lock, a worker's flush
    goes on (it appends to its change log, never to SQLite) and the fold fails
    without losing a change: the next fold, once the lock is gone, writes them."""
    path = str(tmp_path / "s.db")
    reg, writer = writer_for(path)
    assert writer.pool is not None
    reg_over(reg, UDP, "udp", -1)
    reg_over(reg, UDP, "udp", -1, user="bob")
    folder = Folder(path, SqlWriter(path, sqlite_library(), busy_timeout_ms=50,
                                    checkpoints=False))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    writer.collect()
    writer.write(None)
    assert writer.backlog == 0 and writer.c.state_errors == 0
    with pytest.raises(OSError, match="locked"):
        folder.fold()
    other.execute("ROLLBACK")
    other.close()
    assert rows(path) == {}
    assert folder.fold() == 2                           # the same frames, read again
    assert set(rows(path)) == {"sip:alice@example.com", "sip:bob@example.com"}
    assert folder.fold() == 0
    writer.finish()
    folder.close()


@pytest.mark.parametrize("fold_bytes", [None, 5000, 1], ids=["one", "several", "frame-by-frame"])
def test_a_fold_writes_the_last_change_of_each_aor_in_order(tmp_path, monkeypatch, fold_bytes):
    """Frames of two workers, each AOR changed several times, removed, changed
    again: the fold leaves each AOR's last change (or no row), as writing every
    flush straight into the file would; in one transaction or in several (its
    memory bound, FOLD_BYTES: here less than one frame too)."""
    if fold_bytes:
        monkeypatch.setattr(state, "FOLD_BYTES", fold_bytes)
    path, direct = str(tmp_path / "s.db"), str(tmp_path / "direct.db")
    StateFile(path).close()
    StateFile(direct).close()
    os.makedirs(log_dir(path))
    sql = sql_writer(direct, checkpoints=False)
    logs_ = [ChangeLog(os.path.join(log_dir(path), f"{i}-1.log")) for i in (0, 1)]
    for step in range(4):
        for i, log in enumerate(logs_):
            store = Store(track_changes=True)
            for k in range(i, 40, 2):           # worker i's AORs: k of its parity
                if (k + step) % 3:
                    store.load(f"sip:u{k}@x", [Binding(f"sip:u{k}@h{step}", NOW + step,
                                                       cseq=step, call_id="c")])
                else:                           # an AOR left with no binding
                    store.load(f"sip:u{k}@x", [BARE])
                    store.remove_aor(f"sip:u{k}@x")
            n = store.n_changed
            assert log.stage(store, 10_000) == n and log.commit() == n
            # the same changes, straight into the other file
            again = Store(track_changes=True)
            for k in range(i, 40, 2):
                if (k + step) % 3:
                    again.load(f"sip:u{k}@x", [Binding(f"sip:u{k}@h{step}", NOW + step,
                                                       cseq=step, call_id="c")])
                else:
                    again.load(f"sip:u{k}@x", [BARE])
                    again.remove_aor(f"sip:u{k}@x")
            sql.write(again, 10_000)
    assert fold(path, final=True) == 4 * 40              # every change read ...
    assert rows(path) == rows(direct) and len(rows(path)) == 26     # ... the last ones kept
    assert os.listdir(log_dir(path)) == []
    expiry = "SELECT aor, expires_at FROM aors ORDER BY aor"
    db, db2 = sqlite3.connect(path), sqlite3.connect(direct)
    assert db.execute(expiry).fetchall() == db2.execute(expiry).fetchall()
    db.close()
    db2.close()
    sql.close()
    for log in logs_:
        log.close()


def test_a_frame_cut_short_or_damaged_is_dropped_with_a_log_line(tmp_path, log_lines):
    """A worker killed in the middle of an append leaves part of a frame; a disk
    may damage one.  While the segment is still written to, the fold reads the
    whole frames before it and waits; once its worker is gone (final), the rest
    of the segment is dropped, logged, and the frames before it are kept."""
    path = str(tmp_path / "s.db")
    StateFile(path).close()
    os.makedirs(log_dir(path))
    seg = os.path.join(log_dir(path), "0-1.log")
    log = ChangeLog(seg)
    for k in range(3):
        store = Store(track_changes=True)
        store.load(f"sip:u{k}@x", [BARE])
        log.stage(store, 10)
        log.commit()
    log.close()
    data = Path(seg).read_bytes()
    whole = len(data)
    Path(seg).write_bytes(data[:whole - 5])             # the third frame cut short
    assert fold(path) == 2 and set(rows(path)) == {"sip:u0@x", "sip:u1@x"}
    assert not log_lines                                # its worker may still be writing
    assert fold(path, final=True) == 0
    assert "cut short: dropped" in log_lines[-1] and os.listdir(log_dir(path)) == []

    log = ChangeLog(os.path.join(log_dir(path), "0-2.log"))
    for k in range(3, 6):
        store = Store(track_changes=True)
        store.load(f"sip:u{k}@x", [BARE])
        log.stage(store, 10)
        log.commit()
    log.close()
    seg = os.path.join(log_dir(path), "0-2.log")
    data = bytearray(Path(seg).read_bytes())
    data[whole // 3 + FRAME.size + 3] ^= 0xFF          # a byte of the second frame's payload
    Path(seg).write_bytes(bytes(data))
    assert fold(path, final=True) == 1
    assert "damaged: dropped" in log_lines[-1]
    assert set(rows(path)) == {"sip:u0@x", "sip:u1@x", "sip:u3@x"}


def test_a_damaged_first_frame_larger_than_a_fold_ends_the_fold(tmp_path, monkeypatch, log_lines):
    """A segment whose first frame is damaged and larger than FOLD_BYTES: a fold
    while its worker may still write reads nothing and returns (no endless retry);
    once the worker is gone, the segment is dropped and logged."""
    monkeypatch.setattr(state, "FOLD_BYTES", 64)
    path = str(tmp_path / "s.db")
    StateFile(path).close()
    os.makedirs(log_dir(path))
    seg = os.path.join(log_dir(path), "0-1.log")
    log = ChangeLog(seg)
    store = Store(track_changes=True)
    for k in range(20):
        store.load(f"sip:u{k}@x", [BARE])
    log.stage(store, 100)
    log.commit()
    log.close()
    data = bytearray(Path(seg).read_bytes())
    data[FRAME.size + 40] ^= 0xFF
    Path(seg).write_bytes(bytes(data))
    assert fold(path) == 0 and os.path.exists(seg)
    assert fold(path, final=True) == 0 and not os.path.exists(seg)
    assert "damaged: dropped" in log_lines[-1] and rows(path) == {}


def test_a_change_log_write_that_fails_is_cut_off_and_kept_staged(tmp_path):
    """A full disk (here: a file size limit) fails an append: the file is cut back
    to its last whole frame, the batch stays staged, and the next commit writes it."""
    seg = str(tmp_path / "0-1.log")
    log = ChangeLog(seg)
    store = Store(track_changes=True)
    store.load("sip:a@x", [BARE])
    assert log.stage(store, 10) == 1 and log.commit() == 1
    size = log.size
    assert size == os.path.getsize(seg)
    for k in range(200):
        store.load(f"sip:b{k}@x", [FULL])
    assert log.stage(store, 1000) == 200
    # (the limit is set in this process for the one call, then lifted)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, old[1]))
    try:
        with pytest.raises(OSError):
            log.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert log.staged == 200 and os.path.getsize(seg) == size == log.size
    assert log.commit() == 200 and log.staged == 0 and log.rows_written == 201
    log.close()
    assert fold_segment_rows(seg) == 201


def fold_segment_rows(seg):
    from fastsip.server.state import read_frames
    _payloads, n, used, problem = read_frames(Path(seg).read_bytes())
    assert problem is None
    return n


def filled_store(n):
    """A store with ``n`` changed AORs of 1-3 bindings, every third emptied again."""
    store = Store(track_changes=True)
    for i in range(n):
        store.load(f"sip:u{i}@x", [Binding(f"sip:u{i}@h{k}", NOW + 60 + i + k, cseq=i,
                                           call_id=f"c{i}") for k in range(1 + i % 3)])
    for i in range(0, n, 3):
        store.remove_aor(f"sip:u{i}@x")
    return store


def test_the_c_writer_writes_the_rows_the_python_writer_writes(tmp_path):
    """SqlWriter (the store's change list straight into SQLite) and StateFile.write
    of Store.change_records give the same file, row for row; the C writer writes
    the changes in chunks, oldest first, and forgets what it wrote."""
    path_c, path_py = str(tmp_path / "c.db"), str(tmp_path / "py.db")
    f_c, f_py = StateFile(path_c), StateFile(path_py)
    f_py.write([(f"sip:u{i}@x", record_of([BARE]), 1.0) for i in range(0, 300, 3)])
    f_c.write([(f"sip:u{i}@x", record_of([BARE]), 1.0) for i in range(0, 300, 3)])
    sql = sql_writer(path_c)
    store_c, store_py = filled_store(300), filled_store(300)
    store_c.load("sip:late@x", [BARE])                 # changed after the others
    store_py.load("sip:late@x", [BARE])
    assert sql.write(store_c, 120) == 120 and store_c.n_changed == 181
    assert "sip:late@x" not in rows(path_c)
    assert sql.write(store_c, 10_000) == 181 and store_c.n_changed == 0
    assert sql.write(store_c, 10_000) == 0
    f_py.write(store_py.change_records())
    assert rows(path_c) == rows(path_py) and len(rows(path_c)) == 201
    expiry = "SELECT aor, expires_at FROM aors ORDER BY aor"
    assert f_c.db.execute(expiry).fetchall() == f_py.db.execute(expiry).fetchall()
    assert sql.rows_written == 301
    sql.close()
    f_c.close()
    f_py.close()


def test_the_c_writer_keeps_the_changes_when_the_file_is_locked(tmp_path):
    """Another process holds the write lock past the busy timeout: the commit fails
    with OSError naming it, nothing is half written, the batch stays staged (and no
    other is staged over it); the next commit writes it."""
    path = str(tmp_path / "s.db")
    StateFile(path).close()
    store = filled_store(30)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    sql = SqlWriter(path, sqlite_library(), busy_timeout_ms=50)
    assert sql.stage(store, 100) == 30 and store.n_changed == 0 and sql.staged == 30
    with pytest.raises(OSError, match="locked"):
        sql.commit()
    assert sql.staged == 30 and rows(path) == {}
    store.load("sip:new@x", [BARE])
    assert sql.stage(store, 100) == 0 and store.n_changed == 1       # one batch at a time
    other.execute("ROLLBACK")
    other.close()
    assert sql.commit() == 30 and sql.staged == 0 and len(rows(path)) == 20
    assert sql.write(store, 100) == 1 and "sip:new@x" in rows(path)
    assert sql.rows_written == 31
    sql.close()


def test_the_c_writer_refuses_a_library_that_is_not_loaded(tmp_path):
    """(In a process of its own: SQLite's functions are taken once per process.)"""
    path = str(tmp_path / "s.db")
    StateFile(path).close()
    code = ("from fastsip.server._io_c import SqlWriter\n"
            "try:\n"
            f"    SqlWriter({path!r}, b'/nonexistent/libsqlite3.so.0')\n"
            "except OSError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60).stdout
    assert out.startswith("/nonexistent/libsqlite3.so.0 is not loaded"), out


def test_a_row_that_does_not_decode_is_skipped_with_a_log_line(tmp_path, log_lines):
    path = str(tmp_path / "s.db")
    f = StateFile(path)
    good = record_of([BARE])
    f.write([("sip:a@x", good, BARE.expires_at), ("sip:b@x", good[:-3], BARE.expires_at),
             ("sip:c@x", b"garbage", BARE.expires_at)])
    f.close()
    reg, writer = writer_for(path)
    assert writer.load(NOW) == (1, 1)
    assert [b.uri for b in reg.lookup("sip:a@x", NOW)] == [BARE.uri]
    assert writer.file.errors == 2 and reg.store.n_aors == 1
    assert sorted(line for line in log_lines if "does not decode" in line) == [
        f"state file {path}: the row of sip:b@x does not decode (bad record "
        f"(byte 13): truncated): skipped",
        f"state file {path}: the row of sip:c@x does not decode (bad record "
        f"(byte 0): unknown format version): skipped"]
    writer.finish()


def test_log_lines_about_bad_rows_are_bounded(tmp_path, log_lines):
    path = str(tmp_path / "s.db")
    f = StateFile(path)
    f.write([(f"sip:u{i}@x", b"\x01", NOW + 60) for i in range(BAD_ROW_LINES + 5)])
    f.close()
    reg, writer = writer_for(path)
    assert writer.load(NOW) == (0, 0) and writer.file.errors == BAD_ROW_LINES + 5
    assert len([line for line in log_lines if "does not decode" in line]) == BAD_ROW_LINES
    assert f"state file {path}: 5 more rows did not decode: skipped" in log_lines
    writer.finish()


# -- a state file of the previous format ----------------------------------------------------

def old_row(b):
    """A binding as the previous format (marshal4-rows13) stored it, written here
    independently of fastsip's converter."""
    return [b.uri, b.expires_at, b.q, b.call_id, b.cseq, b.source[0], b.source[1], b.transport,
            b.conn_id, list(b.path), b.instance, b.reg_id, b.user_agent]


def write_old_state_file(path, aors):
    """A state file as fastsip wrote it before records: ``aors`` {aor: [Binding]
    or raw bytes}."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE aors (aor TEXT PRIMARY KEY, expires_at REAL NOT NULL,
                           bindings BLOB NOT NULL) WITHOUT ROWID;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
        PRAGMA journal_mode=WAL;
    """)
    db.execute("INSERT INTO meta VALUES ('format', 'marshal4-rows13')")
    for aor, bindings in aors.items():
        blob = bindings if isinstance(bindings, bytes) else marshal.dumps(
            [old_row(b) for b in bindings], 4)
        latest = NOW + 600 if isinstance(bindings, bytes) else max(
            b.expires_at for b in bindings)
        db.execute("INSERT INTO aors VALUES (?, ?, ?)", (aor, latest, blob))
    db.commit()
    db.close()


def test_an_old_state_file_is_converted_on_open(tmp_path, log_lines):
    path = str(tmp_path / "old.db")
    write_old_state_file(path, {"sip:alice@example.com": [FULL, EMPTY],
                                "sip:bob@example.com": [BARE],
                                "sip:bad@example.com": b"not marshal"})
    assert OLD_FORMAT == "marshal4-rows13" and FORMAT != OLD_FORMAT
    f = StateFile(path)
    assert f.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() == (FORMAT,)
    assert log_lines == [f"state file {path}: converted 2 rows from format marshal4-rows13 to "
                         f"{FORMAT} (1 rows that did not decode dropped)"]
    stored = rows(path)
    assert set(stored) == {"sip:alice@example.com", "sip:bob@example.com"}
    assert decode_record(stored["sip:alice@example.com"]) == (0, [FULL, EMPTY])
    assert decode_record(stored["sip:bob@example.com"]) == (0, [BARE])
    f.close()
    StateFile(path).close()                                     # converted once
    assert len(log_lines) == 1
    reg, writer = writer_for(path)
    assert writer.load(NOW) == (2, 3)
    assert reg.store.lookup("sip:alice@example.com") == [FULL, EMPTY]
    writer.finish()


def test_a_state_file_of_an_unknown_format_is_refused(tmp_path):
    path = str(tmp_path / "new.db")
    StateFile(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 'record9' WHERE key = 'format'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="format 'record9', this fastsip writes 'record1'"):
        StateFile(path)


def test_row_of_is_the_feeds_row():
    store = Store(track_changes=True)
    store.load("sip:a@x", [FULL, BARE])
    assert store.change_records() == [row_of("sip:a@x", [FULL, BARE])]
    assert row_of("sip:a@x", []) == ("sip:a@x", None, 0.0)
