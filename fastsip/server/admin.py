"""The supervisor's HTTP endpoint: ``/metrics`` and the JSON admin API.

``fastsip show``, ``bindings`` and ``remove`` use the API; the routes, their
answers and errors are in docs/server.md.  The HTTP side is the standard
library's (``http.server.ThreadingHTTPServer``, a daemon thread per client),
bounded so that no client can stall it: at most ``MAX_CLIENTS`` clients at a
time (``MAX_PER_SOURCE`` from one address; the next get 503 at once), each
with ``REQUEST_DEADLINE`` seconds for its whole request (not per ``recv``) of
at most ``MAX_HEAD`` bytes of head and ``MAX_BODY`` of body.  Answering needs the
workers, over control channels that only the supervisor's loop uses: a
client's thread parses the request and hands it to that loop (a queue and a
wake-up socket, :meth:`AdminServer.fileno` / :meth:`AdminServer.run_pending`);
the loop routes it (:func:`route`) and the thread writes the answer.  With
``--cluster`` the shared location's requests (``SHARED``) need no worker: the
client's thread answers them itself, so a Redis node that keeps them waiting never
holds up the loop (``/metrics``, the workers' restarts).
"""
from __future__ import annotations

import collections
import hmac
import io
import ipaddress
import json
import logging
import socket
import socketserver
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from fastsip.errors import ClusterError
from fastsip.registrar import aor_from_text
from fastsip.server import logs
from fastsip.server.metrics import render

LOG = logs.LOG

REQUEST_DEADLINE = 5.0      # seconds a client has to send its whole request (line, headers, body)
ANSWER_DEADLINE = 30.0      # seconds a client has to take in the whole answer
LOOP_DEADLINE = 30.0        # seconds a request waits for the supervisor's loop (503 then)
MAX_HEAD = 16384            # bytes of request line and headers (431 beyond)
MAX_BODY = 65536            # bytes of body (413 beyond)
MAX_CLIENTS = 32            # clients served at once; more get 503 at once
MAX_PER_SOURCE = 8          # of which from one address
TEXT = "text/plain"


# ---------------------------------------------------------------------- routes

def _json(obj, status="200 OK"):
    return status, "application/json", (json.dumps(obj, indent=1) + "\n").encode()


def _aor_param(q):
    """(the SIP URI named by the ``aor`` parameter, None), or (None, a 400
    reply saying why): what a person types is accepted (see aor_from_text)."""
    if not q.get("aor"):
        return None, _json({"error": "aor is required"}, "400 Bad Request")
    try:
        return aor_from_text(q["aor"]), None
    except ValueError as exc:
        return None, _json({"error": str(exc)}, "400 Bad Request")


def _shared(sup, method: str, path: str, q: dict):
    """The admin API with --cluster: the shared location is asked (every node's
    bindings, as ``fastsip show --cluster``), not this node's workers."""
    from fastsip.cluster import location
    from fastsip.server.commands import binding_dict
    now = time.time()
    try:
        if path == "/api/bindings":
            limit = int(q.get("limit", 100000))
            found, truncated = sup.location(lambda sync: location.bindings(sync, limit, now))
            return _json({"bindings": [binding_dict(a, b, now) for a, b in found],
                          "truncated": truncated})
        aor, refusal = _aor_param(q)
        if refusal:
            return refusal
        aor = sup.aor_of(aor)
        if path == "/api/aor":
            found = sup.location(lambda sync: location.lookup(sync, aor, now))
            return _json({"aor": aor, "bindings": [binding_dict(aor, b, now) for b in found]})
        contact = _contact_param(q)
        removed = sup.location(lambda sync: location.remove(sync, aor, contact, now))
        logs.event(logging.INFO, f"admin: removed {removed} binding(s) of {aor}",
                   aor=aor, contact=contact, removed=removed)
        return _json({"aor": aor, "removed": removed})
    except ClusterError as exc:
        return _json({"error": f"the shared location: {exc}"}, "503 Service Unavailable")


def _contact_param(q):
    """The ``contact`` parameter as `fastsip show` prints it (<sip:...> allowed)."""
    contact = q.get("contact")
    if contact:
        contact = contact.strip()
        if contact.startswith("<") and contact.endswith(">"):
            contact = contact[1:-1].strip()
    return contact or None


SHARED = frozenset((("GET", "/api/aor"), ("GET", "/api/bindings"), ("POST", "/api/remove")))


def answer_of(sup, method: str, path: str, q: dict):
    """``route``'s answer, or None (the connection is closed unanswered) for a request
    it finds malformed; a bug is logged and answered 500."""
    try:
        return route(sup, method, path, q)
    except ValueError:              # e.g. limit=x: the connection is closed without an answer
        return None
    except Exception as exc:        # noqa: BLE001 - a bug: log it, answer, go on
        LOG.exception("admin request %s %s failed", method, path)
        return _json({"error": f"{type(exc).__name__}: {exc}"}, "500 Internal Server Error")


def route(sup, method: str, path: str, q: dict):
    """``(status, content type, body)`` for one request; runs in the supervisor's loop
    (``sup`` is the Supervisor: it asks the workers), but for the shared location's
    requests (``SHARED`` with --cluster), which run on the client's thread: Redis
    may keep them waiting (a node that does not answer), the loop must not wait."""
    if sup.cfg.cluster is not None and (method, path) in SHARED:
        return _shared(sup, method, path, q)
    if path == "/metrics" and method == "GET":
        total = sup.collect()
        alive = sum(1 for s in sup.slots if s.pid)
        text = render(total, alive, sup.cfg.workers, sup.restarts,
                      sup.cfg.node_id if sup.cfg.cluster is not None else None,
                      folded=sup.folder.read if sup.folder is not None else 0)
        return "200 OK", "text/plain; version=0.0.4; charset=utf-8", text.encode()
    if path == "/api/aor" and method == "GET":
        aor, refusal = _aor_param(q)
        if refusal:
            return refusal
        found, near = [], set()
        for slot, answer in sup.ask_all({"op": "lookup", "aor": aor}):
            answer = answer or {}
            aor = answer.get("aor", aor)
            near.update(answer.get("near", ()))
            for b in answer.get("bindings", []):
                b["worker"] = slot.index
                found.append(b)
        return _json({"aor": aor, "bindings": found, "near": sorted(near)[:5]})
    if path == "/api/bindings" and method == "GET":
        limit = int(q.get("limit", 100000))
        found = []
        for slot, answer in sup.ask_all({"op": "bindings", "limit": limit}):
            for b in (answer or {}).get("bindings", []):
                b["worker"] = slot.index
                found.append(b)
        found.sort(key=lambda b: (b["aor"], b["contact"]))
        return _json({"bindings": found[:limit], "truncated": len(found) > limit})
    if path == "/api/remove" and method == "POST":
        aor, refusal = _aor_param(q)
        if refusal:
            return refusal
        contact = _contact_param(q)
        removed, near = 0, set()
        for _slot, answer in sup.ask_all({"op": "remove", "aor": aor, "contact": contact}):
            answer = answer or {}
            aor = answer.get("aor", aor)
            removed += answer.get("removed", 0)
            near.update(answer.get("near", ()))
        logs.event(logging.INFO, f"admin: removed {removed} binding(s) of {aor}",
                   aor=aor, contact=contact, removed=removed)
        return _json({"aor": aor, "removed": removed, "near": sorted(near)[:5]})
    if path == "/api/state/fold" and method == "POST":
        if sup.folder is None:
            return _json({"error": "no change log to fold (--no-state, --cluster, or the "
                                   "workers write the state file themselves)"}, "409 Conflict")
        t0 = time.monotonic()
        try:
            changes = sup.fold_now()
        except (OSError, ValueError, sqlite3.Error) as exc:
            return _json({"error": f"fold failed: {exc}"}, "503 Service Unavailable")
        return _json({"changes": changes, "seconds": round(time.monotonic() - t0, 3)})
    if path == "/api/workers" and method == "GET":
        sup.collect()
        workers = []
        for s in sup.slots:     # counters: the slot's since the start (across restarts)
            t = s.totals()
            workers.append({
                "index": s.index, "pid": s.pid, "ready": s.ready, "restarts": s.restarts,
                "received_udp": t.get("received", {}).get("udp", 0),
                "received_tcp": t.get("received", {}).get("tcp", 0),
                "bindings": t.get("core", {}).get("bindings", 0) if s.ready else None,
                "batch_waits": t.get("batch_waits", 0)})
        return _json({"workers": workers, "restarts": sup.restarts,
            "listen": sup.listen_names(), "state": sup.cfg.state})
    return _json({"error": f"no such endpoint: {method} {path}"}, "404 Not Found")


# ---------------------------------------------------------------------- who may ask

MIN_TOKEN = 16              # characters of an admin token, at least


def read_token(path: str) -> str:
    """The admin token in ``path`` (``--admin-token-file``): the file's text
    without surrounding white space, at least ``MIN_TOKEN`` printable ASCII
    characters and no spaces; ``ConfigError`` saying why not."""
    from fastsip.server.config import ConfigError
    what = f"--admin-token-file {path}"
    try:
        with open(path, "rb") as f:
            token = f.read(4096).strip()
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{what}: the file is empty")
    if any(not 0x21 <= c <= 0x7E for c in token):
        raise ConfigError(f"{what}: the token must be one word of printable ASCII "
                          "(no spaces or line breaks inside)")
    if len(token) < MIN_TOKEN:
        raise ConfigError(f"{what}: the token is shorter than {MIN_TOKEN} characters")
    return token.decode("ascii")


def is_loopback(host: str) -> bool:
    """Whether an address (as bound) is a loopback one: 127.0.0.0/8, ::1."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _host_is_literal(value: str) -> bool:
    """Whether a Host header names an IP address or localhost (not a DNS name, which a
    web page could rebind to this machine)."""
    host = value.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _refused(status, why, headers=()):
    body = (json.dumps({"error": why}) + "\n").encode()
    return status, "application/json", body, headers


def check_access(admin, method: str, headers) -> tuple | None:
    """None when an admin API request may go on, else the refusal (status,
    content type, body, extra headers).  The rules (docs/server.md, *Admin API*):

    - a request with an ``Origin`` header (a web page's) is refused: 403;
    - on a listener beyond loopback without ``--admin-token-file``, the API is off: 403;
    - with a token, ``Authorization: Bearer <token>`` is required (compared in
      constant time): 401 without it or with another;
    - without a token, the ``Host`` header must name an IP address or localhost
      (DNS rebinding): 403;
    - a POST must be ``application/json``: 403.
    """
    if headers.get("Origin") is not None:
        return _refused("403 Forbidden", "cross-origin request refused: the admin API does not "
                        "answer requests with an Origin header (web pages)")
    token = admin.token
    if token is None and not admin.loopback:
        host, port = admin.address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return _refused("403 Forbidden", f"the admin API is off: this endpoint listens on "
                        f"{where}, beyond loopback, and the server has no "
                        "--admin-token-file (/metrics stays open)")
    if token is not None:
        scheme, _, given = (headers.get("Authorization") or "").strip().partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("latin-1", "replace"), token.encode())):
            return _refused("401 Unauthorized",
                            "the admin API needs the server's token (Authorization: Bearer ...; "
                            "fastsip show/bindings/remove --admin-token-file FILE)"
                            if not scheme else "wrong admin token",
                            (("WWW-Authenticate", 'Bearer realm="fastsip"'),))
    elif headers.get("Host") is not None and not _host_is_literal(headers["Host"]):
        return _refused("403 Forbidden", "the Host header must name an IP address or localhost "
                        "(without --admin-token-file)")
    if method == "POST":
        ctype = (headers.get("Content-Type") or "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            return _refused("403 Forbidden", "a POST to the admin API must be application/json")
    return None


# ---------------------------------------------------------------------- HTTP

class _TooLarge(Exception):
    """The request is longer than ``MAX_HEAD + MAX_BODY`` bytes."""


class _DeadlineReader(io.RawIOBase):
    """A client socket's bytes, until ``deadline`` (``time.monotonic()``) and at
    most ``budget`` of them: the whole request must arrive within
    ``REQUEST_DEADLINE``, however slowly it trickles in (a timeout per ``recv``
    would let one byte every few seconds hold a thread for ever)."""

    def __init__(self, sock, deadline: float, budget: int) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long")
        if self.budget <= 0:
            raise _TooLarge
        self.sock.settimeout(left)
        with memoryview(buf) as view:
            n = self.sock.recv_into(view[:self.budget])
        self.budget -= n
        return n


class _Writer(io.RawIOBase):
    """The answer, written at once with ``sendall`` (bounded by ``ANSWER_DEADLINE``
    in all: Python's ``sendall`` timeout is the total)."""

    def __init__(self, sock) -> None:
        super().__init__()
        self.sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sock.settimeout(ANSWER_DEADLINE)
        self.sock.sendall(data)
        return len(data)


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0, ``Connection: close``), any method."""

    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"    # an error answer always has a status line

    def setup(self):
        self.connection = self.request
        self.rfile = io.BufferedReader(_DeadlineReader(
            self.connection, time.monotonic() + REQUEST_DEADLINE, MAX_HEAD + MAX_BODY))
        self.wfile = _Writer(self.connection)

    def handle(self):
        self.close_connection = True
        try:
            self.handle_one_request()
        except _TooLarge:
            self.command, self.request_version = "", self.default_request_version
            self._answer("431 Request Header Fields Too Large", TEXT, b"too large\n")

    def __getattr__(self, name):
        if name.startswith("do_"):          # every method is routed (404 for what is unknown)
            return self._serve
        raise AttributeError(name)

    def log_message(self, format, *args):   # no access log
        pass

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals, in this endpoint's words."""
        if code in (414, 431):              # a request line or headers too long
            self._answer("431 Request Header Fields Too Large", TEXT, b"too large\n")
        elif code == 400:
            self._answer("400 Bad Request", TEXT, b"bad request line\n")
        else:
            phrase = self.responses.get(code, ("Error",))[0]
            self._answer(f"{int(code)} {phrase}", TEXT, f"{message or phrase}\n".encode())

    def parse_request(self):
        if len(self.raw_requestline.split()) != 3:      # METHOD TARGET VERSION, nothing else
            self.command, self.request_version = "", self.default_request_version
            self.send_error(400)
            return False
        if not super().parse_request():
            return False
        if len(self.raw_requestline) + len(bytes(self.headers)) > MAX_HEAD:
            self._answer("431 Request Header Fields Too Large", TEXT, b"too large\n")
            return False
        return True

    def _answer(self, status, ctype, body, headers=()):
        head = [f"HTTP/1.0 {status}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in headers), "Connection: close", "", ""]
        self.wfile.write("\r\n".join(head).encode("latin-1") + body)
        self.close_connection = True

    def _serve(self):
        url = urlsplit(self.path)
        if url.path != "/metrics":          # the admin API (and what is unknown): checked
            refusal = check_access(self.server.admin, self.command, self.headers)
            if refusal is not None:
                self._answer(*refusal)
                return
        try:
            length = int((self.headers.get("Content-Length") or "0").strip() or 0)
        except ValueError:
            return                          # closed without an answer, as a garbled request
        if length > MAX_BODY:
            self._answer("413 Payload Too Large", TEXT, b"too large\n")
            return
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:
            return                          # the client closed before its body was in
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if body and self.command == "POST":
            try:
                extra = json.loads(body)
            except ValueError:
                self._answer("400 Bad Request", TEXT, b"body is not JSON\n")
                return
            if not isinstance(extra, dict) or not all(
                    isinstance(v, str) or v is None for v in extra.values()):
                self._answer("400 Bad Request", TEXT,
                             b"body is not a JSON object of strings\n")
                return
            q.update((k, v) for k, v in extra.items() if v is not None)
        answer = self.server.admin.ask(self.command, url.path, q)
        if answer is not None:
            self._answer(*answer)


_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False          # close() does not wait for clients: their deadlines end them
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, family, admin):
        self.address_family = family
        self.admin = admin
        self.lock = threading.Lock()
        self.served = 0                         # clients being served
        self.by_source: dict = {}               # client address -> clients being served
        super().__init__(address, _Handler)

    def server_bind(self):
        # TCPServer's bind, without HTTPServer's reverse lookup of the host name
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        source = client_address[0]
        with self.lock:
            busy = self.served >= MAX_CLIENTS or self.by_source.get(source, 0) >= MAX_PER_SOURCE
            if not busy:
                self.served += 1
                self.by_source[source] = self.by_source.get(source, 0) + 1
        if busy:                    # answered at once, without reading: this thread never waits
            try:
                request.setblocking(False)
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.admin.conns.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request, source)
            raise

    def _done(self, request, source):
        self.admin.conns.discard(request)
        with self.lock:
            self.served -= 1
            left = self.by_source.pop(source, 1) - 1
            if left:
                self.by_source[source] = left

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request, client_address[0])

    def handle_error(self, request, client_address):
        LOG.debug("admin endpoint: a request from %s failed", client_address, exc_info=True)


class _Pending:
    __slots__ = ("method", "path", "q", "answer", "done")

    def __init__(self, method, path, q):
        self.method, self.path, self.q = method, path, q
        self.answer = None
        self.done = threading.Event()


class AdminServer:
    """The endpoint on ``host:port``; ``OSError`` when it cannot be bound.

    ``start()`` serves it in a daemon thread.  The supervisor's loop waits on
    ``fileno()`` and calls ``run_pending()`` when it is readable.
    """

    def __init__(self, host: str, port: int, sup, token: str | None = None) -> None:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.sup = sup
        self.token = token              # --admin-token-file's, or None
        self.loopback = is_loopback(address[0])
        self.conns: set = set()         # client sockets being served (closed in a forked worker)
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            self.http = _HTTPServer(address, family, self)
        except OSError:
            self._wake_r.close()
            self._wake_w.close()
            raise

    @property
    def address(self):
        return self.http.server_address[:2]

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="fastsip-admin", daemon=True)
        self._thread.start()

    def ask(self, method: str, path: str, q: dict):
        """From a client's thread: the supervisor loop's answer (None when it is stopping;
        503 when the loop has not answered in ``LOOP_DEADLINE`` seconds)."""
        if self.sup.cfg.cluster is not None and (method, path) in SHARED:
            return answer_of(self.sup, method, path, q)     # here (route's docstring)
        pending = _Pending(method, path, q)
        with self._lock:
            if self._closed:
                return None
            self._pending.append(pending)
        try:
            self._wake_w.send(b"\0")
        except OSError:                 # full: the loop has a wake-up waiting already
            pass
        if not pending.done.wait(LOOP_DEADLINE):
            return "503 Service Unavailable", TEXT, b"the server did not answer in time\n"
        return pending.answer

    def run_pending(self) -> None:
        """In the supervisor's loop: answer what the clients' threads handed over."""
        try:
            while self._wake_r.recv(512):
                pass
        except OSError:
            pass
        while True:
            with self._lock:
                if not self._pending:
                    return
                pending = self._pending.popleft()
            pending.answer = answer_of(self.sup, pending.method, pending.path, pending.q)
            pending.done.set()

    def close(self) -> None:
        """Stop serving; clients still waiting get no answer."""
        with self._lock:
            self._closed = True
            waiting, self._pending = list(self._pending), collections.deque()
        for pending in waiting:
            pending.done.set()
        if self._thread is not None:
            self.http.shutdown()
            self._thread.join(2.0)
        self.http.server_close()
        self._wake_r.close()
        self._wake_w.close()

    def close_in_child(self) -> None:
        """In a forked worker: close the inherited sockets (no thread runs there)."""
        for sock in [self.http.socket, self._wake_r, self._wake_w, *list(self.conns)]:
            try:
                sock.close()
            except OSError:
                pass
