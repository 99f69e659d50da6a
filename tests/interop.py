"""Shared pieces of the interop tests (tests/test_interop_*.py): a real client
against ``fastsip serve``, on the server's defaults, over UDP and TCP, with and
without digest.  The client's presence is checked by ``require_client`` in
tests/conftest.py (a failure under CI, a skip elsewhere).
"""
from __future__ import annotations

import hashlib
import os
import select
import subprocess
import time
import urllib.parse

REALM = "127.0.0.1"
USERS = {"alice": "wonderland-7", "bob": "builder-42"}
HERE = os.path.dirname(os.path.abspath(__file__))


def write_htdigest(path, realm=REALM, users=USERS):
    """A plain Apache htdigest file (``user:realm:md5(user:realm:password)``), MD5 only."""
    lines = [f"{u}:{realm}:{hashlib.md5(f'{u}:{realm}:{p}'.encode()).hexdigest()}"
             for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def serve(start, tmp_path, auth: bool):
    """``fastsip serve`` on its defaults; with ``auth`` only ``--realm`` and ``--users``."""
    if not auth:
        return start()
    return start("--realm", REALM, "--users", str(write_htdigest(tmp_path / "users.htdigest")))


def serve_tls(start, tmp_path, auth: bool = False):
    """``fastsip serve`` on its defaults plus only the TLS flags (``--tls-cert``,
    ``--tls-key``: a server certificate for 127.0.0.1, ::1 and localhost from a test
    CA), listening on UDP, TCP, TLS, WS and WSS; with ``auth`` also ``--realm`` and
    ``--users``.  Returns the server and the test PKI (make_test_pki: ``pki["ca"]``
    is the CA file the clients are given)."""
    from fastsip.server.testing import make_test_pki
    folder = tmp_path / "pki"
    folder.mkdir()
    pki = make_test_pki(folder)
    args = ["--tls-cert", pki["cert"], "--tls-key", pki["key"]]
    if auth:
        args += ["--realm", REALM, "--users", str(write_htdigest(tmp_path / "users.htdigest"))]
    return start(*args, transports=("udp", "tcp", "tls", "ws", "wss")), pki


def fetch(srv, user, host=REALM):
    """The bindings the admin API finds for ``sip:user@host``, the AOR WITHOUT a port
    (what a caller looks up), whatever port the client wrote into To."""
    aor = f"sip:{user}@{host}"
    return srv.api("/api/aor?aor=" + urllib.parse.quote(aor, safe=""))["bindings"]


def fetch_one(srv, user, host=REALM):
    """The one binding of ``sip:user@host``; the assertion message shows what the
    server did store when the lookup by user@host finds nothing."""
    found = fetch(srv, user, host)
    assert len(found) == 1, (
        f"GET /api/aor?aor=sip:{user}@{host} found {len(found)} binding(s); "
        f"every binding: {[(b['aor'], b['contact']) for b in srv.api('/api/bindings')['bindings']]}")
    return found[0]


def assert_gone(srv, user, host=REALM):
    assert fetch(srv, user, host) == []
    assert srv.api("/api/bindings")["bindings"] == []
    assert srv.metrics()["fastsip_bindings"] == 0


def wait_gone(srv, user, timeout=10.0, host=REALM):
    """Poll the admin API (bounded) until sip:user@host has no binding left, then
    assert that no binding of any AOR is left (assert_gone)."""
    deadline = time.monotonic() + timeout
    while fetch(srv, user, host) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_gone(srv, user, host)


def assert_refreshed(before, after):
    """The second REGISTER of the same contact updated the one binding: a newer
    request (Call-ID or CSeq) and a new expiry time."""
    assert after["contact"] == before["contact"]
    assert (after["call_id"], after["cseq"]) != (before["call_id"], before["cseq"])
    assert after["expires_at"] != before["expires_at"]


class LineClient:
    """A client driver in a subprocess (tests/netsip/register.pl, tests/pjsua2/register.py):
    one command a line on its standard input, one answer line
    ``done|fail CODE EXPIRES CONTACTS`` on its standard output.  Every answer is
    awaited at most ``timeout`` seconds; the process is killed at the end."""

    def __init__(self, cmd, log_path, env=None, timeout=20.0):
        self.cmd = cmd
        self.timeout = timeout
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, start_new_session=True)
        self.other = []         # lines that are no answers (a library's start-up chatter)

    def ask(self, command):
        """Send one command; returns (status, code, expires, contacts)."""
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode(errors="replace").split(" ", 3)
                if words[0] in ("done", "fail") and len(words) == 4:
                    assert not buf, buf
                    return words[0], words[1], words[2], words[3]
                self.other.append(line)
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"{self.cmd[0]} ended (exit {self.proc.wait(5)}) on "
                                     f"{command!r}\n{self.log()}")
            buf += chunk
        raise AssertionError(f"no answer to {command!r} in {self.timeout} s\n{self.log()}")

    def log(self):
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()[-4000:].decode(errors="replace")

    def close(self):
        """End of input, then a bounded wait; the exit status (killed: negative)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            return self.proc.wait(5)
        finally:
            self.proc.stdout.close()
            self._log.close()

    def kill(self):
        """SIGKILL to the client's process group: its connections are closed by the
        kernel, with no unregister or goodbye first.  The exit status (-9)."""
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(5)
        finally:
            self.proc.stdin.close()
            self.proc.stdout.close()
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.close()
