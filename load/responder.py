"""A tiny reference registrar stand-in for testing the load tool.

``python -m load.responder --listen 127.0.0.1:5070`` answers every REGISTER
over UDP and TCP with a ``200 OK`` that copies Via, From, To (adding a tag),
Call-ID and CSeq and lists the request's Contacts.  It keeps no bindings.
``--transport tls|ws|wss`` serves SIP over TLS, WebSocket (RFC 7118: the
handshake must offer the ``sip`` subprotocol, else 400; client frames must
be masked, else the connection is closed) or WebSocket over TLS instead
(``--tls-cert``/``--tls-key``).  Options make it useful for testing a load
generator:

``--auth``               challenge every request without valid credentials
                         with a 401 (``--algorithm MD5|SHA-256``, ``--qop``)
                         and check the digest (``--password-pattern``)
``--drop F``/``--dup F`` drop / send twice a share F of the replies
``--log-users``          record the CSeq numbers of every user's requests
                         (the From URI's user) in the counters (``users``):
                         which phone's requests reached which of several
                         responders, in which order
``--fast``               the C-speed echo of ``load._echo_c`` (200 only): over UDP
                         ``echo_udp`` (``--processes N``: N processes on one
                         port, SO_REUSEPORT); over the stream transports the
                         loop below with ``echo_stream`` answering whole buffers.
                         With ``--auth`` (UDP only) it is the floor of digest
                         registration: a 401 with one fixed challenge to every
                         request without Authorization, a 200 to the others,
                         nothing checked

It checks the few things a malformed request from ``--malformed-ratio``
breaks and answers those with 400.  Every loop is bounded by
``--duration`` and ``--max-requests``; it listens on loopback only.  On exit
it prints its own counters as JSON (or writes them to ``--stats FILE``).
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import ipaddress
import json
import os
import random
import re
import selectors
import signal
import socket
import ssl
import struct
import sys
import time

__all__ = ["Responder", "main"]

_HDR_RE = re.compile(rb"^([^:\r\n]+?)[ \t]*:[ \t]*(.*?)[ \t]*$")
_COMPACT = {b"i": b"call-id", b"m": b"contact", b"f": b"from", b"t": b"to", b"v": b"via",
            b"l": b"content-length"}
_PARAM_RE = re.compile(r'([A-Za-z0-9_-]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_HASH = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
_USER_RE = re.compile(rb"sips?:([^@;>:]+)@")


def _split(msg: bytes):
    """``(start_line, [(lower name, name, value)], body)`` or ``None``."""
    head, sep, body = msg.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = msg.partition(b"\n\n")
    lines = head.split(b"\n")
    start = lines[0].rstrip(b"\r")
    headers = []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and headers:
            low, name, value = headers[-1]
            headers[-1] = (low, name, value + b" " + line.strip())
            continue
        m = _HDR_RE.match(line)
        if m is None:
            return None
        low = m.group(1).lower()
        headers.append((_COMPACT.get(low, low), m.group(1), m.group(2)))
    return start, headers, body


class Responder:
    """The reply logic, independent of sockets (see the module docstring)."""

    def __init__(self, auth=False, realm="fastsip-load", algorithm="MD5", qop=False,
                 password_pattern="secret", drop=0.0, dup=0.0, seed=1, log_users=False):
        self.auth = auth
        self.realm = realm
        self.algorithm = algorithm
        self.qop = qop
        self.password_pattern = password_pattern
        self.drop = drop
        self.dup = dup
        self.rng = random.Random(seed)
        self.nonces = {}
        self.stats = {"received": 0, "replies": {}, "dropped": 0, "duplicated": 0,
                      "auth_ok": 0, "auth_failed": 0, "not_request": 0}
        if log_users:
            self.stats["users"] = {}

    def _count(self, status: int, n: int = 1):
        key = str(status)
        self.stats["replies"][key] = self.stats["replies"].get(key, 0) + n

    def _password(self, user: str) -> str:
        digits = re.search(r"(\d+)$", user)
        return self.password_pattern.format(user=user, i=int(digits.group(1)) if digits else 0)

    def _check_auth(self, value: bytes, uri: bytes) -> bool:
        params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                  for m in _PARAM_RE.finditer(value.decode("utf-8", "replace"))}
        nonce = params.get("nonce")
        if nonce not in self.nonces or params.get("realm") != self.realm:
            return False
        del self.nonces[nonce]                       # one use per nonce
        hfun = _HASH[self.algorithm]

        def h(s):
            return hfun(s.encode()).hexdigest()

        user = params.get("username", "")
        ha1 = h(f"{user}:{self.realm}:{self._password(user)}")
        ha2 = h(f"REGISTER:{params.get('uri', '')}")
        if self.qop:
            expect = h(f"{ha1}:{nonce}:{params.get('nc', '')}:{params.get('cnonce', '')}:auth:{ha2}")
        else:
            expect = h(f"{ha1}:{nonce}:{ha2}")
        return params.get("response") == expect

    def handle(self, msg: bytes, tcp: bool = False) -> list:
        """The replies (0, 1 or 2 byte strings) to one request."""
        self.stats["received"] += 1
        parts = _split(msg)
        if parts is None or msg.startswith(b"SIP/2.0 "):
            self.stats["not_request"] += 1
            return []
        start, headers, body = parts
        get = {}
        for low, _, value in headers:
            get.setdefault(low, []).append(value)
        if not (b"via" in get and b"call-id" in get and b"cseq" in get and b"from" in get):
            self.stats["not_request"] += 1
            return []
        status, extra = 200, []
        cseq = get[b"cseq"][0].split()
        users = self.stats.get("users")
        if users is not None:
            m = _USER_RE.search(get[b"from"][0])
            if m and cseq and cseq[0].isdigit():
                users.setdefault(m.group(1).decode(), []).append(int(cseq[0]))
        clen = get.get(b"content-length", [b"0"])[0]
        contacts = get.get(b"contact", [])
        method = start.split(b" ", 1)[0]
        if (b"to" not in get or len(cseq) != 2 or cseq[1] != method
                or any(not v.isdigit() for v in get.get(b"expires", []))
                or any(b"<sip:@" in c for c in contacts)
                or not clen.isdigit() or (not tcp and int(clen) != len(body))):
            status = 400
        elif method != b"REGISTER":
            status = 405
        elif self.auth:
            creds = get.get(b"authorization")
            uri = start.split(b" ")[1] if len(start.split(b" ")) > 2 else b""
            if creds and self._check_auth(creds[0], uri):
                self.stats["auth_ok"] += 1
            else:
                if creds:
                    self.stats["auth_failed"] += 1
                status = 401
                nonce = os.urandom(12).hex()
                self.nonces[nonce] = time.monotonic()
                if len(self.nonces) > 100_000:
                    self.nonces.pop(next(iter(self.nonces)))
                chal = f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={self.algorithm}'
                if self.qop:
                    chal += ', qop="auth"'
                extra.append(b"WWW-Authenticate: " + chal.encode())
        if self.rng.random() < self.drop:
            self.stats["dropped"] += 1
            return []
        reason = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 405: b"Method Not Allowed"}
        out = [b"SIP/2.0 %d %s" % (status, reason[status])]
        for low, name, value in headers:
            if low in (b"via", b"from", b"call-id", b"cseq"):
                out.append(name + b": " + value)
            elif low == b"to":
                out.append(name + b": " + value + (b"" if b";tag=" in value else b";tag=resp"))
        if status == 200:
            for c in contacts:
                if b";expires=" not in c:
                    exp = get.get(b"expires", [b"3600"])[0]
                    c = c + b";expires=" + exp
                out.append(b"Contact: " + c)
        out += extra
        out.append(b"Content-Length: 0")
        reply = b"\r\n".join(out) + b"\r\n\r\n"
        self._count(status)
        if self.rng.random() < self.dup:
            self.stats["duplicated"] += 1
            self._count(status)
            return [reply, reply]
        return [reply]


def _frame(buf: bytearray):
    """Split complete messages off a TCP receive buffer."""
    msgs = []
    while True:
        while buf[:2] == b"\r\n":
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return msgs
        m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", bytes(buf[:end]))
        n = end + 4 + (int(m.group(1)) if m else 0)
        if len(buf) < n:
            return msgs
        msgs.append(bytes(buf[:n]))
        del buf[:n]


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A server's frame (unmasked, FIN set) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def ws_frames(buf: bytearray):
    """Complete frames off the front of ``buf``: ``[(fin, opcode, masked, payload)]``,
    the payload unmasked."""
    out = []
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        n, h = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, h = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, h = struct.unpack("!Q", buf[2:10])[0], 10
        masked = bool(b1 & 0x80)
        key = bytes(buf[h:h + 4]) if masked else b""
        h += 4 if masked else 0
        if len(buf) < h + n:
            break
        payload = bytes(buf[h:h + n])
        if masked:
            payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        out.append((bool(b0 & 0x80), b0 & 0x0F, masked, payload))
        del buf[:h + n]
    return out


def ws_answer(request: bytes):
    """``(answer, accepted)`` to a WebSocket opening handshake (RFC 6455 4.2, RFC 7118:
    the ``sip`` subprotocol is required)."""
    lines = request.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        hdrs[name.strip().lower()] = value.strip()
    protos = [p.strip().lower() for p in hdrs.get("sec-websocket-protocol", "").split(",")]
    key = hdrs.get("sec-websocket-key", "")
    if (not lines[0].startswith("GET ") or "websocket" not in hdrs.get("upgrade", "").lower()
            or not key or "sip" not in protos):
        body = b"a SIP WebSocket upgrade with the sip subprotocol is needed\n"
        return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: %d"
                b"\r\nConnection: close\r\n\r\n%s" % (len(body), body)), False
    import base64
    import hashlib
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: sip\r\n\r\n"), True


class _Stream:
    """One accepted connection: TLS through memory BIOs (optional), then a
    WebSocket (optional), then SIP messages."""

    def __init__(self, sock, ctx, ws):
        self.sock = sock
        self.ws = ws
        self.upgraded = not ws
        self.tls = None
        self.tls_done = False
        if ctx is not None:
            self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self.inbio, self.outbio, server_side=True)
        self.plain = bytearray()

    def feed(self, data: bytes) -> bool:
        """Take bytes from the socket; False when the connection is to be closed."""
        if self.tls is None:
            self.plain += data
            return True
        self.inbio.write(data)
        if not self.tls_done:
            try:
                self.tls.do_handshake()
                self.tls_done = True
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, OSError):
                return False
            self.send(b"")
            if not self.tls_done:
                return True
        while True:
            try:
                chunk = self.tls.read(1 << 18)
            except ssl.SSLWantReadError:
                return True
            except (ssl.SSLError, OSError):
                return False
            if not chunk:
                return False
            self.plain += chunk

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            if data:
                self.tls.write(data)
            data = self.outbio.read()
        if data:
            self.sock.setblocking(True)
            try:
                self.sock.sendall(data)
            finally:
                self.sock.setblocking(False)


def _serve_stream(conn: _Stream, responder, fast: bool) -> bool:
    """Answer what ``conn`` has received; False when it is to be closed."""
    st = responder.stats
    if not conn.upgraded:
        end = conn.plain.find(b"\r\n\r\n")
        if end < 0:
            return len(conn.plain) < 16384
        answer, ok = ws_answer(bytes(conn.plain[:end]))
        del conn.plain[:end + 4]
        st["ws_upgrades" if ok else "ws_refused"] += 1
        conn.send(answer)
        if not ok:
            return False
        conn.upgraded = True
    if fast:
        from ._echo_c import echo_stream
        used, out, reqs, bad = echo_stream(bytes(conn.plain), conn.ws)
        del conn.plain[:used]
        if reqs:
            st["received"] += reqs
            responder._count(200, reqs)
        if out:
            conn.send(out)
        if bad:
            st["broken_streams"] += 1
        return not bad
    if conn.ws:
        out = []
        for fin, opcode, masked, payload in ws_frames(conn.plain):
            if not masked:                  # RFC 6455 5.1: close on an unmasked client frame
                st["unmasked_frames"] += 1
                conn.send(ws_frame(struct.pack("!H", 1002), 8))
                return False
            if opcode == 8:
                conn.send(ws_frame(payload[:2], 8))
                return False
            if opcode == 9:
                out.append(ws_frame(payload, 10))
            elif opcode in (1, 2) and fin:
                st["ws_frames"] += 1
                out += [ws_frame(r) for r in responder.handle(payload)]
        if out:
            conn.send(b"".join(out))
        return True
    out = b"".join(r for m in _frame(conn.plain) for r in responder.handle(m, tcp=True))
    if out:
        conn.send(out)
    return True


def _bind(host: str, port: int, transport: str) -> tuple[list, int]:
    """The UDP and/or TCP sockets on ``host:port``, and the port.  With port 0 the
    kernel picks the UDP port and TCP takes the same number: when another program
    holds that TCP port, another number is tried (a few times)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in range(20):
        socks, p = [], port
        try:
            if transport in ("udp", "both"):
                u = socket.socket(family, socket.SOCK_DGRAM)
                socks.append(u)
                u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                u.bind((host, p))
                p = u.getsockname()[1]
            if transport != "udp":
                t = socket.socket(family, socket.SOCK_STREAM)
                socks.append(t)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((host, p))
                p = t.getsockname()[1]
                t.listen(1024)
            return socks, p
        except OSError as exc:
            for s in socks:
                s.close()
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == 19:
                raise
    raise AssertionError("unreachable")


def serve(host: str, port: int, responder: Responder, transport: str = "both",
          duration: float = 300.0, max_requests: int = 10_000_000, ready=None,
          tls_ctx: ssl.SSLContext | None = None, fast: bool = False) -> dict:
    """Answer requests on ``host:port`` until ``duration`` or ``max_requests``
    (``tls_ctx``: the server context for ``tls`` and ``wss``; ``fast``: answer
    stream connections with the C echo)."""
    for key in ("connections", "ws_upgrades", "ws_refused", "ws_frames", "unmasked_frames",
                "broken_streams"):
        responder.stats.setdefault(key, 0)
    ws = transport in ("ws", "wss")
    sel = selectors.DefaultSelector()
    socks, port = _bind(host, port, transport)
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "udp" if s.type == socket.SOCK_DGRAM else "listen")
    if ready:
        ready(port)
    until = time.monotonic() + duration
    bufs = {}
    try:
        while time.monotonic() < until and responder.stats["received"] < max_requests:
            for key, _ in sel.select(timeout=0.1):
                kind, s = key.data, key.fileobj
                if kind == "udp":
                    for _ in range(256):
                        try:
                            data, addr = s.recvfrom(65535)
                        except BlockingIOError:
                            break
                        for r in responder.handle(data):
                            s.sendto(r, addr)
                elif kind == "listen":
                    try:
                        c, _ = s.accept()
                    except BlockingIOError:
                        continue
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    responder.stats["connections"] += 1
                    bufs[c] = _Stream(c, tls_ctx if transport in ("tls", "wss") else None, ws)
                    sel.register(c, selectors.EVENT_READ, "conn")
                else:
                    try:
                        data = s.recv(1 << 18)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    conn = bufs[s]
                    try:
                        keep = bool(data) and conn.feed(data) and _serve_stream(conn, responder,
                                                                               fast)
                    except OSError:
                        keep = False
                    if not keep:
                        sel.unregister(s)
                        s.close()
                        bufs.pop(s, None)
    finally:
        for s in list(bufs) + socks:
            s.close()
    return responder.stats


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _echo_processes(host: str, port: int, processes: int, duration: float,
                    max_requests: int, ready, challenge: bytes) -> dict:
    """``--fast`` over UDP: ``processes`` echo processes, each with its own socket
    on the same port (SO_REUSEPORT spreads the senders, as it does over fastsip's
    workers), answering as ``echo_udp`` with ``challenge``.  Each child sends its
    counters back through a pipe; returns the sum."""
    from ._echo_c import echo_udp
    socks = []
    for _ in range(processes):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.bind((host, port))
        port = s.getsockname()[1]
        socks.append(s)
    children = []
    for s in socks[1:]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                    # a child: serve its socket, report, leave
            code = 0
            try:
                os.close(r)
                rx, tx = echo_udp(s.fileno(), duration, max_requests, challenge)
                os.write(w, json.dumps([rx, tx]).encode())
            except KeyboardInterrupt:
                pass
            except BaseException:       # noqa: BLE001 - a child must not return into main()
                code = 1
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    ready(port)
    rx = tx = 0
    each = []                           # received by each process, the parent first
    done = False
    try:
        rx, tx = echo_udp(socks[0].fileno(), duration, max_requests, challenge)
        each.append(rx)
        done = True
    finally:
        for pid, r in children:     # (they stop on their own when the parent did)
            try:
                if not done:
                    os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
                got = os.read(r, 256)
                if got:
                    crx, ctx = json.loads(got)
                    rx, tx = rx + crx, tx + ctx
                    each.append(crx)
            except (OSError, ValueError):
                pass
            os.close(r)
        for s in socks:
            s.close()
    stats = {"received": rx, "replies": {"401+200" if challenge else "200": tx}}
    if processes > 1:
        stats["per_process"] = each
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.responder", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:5070", metavar="HOST:PORT",
                   help="loopback address to listen on (port 0: any free; printed on stdout)")
    p.add_argument("--transport", choices=("udp", "tcp", "both", "tls", "ws", "wss"),
                   default="both", help="both: UDP and TCP on the same port (default)")
    p.add_argument("--tls-cert", metavar="PEM", help="the certificate for tls and wss")
    p.add_argument("--tls-key", metavar="PEM", help="its private key")
    p.add_argument("--fast", action="store_true",
                   help="C-speed echo (no drop/dup): UDP, or with --transport tcp, tls, "
                        "ws, wss the stream echo; with --auth (UDP) 401 to requests without "
                        "Authorization, 200 to the others, the digest not checked")
    p.add_argument("--processes", type=int, default=1,
                   help="with --fast over UDP: this many echo processes on one port (SO_REUSEPORT)")
    p.add_argument("--auth", action="store_true", help="challenge with 401 and check the digest")
    p.add_argument("--realm", default="fastsip-load")
    p.add_argument("--algorithm", choices=tuple(_HASH), default="MD5")
    p.add_argument("--qop", action="store_true", help='challenge with qop="auth"')
    p.add_argument("--password-pattern", default="secret",
                   help="password of a user ({user}, {i}: the user's trailing digits)")
    p.add_argument("--drop", type=float, default=0.0, help="share of replies to drop")
    p.add_argument("--dup", type=float, default=0.0, help="share of replies to send twice")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-users", action="store_true",
                   help="record every user's CSeq numbers in the counters (not with --fast)")
    p.add_argument("--duration", type=float, default=300.0, help="stop after this many seconds")
    p.add_argument("--max-requests", type=int, default=100_000_000)
    p.add_argument("--stats", metavar="FILE", help="write the counters here (default: stdout)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        p.error("the responder listens on loopback only")
    tls_ctx = None
    if args.transport in ("tls", "wss"):
        if not (args.tls_cert and args.tls_key):
            p.error(f"--transport {args.transport} needs --tls-cert and --tls-key")
        tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        tls_ctx.load_cert_chain(args.tls_cert, args.tls_key)
    streams = args.transport in ("tcp", "tls", "ws", "wss")
    if args.processes < 1 or (args.processes > 1 and not (args.fast and not streams)):
        p.error("--processes N: N >= 1, and more than one only with --fast over UDP")
    if args.log_users and args.fast:
        p.error("--log-users reads every request: not with --fast")
    if args.auth and args.fast and streams:
        p.error("--auth with --fast is UDP only")
    signal.signal(signal.SIGTERM, _interrupt)

    def ready(port):
        print(f"listening {host}:{port}", flush=True)

    stats = {}
    try:
        if args.fast and not streams:
            challenge = b""
            if args.auth:       # one nonce for all, as long as a signed one (32 bytes, base64url)
                nonce = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
                challenge = (f'WWW-Authenticate: Digest realm="{args.realm}", nonce="{nonce}", '
                             f'algorithm={args.algorithm}' + (', qop="auth"' if args.qop else "")
                             ).encode()
            stats = _echo_processes(host, int(port), args.processes, args.duration,
                                    args.max_requests, ready, challenge)
        else:
            r = Responder(auth=args.auth, realm=args.realm, algorithm=args.algorithm, qop=args.qop,
                          password_pattern=args.password_pattern, drop=args.drop, dup=args.dup,
                          seed=args.seed, log_users=args.log_users)
            stats = r.stats
            serve(host, int(port), r, args.transport, args.duration, args.max_requests, ready,
                  tls_ctx=tls_ctx, fast=args.fast)
    except KeyboardInterrupt:
        pass
    text = json.dumps(stats)
    if args.stats:
        with open(args.stats, "w") as f:
            f.write(text + "\n")
    else:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
