"""Interop with linphone 5.1 (Debian package linphone-cli), a real softphone.

Driven headless through ``linphone-daemon --pipe NAME``: commands on the unix
socket /tmp/NAME (a unique name per run), a ``linphonerc`` of its own
(``--config``) in tmp_path with the account, its password and SIP sockets on
127.0.0.1 at kernel-chosen ports; no sound card is opened while no call is
made.  The SIP trace is in the ``--log`` file, kept for assertion messages.

The account: identity ``sip:alice@127.0.0.1:PORT`` and proxy
``<sip:127.0.0.1:PORT;transport=udp|tcp>`` (the registrar's port), expires
60 s (the registrar's Min-Expires).  The admin API is asked for
``sip:alice@127.0.0.1``, without the port.

linphone 5.1 quirks, seen on the wire and in its code:
- Without the directory ``$HOME/.local/share/linphone`` the core cannot open its
  database and ``linphone_core_start`` gives up half-way, silently: it never
  listens, never checks the network, and every REGISTER fails with "No
  listening point".  The test creates the directory in the temporary HOME.
- It drops the port of the identity from To and From (``To: sip:alice@127.0.0.1``);
  the port only reaches the Request-URI.  It sends an ``Expires`` header, a
  Contact with ``;transport=udp|tcp`` and ``+sip.instance`` but no ``reg-id``;
  linphone-daemon sets no User-Agent of its own: it sends ``User-Agent: Unknown``.
- It answers the first digest challenge it can (MD5 or SHA-256).
- It refreshes at 90 % of the granted time, and no command of the daemon (or
  of linphonec) makes it re-register sooner without a new Call-ID.  With
  expires 60 that is 54 s, so the four runs (UDP/TCP x open/digest) start
  together in one module fixture and each test then waits for its own refresh:
  about a minute for all four.
- ``unregister ALL`` removes the account, which sends the REGISTER with
  ``Expires: 0`` and the same Call-ID.
"""
import os
import re
import signal
import socket
import subprocess
import time
import uuid

import pytest

from conftest import require_client
from interop import REALM, USERS, assert_gone, assert_refreshed, fetch, write_htdigest

pytestmark = pytest.mark.server
RUNS = [("udp", False), ("tcp", False), ("udp", True), ("tcp", True)]
REFRESH_WAIT = 75.0         # refresh due 54 s after the first 200; the bound on the wait


def rc_text(host, port, transport, password):
    text = (
        "[sip]\n"
        "bind_address=127.0.0.1\n"
        "sip_port=-1\n"             # -1: a random port
        "sip_tcp_port=-1\n"
        "sip_tls_port=0\n"          # 0: off
        "ipv6=0\n"
        "default_proxy=0\n"
        "\n[proxy_0]\n"
        f"reg_proxy=<sip:{host}:{port};transport={transport}>\n"
        f"reg_identity=sip:alice@{host}:{port}\n"
        "reg_expires=60\n"
        "reg_sendregister=1\n"
        "publish=0\n")
    if password:
        text += f"\n[auth_info_0]\nusername=alice\npasswd={password}\nrealm={REALM}\n"
    return text


class LinphoneDaemon:
    """linphone-daemon in its own process group, commands over its unix socket."""

    def __init__(self, exe, directory, rc):
        directory.mkdir()
        home = directory / "home"
        (home / ".local" / "share" / "linphone").mkdir(parents=True)
        (directory / "linphonerc").write_text(rc)
        self.log_path = directory / "linphone.log"
        self.out_path = directory / "linphone.out"
        self.pipe = f"fastsip-linphone-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._out = open(self.out_path, "wb")
        env = dict(os.environ, HOME=str(home))
        self.proc = subprocess.Popen(
            [exe, "--config", str(directory / "linphonerc"), "--log", str(self.log_path),
             "--pipe", self.pipe],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, env=env,
            cwd=str(directory), start_new_session=True)
        self.sock = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _connect(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        path = "/tmp/" + self.pipe
        while time.monotonic() < deadline and self.proc.poll() is None:
            if os.path.exists(path):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    s.settimeout(10)
                    self.sock = s
                    return
                except OSError:
                    s.close()
            time.sleep(0.05)
        raise AssertionError(f"linphone-daemon socket {path} did not appear "
                             f"(exit {self.proc.poll()})\n{self.out_path.read_text(errors='replace')}")

    def ask(self, command) -> str:
        """One command, its answer (``Status: Ok`` ...) as text."""
        if self.sock is None:
            self._connect()
        self.sock.sendall(command.encode() + b"\n")
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"Status:" in data and (data.endswith(b"\n") or data.endswith(b"\0")):
                break
        return data.decode(errors="replace")

    def state(self) -> str:
        m = re.search(r"State: (\w+)", self.ask("register-status ALL"))
        return m.group(1) if m else ""

    def stop(self):
        try:
            if self.sock is not None and self.proc.poll() is None:
                self.sock.sendall(b"quit\n")
                self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        if self.sock is not None:
            self.sock.close()
        self._out.close()
        try:
            os.unlink("/tmp/" + self.pipe)
        except OSError:
            pass


def sip_trace(log):
    """The SIP messages of the log, without the library chatter."""
    return "\n".join(line for line in log.splitlines()
                     if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d:\d+ ", line))


def header(head, name):
    """The value of header ``name`` in a message head (first one), or None."""
    m = re.search(rf"^{name}: *(.*?)\r?$", head, re.M | re.I)
    return m and m[1]


def registers(log, port):
    """The REGISTERs in the trace: [(to, expires, call_id, cseq)]."""
    out = []
    for block in log.split("REGISTER sip:127.0.0.1:%d" % port)[1:]:
        head = re.split(r"\n\s*\n", block, maxsplit=1)[0]
        out.append(tuple(header(head, name) for name in ("To", "Expires", "Call-ID", "CSeq")))
    return out


class Run:
    """One (server, linphone) pair of the matrix."""

    def __init__(self, exe, root, transport, auth):
        from fastsip.server.testing import ServerProcess
        self.transport, self.auth = transport, auth
        self.dir = root / f"{transport}-{'digest' if auth else 'open'}"
        self.dir.mkdir()
        args = []
        if auth:
            args = ["--realm", REALM, "--users", str(write_htdigest(self.dir / "users.htdigest"))]
        self.srv = ServerProcess(*args, workers=2, state=self.dir / "state.sqlite3",
                                 cwd=str(self.dir))
        self.srv.start()
        self.host, self.port = self.srv.udp if transport == "udp" else self.srv.tcp
        self.phone = LinphoneDaemon(exe, self.dir / "linphone",
                                    rc_text(self.host, self.port, transport,
                                            USERS["alice"] if auth else None))
        self.started = time.monotonic()
        self.state = self.first = None

    def settle(self, timeout=15.0):
        """Wait (bounded) for the first registration; keep linphone's state and the
        bindings found for sip:alice@127.0.0.1 right then (asserted by the test)."""
        deadline = time.monotonic() + timeout
        while True:
            self.state = self.phone.state()
            if self.state == "LinphoneRegistrationOk" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.first = fetch(self.srv, "alice")

    def close(self):
        self.phone.stop()
        self.srv.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All four runs start at once: each waits 54 s for linphone's own refresh."""
    exe = require_client("linphone-daemon", "linphone-cli")
    root = tmp_path_factory.mktemp("linphone")
    started = {}
    try:
        for transport, auth in RUNS:
            started[(transport, auth)] = Run(exe, root, transport, auth)
        for run in started.values():
            run.settle()
        yield started
    finally:
        for run in started.values():
            run.close()


@pytest.mark.parametrize("transport,auth", RUNS,
                         ids=[f"{t}-{'digest' if a else 'open'}" for t, a in RUNS])
def test_linphone_register_fetch_refresh_unregister(runs, transport, auth):
    run = runs[(transport, auth)]
    srv, phone, port = run.srv, run.phone, run.port

    # register: linphone reported LinphoneRegistrationOk ...
    assert run.state == "LinphoneRegistrationOk", sip_trace(phone.log())[-6000:]
    # ... and right then the server found the binding by user@host, without the port
    assert len(run.first) == 1, (run.first, srv.api("/api/bindings")["bindings"])
    first = run.first[0]
    assert first["transport"] == transport
    ua = re.search(r"^User-Agent: *(.*?)\r?$", phone.log(), re.M)
    assert ua and first["user_agent"] == ua.group(1)     # the daemon's is "Unknown"
    m = re.match(r"sip:alice@127\.0\.0\.1:(\d+);transport=(udp|tcp)$", first["contact"])
    assert m and m.group(2) == transport, first["contact"]
    if transport == "udp":
        assert first["source"] == ["127.0.0.1", int(m.group(1))]
    else:
        assert first["source"][0] == "127.0.0.1" and first["conn_id"] >= 0
    assert first["instance"] and first["instance"].startswith("<urn:uuid:")
    assert 45 <= first["expires"] <= 60     # (60 asked; a loaded machine lags)
    sent = registers(phone.log(), port)
    assert sent and sent[0][1] == "60", sent

    # refresh: linphone's own timer, 54 s after the 200: same Call-ID, higher CSeq
    deadline = run.started + REFRESH_WAIT
    while True:
        found = fetch(srv, "alice")
        if len(found) != 1 or found[0]["cseq"] != first["cseq"] or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(found) == 1, found
    second = found[0]
    assert_refreshed(first, second)
    assert second["call_id"] == first["call_id"] and second["cseq"] > first["cseq"]
    assert second["expires_at"] - first["expires_at"] >= 45     # refreshed at about 54 s

    # unregister: the account removed, REGISTER with Expires: 0
    assert "Status: Ok" in phone.ask("unregister ALL")
    deadline = time.monotonic() + 10
    while fetch(srv, "alice") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_gone(srv, "alice")
    last = registers(phone.log(), port)[-1]
    assert last[1] == "0" and last[2] == first["call_id"], last

    m = srv.metrics()
    assert m['fastsip_replies_total{code="200"}'] >= 3
    if auth:
        assert m['fastsip_replies_total{code="401"}'] >= 1
    else:
        assert m.get('fastsip_replies_total{code="401"}', 0) == 0
