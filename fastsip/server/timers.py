"""A worker's timers, run when due between receive batches: expiry, the state file, the TCP sweeps.

- Expiry: ``Registrar.expire`` every second, ``EXPIRE_WORK`` bindings per
  call, for at most ``SLICE`` seconds.
- The state file (:class:`StateWriter`): this shard is loaded at start; every
  ``--flush-interval`` the store's changed AORs are written: staged in C
  ``STAGE_ROWS`` at a time between receive batches and appended to the
  worker's change log on the writer's thread, the GIL released, so the
  sockets never wait for the disk
  (or, where the writer in C is not available, taken as records and written in the
  loop, ``STATE_CHUNK`` per transaction, for at most ``SLICE`` seconds per
  call); at stop, everything is written.
  Without a change log, worker 0 also purges the rows whose bindings have all
  expired, once a minute (with one, the supervisor does).
- The TCP idle sweep (``tcp.TcpServer.sweep``) every second, and the TCP
  message deadlines (``tcp.TcpServer.deadlines``, ``--tcp-message-timeout``)
  every ``DEADLINE_EVERY`` seconds: a connection is closed at most that much
  (plus one loop wait) after its deadline.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastsip.server import logs
from fastsip.server._io_c import ChangeLog
from fastsip.server.state import SEGMENT_BYTES, StateFile, change_log, segment_path, sql_writer

LOG = logs.LOG

EXPIRE_EVERY = 1.0          # seconds between expiry slices
EXPIRE_WORK = 10000         # bindings removed per Registrar.expire call
SLICE = 0.02                # seconds of expiry or state writing before going back to the sockets
STATE_CHUNK = 10000         # AOR rows per state transaction (~20-40 ms of SQLite here)
STAGE_ROWS = 2000           # AORs staged per step (~0.3 ms in the loop) and appended as one frame
WRITER_NICE = 10            # the writer's thread runs this much nicer than its worker
COMMIT_POLL = 0.002         # seconds between looks at the writer's thread while it commits
MAX_PENDING_STATE = 2_000_000
SWEEP_EVERY = 1.0           # seconds between TCP idle sweeps
DEADLINE_EVERY = 0.25       # seconds between checks of the TCP message deadlines
PURGE_EVERY = 60.0          # seconds between purges of expired rows (worker 0)
BAD_ROW_LINES = 10          # log lines about rows that do not decode, per load (then one count)
FIRST_PURGE = 5.0


def nicer() -> None:
    """A thread that writes the state file (a worker's writer, the supervisor's
    checkpoint): nice +WRITER_NICE, so that when it and a receive loop want
    the same core, the loop wins and the replies go out first; SQLite's commit waits
    (at saturation the thread still gets about a tenth of a core, and a flush that
    falls behind shows in fastsip_state_pending_changes).  Linux takes a thread's id
    as a PRIO_PROCESS target."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid)
                                                 + WRITER_NICE))
    except OSError:     # not permitted here (a seccomp profile, say): the default priority
        pass


class StateWriter:
    """This shard's rows of the state file (``--state``), or no file (``path`` None:
    the store's changes are then taken and dropped, so they do not pile up).

    Changes go to this worker's change log (``ChangeLog``, C, from the store's
    change list; the supervisor folds the logs into the file: ``state.Folder``)
    where Python's SQLite library can be shared with the writer in C (Linux):
    each flush stages up to ``STAGE_ROWS`` changed AORs at a time in the loop
    (encoding them, ~0.3 µs each) and appends them as one frame on a thread of
    its own with the GIL released, so the receive loop never waits for the disk
    (``thread=False``: in the caller's thread).  ``log=False``: ``SqlWriter``
    commits them into the file instead (the benchmarks' comparison).  Elsewhere
    ``StateFile.write`` writes ``Store.change_records`` in the loop; ``pending``
    holds rows of that kind (and the rows ``load`` must rewrite)."""

    def __init__(self, path, index: int, n: int, reg, counters, thread: bool = True,
                 log: bool = True) -> None:
        self.path = path
        self.index = index
        self.n = n
        self.reg = reg
        self.c = counters
        self.file = StateFile(path, checkpoints=False) if path else None
        self.sql = None                 # ChangeLog, or SqlWriter (log=False)
        if path:
            self.sql = change_log(path, index) if log else sql_writer(path, checkpoints=False)
        self.pool = (ThreadPoolExecutor(1, thread_name_prefix="fastsip-state",
                                        initializer=nicer)
                     if self.sql is not None and thread else None)
        self.pending: list = []
        self.flushing = False           # a flush has rows to write (the writer in C)
        self.owed = 0                   # the store's changes this flush still stages
        self.commit = None              # the Future of the batch being committed
        self._error_logged = -1e9
        self._slow_logged = -1e9

    @property
    def logging(self) -> bool:
        """Changes go to a change log (the supervisor folds them into the file)."""
        return isinstance(self.sql, ChangeLog)

    @property
    def rows_written(self) -> int:
        if self.file is None:
            return 0
        return self.file.rows_written + (self.sql.rows_written if self.sql is not None else 0)

    @property
    def backlog(self) -> int:
        """Changes waiting to be written (the metric fastsip_state_pending_changes)."""
        if self.sql is None:
            return len(self.pending)
        return len(self.pending) + self.reg.store.n_changed + self.sql.staged

    @property
    def busy(self) -> bool:
        """This flush has rows left to write."""
        return bool(self.pending) or self.flushing

    @property
    def committing(self) -> bool:
        """A batch is being committed on the writer's thread (nothing to do but wait)."""
        return self.commit is not None and not self.pending and not self.commit.done()

    def load(self, now: float, flows_gone=True) -> tuple[int, int]:
        """Load this shard's live bindings into the store: (AORs, bindings).  The
        rows' records go into the store in C (``Store.load_record``); a row
        that does not decode is skipped and logged.  Flow bindings (RFC 5626
        flows, ``.invalid`` WebSocket contacts: see ``Store.connection_closed``)
        whose connection is gone are not loaded, and the rows that held them are
        rewritten without them.  ``flows_gone``: True, every connection is gone
        (no connection survives a restart), or ``gone(conn_id) -> bool``
        (``Store.load_record``'s ``drop_flows``)."""
        aors = loaded = bad = 0
        rewrite = []
        if self.file is None:
            return 0, 0
        store = self.reg.store
        for aor, record in self.file.load(self.index, self.n, now, self.reg.aor_of):
            try:
                kept, dropped = store.load_record(aor, record, now, drop_flows=flows_gone)
            except ValueError as exc:
                self.file.errors += 1
                bad += 1
                if bad <= BAD_ROW_LINES:
                    LOG.warning("state file %s: the row of %s does not decode (%s): skipped",
                                self.path, aor, exc)
                continue
            if dropped:
                rewrite.append(aor)
            if kept:
                aors += 1
            loaded += kept
        if bad > BAD_ROW_LINES:
            LOG.warning("state file %s: %d more rows did not decode: skipped", self.path,
                        bad - BAD_ROW_LINES)
        store.clear_changes()           # what was just loaded is already in the file
        for aor in rewrite:             # ... but for the flows left out
            if not store.mark_changed(aor):
                self.pending.append((aor, None, 0.0))   # it held flows only: the row goes
        self.collect()
        return aors, loaded

    def collect(self) -> None:
        """A flush begins: the store's changes so far are this flush's to write
        (with the writer in C they stay in the store until staged; else they are taken
        as records)."""
        if self.file is None:
            self.reg.store.clear_changes()      # nobody needs them: do not let them pile up
            return
        if self.sql is not None:
            self.owed = self.reg.store.n_changed
            self.flushing = True
            return
        self.pending.extend(self.reg.store.change_records())
        if len(self.pending) > MAX_PENDING_STATE:
            drop = len(self.pending) - MAX_PENDING_STATE
            del self.pending[:drop]
            self.c.dropped_state_overflow += drop

    def write(self, budget) -> None:
        """Go on with this flush for ``budget`` seconds (None: to its end, waiting
        for the writer's thread).  Python rows: ``STATE_CHUNK`` per transaction.
        The writer in C: one step (``_step``), or every step with ``budget`` None.  A
        failed write is retried at the next flush; nothing is dropped (but what
        ``MAX_PENDING_STATE`` bounds on the Python path)."""
        deadline = None if budget is None else time.perf_counter() + budget
        while self.pending:
            n = min(len(self.pending), STATE_CHUNK)
            t0 = time.perf_counter()
            try:
                self.file.write(self.pending[:n])
            except Exception as exc:    # noqa: BLE001 - the file may be full, locked, gone
                self._failed(exc)
                return
            del self.pending[:n]
            self._took(n, time.perf_counter() - t0)
            if deadline is not None and time.perf_counter() > deadline:
                return
        if budget is None:
            while self.flushing:
                self._step(wait=True)
        elif self.flushing:
            self._step(wait=False)

    def _step(self, wait: bool) -> None:
        """The writer in C: take the result of the append under way (``wait``: wait for
        it), then stage the next rows (or retry the batch whose commit failed) and
        commit them, on the thread when there is one."""
        if self.commit is not None:
            if not (wait or self.commit.done()):
                return
            future, self.commit = self.commit, None
            try:
                future.result()
            except Exception as exc:    # noqa: BLE001 - the file may be full, locked, gone
                self._failed(exc)
                return
        if not self.sql.staged:
            n = self.sql.stage(self.reg.store, min(STAGE_ROWS, self.owed)) if self.owed > 0 else 0
            if not n:
                self.flushing = False
                return
            self.owed = min(self.owed - n, self.reg.store.n_changed)
        if self.pool is not None:
            self.commit = self.pool.submit(self._commit)
            return
        try:
            self._commit()
        except Exception as exc:        # noqa: BLE001
            self._failed(exc)

    def _commit(self) -> int:
        t0 = time.perf_counter()
        n = self.sql.commit()
        self._took(n, time.perf_counter() - t0, thread=self.pool is not None)
        if getattr(self.sql, "size", 0) >= SEGMENT_BYTES:      # the change log's next segment
            self.sql.open(segment_path(self.path, self.index))
        return n

    def _took(self, n: int, took: float, thread: bool = False) -> None:
        if took > 0.2 and time.monotonic() - self._slow_logged > 60:
            self._slow_logged = time.monotonic()
            LOG.warning("state file: writing %d AORs took %.0f ms (%s)", n, took * 1000,
                        "on the writer's thread" if thread else "the receive loop waited")

    def _failed(self, exc: Exception) -> None:
        """A write failed: counted, logged once a minute; what it held stays (the
        Python rows in ``pending``, the C writer's batch staged) for the next flush."""
        self.c.state_errors += 1
        self.flushing = False
        self.owed = 0
        if time.monotonic() - self._error_logged > 60:
            self._error_logged = time.monotonic()
            LOG.error("state file %s: write failed (%s); %d AOR changes pending",
                      self.path, exc, self.backlog)

    def purge(self, now: float) -> None:
        """Delete the rows whose bindings all expired (on the writer's thread when
        there is one: it may take a while)."""
        if self.pool is not None:
            self.pool.submit(self._purge, now)
        else:
            self._purge(now)

    def _purge(self, now: float) -> None:
        try:
            self.file.purge_expired(now)
        except Exception:       # noqa: BLE001 - logged, retried next time
            LOG.warning("state file: purge of expired rows failed", exc_info=True)

    def finish(self) -> None:
        """At stop: write every change, close the file."""
        if self.file is not None:
            self.collect()
            self.write(None)
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            self.file.close()
            if self.sql is not None:
                self.sql.close()


class Timers:
    """``run(now)`` does what is due; ``due_in(now)``: seconds until something is
    (the compiled loop calls the worker's tick, and so ``run``, only then)."""

    def __init__(self, reg, cfg, writer: StateWriter, sweep, purges: bool, now: float,
                 deadlines=None) -> None:
        self.reg = reg
        self.cfg = cfg                  # flush_interval is live (SIGHUP)
        self.writer = writer
        self.sweep = sweep              # sweep(now): close idle TCP connections
        self.deadlines = deadlines      # deadlines(now): close TCP connections late with a message
        # (with a change log the supervisor purges: no worker writes the file itself)
        self.purges = purges and writer.file is not None and not writer.logging
        self.next_expire = now + EXPIRE_EVERY
        self.next_flush = now + cfg.flush_interval
        self.next_sweep = now + SWEEP_EVERY
        self.next_deadlines = now + DEADLINE_EVERY
        self.next_purge = now + FIRST_PURGE

    @property
    def busy(self) -> bool:
        """Changes wait to be written: the loop should not sleep."""
        return self.writer.busy

    def due_in(self, now: float) -> float:
        """Seconds until ``run`` has something to do (0 while changes wait to be
        written, COMMIT_POLL while the writer's thread commits)."""
        if self.writer.busy:
            return COMMIT_POLL if self.writer.committing else 0.0
        due = min(self.next_expire, self.next_flush, self.next_sweep)
        if self.deadlines is not None:
            due = min(due, self.next_deadlines)
        if self.purges:
            due = min(due, self.next_purge)
        return max(0.0, due - now)

    def run(self, now: float) -> None:
        if now >= self.next_expire:
            self.next_expire = now + EXPIRE_EVERY
            self.expire(now)
        if now >= self.next_flush:
            self.next_flush = now + self.cfg.flush_interval
            self.writer.collect()
            log_throttles(self.reg)
        if self.writer.busy:
            self.writer.write(SLICE)
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_EVERY
            self.sweep(now)
        if self.deadlines is not None and now >= self.next_deadlines:
            self.next_deadlines = now + DEADLINE_EVERY
            self.deadlines(now)
        if self.purges and now >= self.next_purge:
            self.next_purge = now + PURGE_EVERY
            self.writer.purge(now)

    def expire(self, now: float) -> None:
        deadline = time.perf_counter() + SLICE
        while self.reg.expire(now, EXPIRE_WORK) >= EXPIRE_WORK and time.perf_counter() < deadline:
            pass


#: throttle log lines written per flush at most (the rest are counted in one line)
THROTTLE_LINES = 10


def log_throttles(reg) -> None:
    """One WARNING per source or user the digest failure budget began to refuse."""
    auth = reg.authorize
    failures = getattr(auth, "failures", None)
    if failures is None:
        return
    events = failures.events_since()
    for kind, key, _until in events[:THROTTLE_LINES]:
        LOG.warning("digest: too many wrong passwords %s %s: refused (403) for %.0f s",
                    "from" if kind == "source" else "for user", key, failures.backoff)
    if len(events) > THROTTLE_LINES:
        LOG.warning("digest: %d more sources or users refused for wrong passwords",
                    len(events) - THROTTLE_LINES)

