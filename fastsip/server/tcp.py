"""Stream connections (TCP, TLS, WS, WSS): accept, read and frame, serve or hand off, write,
close, the sweeps.

TLS (``tls:`` and ``wss:`` listeners) is Python's ``ssl`` over the same
non-blocking socket, with the context of ``tls.py``; the handshake runs in
the loop like any read.  WebSocket (``ws:`` and ``wss:``) is
``fastsip.websocket.WsConnection``, sans-I/O, over the plain or decrypted
stream: it answers the HTTP upgrade, and each WebSocket message is one SIP
message (RFC 7118), served without the stream framer; replies go back as
text frames.

Each connection has a ``StreamFramer`` (RFC 3261 section 18.3 framing by
Content-Length, bounded by ``--max-message-size``; a stream that cannot be
framed closes the connection) and an output queue bounded by ``TCP_MAX_OUT``
(a client that does not read is disconnected).  CRLFCRLF keep-alives get
CRLF (RFC 5626).  A request for an AOR of another shard is handed to its
owner with the connection id; the owner's reply comes back through the
hand-off channel and is written here (``deliver``).  Connection ids are
unique across workers and restarts: the worker index is in their low 8 bits.

When a connection closes, the bindings that live only through it (RFC 5626
flows, RFC 7118 ``.invalid`` contacts: ``RegistrarCore.connection_closed``)
are removed, here and in every worker this connection handed a request to.

Limits (issue #14, docs/server.md *Limits and protection*), the same for
every stream transport, each refusal or close counted (``tcp_refused``,
``tcp_closed``):

- ``--tcp-message-timeout``: a message must be complete (headers and body)
  within that many seconds of its first byte, else the connection is closed
  (``deadlines``); CRLF keep-alives do not start the clock.  Against
  slowloris, which every byte would otherwise keep alive under the idle
  timeout alone.  The TLS handshake and the WebSocket upgrade are on the
  same clock, from the accept: a connection that never completes them is
  closed as ``handshake_timeout``.
- ``--max-connections-per-source``: one source (an IPv4 address, an IPv6
  /64) holds at most that many of this worker's connections.
- ``--max-connections``: when every slot is taken, a newcomer whose source
  holds fewer connections than the biggest holder minus one takes the oldest
  connection of that holder (``evicted``); otherwise it is refused.  So one
  source, or a few, can never lock the others out, whatever the numbers.
"""
from __future__ import annotations

import errno
import socket
import ssl
import struct
import time
from functools import partial

import fastsip
from fastsip.core._core import TRANSPORTS
from fastsip.server import logs, tls
from fastsip.server.loop import EP_ERR, EP_IN, EP_OUT
from fastsip.websocket import WsConnection, origin_set

LOG = logs.LOG

TCP_READ = 65536
TCP_MAX_OUT = 1 << 20       # bytes queued to one connection before it is closed
ACCEPTS_PER_EVENT = 64
_RST = struct.pack("ii", 1, 0)      # SO_LINGER on, 0 s: close() sends RST, leaves no TIME_WAIT
_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_key(host: str) -> str:
    """What one source is, for the per-source cap: an IPv4 address, an IPv6 /64
    (one subscriber's prefix), an IPv4-mapped IPv6 address as its IPv4 address."""
    if ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return host
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


def _crlf_only(data: bytes) -> bool:
    return not data.strip(b"\r\n")


class Conn:
    __slots__ = ("sock", "fd", "cid", "peer", "host", "source", "transport", "code", "framer",
                 "ws", "secure", "handshake", "out", "last", "pinged", "started", "writing",
                 "owners")

    def __init__(self, sock, cid, peer, source, transport, max_size, origins, now):
        self.sock = sock                # an ssl.SSLSocket for tls and wss
        self.fd = sock.fileno()
        self.cid = cid
        self.peer = peer
        self.host = peer[0].encode()
        self.source = source            # source_key(peer[0])
        self.transport = transport      # "tcp", "tls", "ws" or "wss"
        self.code = TRANSPORTS.index(transport)     # its number in hand-offs
        ws = transport in ("ws", "wss")
        self.framer = None if ws else fastsip.StreamFramer(max_size=max_size)
        self.ws = WsConnection(max_message=max_size, origins=origins) if ws else None
        self.secure = transport in ("tls", "wss")
        self.handshake = self.secure    # the TLS handshake is to be done
        self.out = bytearray()
        self.last = now                 # last byte received (the idle timeout)
        self.pinged = 0.0               # when the server last sent a WebSocket ping
        self.started = 0.0              # first byte of the incomplete message, 0: none
        self.writing = False
        self.owners = 0                 # bit j: a request was handed to worker j


class Sources:
    """The connections each source holds, in accept order, and which source holds the most.

    ``by_count[n]`` is the set of sources holding ``n`` connections and
    ``top`` the largest such ``n``, so adding, removing and finding the
    biggest holder cost O(1) however many sources there are.
    """

    __slots__ = ("conns", "by_count", "top")

    def __init__(self) -> None:
        self.conns: dict = {}           # source -> {fd: Conn}, oldest first
        self.by_count: dict = {}        # n -> {source holding n connections}
        self.top = 0

    def __len__(self) -> int:
        return len(self.conns)

    def count(self, source) -> int:
        d = self.conns.get(source)
        return len(d) if d else 0

    def _move(self, source, old: int, new: int) -> None:
        if old:
            bucket = self.by_count[old]
            bucket.discard(source)
            if not bucket:
                del self.by_count[old]
                if old == self.top and new < old:
                    self.top = new
        if new:
            self.by_count.setdefault(new, set()).add(source)
            if new > self.top:
                self.top = new

    def add(self, conn: Conn) -> None:
        d = self.conns.setdefault(conn.source, {})
        d[conn.fd] = conn
        self._move(conn.source, len(d) - 1, len(d))

    def remove(self, conn: Conn) -> None:
        d = self.conns.get(conn.source)
        if not d or d.pop(conn.fd, None) is None:
            return
        if not d:
            del self.conns[conn.source]
        self._move(conn.source, len(d) + 1, len(d))

    def victim(self, held: int):
        """The oldest connection of the biggest holder, if that holder has more than
        ``held + 1`` (a newcomer holding ``held`` then takes it: the split gets fairer,
        never the other way round), else None."""
        if self.top <= held + 1:
            return None
        source = next(iter(self.by_count[self.top]))
        return next(iter(self.conns[source].values()))


class TcpServer:
    """The worker's stream listeners (TCP, TLS, WS, WSS) and the connections they accepted."""

    def __init__(self, listeners, loop, index: int, n: int, reg, cfg, limiter, handoffs,
                 counters, hist, bug) -> None:
        self.listeners = listeners      # [(transport, listening socket)]
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
        self.sources = Sources()
        self.partial: dict = {}         # fd -> Conn holding part of a message, by Conn.started
        self.next_cid = (int(time.time() * 1000) & 0xFFFFFFFFFF) << 8 | index
        self.per_transport = dict.fromkeys(("tcp", "tls", "ws", "wss"), 0)   # open connections
        self._origins = (None, None)    # (--ws-origin as given, origin_set of it): shared
        self.tls_ctx = None
        if any(t in ("tls", "wss") for t, _s in listeners):
            self.tls_ctx = tls.make_context(cfg)
        handoffs.deliver = self.deliver
        handoffs.closed = self.reg_closed
        self.serve_shard = reg.serve_shard  # the shared location's, with --cluster
        self.after = None               # called after a read's messages are served (--cluster)
        self.flows_end = None           # (conn): ends a closed connection's flows (--cluster)

    def __len__(self) -> int:
        return len(self.conns)

    def listen(self) -> None:
        for transport, s in self.listeners:
            self.loop.add(s.fileno(), partial(self.on_accept, transport, s))

    def reload_tls(self) -> None:
        """A SIGHUP: a new TLS context from the files for the connections accepted from now."""
        if self.tls_ctx is None:
            return
        try:
            self.tls_ctx = tls.make_context(self.cfg)
        except Exception as exc:        # noqa: BLE001 - keep serving with the old one
            LOG.error("SIGHUP: %s (keeping the old TLS certificate)", exc)

    def on_accept(self, transport, lsock, events: int = 0) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    LOG.warning("TCP accept failed: %s", exc.strerror)
                return
            source = source_key(peer[0])
            held = self.sources.count(source)
            if held >= self.cfg.max_connections_per_source:
                self.c.tcp_refused_per_source += 1
                self._refuse(sock)
                continue
            if len(self.conns) >= self.cfg.max_connections:
                victim = self.sources.victim(held)
                if victim is None:
                    self.c.dropped_max_connections += 1
                    self.c.tcp_refused_max_connections += 1
                    self._refuse(sock)
                    continue
                self.c.tcp_closed_evicted += 1
                self.close(victim)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport in ("tls", "wss"):
                try:
                    sock = self.tls_ctx.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
                except OSError:         # gone already
                    sock.close()
                    continue
            cid = self.next_cid
            self.next_cid += 256
            now = time.time()
            conn = Conn(sock, cid, (peer[0], peer[1]), source, transport,
                        self.cfg.max_message_size, self._ws_origins(), now)
            self.conns[conn.fd] = conn
            self.conn_ids[cid] = conn
            self.sources.add(conn)
            self.per_transport[transport] += 1
            if conn.handshake or conn.ws is not None:
                conn.started = now      # the handshake's deadline
                self.partial[conn.fd] = conn
            self.loop.add(conn.fd, partial(self.on_event, conn))

    def _ws_origins(self):
        """--ws-origin (live: SIGHUP) as one frozenset all WebSocket connections share."""
        given = self.cfg.ws_origin or None
        if given != self._origins[0]:
            self._origins = (given, origin_set(given))
        return self._origins[1]

    def on_event(self, conn: Conn, events: int) -> None:
        if events & (EP_IN | EP_ERR):
            self.read(conn)
        if events & EP_OUT and conn.fd in self.conns:
            self.on_writable(conn)

    # -- reading ---------------------------------------------------------------------------
    def _tls_handshake(self, conn: Conn) -> bool:
        """Go on with the TLS handshake; True once it is done (the connection may then
        hold application data already)."""
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            self._want_write(conn)
            return False
        except (ssl.SSLError, OSError) as exc:
            self.c.count("tls_handshake_failures", tls.failure_reason(exc))
            self.close(conn, reset=True)
            return False
        conn.handshake = False
        if conn.ws is None and not conn.framer.buffered:
            self._clock_stop(conn)
        if conn.out:                    # written while the handshake ran
            self._want_write(conn)
        return True

    def _recv(self, conn: Conn):
        """What the connection has for us: bytes, b"" when it is closed, None when nothing."""
        try:
            data = conn.sock.recv(TCP_READ)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            self._want_write(conn)
            return None
        except OSError:                 # ssl.SSLError included: a broken TLS stream
            return b""
        if conn.secure and data:        # a record decrypted but not all handed out
            more = conn.sock.pending()
            while more:
                data += conn.sock.recv(more)
                more = conn.sock.pending()
        return data

    def read(self, conn: Conn) -> None:
        if conn.handshake and not self._tls_handshake(conn):
            return
        data = self._recv(conn)
        if data is None:
            return
        if not data:
            self.close(conn)
            return
        now = time.time()
        conn.last = now
        if conn.ws is not None:
            was_open = conn.ws.open
            out, items, closing = conn.ws.receive(data)
            if closing:
                # messages that came before the close (or the error) are answered,
                # and the close frame goes after their replies (RFC 6455 5.5.1)
                if items and was_open:
                    self.serve(conn, items, now)
                if out:
                    self.write(conn, out)
                if conn.ws.reason not in (None, "closed", "http"):
                    self.c.count("ws_refused", conn.ws.reason)
                self.close(conn)
                return
            if out:
                self.write(conn, out)
            self._message_clock(conn, conn.ws.buffered if conn.ws.open else 1, items, now)
        else:
            try:
                items = conn.framer.feed(data)
            except fastsip.ParseError:
                self.c.framing_errors += 1
                self.close(conn)
                return
            pending = conn.framer.buffered
            if pending and pending <= 3 and (
                    _crlf_only(data[-pending:]) if len(data) >= pending
                    else not conn.started and _crlf_only(data)):
                pending = 0             # a keep-alive on its way (or a lone CRLF)
            self._message_clock(conn, pending, items, now)
        if items:
            self.serve(conn, items, now)

    def serve(self, conn: Conn, items: list, now: float) -> None:
        """Serve the complete messages ``items`` of ``conn``, or hand them off.  The
        replies of one read go out in one write (one TLS record, one system call),
        framed for the connection's transport."""
        t0 = time.perf_counter()
        handled = pings = 0
        host = conn.host
        serve_shard = self.serve_shard
        limiter = self.limiter
        c = self.c
        frame = conn.ws.frame if conn.ws is not None else None
        replies = []
        for item in items:
            if item == fastsip.PING:
                pings += 1
                replies.append(fastsip.PONG if frame is None else frame(fastsip.PONG))
                continue
            if limiter.rate and not limiter.allow(host, now):
                continue
            try:
                reply = serve_shard(item, host, conn.peer[1], now, conn.transport, conn.cid,
                                    self.index, self.n)
            except Exception:           # noqa: BLE001 - a bug in the core: log, go on
                self.bug(item)
                continue
            if type(reply) is int:
                conn.owners |= 1 << reply
                self.handoffs.tcp_request(reply, host, conn.cid, conn.peer[1], item, conn.code)
                c.handoffs_sent += 1
                continue
            handled += 1
            if reply is not None:
                replies.append(reply if frame is None else frame(reply))
        if replies:
            self.write(conn, replies[0] if len(replies) == 1 else b"".join(replies))
        if self.after is not None:
            self.after()
        c.keepalives += pings
        c.count("received", conn.transport, len(items) - pings)
        if handled:
            self.hist.observe(time.perf_counter() - t0, handled)

    def _message_clock(self, conn: Conn, pending: int, completed, now: float) -> None:
        """Start, restart or stop the clock of ``--tcp-message-timeout`` after a read.

        It runs while ``pending`` bytes of a message are held, from that
        message's first byte: a read that ``completed`` a message and left more
        restarts it.  The TLS handshake and WebSocket upgrade keep it running
        from the accept.
        """
        if conn.handshake:
            return
        if not pending:
            self._clock_stop(conn)
        elif completed or not conn.started:
            conn.started = now
            self.partial.pop(conn.fd, None)     # to the end: the dict stays in clock order
            self.partial[conn.fd] = conn

    def _clock_stop(self, conn: Conn) -> None:
        if conn.started:
            conn.started = 0.0
            del self.partial[conn.fd]

    # -- writing ---------------------------------------------------------------------------
    def deliver(self, conn_id: int, data: bytes) -> None:
        """Send the SIP message ``data`` on connection ``conn_id`` if it is still open."""
        conn = self.conn_ids.get(conn_id)
        if conn is not None:
            self.send(conn, data)

    def send(self, conn: Conn, data: bytes) -> None:
        """Send one SIP message (or keep-alive) on ``conn``, framed for its transport."""
        self.write(conn, data if conn.ws is None else conn.ws.frame(data))

    def write(self, conn: Conn, data: bytes) -> None:
        if conn.fd not in self.conns:
            return
        if not conn.out and not conn.handshake:     # (during the TLS handshake: queued)
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                    ssl.SSLWantReadError):
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
        self._want_write(conn)

    def _want_write(self, conn: Conn) -> None:
        if not conn.writing:
            conn.writing = True
            self.loop.modify(conn.fd, EP_IN | EP_OUT)

    def on_writable(self, conn: Conn) -> None:
        if conn.handshake and not self._tls_handshake(conn):
            return
        sent = 0
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                    ssl.SSLWantReadError):
                return
            except OSError:
                self.close(conn)
                return
        del conn.out[:sent]
        if not conn.out and conn.writing:
            conn.writing = False
            self.loop.modify(conn.fd, EP_IN)

    # -- closing ---------------------------------------------------------------------------
    def close(self, conn: Conn, reset: bool = False) -> None:
        """Close ``conn`` (with a RST if ``reset``) and end the flows that lived through it."""
        if self.conns.pop(conn.fd, None) is None:
            return
        self.conn_ids.pop(conn.cid, None)
        self.sources.remove(conn)
        self.per_transport[conn.transport] -= 1
        if conn.started:
            self.partial.pop(conn.fd, None)
        self.loop.remove(conn.fd)
        if reset:
            self._refuse(conn.sock)
        else:
            conn.sock.close()
        if self.flows_end is not None:
            self.flows_end(conn)
        else:
            self.reg_closed(conn.cid)
        owners = conn.owners & ~(1 << self.index)
        if owners:
            self.handoffs.conn_closed(owners, conn.cid)

    def reg_closed(self, conn_id: int) -> None:
        """Connection ``conn_id`` is gone: remove its flows from this worker's shard."""
        try:
            self.reg.connection_closed(conn_id, time.time())
        except Exception:               # noqa: BLE001 - a bug in the core: log, go on
            self.bug(b"")

    @staticmethod
    def _refuse(sock) -> None:
        """Close with a RST: no TIME_WAIT left behind for a flood."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except OSError:
            pass
        sock.close()

    def sweep(self, now: float) -> None:
        """Close connections silent for ``--tcp-idle-timeout`` seconds.  A WebSocket
        connection silent for half of it gets a ping: a live browser answers (its
        WebSocket does, whatever the page's SIP stack does), a gone one is closed
        at the timeout (never before a sweep after its ping) and its flows end."""
        idle = self.cfg.tcp_idle_timeout
        if idle and self.conns:
            half = idle / 2
            for conn in [c for c in self.conns.values() if now - c.last > half]:
                if conn.ws is not None and conn.ws.open and conn.pinged <= conn.last:
                    conn.pinged = now
                    self.write(conn, conn.ws.ping())
                elif now - conn.last > idle:
                    self.c.tcp_closed_idle += 1
                    self.close(conn)

    def deadlines(self, now: float) -> None:
        """Close connections whose message (or handshake) is not complete
        ``--tcp-message-timeout`` seconds after its first byte (or the accept).
        ``partial`` is in clock order: only the expired ones and one more are
        looked at."""
        limit = self.cfg.tcp_message_timeout
        if not limit:
            return
        expired = []
        for conn in self.partial.values():
            if now - conn.started <= limit:
                break
            expired.append(conn)
        for conn in expired:
            if conn.handshake or (conn.ws is not None and not conn.ws.open):
                self.c.tcp_closed_handshake_timeout += 1
            else:
                self.c.tcp_closed_message_timeout += 1
            self.close(conn, reset=True)

    def close_all(self) -> None:
        """At stop: stop accepting, close every connection."""
        for _t, s in self.listeners:
            self.loop.remove(s.fileno())
            s.close()
        for conn in list(self.conns.values()):
            self.close(conn)
