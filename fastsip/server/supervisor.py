"""The supervisor: opens the sockets, forks the workers, restarts the dead, serves HTTP.

- Every listen address gets one socket per worker, all bound with
  ``SO_REUSEPORT`` before any worker starts (so a bad address fails at once,
  with exit status 2).  The supervisor keeps its copies: a worker that dies
  leaves its socket open, datagrams and connections queue on it, and the
  restarted worker picks them up.  A probe bind without ``SO_REUSEPORT``
  first makes sure that no other program holds the port.
- Hand-off inboxes are ``AF_UNIX`` datagram socket pairs, one per worker,
  created once: any worker sends on the writing end of the owner's pair.
- The control channel is a stream socket pair per worker (``control.py``).
- Counters: the supervisor asks each worker for its report (at each scrape, and
  every ``STATS_EVERY`` seconds); a worker also writes it into a block of
  shared memory (``statsblock.py``) every ``worker.PUBLISH_EVERY`` seconds
  and when it exits.  When a worker dies its slot keeps its final counters
  as the base of the next worker's, so no counter goes down.
- The HTTP endpoint (``/metrics`` and the JSON admin API that ``fastsip show``,
  ``bindings`` and ``remove`` use, ``admin.py``) is served by a thread of its
  own; the requests are answered in the supervisor's loop, which asks the
  workers over their control channels.
- SIGTERM/SIGINT: workers stop accepting, write their pending changes and
  exit; the supervisor exits 0 (workers still alive after ``STOP_GRACE``
  seconds are killed).  SIGHUP: reopen the log file, re-read the config
  file's live settings and the users file, and pass them to the workers.
"""
from __future__ import annotations

import copy
import logging
import os
import selectors
import signal
import socket
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastsip.errors import ClusterError
from fastsip.server import control, logs, steer
from fastsip.server._io_c import set_dont_fragment
from fastsip.server.admin import AdminServer, read_token
from fastsip.server.config import SECURE, ConfigError, resolve
from fastsip.server.metrics import add_reports, latest_report
from fastsip.server.statsblock import StatsBlock
from fastsip.server.tls import make_context as make_tls_context

LOG = logs.LOG
STOP_GRACE = 8.0            # seconds workers get to write their state before SIGKILL
STATS_EVERY = 2.0           # seconds between counter snapshots (kept when a worker dies)
CHECKPOINT_EVERY = 1.0      # seconds between WAL checkpoints (the supervisor's; workers never do)
FIRST_PURGE = 5.0           # seconds from the start to the first purge of expired rows
PURGE_EVERY = 60.0          # seconds between purges of expired rows (with a change log)
RESTART_BACKOFF = 1.0       # a worker that dies within this many seconds of its start waits this long
BUF = 4 << 20


def _force_buf(sock, opt, force, size):
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


def _fmt(transport, host, port):
    return f"{transport}:[{host}]:{port}" if ":" in host else f"{transport}:{host}:{port}"


def open_listener(transport, host, port, n):
    """Bind ``n`` SO_REUSEPORT sockets on one address; ConfigError when it is unusable."""
    typ = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    name = _fmt(transport, host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=typ)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {name}: {exc.strerror}") from None
    fam, _, _, _, addr = infos[0]

    def new():
        s = socket.socket(fam, typ)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if typ == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s

    probe = new()
    try:
        probe.bind(addr)
        addr = probe.getsockname()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {name}: {exc.strerror}") from None
    finally:
        probe.close()
    socks = []
    try:
        for _ in range(n):
            s = new()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(addr)
            if typ == socket.SOCK_STREAM:
                s.listen(1024)
            else:
                _force_buf(s, socket.SO_RCVBUF, 33, BUF)     # 33 = SO_RCVBUFFORCE
                _force_buf(s, socket.SO_SNDBUF, 32, BUF)     # 32 = SO_SNDBUFFORCE
                if fam == socket.AF_INET:
                    set_dont_fragment(s.fileno())
            s.set_inheritable(False)
    except OSError as exc:
        for s in socks:
            s.close()
        raise ConfigError(f"cannot listen on {name}: {exc.strerror}") from None
    return (transport, addr[0], addr[1]), socks


def own_addresses(listen) -> list:
    """What the R-URI of a REGISTER may name: the listen hosts (all local ones for a wildcard)."""
    out = []
    for _transport, host, _port in listen:
        if host in ("0.0.0.0", "::"):
            names = {"127.0.0.1", "::1", "localhost"}
            try:
                hn = socket.gethostname()
                names.add(hn)
                for info in socket.getaddrinfo(hn, None):
                    names.add(info[4][0])
            except OSError:
                pass
            out.extend(sorted(names))
        else:
            out.append(host)
    return list(dict.fromkeys(out))


class Slot:
    """One worker's place: the running worker's pid and channel, and the counters of
    the workers that ran here before it (``base``), so its totals carry on."""

    def __init__(self, index):
        self.index = index
        self.pid = 0
        self.ctrl = None
        self.ready = False
        self.started = 0.0
        self.restarts = 0
        self.last = {}          # the running worker's latest report
        self.base = {}          # the counters (no gauges) of the workers that died here
        self.block = StatsBlock()   # shared with the worker: its report, for after its death
        self.reader = None
        self.restart_at = None

    def totals(self) -> dict:
        """This slot's counters since the server started, and its worker's gauges."""
        return add_reports(copy.deepcopy(self.base), self.last)

    def retire(self) -> None:
        """The worker is gone: its last counters become part of the base.  The last
        of them are in the shared block (written at most PUBLISH_EVERY seconds before
        a SIGKILL, or at its exit), or were in its last answer, whichever is later."""
        final = latest_report(self.last, self.block.read())
        add_reports(self.base, final, with_gauges=False)
        self.last = {}
        self.block.clear()


class Supervisor:
    def __init__(self, cfg):
        self.cfg = cfg
        self._sync = None           # SyncCluster of the admin API, with --cluster
        self._sync_lock = threading.Lock()
        self._aor_form = None       # a Registrar that only canonicalizes AORs (aor_of)
        self.cluster_primaries = 0
        self.listen = []            # [(transport, host, port)] as bound
        self.udp = []               # per worker: [socket per UDP address]
        self.tcp = []               # per worker: [(transport, socket) per stream address]
        self.inboxes = []           # [(recv end, send end)] per worker
        self.slots = []
        self.restarts = 0
        self.stopping = False
        self.signals = []
        self.admin = None           # the HTTP endpoint (admin.py)
        self.secret = os.urandom(32)
        self.addresses = []
        self.announced = False
        self.steering = {}          # UDP listener -> "on", or "off (why)"
        self.auth_users = 0         # users the --users file holds for --realm (at start)
        self.state = None           # the supervisor's connection to the state file (run)
        self.folder = None          # the workers' change logs into the state file (state.Folder)
        self.checkpointer = None    # its thread for the folds and the WAL checkpoints
        self.checkpointing = None   # the Future of the fold or checkpoint under way

    # ------------------------------------------------------------------ setup
    def open(self):
        cfg = self.cfg
        n = cfg.workers
        self.udp = [[] for _ in range(n)]
        self.tcp = [[] for _ in range(n)]
        try:
            for transport, host, port in cfg.listen:
                bound, socks = open_listener(transport, host, port, n)
                self.listen.append(bound)
                if transport == "udp" and n > 1:
                    why = ("--no-steer" if cfg.no_steer else
                           steer.attach(socks, cfg.aor_by == "user"))
                    self.steering[_fmt(*bound)] = f"off ({why})" if why else "on"
                for i, s in enumerate(socks):
                    if transport == "udp":
                        self.udp[i].append(s)
                    else:
                        self.tcp[i].append((transport, s))
            if any(t in SECURE for t, _h, _p in cfg.listen):
                make_tls_context(cfg)   # a certificate or key that will not do: say it now
            host, port = cfg.metrics
            token = read_token(cfg.admin_token_file) if cfg.admin_token_file else None
            if token is not None and os.stat(cfg.admin_token_file).st_mode & 0o077:
                LOG.warning("--admin-token-file %s: other users may read it (chmod 600 it)",
                            cfg.admin_token_file)
            try:
                self.admin = AdminServer(host, port, self, token)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {host}:{port}: "
                                  f"{getattr(exc, 'strerror', exc)}") from None
            self.metrics_addr = self.admin.address
        except ConfigError:
            self.close_sockets()
            raise
        for _ in range(n):
            r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            _force_buf(w, socket.SO_SNDBUF, 32, BUF)
            _force_buf(r, socket.SO_RCVBUF, 33, BUF)
            self.inboxes.append((r, w))
        self.addresses = own_addresses(self.listen)
        if cfg.cluster is not None:
            self.cluster_primaries = self._check_cluster()
        if cfg.state:
            try:
                from fastsip.server.state import Folder, StateFile, sql_writer
                StateFile(cfg.state).close()
                sql = sql_writer(cfg.state, checkpoints=False)
                if sql is not None:
                    self.folder = Folder(cfg.state, sql)
                    # what the last run's workers logged and no fold wrote (a kill -9)
                    folded = self.folder.fold(final=True)
                    if folded:
                        LOG.info("state file %s: %d changes of the last run written from its "
                                 "change log", cfg.state, folded)
            except (OSError, ValueError, sqlite3.Error) as exc:
                self.close_sockets()
                raise ConfigError(f"--state {cfg.state}: {exc}") from None
        if cfg.realm is not None:
            try:
                from fastsip.auth import load_htdigest
                # keys are (user, realm) or (user, realm, algorithm): count each user once
                self.auth_users = len({key[0] for key in load_htdigest(cfg.users)
                                       if key[1] == cfg.realm})
            except (OSError, ValueError) as exc:
                self.close_sockets()
                raise ConfigError(f"--users {cfg.users}: {exc}") from None

    def close_sockets(self):
        for group in self.udp:
            for s in group:
                s.close()
        for group in self.tcp:
            for _t, s in group:
                s.close()
        for r, w in self.inboxes:
            r.close()
            w.close()
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    # ------------------------------------------------------------------ workers
    def spawn(self, slot):
        self._checkpoint_done()
        if self.folder is not None:
            # a worker loads its shard from the file: first what its dead predecessor logged
            try:
                self.folder.fold(slot.index, final=True)
            except (OSError, ValueError, sqlite3.Error) as exc:
                LOG.error("state file: folding worker %d's change log failed (%s): it loads "
                          "without its last changes", slot.index, exc)
        sup_end, wk_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:                                    # the worker
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                sup_end.close()
                self.sel.close()
                self.admin.close_in_child()
                self._wake_r.close()
                self._wake_w.close()
                for other in self.slots:
                    if other.ctrl is not None:
                        other.ctrl.close()
                    if other is not slot:
                        other.block.close()
                for j in range(self.cfg.workers):
                    if j != slot.index:
                        for s in self.udp[j] + [s for _t, s in self.tcp[j]]:
                            s.close()
                logs.set_role(f"worker {slot.index}")
                from fastsip.server.worker import Worker
                w = Worker(slot.index, self.cfg, self.udp[slot.index], self.tcp[slot.index],
                           self.inboxes[slot.index][0], [w for _, w in self.inboxes], wk_end,
                           self.secret, self.addresses, slot.block, restarted=slot.restarts > 0)
                code = w.run()
            except BaseException:                       # noqa: BLE001 - report, then exit
                LOG.exception("worker %d failed", slot.index)
            finally:
                try:
                    logging.shutdown()
                finally:
                    os._exit(code)
        wk_end.close()
        slot.pid = pid
        slot.ctrl = sup_end
        slot.ready = False
        slot.started = time.monotonic()
        slot.reader = control.Reader()
        slot.restart_at = None
        self.sel.register(sup_end, selectors.EVENT_READ, ("ctrl", slot))

    def _on_ctrl(self, slot):
        try:
            data = slot.ctrl.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(slot.ctrl)
            return
        for msg in slot.reader.feed(data):
            if msg.get("op") == "ready":
                slot.ready = True
                self.sel.unregister(slot.ctrl)
                logs.event(logging.INFO,
                           f"worker {slot.index} (pid {slot.pid}) ready: loaded {msg['bindings']} "
                           f"bindings of {msg['aors']} AORs from the state file in {msg['seconds']} s"
                           if self.cfg.state else
                           f"worker {slot.index} (pid {slot.pid}) ready (no state file)",
                           worker=slot.index, pid=slot.pid, bindings=msg["bindings"],
                           aors=msg["aors"], seconds=msg["seconds"])
        if not self.announced and all(s.ready for s in self.slots):
            self.announced = True
            self._announce()

    def _announce(self):
        cfg = self.cfg
        where = ", ".join(_fmt(*b) for b in self.listen)
        state = os.path.abspath(cfg.state) if cfg.state else "none (--no-state: bindings in memory only)"
        if cfg.cluster is not None:
            n = self.cluster_primaries
            state = (f"shared at {cfg.cluster.redacted()} ({n} primar{'ies' if n != 1 else 'y'}), "
                     f"node {cfg.node_id}")
        mh, mp = self.metrics_addr
        if cfg.realm is None:
            auth = "digest authentication off"
        else:
            n = self.auth_users
            auth = (f"digest authentication on, realm {cfg.realm}: {n} user{'s' if n != 1 else ''} "
                    f"in {cfg.users}")
            if n == 0:
                auth += " (WARNING: none of this realm, so no phone can register)"
        steering = set(self.steering.values())
        steering = ("; kernel steering by AOR " + (steering.pop() if len(steering) == 1 else
                    ", ".join(f"{k} {v}" for k, v in self.steering.items()))) if steering else ""
        exposed = not self.admin.loopback
        if exposed:
            admin = (" (WARNING: beyond loopback: /metrics open to the network, admin API "
                     + ("on with the --admin-token-file token)" if self.admin.token
                        else "off without --admin-token-file)"))
        else:
            admin = " (admin API with the --admin-token-file token)" if self.admin.token else ""
        # not silently off: the right value depends on what stands in front (docs/security.md)
        rate = (f"rate limit per source {cfg.rate_limit:g}/s" if cfg.rate_limit
                else "rate limit per source off")
        line = (f"fastsip serve: listening on {where}; {cfg.workers} worker"
                f"{'s' if cfg.workers != 1 else ''}; state {state}; "
                f"metrics http://{f'[{mh}]' if ':' in mh else mh}:{mp}/metrics{admin}; "
                f"{rate}; {auth}; redirect server {'on' if cfg.redirect else 'off'}{steering}")
        # stdout gets the start line (scripts and fastsip.server.testing read it there); the
        # log gets it too, unless the log is the very same file or terminal (a plain
        # `fastsip serve` in a shell, or `>out 2>&1`), where it would show twice
        print(line, flush=True)
        if not logs.same_as_stdout():
            logs.event(logging.WARNING if exposed or (cfg.realm is not None and self.auth_users == 0)
                       else logging.INFO, line,
                       listen=[_fmt(*b) for b in self.listen], workers=cfg.workers,
                       state=cfg.state, metrics=f"{mh}:{mp}", steering=self.steering,
                       admin="off" if exposed and not self.admin.token else
                       "token" if self.admin.token else "loopback",
                       realm=cfg.realm, users=self.auth_users if cfg.realm is not None else None,
                       redirect=cfg.redirect)

    def _check_cluster(self) -> int:
        """--cluster: the slot map can be read and the function library loads on
        every primary (FUNCTION LOAD REPLACE: a newer fastsip's replaces an older
        one's); otherwise one error line.  Returns the number of primaries."""
        from fastsip.cluster.sync import SyncCluster
        try:
            sync = SyncCluster(self.cfg.cluster)
            try:
                sync.load_library()
            finally:
                sync.close()
        except ClusterError as exc:
            self.close_sockets()
            raise ConfigError(f"--cluster: {exc}") from None
        return len(sync.slots.primaries)

    def location(self, read):
        """``read(sync)`` on the shared location (--cluster), through a connection
        kept between calls; one lost is made again once.  Called from the admin API's
        client threads, one at a time."""
        from fastsip.cluster.sync import SyncCluster
        with self._sync_lock:
            for attempt in (1, 2):
                if self._sync is None:
                    self._sync = SyncCluster(self.cfg.cluster)
                try:
                    return read(self._sync)
                except ClusterError:
                    self._sync.close()
                    self._sync = None
                    if attempt == 2:
                        raise

    def aor_of(self, uri) -> str:
        """The canonical AOR of ``uri``, as the workers key it (--aor-by)."""
        if self._aor_form is None:
            import fastsip
            self._aor_form = fastsip.Registrar(aor_by=self.cfg.aor_by)
        return self._aor_form.aor_of(uri)

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot in self.slots:
                if slot.pid == pid:
                    self._died(slot, status)

    def _died(self, slot, status):
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.WEXITSTATUS(status)}")
        slot.retire()
        if slot.ctrl is not None:
            try:
                self.sel.unregister(slot.ctrl)
            except (KeyError, ValueError):
                pass
            slot.ctrl.close()
            slot.ctrl = None
        old = slot.pid
        slot.pid = 0
        slot.ready = False
        if self.stopping:
            return
        self.restarts += 1
        slot.restarts += 1
        quick = time.monotonic() - slot.started < RESTART_BACKOFF
        slot.restart_at = time.monotonic() + (RESTART_BACKOFF if quick else 0.0)
        logs.event(logging.WARNING, f"worker {slot.index} (pid {old}) died ({how}); restarting"
                   + (f" in {RESTART_BACKOFF:g} s" if quick else ""),
                   worker=slot.index, pid=old, status=how)
        if any(self.tcp):               # its connections died with it: so do their flows
            self.ask_all({"op": "conns_gone", "worker": slot.index})

    # ------------------------------------------------------------------ asking workers
    def ask_all(self, msg, timeout=5.0):
        """[(slot, answer)] from every ready worker (answers None for one that did not answer)."""
        out = []
        for slot in self.slots:
            if slot.ready and slot.ctrl is not None:
                out.append((slot, control.request(slot.ctrl, msg, timeout, slot.reader)))
        return out

    def collect(self) -> dict:
        """Every slot's counters added up: those of the workers that died there and
        its worker's.  A worker that does not answer in time counts with the last
        report it gave, so counters never go down."""
        total: dict = {}
        for slot, answer in self.ask_all({"op": "stats"}):
            if answer and "report" in answer:
                slot.last = answer["report"]
        for slot in self.slots:
            add_reports(total, slot.base)
            add_reports(total, slot.last)
        return total

    def listen_names(self) -> list:
        """The bound listen addresses as the start line names them."""
        return [_fmt(*b) for b in self.listen]

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        self.signals.append(signum)

    def _reload(self):
        logs.setup(self.cfg.log_level, self.cfg.log_format, self.cfg.log_file)
        if self.cfg.config:
            try:
                new = resolve(self._args, self.cfg.config)
            except ConfigError as exc:
                LOG.error("SIGHUP: %s (keeping the running configuration)", exc)
                return
            values = new.live_values()
            changed = {k: v for k, v in values.items() if getattr(self.cfg, k) != v}
            fixed = sorted(k for k in vars(new) if k not in values and k not in ("config",)
                           and getattr(new, k) != getattr(self.cfg, k)
                           and not (k == "listen" and [tuple(x) for x in new.listen] == self.listen))
            if fixed:
                LOG.warning("SIGHUP: %s changed in %s: takes effect at the next start",
                            ", ".join(fixed), self.cfg.config)
            for k, v in values.items():
                setattr(self.cfg, k, v)
            logs.setup(self.cfg.log_level, self.cfg.log_format, self.cfg.log_file)
        else:
            values, changed = self.cfg.live_values(), {}
        if self.cfg.admin_token_file:
            try:
                self.admin.token = read_token(self.cfg.admin_token_file)
            except ConfigError as exc:
                LOG.error("SIGHUP: %s (keeping the admin token)", exc)
        tls_ok = False
        if any(t in SECURE for t, _h, _p in self.listen):
            try:
                make_tls_context(self.cfg)
                tls_ok = True
            except ConfigError as exc:
                LOG.error("SIGHUP: %s (keeping the old TLS certificate)", exc)
        answers = self.ask_all({"op": "reload", "values": values, "tls": tls_ok})
        logs.event(logging.INFO, "SIGHUP: logs reopened; configuration reloaded"
                   + (f" (changed: {', '.join(sorted(changed))})" if changed else " (no change)")
                   + f"; {sum(1 for _, a in answers if a and a.get('ok'))} workers updated",
                   changed=sorted(changed))

    # ------------------------------------------------------------------ main loop
    def run(self, args=None) -> int:
        self._args = args
        cfg = self.cfg
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.sel.register(self.admin.fileno(), selectors.EVENT_READ, ("admin", None))
        self.slots = [Slot(i) for i in range(cfg.workers)]
        for slot in self.slots:
            self.spawn(slot)
        self.admin.start()
        next_stats = time.monotonic() + STATS_EVERY
        next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
        next_fold = time.monotonic() + cfg.fold_interval
        next_purge = time.monotonic() + FIRST_PURGE
        self.state = None
        if cfg.state:
            from fastsip.server.state import StateFile
            from fastsip.server.timers import nicer
            self.state = StateFile(cfg.state)
            # the folds and checkpoints on a thread nicer than the workers: they never
            # take a core from a receive loop first, nor hold up this loop (the admin
            # API, restarts)
            self.checkpointer = ThreadPoolExecutor(1, thread_name_prefix="fastsip-checkpoint",
                                                   initializer=nicer)
        while not self.stopping:
            for key, _ in self.sel.select(0.25):
                kind, slot = key.data
                if kind == "wake":
                    try:
                        while self._wake_r.recv(512):
                            pass
                    except OSError:
                        pass
                elif kind == "admin":
                    self.admin.run_pending()
                elif kind == "ctrl":
                    self._on_ctrl(slot)
            sigs, self.signals = self.signals, []
            for sig in sigs:
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self.stopping = True
                    logs.event(logging.INFO, f"{signal.Signals(sig).name}: stopping",
                               signal=signal.Signals(sig).name)
                elif sig == signal.SIGHUP:
                    self._reload()
                elif sig == signal.SIGCHLD:
                    self._reap()
            self._reap()
            now = time.monotonic()
            for slot in self.slots:
                if not slot.pid and slot.restart_at is not None and now >= slot.restart_at \
                        and not self.stopping:
                    self.spawn(slot)
            if now >= next_stats:
                next_stats = now + STATS_EVERY
                self.collect()
            if self.state is not None and now >= next_checkpoint:
                next_checkpoint = now + CHECKPOINT_EVERY
                if self.checkpointing is None or self.checkpointing.done():
                    fold = self.folder is not None and now >= next_fold
                    if fold:
                        next_fold = now + cfg.fold_interval
                    purge = self.folder is not None and now >= next_purge
                    if purge:
                        next_purge = now + PURGE_EVERY
                    self.checkpointing = self.checkpointer.submit(self._checkpoint, fold, purge)
        return self.stop()

    def _checkpoint(self, fold: bool = False, purge: bool = False) -> None:
        """The WAL checkpoint (``fold``: the workers' change logs first; ``purge``:
        then the rows whose bindings all expired, such as rows that expired while
        the server was down, which no worker loaded and so none will delete)."""
        try:
            if fold:
                self.folder.fold()
            if purge:
                self.state.purge_expired(time.time())
            if purge or not fold:
                self.state.checkpoint()
        except (OSError, ValueError, sqlite3.Error) as exc:
            LOG.warning("state file: %s failed: %s", "fold" if fold else
                        "purge" if purge else "checkpoint", exc)

    def fold_now(self) -> int:
        """``POST /api/state/fold``: the workers' change logs into the file now (after
        the fold under way, if any); the changes read.  A worker's last flush may
        still be on its way: this folds what the logs hold."""
        self._checkpoint_done()
        return self.folder.fold()

    def _checkpoint_done(self) -> None:
        """Wait for the checkpoint under way: a fork while its thread holds one of
        SQLite's locks would leave the lock held in the child for ever."""
        if self.checkpointing is not None:
            self.checkpointing.result()

    def stop(self) -> int:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE
        while any(s.pid for s in self.slots) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)
        for slot in self.slots:
            if slot.pid:
                LOG.error("worker %d (pid %d) did not stop in %g s: killed", slot.index, slot.pid,
                          STOP_GRACE)
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                    os.waitpid(slot.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                slot.pid = 0
        self.close_sockets()
        if self.checkpointer is not None:
            self.checkpointer.shutdown(wait=True)
        if self.folder is not None:
            try:
                self.folder.fold(final=True)
            except (OSError, ValueError, sqlite3.Error) as exc:
                LOG.error("state file: the last fold failed (%s): the change log in %s is "
                          "written at the next start", exc, self.folder.dir)
        if self.state is not None:
            try:
                self.state.checkpoint("TRUNCATE")
            except sqlite3.Error as exc:
                LOG.warning("state file: final checkpoint failed: %s", exc)
            self.state.close()
        if self.folder is not None:
            self.folder.close()
        logs.event(logging.INFO, "stopped" + (f"; state written to {os.path.abspath(self.cfg.state)}"
                                              if self.cfg.state else ""))
        return 0


def serve(args) -> int:
    """``fastsip serve``: resolve the configuration, open the sockets, supervise."""
    try:
        cfg = resolve(args)
    except ConfigError as exc:
        print(f"fastsip serve: error: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, cfg.log_format, cfg.log_file)
    if cfg.cluster is not None:
        logs.set_node(cfg.node_id)
    sup = Supervisor(cfg)
    try:
        sup.open()
    except ConfigError as exc:
        print(f"fastsip serve: error: {exc}", file=sys.stderr)
        return 2
    return sup.run(args)
