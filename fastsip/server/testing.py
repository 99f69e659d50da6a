"""Helpers for end-to-end tests of ``fastsip serve`` (used by tests/test_server*.py).

``ServerProcess`` runs the real server as a subprocess on 127.0.0.1 with
kernel-chosen ports, reads the ports from its start line, and always kills
its whole process group at the end.  ``register``/``options`` build plain
SIP requests as a phone would send them; ``Phone`` sends them over UDP or
TCP and waits (bounded) for the reply.

``RedisServer`` and ``RedisCluster`` run real ``redis-server`` processes on loopback
(one server, or a Redis Cluster of several) for the tests of the cluster mode: each
process is held as a subprocess in its own session and killed at the end (or at exit),
and ``command`` speaks RESP2 to it over a plain socket.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import fastsip

_LINE = re.compile(r"listening on (?P<listen>[^;]+); (?P<workers>\d+) workers?; state (?P<state>.+?); "
                   r"metrics http://(?P<mhost>[^ ]+):(?P<mport>\d+)/metrics(?: \((?P<admin>[^)]*)\))?; "
                   r"rate limit per source (?P<rate>off|[\d.]+/s); "
                   r"digest authentication (?P<auth>off|on, realm .*?: (?P<users>\d+) users? in [^;]+)"
                   r"(?:; redirect server (?P<redirect>on|off))?"
                   r"(?:; kernel steering by AOR (?P<steering>.+))?$")


def steering_unavailable():
    """Why this kernel will not load the steering program (None when it will)."""
    from fastsip.server import steer
    try:
        os.close(steer.load(2))
    except steer.SteerError as exc:
        return f"no kernel steering here: {exc}"
    return None


class ServerProcess:
    """``fastsip serve`` in a subprocess (its own session, so that its workers die with it)."""

    def __init__(self, *args, workers=2, state=None, cwd=None, transports=("udp", "tcp"),
                 env=None, prefix=()):
        self.args = list(args)
        self.prefix = list(prefix)      # a command that runs the server, e.g. setpriv ...
        self.workers = workers
        self.state = state
        self.cwd = cwd
        self.transports = transports
        self.env = env
        self.proc = None
        self.udp = self.tcp = None      # ("127.0.0.1", port)
        self.tls = self.ws = self.wss = None
        self.metrics_addr = None
        self.token = None               # sent with every admin request when set
        self.start_line = ""
        self.stderr_path = None

    def command(self):
        cmd = [*self.prefix, sys.executable, "-m", "fastsip.cli", "serve", "--workers", str(self.workers),
               "--metrics", "127.0.0.1:0"]
        for t in self.transports:
            cmd += ["--listen", f"{t}:127.0.0.1:0"]
        cmd += ["--state", str(self.state)] if self.state else ["--no-state"]
        return cmd + self.args

    def start(self, timeout=20.0):
        env = dict(os.environ if self.env is None else self.env)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.stderr_path = os.path.join(self.cwd or ".", f"fastsip-serve-{os.getpid()}-{id(self)}.log")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self._err,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd, env=env,
                                     start_new_session=True)
        line = self._readline(timeout)
        m = _LINE.search(line)
        if not m:
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log()}")
        self.start_line = line
        self.listen = []
        for item in m.group("listen").split(", "):
            t, rest = item.split(":", 1)
            host, port = rest.rsplit(":", 1)
            addr = (host.strip("[]"), int(port))
            self.listen.append((t, addr))
            if getattr(self, t) is None:
                setattr(self, t, addr)
        # a wildcard listener is reached over loopback
        mhost = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(m.group("mhost"), m.group("mhost"))
        self.metrics_addr = (mhost, int(m.group("mport")))
        return self

    def _readline(self, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf.decode(errors="replace")

    def log(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=15.0) -> int:
        """SIGTERM, then wait (bounded); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        """Kill the server's whole process group (supervisor and workers); idempotent."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()

    # -- the HTTP endpoint ---------------------------------------------------
    def http(self, path, method="GET", timeout=10.0, body=None, headers=None):
        """The answer's body; a POST sends ``body`` (a dict, default none) as JSON.  With
        :attr:`token` set, the request carries it (``Authorization: Bearer``)."""
        host, port = self.metrics_addr
        hdrs = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = None
        if method == "POST":
            hdrs["Content-Type"] = "application/json"
            data = json.dumps(body or {}).encode()
        hdrs.update(headers or {})
        req = urllib.request.Request(f"http://{host}:{port}{path}", method=method, data=data,
                                     headers=hdrs)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def api(self, path, method="GET", body=None):
        return json.loads(self.http(path, method, body=body))

    def metrics(self) -> dict:
        """``{'name{labels}': value}`` from /metrics."""
        out = {}
        for line in self.http("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def worker_pids(self) -> list:
        return [w["pid"] for w in self.api("/api/workers")["workers"]]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()


def wait_for(predicate, timeout=10.0, every=0.05):
    """Call ``predicate`` every ``every`` seconds until it returns something true (which
    is returned) or ``timeout`` seconds pass (then its last value is returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


# -- a test PKI ------------------------------------------------------------------------------

def make_test_pki(directory) -> dict:
    """A CA, a server certificate for 127.0.0.1, ::1 and localhost signed by it, and a client
    certificate (for mutual TLS), made with the ``openssl`` command in ``directory``:
    ``{"ca": path, "cert": path, "key": path, "client_cert": path, "client_key": path}``.
    EC P-256 keys, valid for 30 days."""
    d = os.fspath(directory)
    out = {k: os.path.join(d, f) for k, f in (
        ("ca", "ca.pem"), ("ca_key", "ca.key"), ("cert", "server.pem"), ("key", "server.key"),
        ("client_cert", "client.pem"), ("client_key", "client.key"))}

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", out["ca_key"], "-out", out["ca"], "-days", "30",
        "-subj", "/CN=fastsip test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in (
            ("", "localhost", "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n"
                              "extendedKeyUsage=serverAuth"),
            ("client_", "fastsip test client", "extendedKeyUsage=clientAuth")):
        csr = os.path.join(d, f"{name or 'server_'}req.csr")
        extfile = os.path.join(d, f"{name or 'server_'}ext.cnf")
        with open(extfile, "w") as f:
            f.write(ext + "\nbasicConstraints=CA:FALSE\n")
        run("req", "-new", *ec, "-keyout", out[name + "key"], "-out", csr, "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", csr, "-CA", out["ca"], "-CAkey", out["ca_key"],
            "-CAcreateserial", "-out", out[name + "cert"], "-days", "30", "-extfile", extfile)
    return out


# -- SIP requests, as a phone writes them ------------------------------------------------------

def md5_authorization(user, password, nonce, nc=1, *, realm="example.com",
                      uri="sip:example.com", cnonce="abc") -> str:
    """An ``Authorization`` header line answering a MD5 ``qop=auth`` challenge for a
    REGISTER (RFC 7616), computed here with hashlib (not with fastsip's digest code,
    which tests check against it)."""
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
    resp = hashlib.md5(f"{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (f'Authorization: Digest username="{user}", realm="{realm}", nonce="{nonce}", '
            f'uri="{uri}", response="{resp}", algorithm=MD5, qop=auth, nc={nc:08x}, '
            f'cnonce="{cnonce}"')


def register(user, domain="example.com", *, contact=None, call_id="c1", cseq=1, expires=None,
             transport="UDP", local=("127.0.0.1", 5060), extra=(), branch=None, ruri=None):
    """A REGISTER for sip:user@domain.  ``contact``: a URI, a list of URIs, None for a fetch
    (no Contact), or a raw header value such as ``"*"``."""
    lines = [
        f"REGISTER {ruri or 'sip:' + domain} SIP/2.0",
        f"Via: SIP/2.0/{transport} {local[0]}:{local[1]};rport;branch="
        f"{branch or 'z9hG4bK' + os.urandom(6).hex()}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{domain}>;tag={os.urandom(4).hex()}",
        f"To: <sip:{user}@{domain}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
    ]
    if isinstance(contact, (list, tuple)):
        lines += [f"Contact: <{c}>" for c in contact]
    elif contact is not None:
        lines.append(f"Contact: {contact}" if contact == "*" else f"Contact: <{contact}>")
    if expires is not None:
        lines.append(f"Expires: {expires}")
    lines += list(extra) + ["User-Agent: fastsip-tests", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def request(method, uri="sip:example.com", *, transport="UDP", local=("127.0.0.1", 5060),
            call_id="r1", cseq=1, extra=(), to=None):
    """A request for ``uri``; To is ``<uri>`` unless ``to`` (a URI) is given."""
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {local[0]}:{local[1]};branch=z9hG4bK{os.urandom(6).hex()}",
        "Max-Forwards: 70",
        f"From: <sip:tester@example.com>;tag={os.urandom(4).hex()}",
        f"To: <{to or uri}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *extra,
        "Content-Length: 0", "", "",
    ]
    return "\r\n".join(lines).encode()


class Phone:
    """One client socket (UDP, or a TCP or TLS connection) talking to the server."""

    def __init__(self, server_addr, transport="udp", source=None, ca=None):
        """``source``: the local address to send from (e.g. another of 127/8); ``ca``:
        the CA file a TLS server certificate is checked against (``make_test_pki``)."""
        self.server = server_addr
        self.transport = transport
        v6 = ":" in server_addr[0]
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((source or ("::1" if v6 else "127.0.0.1"), 0))
        else:
            self.sock = socket.create_connection(server_addr, timeout=5,
                                                 source_address=(source, 0) if source else None)
            if transport == "tls":
                ctx = ssl.create_default_context(cafile=ca)
                self.sock = ctx.wrap_socket(self.sock, server_hostname=server_addr[0])
        self.local = self.sock.getsockname()[:2]
        self.framer = fastsip.StreamFramer()
        self.pending = []

    def send(self, data: bytes):
        if self.transport == "udp":
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def recv(self, timeout=3.0):
        """The next message (bytes), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return None
            if self.transport == "udp":
                return data
            if not data:
                raise ConnectionError("the server closed the connection")
            if data == fastsip.PONG and not self.framer.buffered:
                return data                 # the framer would skip a lone CRLF
            self.pending += self.framer.feed(data)
        return self.pending.pop(0)

    def ask(self, data: bytes, timeout=3.0, tries=3):
        """Send a request and return the parsed final reply (UDP: resent up to ``tries`` times)."""
        for _ in range(tries if self.transport == "udp" else 1):
            self.send(data)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                raw = self.recv(deadline - time.monotonic())
                if raw is None:
                    break
                if raw in (fastsip.PING, fastsip.PONG):
                    continue
                msg = fastsip.parse(raw)
                if isinstance(msg, fastsip.Response) and msg.status >= 200:
                    return msg
        raise TimeoutError("no reply from the server")

    def close(self):
        self.sock.close()


def contacts_of(reply) -> dict:
    """``{contact uri: expires}`` of a 200 to REGISTER."""
    return {c.uri: c.expires for c in reply.contacts}


# -- Redis: one server, or a Redis Cluster, on loopback ----------------------------------------

REDIS_HOST = "127.0.0.1"
CLUSTER_BUS_OFFSET = 10000      # a cluster node's bus listens on its port + 10000
CLUSTER_SLOTS = 16384


class RedisError(Exception):
    """An error reply from Redis; its text, e.g. ``MOVED 3999 127.0.0.1:21002``."""


def _bindable(port, host=REDIS_HOST) -> bool:
    """Whether a TCP socket can bind ``host:port`` now (no SO_REUSEADDR: a port with a
    connection in TIME_WAIT counts as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _port_range(bus):
    """Where ``free_port`` draws from: below the kernel's ephemeral range (from which
    outgoing connections take their local ports) when there is room, bus port included."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low_ephemeral = 32768
    top = low_ephemeral - 1 - (CLUSTER_BUS_OFFSET if bus else 0)
    if top - 10000 >= 1000:
        return 10000, top
    return 1024, 65535 - (CLUSTER_BUS_OFFSET if bus else 0)


_rng = random.SystemRandom()    # not the random module's state, which tests may seed


def free_port(bus=False, tries=200) -> int:
    """A TCP port on 127.0.0.1 that can be bound now, drawn at random (see _port_range);
    with ``bus``, port + 10000 too (a Redis Cluster node's bus).  Probed by binding both,
    so another process may still take it before its user does: ``RedisServer`` retries."""
    low, high = _port_range(bus)
    for _ in range(tries):
        port = _rng.randint(low, high)
        if _bindable(port) and (not bus or _bindable(port + CLUSTER_BUS_OFFSET)):
            return port
    raise RuntimeError(f"no free port{' pair' if bus else ''} in {low}-{high} after {tries} tries")


def _resp_encode(args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            arg = str(arg).encode()
        elif isinstance(arg, bytearray | memoryview):
            arg = bytes(arg)
        elif not isinstance(arg, bytes):
            raise TypeError(f"a Redis argument is str, bytes or a number, not {type(arg).__name__}")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _Resp:
    """One blocking RESP2 connection: ``call(args, timeout)`` sends a command and reads its
    whole reply within ``timeout`` seconds."""

    def __init__(self, port, timeout):
        self.sock = socket.create_connection((REDIS_HOST, port), timeout=timeout)
        self.buf = bytearray()
        self.deadline = 0.0

    def call(self, args, timeout):
        self.deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        self.sock.sendall(_resp_encode(args))
        reply = self._reply()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def _fill(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no (whole) reply from redis in time")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def _reply(self):
        """One reply; an error reply is returned as a RedisError (raised by ``call`` at the
        top; inside an array, e.g. EXEC's, it stays an element)."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data = bytes(self.buf[:n])
            del self.buf[:n + 2]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP2 reply: {line[:80]!r}")

    def close(self):
        self.sock.close()


def parse_info(text) -> dict:
    """``{field: value}`` (both str) from INFO or CLUSTER INFO text."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


_LIVE_REDIS: set = set()        # the RedisServers whose process may be running
_LIVE_CLUSTERS: set = set()     # the RedisClusters started and not stopped
_prctl = None


def _die_with_parent():
    """In the child before exec: SIGKILL when the process that started it dies, even
    killed (Linux PR_SET_PDEATHSIG), so that no redis-server outlives a killed test run.
    (Strictly when the thread that started it ends: start servers from the main thread.)"""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)       # PR_SET_PDEATHSIG


def _load_prctl():
    global _prctl
    if _prctl is None and sys.platform == "linux":
        import ctypes
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            pass


@atexit.register
def _kill_live_redis():
    """At exit: every cluster stopped (its temporary directory removed), every other
    server killed and its temporary directory removed."""
    for cluster in list(_LIVE_CLUSTERS):
        cluster.stop(timeout=1.0)
    for server in list(_LIVE_REDIS):
        server.kill()
        if server._own_directory and server.directory:
            shutil.rmtree(server.directory, ignore_errors=True)


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, held as a subprocess (``--daemonize no``, in its
    own session, SIGKILLed if this process dies).  ``args``: more redis-server options
    (``"--maxmemory", "10mb"``); unless ``persist``, ``--save '' --appendonly no``.
    ``port``: None picks a free one (and another if it was taken before the server bound
    it); ``bus``: keep port + 10000 free as well (a cluster node, see RedisCluster).
    ``directory``: its working directory (its log, ``redis.log``, and whatever it
    writes); None makes a temporary one, removed by ``stop``.  The port and the directory
    stay the same across ``restart``.  ``command`` is a small blocking RESP2 client:
    str, bytes and numbers in; replies as bytes (bulk and status strings), int, list or
    None; an error reply raises RedisError."""

    def __init__(self, *args, port=None, directory=None, persist=False, bus=False, name="redis",
                 executable="redis-server"):
        self.args = list(args)
        self.port = port
        self.directory = os.fspath(directory) if directory is not None else None
        self._own_directory = directory is None
        self.persist = persist
        self.bus = bus
        self.name = name
        self.executable = executable
        self.node_id = None         # a cluster node's id (RedisCluster sets it)
        self.proc = None
        self.paused = False
        self._conn = None

    def __repr__(self):
        state = ("paused" if self.paused else f"pid {self.pid}") if self.running else "not running"
        return f"<RedisServer {self.name} {REDIS_HOST}:{self.port} {state}>"

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        """The process id while it runs (paused too), else None."""
        return self.proc.pid if self.running else None

    @property
    def log_path(self):
        return os.path.join(self.directory, "redis.log") if self.directory else None

    def log(self, tail=None) -> str:
        """Its log (stdout and stderr), or the last ``tail`` lines of it."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except (OSError, TypeError):
            return ""
        return "\n".join(lines[-tail:] if tail else lines)

    def command_line(self, port) -> list:
        cmd = [self.executable, "--port", str(port), "--bind", REDIS_HOST, "--daemonize", "no",
               "--dir", self.directory, "--shutdown-timeout", "0"]
        if not self.persist:
            cmd += ["--save", "", "--appendonly", "no"]
        return cmd + [str(a) for a in self.args]

    def start(self, timeout=10.0):
        """Start it (no-op when running) and wait until it answers; returns self."""
        if self.running:
            return self
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="fastsip-redis-")
        os.makedirs(self.directory, exist_ok=True)
        deadline = time.monotonic() + timeout
        fixed = self.port is not None
        _load_prctl()
        for _ in range(1 if fixed else 5):
            port = self.port if fixed else free_port(bus=self.bus)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.command_line(port), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
                                             start_new_session=True, preexec_fn=_die_with_parent)
            _LIVE_REDIS.add(self)
            self.paused = False
            why = self._wait_up(port, deadline)
            if why is None:
                self.port = port
                return self
            self.kill()
            if fixed or "Address already in use" not in why or time.monotonic() >= deadline:
                break
        raise RuntimeError(f"redis-server {self.name} did not start on {REDIS_HOST}:{port}: {why}\n"
                           f"{self.log(tail=15)}")

    def _wait_up(self, port, deadline):
        """None once the process we started answers on ``port``, else why not."""
        why = "no answer"
        while True:
            if self.proc.poll() is not None:
                return f"exited with status {self.proc.returncode}: {self.log(tail=3)}"
            try:
                conn = _Resp(port, timeout=0.5)     # short: another process may hold the port
                try:
                    info = parse_info(conn.call(["INFO", "server"], 0.5))
                finally:
                    conn.close()
                if info.get("process_id") == str(self.proc.pid):
                    return None
                why = f"another process (pid {info.get('process_id')}) answers on that port"
            except (OSError, RedisError) as exc:
                why = repr(exc)
            if time.monotonic() >= deadline:
                return f"no answer in time (last: {why})"
            time.sleep(0.02)

    def command(self, *args, timeout=5.0):
        """Run one command and return its reply (see the class doc).  The connection is
        kept for the next command, but dropped after anything but an error reply."""
        if self.port is None:
            raise RuntimeError(f"{self!r} was never started")
        try:
            if self._conn is None:
                self._conn = _Resp(self.port, timeout)
            return self._conn.call(args, timeout)
        except RedisError:
            raise
        except BaseException:
            self._drop_connection()
            raise

    def info(self, section=None, timeout=5.0) -> dict:
        """INFO [section] as ``{field: value}`` (str)."""
        return parse_info(self.command("INFO", *([section] if section else []), timeout=timeout))

    def _drop_connection(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def pause(self):
        """SIGSTOP: it stays connected (the kernel still accepts) but answers nothing."""
        if self.running:
            self._signal(signal.SIGSTOP)
            self.paused = True

    def resume(self):
        """SIGCONT after ``pause``."""
        if self.running:
            self._signal(signal.SIGCONT)
        self.paused = False

    def kill(self):
        """SIGKILL (its process group), and reap it; idempotent."""
        self._drop_connection()
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal(signal.SIGKILL)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.paused = False
        _LIVE_REDIS.discard(self)

    def terminate(self, timeout=5.0):
        """SIGTERM (after a SIGCONT if paused), a bounded wait, then SIGKILL; the directory
        stays (``restart`` starts it again from there)."""
        self._drop_connection()
        if self.running:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def restart(self, timeout=10.0):
        """Start it again on the same port from the same directory (a cluster node finds its
        nodes.conf there and rejoins); a running one is terminated first.  Returns self."""
        self.terminate()
        return self.start(timeout)

    def stop(self, timeout=5.0):
        """``terminate``, and remove the directory if it was made here."""
        self.terminate(timeout)
        if self._own_directory and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _parse_cluster_nodes(text) -> list:
    """CLUSTER NODES as ``[{"id", "port", "flags" (set), "master" (id or None),
    "slots" ([(first, last), ...])}, ...]``; slots being imported or migrated are left out."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split(",")[0].split("@")[0]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        out.append({"id": fields[0], "port": int(address.rpartition(":")[2] or 0),
                    "flags": set(fields[2].split(",")),
                    "master": None if fields[3] == "-" else fields[3], "slots": slots})
    return out


def _serving(view, slot):
    """The entry of ``view`` (parsed CLUSTER NODES) that serves ``slot``, or None."""
    for entry in view:
        if "master" in entry["flags"] and any(a <= slot <= b for a, b in entry["slots"]):
            return entry
    return None


class RedisCluster:
    """A real Redis Cluster on 127.0.0.1: ``primaries`` primaries with ``replicas`` replicas
    each, one ``redis-server`` (a RedisServer, in ``nodes``) per node, each in its own
    directory under ``directory`` (None: a temporary one, removed by ``stop``) with its
    nodes.conf, formed with ``redis-cli --cluster create``.  ``start`` returns once every
    node says ``cluster_state:ok``, knows every node and agrees on the slots and the
    roles, and every replica's link to its primary is up.

    Roles and slots are read from the cluster (CLUSTER NODES of the first running,
    unpaused node that answers), so they stay right after a failover.  ``node_timeout``
    (ms) is cluster-node-timeout: a primary unreachable that long is failed over.
    ``args``: more redis-server options for every node."""

    def __init__(self, primaries=3, replicas=1, *args, directory=None, node_timeout=2000):
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.n_primaries = primaries
        self.n_replicas = replicas
        self.args = list(args)
        self.node_timeout = node_timeout
        self.directory = os.fspath(directory) if directory is not None else None
        self._own_directory = directory is None
        self.nodes = []
        self._slots_seen = {}       # node id -> the slots it was last seen serving

    def __repr__(self):
        return f"<RedisCluster {self.n_primaries}x{1 + self.n_replicas} {self.url}>"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P1,127.0.0.1:P2,...``: every node."""
        return "redis://" + ",".join(f"{REDIS_HOST}:{n.port}" for n in self.nodes)

    def _node_args(self, i):
        return ["--cluster-enabled", "yes", "--cluster-node-timeout", str(self.node_timeout),
                "--cluster-config-file", os.path.join(self.directory, f"node{i}", "nodes.conf"),
                # a new replica syncs at once (the default waits 5 s for more replicas)
                "--repl-diskless-sync-delay", "0", *self.args]

    def start(self, timeout=60.0):
        """Start the nodes, create the cluster and wait until it is ok (see the class doc);
        returns self.  On any failure every node is stopped before the error is raised."""
        if self.nodes:
            return self
        deadline = time.monotonic() + timeout
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="fastsip-redis-cluster-")
        _LIVE_CLUSTERS.add(self)
        try:
            for i in range(self.n_primaries * (1 + self.n_replicas)):
                node = RedisServer(*self._node_args(i), directory=os.path.join(self.directory, f"node{i}"),
                                   bus=True, name=f"node{i}")
                self.nodes.append(node)
                node.start(max(1.0, deadline - time.monotonic()))
            cmd = ["redis-cli", "--cluster", "create", *(f"{REDIS_HOST}:{n.port}" for n in self.nodes),
                   "--cluster-replicas", str(self.n_replicas), "--cluster-yes"]
            try:
                done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                      timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"redis-cli --cluster create did not finish in time:\n"
                                   f"{(exc.stdout or b'').decode(errors='replace')[-2000:]}") from None
            said = re.sub(r"\x1b\[[0-9;]*m", "", (done.stdout + done.stderr).decode(errors="replace"))
            if done.returncode != 0 or "[OK] All 16384 slots covered" not in said:
                raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n"
                                   f"{said[-2000:]}")
            for node in self.nodes:
                node.node_id = node.command("CLUSTER", "MYID").decode()
            self._wait(deadline, "form")
        except BaseException:
            self.stop()
            raise
        return self

    # -- what the cluster says ---------------------------------------------------------------
    def _live(self):
        return [n for n in self.nodes if n.running and not n.paused]

    def _by_id(self, node_id):
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise LookupError(f"node id {node_id} is none of this cluster's nodes")

    def _note(self, view):
        for entry in view:
            if entry["slots"]:
                self._slots_seen[entry["id"]] = entry["slots"]
        return view

    def view(self, timeout=1.0) -> list:
        """CLUSTER NODES, parsed (see _parse_cluster_nodes), from the first running, unpaused
        node that answers within ``timeout``."""
        errors = []
        for node in self._live():
            try:
                return self._note(_parse_cluster_nodes(node.command("CLUSTER", "NODES", timeout=timeout)))
            except (OSError, RedisError) as exc:
                errors.append(f"{node.name}: {exc!r}")
        raise RuntimeError(f"no node of the cluster answers: {'; '.join(errors) or 'none running'}")

    def primaries(self) -> list:
        """The nodes that serve slots, as the cluster lists them now (one that failed but
        still holds its slots, before a failover, is listed: ``wait_ok`` waits for live
        ones), in the order of their first slot."""
        served = sorted((min(e["slots"]), e["id"]) for e in self.view()
                        if "master" in e["flags"] and e["slots"])
        return [self._by_id(node_id) for _, node_id in served]

    def replicas_of(self, node) -> list:
        """The nodes the cluster lists now as replicas of ``node`` (failed ones too)."""
        return [self._by_id(e["id"]) for e in self.view() if e["master"] == node.node_id]

    def keyslot(self, key) -> int:
        for node in self._live():
            try:
                return node.command("CLUSTER", "KEYSLOT", key, timeout=1.0)
            except (OSError, RedisError):
                continue
        raise RuntimeError("no node of the cluster answers CLUSTER KEYSLOT")

    def node_for_key(self, key):
        """The primary that serves ``key``'s slot now (a ``{hash tag}`` in it counts)."""
        slot = self.keyslot(key)
        entry = _serving(self.view(), slot)
        if entry is None:
            raise RuntimeError(f"no primary serves slot {slot} (key {key!r})")
        return self._by_id(entry["id"])

    def command_for_key(self, key, *args, timeout=5.0):
        """Run ``args`` (the whole command: ``"SET", key, value``) on the primary that serves
        ``key``; a MOVED reply (the slot changed hands meanwhile) is followed, twice at most."""
        node = self.node_for_key(key)
        for _ in range(3):
            try:
                return node.command(*args, timeout=timeout)
            except RedisError as exc:
                if not str(exc).startswith("MOVED "):
                    raise
                port = int(str(exc).rpartition(":")[2])
                node = next((n for n in self.nodes if n.port == port), None)
                if node is None:
                    raise
        raise RedisError(f"still MOVED after 3 tries: {args[:1]} {key!r}")

    def all_keys(self, pattern="*") -> list:
        """Every key matching ``pattern`` (SCAN over every primary), sorted."""
        keys = set()
        for node in self.primaries():
            cursor = b"0"
            for _ in range(100_000):
                cursor, batch = node.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                keys.update(batch)
                if cursor == b"0":
                    break
        return sorted(keys)

    # -- waiting -----------------------------------------------------------------------------
    def _problem(self):
        """None when the cluster is ok, else what is wrong, naming the node."""
        live = self._live()
        if not live:
            return "no node is running"
        topology = None
        for node in live:
            who = f"{node.name} ({REDIS_HOST}:{node.port}, pid {node.pid})"
            try:
                info = parse_info(node.command("CLUSTER", "INFO", timeout=1.0))
                view = self._note(_parse_cluster_nodes(node.command("CLUSTER", "NODES", timeout=1.0)))
                me = next((e for e in view if "myself" in e["flags"]), {"flags": set()})
                link = node.info("replication", timeout=1.0).get("master_link_status")
            except (OSError, RedisError) as exc:
                return f"{who} did not answer: {exc!r}"
            said = ", ".join(f"{k}:{info.get(k)}" for k in (
                "cluster_state", "cluster_slots_assigned", "cluster_slots_ok", "cluster_known_nodes"))
            if (info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(CLUSTER_SLOTS)
                    or info.get("cluster_known_nodes") != str(len(self.nodes))):
                return f"{who} says {said}"
            mine = sorted((e["id"], "master" in e["flags"], e["master"] or "", tuple(e["slots"]))
                          for e in view)
            if topology is None:
                topology, first = mine, who
            elif mine != topology:
                return f"{who} and {first} do not agree yet on the roles and slots"
            if "slave" in me["flags"] and link != "up":
                return f"{who}, a replica, says master_link_status:{link}"
            for entry in view:
                if "master" in entry["flags"] and entry["slots"]:
                    owner = self._by_id(entry["id"])
                    if not owner.running or owner.paused:
                        return (f"{who} says {owner.name} serves slots {entry['slots']}, but it is "
                                f"{'paused' if owner.paused else 'not running'}")
                    if entry["flags"] & {"fail", "fail?"}:
                        flags = ",".join(sorted(entry["flags"]))
                        return f"{who} says {owner.name}, serving slots, is {flags}"
        return None

    def _wait(self, deadline, what):
        started = time.monotonic()
        while True:
            problem = self._problem()
            if problem is None:
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the Redis Cluster did not {what} in "
                                   f"{time.monotonic() - started:.1f} s: {problem}")
            time.sleep(0.1)

    def wait_ok(self, timeout=20.0) -> float:
        """Wait until every running, unpaused node says cluster_state:ok and knows every node,
        they agree on roles and slots, every slot is served by a running, unpaused primary
        and every running replica's link is up; returns the seconds waited."""
        return self._wait(time.monotonic() + timeout, "become ok")

    def wait_failover(self, old_primary, timeout=15.0):
        """Wait until every running, unpaused node says the slots ``old_primary`` served are
        served by another node (its promoted replica), running and unflagged; returns it."""
        slots = self._slots_seen.get(old_primary.node_id)
        if not slots:
            raise ValueError(f"{old_primary.name} was never seen serving slots")
        slot = slots[0][0]
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        last = "nothing yet"
        while True:
            owners = set()
            for node in self._live():
                try:
                    view = self._note(_parse_cluster_nodes(node.command("CLUSTER", "NODES", timeout=1.0)))
                except (OSError, RedisError) as exc:
                    last = f"{node.name} did not answer: {exc!r}"
                    owners.add(None)
                    continue
                entry = _serving(view, slot)
                if entry is None:
                    last = f"{node.name} says no node serves slot {slot}"
                    owners.add(None)
                elif entry["id"] == old_primary.node_id or entry["flags"] & {"fail", "fail?"}:
                    last = (f"{node.name} says slot {slot} is served by {self._by_id(entry['id']).name}"
                            f" ({','.join(sorted(entry['flags']))})")
                    owners.add(None)
                else:
                    owners.add(entry["id"])
            if len(owners) > 1 and None not in owners:
                last = f"the nodes do not agree yet on who serves slot {slot}"
            elif len(owners) == 1 and None not in owners:
                new = self._by_id(owners.pop())
                if new.running and not new.paused:
                    return new
                last = f"{new.name}, promoted, is {'paused' if new.paused else 'not running'}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no replica of {old_primary.name} was promoted in "
                                   f"{time.monotonic() - started:.1f} s: {last}")
            time.sleep(0.1)

    # -- the end -----------------------------------------------------------------------------
    def stop(self, timeout=5.0):
        """SIGTERM to every node at once, a bounded wait, SIGKILL to the rest; then the
        directory is removed if it was made here."""
        for node in self.nodes:
            node._drop_connection()
            if node.running:
                node._signal(signal.SIGCONT)
                node._signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.running:
                try:
                    node.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            node.kill()
        _LIVE_CLUSTERS.discard(self)
        if self._own_directory and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
