"""Connection-level load: TLS handshakes per second, and many idle connections held.

``python -m load.handshake rate`` opens connections as fast as the target
takes them, ``--concurrency`` at a time, each one: TCP connect, TLS
handshake (``tls``; ``wss`` adds the WebSocket upgrade with the ``sip``
subprotocol; ``tcp``/``ws`` have no TLS), then (unless ``--handshake-only``)
one REGISTER answered, then close; it reports the completed connections per
second and, with ``--server-pid``, the server's CPU per connection.

``python -m load.handshake hold --count N`` opens N connections (past their
handshakes), prints ``held N`` and keeps them open, silent, until SIGTERM,
its standard input closing or ``--duration``; the client's TLS state is
dropped once the handshake is done (the server's stays), so one process
holds many.  Both spread the connections over source addresses 127.2.x.y
(``--sources``) so that neither the per-source limits of a server nor the
ephemeral ports of one address run out.

Loopback targets only; everything is bounded by a count and a time.  Pure
Python (``selectors``, ``ssl`` memory BIOs): the client's own cost per
handshake is reported (``client_cpu_us``) so that a run whose client was
the limit is seen as such.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import selectors
import signal
import socket
import ssl
import sys
import time

from .netutil import (
    TargetError,
    check_target,
    parse_target,
    tls_client_context,
    ws_accept,
)
from .report import ProcCpu

__all__ = ["handshake_rate", "hold_idle", "source_address", "main"]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def source_address(i: int, n: int) -> str:
    """The ``i % n``-th of ``n`` source addresses 127.2.0.1, 127.2.0.2, ..."""
    k = i % n
    return f"127.2.{k // 250}.{k % 250 + 1}"


def _register(i: int, host: str, port: int, transport: str, run: str) -> bytes:
    user = f"h{i:07d}"
    sent_by = f"{run}{i:x}.invalid" if transport in ("ws", "wss") else f"{host}:{port}"
    tp = transport.upper()
    return (f"REGISTER sip:{host} SIP/2.0\r\n"
            f"Via: SIP/2.0/{tp} {sent_by};rport;branch=z9hG4bK-{run}-{i}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:{user}@{host}>;tag={run}{i}\r\nTo: <sip:{user}@{host}>\r\n"
            f"Call-ID: {run}-{i}@handshake\r\nCSeq: 1 REGISTER\r\n"
            f"Contact: <sip:{user}@{sent_by};transport={transport}>\r\nExpires: 600\r\n"
            "User-Agent: fastsip-load-handshake\r\nContent-Length: 0\r\n\r\n").encode()


def _ws_frame(payload: bytes) -> bytes:
    """A client's text frame (masked) carrying ``payload``."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0xFE]) + n.to_bytes(2, "big"))
    masked = bytes(b ^ key[k % 4] for k, b in enumerate(payload))
    return head + key + masked


class _Conn:
    """One connection's way through connect, TLS, WebSocket, REGISTER."""

    __slots__ = ("sock", "tls", "inbio", "outbio", "state", "buf", "t0", "i", "wskey")

    def __init__(self, i: int, sock: socket.socket, ctx, host: str):
        self.i = i
        self.sock = sock
        self.t0 = time.monotonic()
        self.buf = b""
        self.state = "connect"
        self.tls = None
        self.wskey = b""
        if ctx is not None:
            self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self.inbio, self.outbio, server_hostname=host)

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            if data:
                self.tls.write(data)
            data = self.outbio.read()
        if data:
            self.sock.sendall(data)        # small: fits the socket buffer

    def recv_plain(self) -> bytes | None:
        """What arrived, decrypted; None when the peer closed."""
        data = self.sock.recv(65536)
        if not data:
            return None
        if self.tls is None:
            return data
        self.inbio.write(data)
        out = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return out
            if not chunk:
                return None if not out else out
            out += chunk


class _Driver:
    """Connections started, ``concurrency`` at a time, each through its steps."""

    def __init__(self, host, port, transport, ctx, sources, register=True, keep=False,
                 timeout=5.0):
        self.host, self.port, self.transport = host, port, transport
        self.ctx = ctx if transport in ("tls", "wss") else None
        self.sources = sources
        self.register = register
        self.keep = keep
        self.timeout = timeout
        self.sel = selectors.DefaultSelector()
        self.run = os.urandom(3).hex()
        self.started = self.done = 0
        self.failed = {}
        self.held = []
        self.latencies = []
        self.live = {}
        self.unfinished = 0

    def _fail(self, c: _Conn, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1
        self._close(c)

    def _close(self, c: _Conn) -> None:
        self.live.pop(c.sock.fileno(), None)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def start_one(self) -> None:
        i = self.started
        self.started += 1
        s = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                          socket.SOCK_STREAM)
        try:
            if self.sources and ":" not in self.host:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((source_address(i, self.sources), 0))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            err = s.connect_ex((self.host, self.port))
        except OSError as exc:
            s.close()
            self.failed[f"connect: {exc.strerror}"] = self.failed.get(f"connect: {exc.strerror}", 0) + 1
            return
        if err not in (0, errno.EINPROGRESS):
            s.close()
            why = f"connect: {os.strerror(err)}"
            self.failed[why] = self.failed.get(why, 0) + 1
            return
        c = _Conn(i, s, self.ctx, self.host)
        self.live[s.fileno()] = c
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def _advance(self, c: _Conn) -> None:
        """Take ``c`` as far as it goes now."""
        if c.state == "connect":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self._fail(c, f"connect: {os.strerror(err)}")
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            c.state = "tls" if c.tls is not None else "open"
            if c.tls is None:
                return self._opened(c)
            return self._tls_step(c, b"")
        try:
            data = c.recv_plain() if c.state != "tls" else self._recv_raw(c)
        except (ssl.SSLError, OSError) as exc:
            return self._fail(c, f"{c.state}: {exc.__class__.__name__}")
        if data is None:
            return self._fail(c, f"{c.state}: closed by the server")
        if c.state == "tls":
            return self._tls_step(c, data)
        c.buf += data
        if c.state == "ws":
            if b"\r\n\r\n" not in c.buf:
                return None
            head, _, c.buf = c.buf.partition(b"\r\n\r\n")
            ok = (head.startswith(b"HTTP/1.1 101") and ws_accept(c.wskey) in head
                  and b"sip" in head.lower().split(b"sec-websocket-protocol:")[-1][:20])
            if not ok:
                return self._fail(c, "ws: upgrade refused")
            return self._ready(c)
        if c.state == "sip":
            if self.transport in ("ws", "wss"):
                if len(c.buf) < 2 or len(c.buf) < 2 + (c.buf[1] & 0x7F if c.buf[1] & 0x7F < 126 else 2):
                    return None
                n, h = c.buf[1] & 0x7F, 2
                if n == 126:
                    n, h = int.from_bytes(c.buf[2:4], "big"), 4
                if len(c.buf) < h + n:
                    return None
                msg = c.buf[h:h + n]
            else:
                if b"\r\n\r\n" not in c.buf:
                    return None
                msg = c.buf
            if not msg.startswith(b"SIP/2.0 2"):
                return self._fail(c, "sip: " + msg.split(b"\r\n", 1)[0].decode("latin-1", "replace"))
            return self._finish(c)
        return None

    def _recv_raw(self, c: _Conn):
        data = c.sock.recv(65536)
        return data if data else None

    def _tls_step(self, c: _Conn, data: bytes) -> None:
        if data:
            c.inbio.write(data)
        try:
            c.tls.do_handshake()
        except ssl.SSLWantReadError:
            c.send(b"")
            return None
        except ssl.SSLError as exc:
            return self._fail(c, f"tls: {exc.reason or exc}")
        c.send(b"")
        return self._opened(c)

    def _opened(self, c: _Conn) -> None:
        if self.transport in ("ws", "wss"):
            import base64
            c.wskey = base64.b64encode(os.urandom(16))
            c.state = "ws"
            c.send(f"GET / HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {c.wskey.decode()}\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n\r\n".encode())
            return None
        return self._ready(c)

    def _ready(self, c: _Conn) -> None:
        if not self.register:
            return self._finish(c)
        msg = _register(c.i, self.host, self.port, self.transport, self.run)
        c.state = "sip"
        c.buf = b""
        c.send(_ws_frame(msg) if self.transport in ("ws", "wss") else msg)
        return None

    def _finish(self, c: _Conn) -> None:
        self.done += 1
        self.latencies.append(time.monotonic() - c.t0)
        if self.keep:
            self.live.pop(c.sock.fileno(), None)
            self.sel.unregister(c.sock)
            c.tls = c.inbio = c.outbio = None        # the client's TLS state is not needed
            self.held.append(c.sock)
        else:
            self._close(c)

    def loop(self, total: int, concurrency: int, until: float) -> None:
        """Run until ``total`` connections are done (or failed) or ``until``."""
        while time.monotonic() < until:
            while self.started < total and len(self.live) < concurrency:
                self.start_one()
            if not self.live:
                if self.started >= total:
                    break
                continue
            for key, _ in self.sel.select(timeout=0.2):
                self._advance(key.data)
            now = time.monotonic()
            for c in [c for c in self.live.values() if now - c.t0 > self.timeout]:
                self._fail(c, f"{c.state}: timed out")
        self.unfinished = len(self.live)        # under way when time ran out: not failures
        for c in list(self.live.values()):
            self._close(c)


def _raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, need + 64) if hard != resource.RLIM_INFINITY else need + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def handshake_rate(host: str, port: int, transport: str = "tls", ctx=None, concurrency: int = 32,
                   duration: float = 5.0, count: int | None = None, register: bool = True,
                   sources: int = 256, server_pids=(), timeout: float = 5.0) -> dict:
    """Connections (handshake, REGISTER, close) per second; see the module docstring."""
    _raise_nofile(concurrency + 16)
    d = _Driver(host, port, transport, ctx, sources, register=register, timeout=timeout)
    server = ProcCpu(list(server_pids)) if server_pids else None
    cpu0, t0 = time.process_time(), time.monotonic()
    d.loop(count or 10**9, concurrency, t0 + duration)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    if server:
        server.stop()
    lat = sorted(d.latencies)

    def q(f):
        return round(1000 * lat[min(len(lat) - 1, int(f * len(lat)))], 3) if lat else None

    res = {"transport": transport, "register": register, "concurrency": concurrency,
           "started": d.started, "done": d.done, "failed": d.failed, "unfinished": d.unfinished,
           "elapsed_s": round(wall, 3),
           "rate": round(d.done / wall, 1) if wall else 0.0,
           "latency_ms": {"p50": q(0.5), "p99": q(0.99), "max": q(1.0)},
           "client_cpu_pct": round(100 * cpu / wall, 1) if wall else 0.0,
           "client_cpu_us": round(1e6 * cpu / d.done, 1) if d.done else None}
    if server:
        ns = server.cpu_ns
        res["server_cpu_pct"] = round(100 * ns / 1e9 / wall, 1) if wall else 0.0
        res["server_cpu_us"] = round(ns / 1e3 / d.done, 1) if d.done else None
    return res


def hold_idle(host: str, port: int, count: int, transport: str = "tls", ctx=None,
              concurrency: int = 64, sources: int = 256, first: int = 0,
              limit_s: float = 120.0) -> tuple:
    """Open ``count`` connections past their handshakes and keep them:
    ``(sockets, failures)``.  ``first``: the number of the first connection
    (so that several holders use different source addresses)."""
    _raise_nofile(count + concurrency + 16)
    d = _Driver(host, port, transport, ctx, sources, register=False, keep=True)
    d.started = first
    d.loop(first + count, concurrency, time.monotonic() + limit_s)
    return d.held, d.failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.handshake", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("rate", "hold"))
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--transport", choices=("tcp", "tls", "ws", "wss"), default="tls")
    p.add_argument("--tls-ca", metavar="PEM")
    p.add_argument("--tls-insecure", action="store_true")
    p.add_argument("--concurrency", type=int, default=32, help="connections under way at once")
    p.add_argument("--duration", type=float, default=5.0,
                   help="rate: seconds of connecting; hold: seconds to hold at most")
    p.add_argument("--count", type=int, help="rate: connections at most; hold: connections to hold")
    p.add_argument("--first", type=int, default=0, help="hold: number of the first connection")
    p.add_argument("--handshake-only", action="store_true", help="rate: no REGISTER")
    p.add_argument("--sources", type=int, default=256, help="source addresses 127.2.x.y to use")
    p.add_argument("--server-pid", type=int, nargs="+", default=[])
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per connection")
    args = p.parse_args(argv)
    try:
        host, port = parse_target(args.target)
        check_target(host, False)
    except TargetError as exc:
        p.error(str(exc))
    if args.mode == "hold" and not args.count:
        p.error("hold needs --count")
    if not 1 <= args.concurrency <= 4096 or not 0 < args.duration <= 3600:
        p.error("--concurrency within 1..4096, --duration within (0, 3600]")
    ctx = (tls_client_context(args.tls_ca, args.tls_insecure)
           if args.transport in ("tls", "wss") else None)
    if args.mode == "rate":
        res = handshake_rate(host, port, args.transport, ctx, args.concurrency, args.duration,
                             args.count, not args.handshake_only, args.sources, args.server_pid,
                             args.timeout)
        print(json.dumps(res), flush=True)
        return 0 if res["done"] and not res["failed"] else 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    held, failed = hold_idle(host, port, args.count, args.transport, ctx, args.concurrency,
                             args.sources, args.first, limit_s=min(args.duration, 600))
    print(json.dumps({"held": len(held), "failed": failed}), flush=True)
    until = time.monotonic() + args.duration
    sel = selectors.DefaultSelector()
    try:
        sel.register(sys.stdin, selectors.EVENT_READ)
    except (OSError, ValueError):       # not a pipe or a terminal (/dev/null): time and SIGTERM
        pass
    closed = 0
    while not stop and time.monotonic() < until:
        if not sel.get_map():
            time.sleep(0.5)
            continue
        for _ in sel.select(timeout=0.5):
            if not sys.stdin.buffer.read1(4096):     # the parent closed our standard input
                stop.append(1)
    for s in held:
        try:
            if s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                closed += 1
        except (BlockingIOError, OSError):
            pass
        s.close()
    print(json.dumps({"closed_by_server": closed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
