"""A tiny reference registrar stand-in for testing the load tool.

``python -m load.responder --listen 127.0.0.1:5070`` answers every REGISTER
over UDP and TCP with a ``200 OK`` that copies Via, From, To (adding a tag),
Call-ID and CSeq and lists the request's Contacts.  It keeps no bindings.
Options make it useful for testing a load generator:

``--auth``               challenge every request without valid credentials
                         with a 401 (``--algorithm MD5|SHA-256``, ``--qop``)
                         and check the digest (``--password-pattern``)
``--drop F``/``--dup F`` drop / send twice a share F of the replies
``--fast``               the C-speed echo of ``load._echo_c`` (UDP, 200 only)

It checks the few things a malformed request from ``--malformed-ratio``
breaks and answers those with 400.  Every loop is bounded by
``--duration`` and ``--max-requests``; it listens on loopback only.  On exit
it prints its own counters as JSON (or writes them to ``--stats FILE``).
"""

from __future__ import annotations

import argparse
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
import sys
import time

__all__ = ["Responder", "main"]

_HDR_RE = re.compile(rb"^([^:\r\n]+?)[ \t]*:[ \t]*(.*?)[ \t]*$")
_COMPACT = {b"i": b"call-id", b"m": b"contact", b"f": b"from", b"t": b"to", b"v": b"via",
            b"l": b"content-length"}
_PARAM_RE = re.compile(r'([A-Za-z0-9_-]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_HASH = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


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
                 password_pattern="secret", drop=0.0, dup=0.0, seed=1):
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
            if transport in ("tcp", "both"):
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
          duration: float = 300.0, max_requests: int = 10_000_000, ready=None) -> dict:
    """Answer requests on ``host:port`` until ``duration`` or ``max_requests``."""
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
                    bufs[c] = bytearray()
                    sel.register(c, selectors.EVENT_READ, "conn")
                else:
                    try:
                        data = s.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(s)
                        s.close()
                        bufs.pop(s, None)
                        continue
                    buf = bufs[s]
                    buf += data
                    out = b"".join(r for m in _frame(buf) for r in responder.handle(m, tcp=True))
                    if out:
                        s.setblocking(True)
                        s.sendall(out)
                        s.setblocking(False)
    finally:
        for s in list(bufs) + socks:
            s.close()
    return responder.stats


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.responder", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:5070", metavar="HOST:PORT",
                   help="loopback address to listen on (port 0: any free; printed on stdout)")
    p.add_argument("--transport", choices=("udp", "tcp", "both"), default="both")
    p.add_argument("--fast", action="store_true", help="C-speed UDP echo (no auth/drop/dup)")
    p.add_argument("--auth", action="store_true", help="challenge with 401 and check the digest")
    p.add_argument("--realm", default="fastsip-load")
    p.add_argument("--algorithm", choices=tuple(_HASH), default="MD5")
    p.add_argument("--qop", action="store_true", help='challenge with qop="auth"')
    p.add_argument("--password-pattern", default="secret",
                   help="password of a user ({user}, {i}: the user's trailing digits)")
    p.add_argument("--drop", type=float, default=0.0, help="share of replies to drop")
    p.add_argument("--dup", type=float, default=0.0, help="share of replies to send twice")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=300.0, help="stop after this many seconds")
    p.add_argument("--max-requests", type=int, default=100_000_000)
    p.add_argument("--stats", metavar="FILE", help="write the counters here (default: stdout)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        p.error("the responder listens on loopback only")
    signal.signal(signal.SIGTERM, _interrupt)

    def ready(port):
        print(f"listening {host}:{port}", flush=True)

    stats = {}
    try:
        if args.fast:
            from ._echo_c import echo_udp
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.bind((host, int(port)))
            ready(s.getsockname()[1])
            try:
                rx, tx = echo_udp(s.fileno(), args.duration, args.max_requests)
                stats = {"received": rx, "replies": {"200": tx}}
            finally:
                s.close()
        else:
            r = Responder(auth=args.auth, realm=args.realm, algorithm=args.algorithm, qop=args.qop,
                          password_pattern=args.password_pattern, drop=args.drop, dup=args.dup,
                          seed=args.seed)
            stats = r.stats
            serve(host, int(port), r, args.transport, args.duration, args.max_requests, ready)
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
