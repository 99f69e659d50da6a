"""TCP connections: accept, read and frame, serve or hand off, write, close, the idle sweep.

Each connection has a ``StreamFramer`` (RFC 3261 section 18.3 framing by
Content-Length, bounded by ``--max-message-size``; a stream that cannot be
framed closes the connection) and an output queue bounded by ``TCP_MAX_OUT``
(a client that does not read is disconnected).  CRLFCRLF keep-alives get
CRLF (RFC 5626).  A request for an AOR of another shard is handed to its
owner with the connection id; the owner's reply comes back through the
hand-off channel and is written here (``deliver``).  Connection ids are
unique across workers and restarts: the worker index is in their low 8 bits.
"""
from __future__ import annotations

import errno
import socket
import time
from functools import partial

import fastsip
from fastsip.server import logs
from fastsip.server.loop import EP_ERR, EP_IN, EP_OUT

LOG = logs.LOG

TCP_READ = 65536
TCP_MAX_OUT = 1 << 20       # bytes queued to one connection before it is closed
ACCEPTS_PER_EVENT = 64


class Conn:
    __slots__ = ("sock", "fd", "cid", "peer", "host", "framer", "out", "last", "writing")

    def __init__(self, sock, cid, peer, max_size, now):
        self.sock = sock
        self.fd = sock.fileno()
        self.cid = cid
        self.peer = peer
        self.host = peer[0].encode()
        self.framer = fastsip.StreamFramer(max_size=max_size)
        self.out = bytearray()
        self.last = now
        self.writing = False


class TcpServer:
    """The worker's TCP listeners and the connections they accepted."""

    def __init__(self, listeners, loop, index: int, n: int, reg, cfg, limiter, handoffs,
                 counters, hist, bug) -> None:
        self.listeners = listeners
        self.loop = loop
        self.index = index
        self.n = n
        self.reg = reg
        self.cfg = cfg                  # tcp_idle_timeout is live (SIGHUP)
        self.limiter = limiter
        self.handoffs = handoffs
        self.c = counters
        self.hist = hist
        self.bug = bug
        self.conns: dict = {}           # fd -> Conn
        self.conn_ids: dict = {}        # conn id -> Conn
        self.next_cid = (int(time.time() * 1000) & 0xFFFFFFFFFF) << 8 | index
        handoffs.deliver = self.deliver

    def __len__(self) -> int:
        return len(self.conns)

    def listen(self) -> None:
        for s in self.listeners:
            self.loop.add(s.fileno(), partial(self.on_accept, s))

    def on_accept(self, lsock, events: int = 0) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
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
            self.loop.add(conn.fd, partial(self.on_event, conn))

    def on_event(self, conn: Conn, events: int) -> None:
        if events & (EP_IN | EP_ERR):
            self.read(conn)
        if events & EP_OUT and conn.fd in self.conns:
            self.on_writable(conn)

    def read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(TCP_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        now = time.time()
        conn.last = now
        try:
            items = conn.framer.feed(data)
        except fastsip.ParseError:
            self.c.framing_errors += 1
            self.close(conn)
            return
        if not items:
            return
        t0 = time.perf_counter()
        handled = 0
        host = conn.host
        serve_shard = self.reg.serve_shard
        limiter = self.limiter
        c = self.c
        for item in items:
            if item == fastsip.PING:
                c.keepalives += 1
                self.write(conn, fastsip.PONG)
                continue
            if conn.fd not in self.conns:
                return
            c.received_tcp += 1
            if limiter.rate and not limiter.allow(host, now):
                continue
            try:
                reply = serve_shard(item, host, conn.peer[1], now, "tcp", conn.cid, self.index,
                                    self.n)
            except Exception:           # noqa: BLE001 - a bug in the core: log, go on
                self.bug(item)
                continue
            if type(reply) is int:
                self.handoffs.tcp_request(reply, host, conn.cid, conn.peer[1], item)
                c.handoffs_sent += 1
                continue
            handled += 1
            if reply is not None:
                self.write(conn, reply)
        if handled:
            self.hist.observe(time.perf_counter() - t0, handled)

    def deliver(self, conn_id: int, data: bytes) -> None:
        """Write ``data`` to connection ``conn_id`` if it is still open."""
        conn = self.conn_ids.get(conn_id)
        if conn is not None:
            self.write(conn, data)

    def write(self, conn: Conn, data: bytes) -> None:
        if conn.fd not in self.conns:
            return
        if not conn.out:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close(conn)
                return
            if sent == len(data):
                return
            data = data[sent:]
        conn.out += data
        if len(conn.out) > TCP_MAX_OUT:
            self.c.dropped_tcp_overflow += 1
            self.close(conn)
            return
        if not conn.writing:
            conn.writing = True
            self.loop.modify(conn.fd, EP_IN | EP_OUT)

    def on_writable(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        del conn.out[:sent]
        if not conn.out and conn.writing:
            conn.writing = False
            self.loop.modify(conn.fd, EP_IN)

    def close(self, conn: Conn) -> None:
        if self.conns.pop(conn.fd, None) is None:
            return
        self.conn_ids.pop(conn.cid, None)
        self.loop.remove(conn.fd)
        conn.sock.close()

    def sweep(self, now: float) -> None:
        """Close connections silent for ``--tcp-idle-timeout`` seconds."""
        idle = self.cfg.tcp_idle_timeout
        if idle and self.conns:
            for conn in [c for c in self.conns.values() if now - c.last > idle]:
                self.close(conn)

    def close_all(self) -> None:
        """At stop: stop accepting, close every connection."""
        for s in self.listeners:
            self.loop.remove(s.fileno())
            s.close()
        for conn in list(self.conns.values()):
            self.close(conn)
