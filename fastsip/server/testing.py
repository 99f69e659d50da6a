"""Helpers for end-to-end tests of ``fastsip serve`` (used by tests/test_server*.py).

``ServerProcess`` runs the real server as a subprocess on 127.0.0.1 with
kernel-chosen ports, reads the ports from its start line, and always kills
its whole process group at the end.  ``register``/``options`` build plain
SIP requests as a phone would send them; ``Phone`` sends them over UDP or
TCP and waits (bounded) for the reply.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
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
