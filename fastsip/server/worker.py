"""A worker process: one shard of the bindings, its sockets, one thread, one epoll loop.

The loop waits on: its UDP sockets (``recvmmsg`` batches through
``fastsip.server._io_c.BatchIO``), its TCP listeners and connections (a
``StreamFramer`` per connection; CRLFCRLF keep-alives get CRLF), its hand-off
inbox (requests other workers received for AORs of this shard, and replies
to deliver over TCP connections this worker holds), the control channel to
the supervisor, and a signal wake-up socket.  Between batches it runs the
timers: expiry (``Registrar.expire``, bounded work per slice), the state
writer (bounded rows per transaction), the TCP idle sweep.

The clock is read once per receive batch, as wall-clock seconds, and passed
to the core as ``now``.  The worker never builds a SIP message itself: every
reply comes from ``Registrar.serve``.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import socket
import time

import fastsip
from fastsip.server._io_c import (H_TCP, H_TCP_REPLY, HANDOFF_HEADER, BatchIO,
                                   encode_handoff)
from fastsip.server import control, logs
from fastsip.server.metrics import Histogram, WorkerCounters
from fastsip.server.state import StateFile

LOG = logs.LOG

EXPIRE_EVERY = 1.0          # seconds between expiry slices
EXPIRE_WORK = 10000         # bindings removed per Registrar.expire call
SLICE = 0.02                # seconds of expiry or state writing before going back to the sockets
STATE_CHUNK = 2000          # AOR rows per state transaction
MAX_PENDING_STATE = 2_000_000
MAX_PENDING_HANDOFF = 20000  # per peer, while its inbox is full
UDP_BATCHES_PER_EVENT = 16
TCP_READ = 65536
TCP_MAX_OUT = 1 << 20       # bytes queued to one connection before it is closed
RATE_SOURCES_MAX = 100_000
PURGE_EVERY = 60.0

EP_IN = select.EPOLLIN
EP_OUT = select.EPOLLOUT


def make_registrar(cfg, addresses, secret):
    """The core, configured from a ``ServerConfig``."""
    authorize = None
    if cfg.realm is not None:
        authorize = fastsip.Authorize(realm=cfg.realm, users=cfg.users, secret=secret,
                                      algorithms=cfg.auth_algorithms)
    return fastsip.Registrar(min_expires=cfg.min_expires, max_expires=cfg.max_expires,
                             default_expires=cfg.default_expires, max_contacts=cfg.max_contacts,
                             domains=cfg.domain or None, addresses=tuple(addresses),
                             authorize=authorize, track_changes=bool(cfg.state),
                             aor_by=cfg.aor_by)


def binding_dict(aor, b, now) -> dict:
    """A Binding as JSON for the admin API."""
    src = b.source or ("", 0)
    return {
        "aor": aor, "contact": b.uri, "expires": max(0, int(round(b.expires_at - now))),
        "expires_at": b.expires_at, "q": b.q, "call_id": b.call_id, "cseq": b.cseq,
        "source": [src[0], src[1]], "transport": b.transport, "conn_id": b.conn_id,
        "path": list(b.path or ()), "instance": b.instance, "reg_id": b.reg_id,
        "user_agent": b.user_agent,
    }


class Conn:
    __slots__ = ("sock", "fd", "cid", "peer", "framer", "out", "last", "writing")

    def __init__(self, sock, cid, peer, max_size, now):
        self.sock = sock
        self.fd = sock.fileno()
        self.cid = cid
        self.peer = peer
        self.framer = fastsip.StreamFramer(max_size=max_size)
        self.out = bytearray()
        self.last = now
        self.writing = False


class Worker:
    def __init__(self, index, cfg, udp_socks, tcp_socks, inbox, peers, ctrl, secret, addresses):
        self.index = index
        self.n = cfg.workers
        self.cfg = cfg
        self.udp = udp_socks            # [socket] in listener order (index = listener number)
        self.tcp = tcp_socks            # [socket]
        self.inbox = inbox              # this worker's receiving end
        self.peers = peers              # [sending end of worker j's inbox]
        self.ctrl = ctrl
        self.secret = secret
        self.addresses = addresses
        self.reg = None
        self.state = None
        self.io = BatchIO(cfg.batch, cfg.max_message_size)
        self.inbox_io = BatchIO(cfg.batch, min(65535, cfg.max_message_size + HANDOFF_HEADER + 300))
        self.hist = Histogram()
        self.conns = {}                 # fd -> Conn
        self.conn_ids = {}              # conn id -> Conn
        # connection ids: unique across workers and restarts (worker index in the low 8 bits)
        self.next_cid = (int(time.time() * 1000) & 0xFFFFFFFFFF) << 8 | index
        self.handoff_q = [[] for _ in range(self.n)]
        self.state_pending = []
        self.rate = {}                  # source host -> [tokens, last]
        self.stopping = False
        self.ctrl_reader = control.Reader()
        self.c = WorkerCounters()
        self._state_error_logged = -1e9
        self._bug_logged = -1e9
        self._slow_logged = -1e9

    # ------------------------------------------------------------------ start
    def start(self):
        """Build the core and load this shard from the state file."""
        self.reg = make_registrar(self.cfg, self.addresses, self.secret)
        loaded = aors = 0
        t0 = time.monotonic()
        if self.cfg.state:
            self.state = StateFile(self.cfg.state, checkpoints=False)
            now = time.time()
            for aor, bindings in self.state.load(self.index, self.n, now, self.reg.aor_of):
                self.reg.store.load(aor, bindings)
                aors += 1
                loaded += len(bindings)
            self.reg.store.changes()    # what was just loaded is already in the file
        return {"op": "ready", "index": self.index, "pid": os.getpid(), "bindings": loaded,
                "aors": aors, "seconds": round(time.monotonic() - t0, 3)}

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        for s in self.udp + self.tcp + [self.inbox] + [p for p in self.peers if p is not None]:
            s.setblocking(False)
        self.ctrl.settimeout(10.0)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the supervisor decides
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

        ready = self.start()
        self.ctrl.sendall(control.encode(ready))

        ep = self.ep = select.epoll()
        kinds = self.kinds = {}
        for li, s in enumerate(self.udp):
            ep.register(s.fileno(), EP_IN)
            kinds[s.fileno()] = ("udp", li, s)
        for s in self.tcp:
            ep.register(s.fileno(), EP_IN)
            kinds[s.fileno()] = ("listen", 0, s)
        ep.register(self.inbox.fileno(), EP_IN)
        kinds[self.inbox.fileno()] = ("inbox", 0, self.inbox)
        ep.register(self.ctrl.fileno(), EP_IN)
        kinds[self.ctrl.fileno()] = ("ctrl", 0, self.ctrl)
        ep.register(wake_r.fileno(), EP_IN)
        kinds[wake_r.fileno()] = ("wake", 0, wake_r)

        now = time.time()
        next_expire = now + EXPIRE_EVERY
        next_flush = now + self.cfg.flush_interval
        next_sweep = now + 1.0
        next_purge = now + 5.0
        last_wake = 0.0
        while not self.stopping:
            busy = bool(self.state_pending) or any(self.handoff_q)
            events = ep.poll(0 if busy else 0.2)
            if events and self.cfg.batch_wait:
                # Steady traffic (woken again within two waits): let the batch grow.
                # Slower traffic would pay a second wake-up for nothing.
                t = time.monotonic()
                wait = self.cfg.batch_wait * 1e-6
                if t - last_wake < 2 * wait:
                    time.sleep(wait)
                last_wake = t
            for fd, ev in events:
                kind, li, obj = kinds.get(fd, (None, 0, None))
                if kind == "udp":
                    self._on_udp(li, obj)
                elif kind == "conn":
                    if ev & EP_IN or ev & (select.EPOLLHUP | select.EPOLLERR):
                        self._on_conn_read(obj)
                    if ev & EP_OUT and obj.fd in self.conns:
                        self._on_conn_write(obj)
                elif kind == "inbox":
                    self._on_inbox()
                elif kind == "listen":
                    self._on_accept(obj)
                elif kind == "ctrl":
                    self._on_ctrl()
                elif kind == "wake":
                    try:
                        while wake_r.recv(512):
                            pass
                    except OSError:
                        pass
            if any(self.handoff_q):
                self._send_handoffs()
            now = time.time()
            if now >= next_expire:
                next_expire = now + EXPIRE_EVERY
                self._expire(now)
            if now >= next_flush:
                next_flush = now + self.cfg.flush_interval
                self._collect_changes()
            if self.state_pending:
                self._write_state(SLICE)
            if now >= next_sweep:
                next_sweep = now + 1.0
                self._sweep(now)
            if now >= next_purge and self.state is not None and self.index == 0:
                next_purge = now + PURGE_EVERY
                try:
                    self.state.purge_expired(now)
                except Exception:       # noqa: BLE001 - logged, retried next time
                    LOG.warning("state file: purge of expired rows failed", exc_info=True)
        return self._shutdown()

    def _on_term(self, signum, frame):
        self.stopping = True

    def _shutdown(self) -> int:
        """Stop accepting, close connections, write every pending change, exit 0."""
        for s in self.udp + self.tcp:
            try:
                self.ep.unregister(s.fileno())
            except OSError:
                pass
            s.close()
        for conn in list(self.conns.values()):
            self._close(conn)
        self._send_handoffs()
        if self.state is not None:
            self._collect_changes()
            self._write_state(None)
            self.state.close()
        return 0

    # ------------------------------------------------------------------ UDP
    def _on_udp(self, li, sock):
        """Serve what waits on one UDP socket: ``BatchIO.serve_udp`` reads a
        batch, answers what this shard owns and queues the rest for its owners."""
        serve_udp = self.io.serve_udp
        serve_shard = self.reg.serve_shard
        fd = sock.fileno()
        allow = self._allow if self.cfg.rate_limit else None
        received = handed = 0
        for _ in range(UDP_BATCHES_PER_EVENT):
            now = time.time()
            t0 = time.perf_counter()
            got, out = serve_udp(fd, serve_shard, now, self.index, self.n, li, self.handoff_q,
                                 allow, self._bug)
            if not got:
                break
            received += got
            handed += out
            self.c.batches_udp += 1
            self.hist.observe(time.perf_counter() - t0, got - out)
            if got < self.io.vlen:
                break
        if handed:
            self._send_handoffs()
        self.c.received_udp += received
        self.c.handoffs_sent += handed

    def _allow(self, host, now) -> bool:
        b = self.rate.get(host)
        rate = self.cfg.rate_limit
        burst = self.cfg.rate_burst
        if b is None:
            if len(self.rate) >= RATE_SOURCES_MAX:
                self._prune_rate(now)
            self.rate[host] = [burst - 1.0, now]
            return True
        tokens = min(burst, b[0] + (now - b[1]) * rate)
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            self.c.rate_limited += 1
            return False
        b[0] = tokens - 1.0
        return True

    def _prune_rate(self, now):
        rate, burst = self.cfg.rate_limit, self.cfg.rate_burst
        full = [h for h, b in self.rate.items() if b[0] + (now - b[1]) * rate >= burst]
        for h in full:
            del self.rate[h]
        if len(self.rate) >= RATE_SOURCES_MAX:     # a flood of distinct sources: start over
            self.rate.clear()

    def _bug(self, data):
        """The core raised: a bug.  Count it, log the traceback (at most once a minute)."""
        self.c.internal_errors += 1
        if time.monotonic() - self._bug_logged > 60:
            self._bug_logged = time.monotonic()
            LOG.exception("the registrar core raised on a %d-byte message (a bug; message "
                          "dropped; further ones this minute are only counted)", len(data))

    # ------------------------------------------------------------------ hand-off
    def _send_handoffs(self):
        for j, q in enumerate(self.handoff_q):
            if not q:
                continue
            sent = self.inbox_io.send(self.peers[j].fileno(), q)
            if sent >= len(q):
                q.clear()
            else:
                del q[:sent]
                if len(q) > MAX_PENDING_HANDOFF:
                    drop = len(q) - MAX_PENDING_HANDOFF
                    del q[:drop]
                    self.c.dropped_handoff_overflow += drop

    def _on_inbox(self):
        """Serve requests other workers handed over: UDP ones in ``serve_inbox``,
        TCP requests and TCP replies here (they need this worker's connections)."""
        serve_inbox = self.inbox_io.serve_inbox
        serve_shard = self.reg.serve_shard
        fd = self.inbox.fileno()
        udp_fds = [s.fileno() for s in self.udp]
        for _ in range(UDP_BATCHES_PER_EVENT):
            now = time.time()
            t0 = time.perf_counter()
            got, count, others = serve_inbox(fd, serve_shard, now, udp_fds, self._bug)
            if not got:
                break
            for kind, li, origin, host, cid, port, data in others:
                if kind == H_TCP_REPLY:
                    conn = self.conn_ids.get(cid)
                    if conn is not None:
                        self._write(conn, data)
                    continue
                if kind != H_TCP:
                    continue
                count += 1
                try:
                    reply = serve_shard(data, host, port, now, "tcp", cid, 0, 1)
                except Exception:       # noqa: BLE001 - a bug in the core: log, go on
                    self._bug(data)
                    continue
                if reply is not None:
                    self._reply_tcp(origin, cid, reply)
            self.c.handoffs_received += count
            self.c.batches_inbox += 1
            self.hist.observe(time.perf_counter() - t0, count)
            if got < self.inbox_io.vlen:
                break

    def _reply_tcp(self, origin, cid, reply):
        if origin == self.index:
            conn = self.conn_ids.get(cid)
            if conn is not None:
                self._write(conn, reply)
        elif origin < self.n:
            self.handoff_q[origin].append(
                (encode_handoff(H_TCP_REPLY, 0, self.index, b"", cid, 0, reply), None))

    # ------------------------------------------------------------------ TCP
    def _on_accept(self, lsock):
        for _ in range(64):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    LOG.warning("TCP accept failed: %s", exc.strerror)
                return
            if len(self.conns) >= self.cfg.max_connections:
                self.c.dropped_max_connections += 1
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cid = self.next_cid
            self.next_cid += 256
            conn = Conn(sock, cid, (peer[0], peer[1]), self.cfg.max_message_size, time.time())
            self.conns[conn.fd] = conn
            self.conn_ids[cid] = conn
            self.kinds[conn.fd] = ("conn", 0, conn)
            self.ep.register(conn.fd, EP_IN)

    def _on_conn_read(self, conn):
        try:
            data = conn.sock.recv(TCP_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        now = time.time()
        conn.last = now
        try:
            items = conn.framer.feed(data)
        except fastsip.ParseError:
            self.c.framing_errors += 1
            self._close(conn)
            return
        if not items:
            return
        t0 = time.perf_counter()
        n = self.n
        handled = 0
        host = conn.peer[0].encode()
        serve_shard = self.reg.serve_shard
        for item in items:
            if item == fastsip.PING:
                self.c.keepalives += 1
                self._write(conn, fastsip.PONG)
                continue
            if conn.fd not in self.conns:
                return
            self.c.received_tcp += 1
            if self.cfg.rate_limit and not self._allow(host, now):
                continue
            try:
                reply = serve_shard(item, host, conn.peer[1], now, "tcp", conn.cid, self.index, n)
            except Exception:           # noqa: BLE001 - a bug in the core: log, go on
                self._bug(item)
                continue
            if type(reply) is int:
                self.handoff_q[reply].append(
                    (encode_handoff(H_TCP, 0, self.index, host, conn.cid, conn.peer[1], item),
                     None))
                self.c.handoffs_sent += 1
                continue
            handled += 1
            if reply is not None:
                self._write(conn, reply)
        if handled:
            self.hist.observe(time.perf_counter() - t0, handled)

    def _write(self, conn, data):
        if conn.fd not in self.conns:
            return
        if not conn.out:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent == len(data):
                return
            data = data[sent:]
        conn.out += data
        if len(conn.out) > TCP_MAX_OUT:
            self.c.dropped_tcp_overflow += 1
            self._close(conn)
            return
        if not conn.writing:
            conn.writing = True
            self.ep.modify(conn.fd, EP_IN | EP_OUT)

    def _on_conn_write(self, conn):
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        if not conn.out and conn.writing:
            conn.writing = False
            self.ep.modify(conn.fd, EP_IN)

    def _close(self, conn):
        if self.conns.pop(conn.fd, None) is None:
            return
        self.conn_ids.pop(conn.cid, None)
        self.kinds.pop(conn.fd, None)
        try:
            self.ep.unregister(conn.fd)
        except OSError:
            pass
        conn.sock.close()

    def _sweep(self, now):
        idle = self.cfg.tcp_idle_timeout
        if idle and self.conns:
            for conn in [c for c in self.conns.values() if now - c.last > idle]:
                self._close(conn)

    # ------------------------------------------------------------------ timers
    def _expire(self, now):
        deadline = time.perf_counter() + SLICE
        while self.reg.expire(now, EXPIRE_WORK) >= EXPIRE_WORK and time.perf_counter() < deadline:
            pass

    def _collect_changes(self):
        if self.state is None:
            self.reg.store.changes()        # nobody needs them: do not let them pile up
            return
        self.state_pending.extend(self.reg.store.changes())
        if len(self.state_pending) > MAX_PENDING_STATE:
            drop = len(self.state_pending) - MAX_PENDING_STATE
            del self.state_pending[:drop]
            self.c.dropped_state_overflow += drop

    def _write_state(self, budget):
        """Write pending changes, ``STATE_CHUNK`` AORs per transaction, for ``budget`` seconds
        (None: everything)."""
        deadline = None if budget is None else time.perf_counter() + budget
        while self.state_pending:
            chunk = self.state_pending[:STATE_CHUNK]
            t0 = time.perf_counter()
            try:
                self.state.write(chunk)
                took = time.perf_counter() - t0
                if took > 0.2 and time.monotonic() - self._slow_logged > 60:
                    self._slow_logged = time.monotonic()
                    LOG.warning("state file: writing %d AORs took %.0f ms (the receive loop "
                                "waited)", len(chunk), took * 1000)
            except Exception as exc:    # noqa: BLE001 - the file may be full, locked, gone
                self.c.state_errors += 1
                if time.monotonic() - self._state_error_logged > 60:
                    self._state_error_logged = time.monotonic()
                    LOG.error("state file %s: write failed (%s); %d AOR changes pending",
                              self.cfg.state, exc, len(self.state_pending))
                return
            del self.state_pending[:len(chunk)]
            if deadline is not None and time.perf_counter() > deadline:
                return

    # ------------------------------------------------------------------ control
    def report(self) -> dict:
        c = self.c
        c.dropped_oversized = self.io.oversized + self.inbox_io.oversized
        c.dropped_send_failed = self.io.send_errors + self.inbox_io.send_errors
        c.tcp_connections = len(self.conns)
        c.state_pending = len(self.state_pending)
        c.state_rows_written = self.state.rows_written if self.state else 0
        c.rate_limit_sources = len(self.rate)
        r = c.report()
        r["core"] = self.reg.stats()
        r["latency"] = self.hist.as_dict()
        return r

    def _on_ctrl(self):
        try:
            data = self.ctrl.recv(1 << 16)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:                     # the supervisor is gone: stop
            self.stopping = True
            return
        try:
            msgs = self.ctrl_reader.feed(data)
        except ValueError:
            self.stopping = True
            return
        for msg in msgs:
            try:
                answer = self._control(msg)
            except Exception as exc:     # noqa: BLE001 - a bug: log it, answer, go on
                LOG.exception("control request %r failed", msg.get("op"))
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                self.ctrl.sendall(control.encode(answer))
            except OSError:
                self.stopping = True

    def _control(self, msg) -> dict:
        op = msg.get("op")
        now = time.time()
        if op == "stats":
            return {"index": self.index, "pid": os.getpid(), "report": self.report()}
        if op == "lookup":
            aor = self.reg.aor_of(msg["aor"])
            found = [binding_dict(aor, b, now) for b in self.reg.lookup(aor, now)]
            return {"aor": aor, "bindings": found, "near": [] if found else self.reg.near(aor)}
        if op == "bindings":
            limit = int(msg.get("limit", 100000))
            out = []
            for aor, b in self.reg.bindings(now):
                if len(out) >= limit:
                    break
                out.append(binding_dict(aor, b, now))
            return {"bindings": out}
        if op == "remove":
            aor = self.reg.aor_of(msg["aor"])
            removed = self.reg.remove(aor, msg.get("contact"), now)
            return {"aor": aor, "removed": removed,
                    "near": [] if removed or msg.get("contact") else self.reg.near(aor)}
        if op == "reload":
            self._reload(msg["values"])
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    def _reload(self, values):
        """Apply the live settings of a SIGHUP (see config.LIVE)."""
        old_users, old_domains = self.cfg.users, self.cfg.domain
        for k, v in values.items():
            setattr(self.cfg, k, v)
        logs.setup(self.cfg.log_level, self.cfg.log_format, self.cfg.log_file)
        if self.cfg.domain != old_domains:
            self.reg.set_domains(self.cfg.domain or None)
        try:
            self.reg.configure(min_expires=self.cfg.min_expires, max_expires=self.cfg.max_expires,
                               default_expires=self.cfg.default_expires,
                               max_contacts=self.cfg.max_contacts)
        except ValueError as exc:
            LOG.error("reload: %s (keeping the old limits)", exc)
        if self.cfg.realm is not None:
            # the users file is re-read even under the same name (it may have changed)
            try:
                self.reg.authorize = fastsip.Authorize(realm=self.cfg.realm, users=self.cfg.users,
                                                       secret=self.secret,
                                                       algorithms=self.cfg.auth_algorithms)
            except (OSError, ValueError) as exc:
                self.cfg.users = old_users
                LOG.error("reload: users file: %s (keeping the old one)", exc)
