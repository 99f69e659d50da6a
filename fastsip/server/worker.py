"""A worker process: one shard of the bindings, its sockets, one thread, one event loop.

The worker builds the core (``fastsip.Registrar``), loads its shard from the
state file, and then runs the loop (``loop.py``) until SIGTERM or until the
supervisor is gone.  The work is done in rooms, one job each:

- ``loop.py``: the event loop, compiled (``_io_c.EventLoop``): it serves
  the UDP listeners and the inbox itself and enters Python only for the
  other descriptors and, when due, for ``_tick`` (timers, the report);
- ``udp.py``: UDP listeners, served in batches in Cython (``_io_c.pyx``);
- ``tcp.py``: stream listeners and connections: TCP, TLS (``tls.py``),
  WebSocket and secure WebSocket;
- ``inbox.py``: hand-offs to the workers owning other shards, and this
  worker's inbox;
- ``ratelimit.py``: the per-source token bucket (``--rate-limit``);
- ``timers.py``: expiry, the state file writer, the TCP idle sweep and
  message deadlines;
- ``commands.py``: the control channel (stats, admin requests, reload).

The worker writes its counters into a block of memory shared with the
supervisor (``statsblock.py``) every ``PUBLISH_EVERY`` seconds while sockets
are served (``PUBLISH_IDLE`` while idle) and as it exits, so that they
outlive a SIGKILL.

The clock is read once per receive batch, as wall-clock seconds, and passed
to the core as ``now``.  The worker never builds a SIP message itself: every
reply comes from the core.
"""
from __future__ import annotations

import os
import time

import fastsip
from fastsip.server import control, logs
from fastsip.server.commands import Commands, make_authorize, worker_max_bindings
from fastsip.server.inbox import MAX_PENDING_HANDOFF, Handoffs
from fastsip.server.loop import Loop
from fastsip.server.metrics import Histogram, WorkerCounters
from fastsip.server.ratelimit import RateLimiter
from fastsip.server.shared import SharedLocation
from fastsip.server.tcp import TcpServer
from fastsip.server.timers import StateWriter, Timers
from fastsip.server.udp import UdpServer

LOG = logs.LOG

IDLE_WAIT = 0.2             # seconds the loop waits at most between two ticks
PUBLISH_EVERY = 0.25        # seconds between reports written to the shared block, while busy
PUBLISH_IDLE = 1.0          # ... when no socket was ready (timers may still count)


def make_registrar(cfg, addresses, secret):
    """The core, configured from a ``ServerConfig``."""
    return fastsip.Registrar(min_expires=cfg.min_expires, max_expires=cfg.max_expires,
                             default_expires=cfg.default_expires, max_contacts=cfg.max_contacts,
                             domains=cfg.domain or None, addresses=tuple(addresses),
                             authorize=make_authorize(cfg, secret),
                             track_changes=bool(cfg.state), aor_by=cfg.aor_by,
                             max_bindings=worker_max_bindings(cfg), redirect=cfg.redirect,
                             shared=cfg.cluster is not None)


class Worker:
    def __init__(self, index, cfg, udp_socks, tcp_socks, inbox, peers, ctrl, secret, addresses,
                 stats_block=None, restarted=False):
        self.index = index
        self.n = cfg.workers
        self.cfg = cfg
        self.udp_socks = udp_socks      # [socket] in listener order (index = listener number)
        self.tcp_socks = tcp_socks      # [(transport, socket)]: tcp, tls, ws, wss listeners
        self.inbox = inbox              # this worker's receiving end
        self.peers = peers              # [sending end of worker j's inbox]
        self.ctrl = ctrl
        self.secret = secret
        self.addresses = addresses
        self.block = stats_block        # statsblock.StatsBlock shared with the supervisor, or None
        self.restarted = restarted      # a predecessor died: the other workers' connections live
        self._published = 0.0           # time.monotonic() of the last report written there
        self._unpublished = False       # sockets were served since the last report written
        self.stopping = False
        self.c = WorkerCounters()
        self.hist = Histogram()
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst)
        self.loop = Loop()
        self.reg = self.writer = None
        self.udp = self.tcp = self.handoffs = self.timers = self.commands = None
        self.shared = None              # SharedLocation, with --cluster
        self._bug_logged = -1e9

    # ------------------------------------------------------------------ start
    def start(self) -> dict:
        """Build the core and load this shard from the state file."""
        self.reg = make_registrar(self.cfg, self.addresses, self.secret)
        t0 = time.monotonic()
        self.writer = StateWriter(self.cfg.state, self.index, self.n, self.reg, self.c)
        # Flow bindings whose connection is gone are not loaded: at a start every
        # connection is; after this worker's death only its own (the 8 low bits of
        # a connection id are the worker's index), the others' workers still hold theirs.
        index = self.index
        aors, loaded = self.writer.load(
            time.time(), (lambda cid: cid & 0xFF == index) if self.restarted else True)
        return {"op": "ready", "index": self.index, "pid": os.getpid(), "bindings": loaded,
                "aors": aors, "seconds": round(time.monotonic() - t0, 3)}

    def _rooms(self) -> None:
        """The parts of the loop, wired to one another and to the loop."""
        cfg, reg, c, hist, bug = self.cfg, self.reg, self.c, self.hist, self._bug
        loop = self.loop
        self.handoffs = Handoffs(self.index, self.n, self.inbox, self.peers, self.udp_socks, reg,
                                 cfg, c, bug)
        self.udp = UdpServer(self.udp_socks, cfg)
        self.tcp = TcpServer(self.tcp_socks, loop, self.index, self.n, reg, cfg, self.limiter,
                             self.handoffs, c, hist, bug)
        self.timers = Timers(reg, cfg, self.writer, self.tcp.sweep, self.index == 0, time.time(),
                             self.tcp.deadlines)
        self.commands = Commands(self.ctrl, self.index, cfg, self.secret, reg, self.report,
                                 self._reloaded, self._stop)
        serve_shard = reg.serve_shard
        if cfg.cluster is not None:
            self.shared = SharedLocation(reg, cfg.cluster, loop, self.udp_socks, self.tcp.deliver,
                                         c, cfg.cluster_wait, cfg.cluster_grace)
            self.shared.start()
            serve_shard = self.tcp.serve_shard = self.shared.serve_shard
            self.tcp.after = self.shared.after_batch
            self.tcp.flows_end = self.shared.flows_end
            loop.set_queue(self.shared.wq)
        loop.serve(self.udp.io, self.handoffs.io, serve_shard, self.index, self.n,
                   self.handoffs.queues, self.handoffs.peer_fds, self.udp.fds, self.limiter,
                   hist, bug, self.handoffs.serve_others, MAX_PENDING_HANDOFF)
        self.udp.listen(loop)
        self.tcp.listen()
        loop.add_inbox(self.inbox.fileno())
        loop.add(self.ctrl.fileno(), self.commands.on_readable)
        self._reloaded()

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        for s in self.udp_socks + [s for _t, s in self.tcp_socks] + [self.inbox] + [
                p for p in self.peers if p is not None]:
            s.setblocking(False)
        self.ctrl.settimeout(10.0)
        self.loop.catch_signals(self._stop)
        ready = self.start()
        self.ctrl.sendall(control.encode(ready))
        self._rooms()
        try:
            if not self.stopping:
                self.loop.run(self._tick)
            return self._shutdown()
        finally:
            self.publish()              # the final counters, whatever ended the loop

    def _tick(self, active: bool) -> tuple[float, float]:
        """The Python side of the loop (``EventLoop.run``), called only when due: the
        timers, and the report written every ``PUBLISH_EVERY`` seconds while sockets
        are served (``active``: some were since the last call), ``PUBLISH_IDLE``
        while idle.  Returns when to be called next, and how soon once sockets are
        ready (both ``time.monotonic()``)."""
        timers = self.timers
        now = time.time()
        timers.run(now)
        due = timers.due_in(now)
        if self.shared is not None:
            due = min(due, self.shared.tick(now))
        t = time.monotonic()
        self._unpublished = self._unpublished or active
        if t - self._published >= (PUBLISH_EVERY if self._unpublished else PUBLISH_IDLE):
            self.publish(t)
            self._unpublished = False
        publish_at = self._published + (PUBLISH_EVERY if self._unpublished else PUBLISH_IDLE)
        nxt = min(t + min(due, IDLE_WAIT), publish_at)
        return nxt, min(nxt, self._published + PUBLISH_EVERY)

    def _stop(self) -> None:
        self.stopping = True
        self.loop.stop()

    def _shutdown(self) -> int:
        """Stop accepting, close connections, write every pending change, exit 0."""
        for s in self.udp_socks:
            self.loop.remove(s.fileno())
            s.close()
        self.tcp.close_all()
        if self.shared is not None:
            self.shared.close()
        self.handoffs.flush()
        self.writer.finish()
        return 0

    def _reloaded(self, tls: bool = False) -> None:
        """The live settings the rooms keep for themselves (at start and after a SIGHUP);
        ``tls``: a new TLS certificate for the connections accepted from now."""
        if tls:
            self.tcp.reload_tls()
        self.limiter.configure(self.cfg.rate_limit, self.cfg.rate_burst)
        self.loop.batch_wait = self.cfg.batch_wait * 1e-6
        if self.shared is not None:
            self.shared.wait_s = self.cfg.cluster_wait

    def _bug(self, data) -> None:
        """The core raised: a bug.  Count it, log the traceback (at most once a minute)."""
        self.c.internal_errors += 1
        if time.monotonic() - self._bug_logged > 60:
            self._bug_logged = time.monotonic()
            LOG.exception("the registrar core raised on a %d-byte message (a bug; message "
                          "dropped; further ones this minute are only counted)", len(data))

    # ------------------------------------------------------------------ report
    def publish(self, now: float | None = None) -> None:
        """Write the report into the block the supervisor reads when this worker is gone."""
        self._published = time.monotonic() if now is None else now
        if self.block is None:
            return
        try:
            self.block.write(self.report())
        except Exception:               # noqa: BLE001 - never let the counters stop the worker
            LOG.debug("writing the counters to the shared block failed", exc_info=True)

    def report(self) -> dict:
        """This worker's counters and the core's, for the supervisor (metrics.py)."""
        c = self.c
        io, inbox_io = self.udp.io, self.handoffs.io
        c.dropped_oversized = io.oversized + inbox_io.oversized
        c.dropped_send_failed = io.send_errors + inbox_io.send_errors
        c.rate_limited = self.limiter.refused
        c.rate_limit_sources = len(self.limiter)
        c.tcp_connections = len(self.tcp)
        for t, n in self.tcp.per_transport.items():
            setattr(c, "connections_" + t, n)
        c.tcp_sources = len(self.tcp.sources)
        c.state_pending = self.writer.backlog
        c.state_rows_written = self.writer.rows_written
        extra = self.loop.counters()
        if self.shared is not None:
            extra.update(self.shared.counters())
        r = c.report(extra)
        r["core"] = self.reg.stats()
        r["latency"] = self.hist.as_dict()
        return r
