"""Interop with baresip 1.0 (Debian package baresip-core), a real softphone.

baresip runs headless: a config directory of its own (``-f``) that loads only
stdio (its console on a pipe), menu (the commands) and account (the accounts
file); no audio or video module, so it never opens a sound device.  Its SIP
sockets are bound to 127.0.0.1 on a kernel-chosen port.  ``-s`` prints every
SIP message it sends and receives, kept in a log for the assertion messages.

The account is the AOR ``sip:alice@127.0.0.1:PORT`` with the registrar's
port, as a phone configured with "127.0.0.1:PORT" writes it: baresip sends the
REGISTER to that host and port and puts the port into To.  The admin API is
then asked for ``sip:alice@127.0.0.1``, without the port.

baresip 1.0 quirks, seen on the wire: the Contact user is ``alice-0x<address
of its UA object>``, with ``;expires=N`` on the Contact and no Expires header;
``regint=60`` asks 60 s (the registrar's Min-Expires); it refreshes at
``rwait`` percent of the granted time (default 90 %, here 5 %: every 3 s, so
that the test sees a refresh without waiting 54 s), with the same Call-ID and
CSeq + 1.  There is no command to re-register in 1.0 (``/uareg`` came later):
``/quit`` unregisters (Contact ``;expires=0``) and waits for the 200 before
it exits.  For digest it answers MD5 challenges only, and it refuses a 401
that offers any other algorithm ("Function not implemented"), even with an
MD5 challenge next to it.
"""
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import require_client
from interop import USERS, assert_gone, assert_refreshed, fetch, fetch_one, serve

pytestmark = pytest.mark.server
MODULE_PATH = "/usr/lib/baresip/modules"


@pytest.fixture
def baresip():
    return require_client("baresip", "baresip-core")


class Baresip:
    """baresip in its own process group, commands on its standard input,
    everything it prints (with the SIP trace) in ``log_path``."""

    def __init__(self, exe, tmp_path, account, config=""):
        """``config``: lines added to baresip's config file (e.g. ``sip_cafile``)."""
        conf = tmp_path / "baresip"
        conf.mkdir()
        home = tmp_path / "home"
        home.mkdir()
        (conf / "config").write_text(
            f"module_path\t{MODULE_PATH}\n"
            "sip_listen\t127.0.0.1:0\n"
            "module\t\tstdio.so\n"
            "module\t\tmenu.so\n"
            "module\t\taccount.so\n" + config)
        (conf / "accounts").write_text(account + "\n")
        self.log_path = tmp_path / "baresip.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, HOME=str(home))
        self.proc = subprocess.Popen([exe, "-s", "-f", str(conf)], stdin=subprocess.PIPE,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(tmp_path), start_new_session=True)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def command(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, what, timeout=15.0):
        """Wait (bounded) until the log matches the regular expression ``what``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(what, self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"baresip: no {what!r} within {timeout} s "
                             f"(exit {self.proc.poll()})\n{self.log()[-6000:]}")

    def quit(self, timeout=15.0) -> int:
        """``/quit``: baresip unregisters, waits for the reply, and exits."""
        self.command("/quit")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"baresip did not exit within {timeout} s of /quit\n"
                                 f"{self.log()[-6000:]}") from None

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self._log.close()


def wait_binding(srv, pred, timeout=15.0):
    """Poll the admin API (bounded) for sip:alice@127.0.0.1 until ``pred(bindings)``."""
    deadline = time.monotonic() + timeout
    while True:
        found = fetch(srv, "alice")
        if pred(found) or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def header(head, name):
    """The value of header ``name`` in a message head (first one), or None."""
    m = re.search(rf"^{name}: *(.*?)\r?$", head, re.M | re.I)
    return m and m[1]


def registers(log, port):
    """The REGISTERs of the SIP trace that went to the registrar's port: [(to, contact, cseq)]."""
    out = []
    for block in log.split("REGISTER sip:127.0.0.1:%d" % port)[1:]:
        head = block.split("\r\n\r\n")[0].split("\n\n")[0]
        out.append((header(head, "To"), header(head, "Contact"), header(head, "CSeq")))
    return out


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_baresip_register_fetch_refresh_unregister(baresip, start, tmp_path, transport, auth):
    srv = serve(start, tmp_path, auth)
    host, port = srv.udp if transport == "udp" else srv.tcp
    account = f"<sip:alice@{host}:{port};transport={transport}>;regint=60;rwait=5"
    if auth:
        account += f";auth_pass={USERS['alice']}"
    phone = Baresip(baresip, tmp_path, account)
    try:
        # register: baresip reports the 200 itself ...
        phone.wait_for(r"All 1 useragent registered successfully")
        # ... and the server finds the binding by user@host, without the port
        first = fetch_one(srv, "alice")
        assert first["transport"] == transport
        assert first["user_agent"].startswith("baresip v1.0")
        m = re.match(r"sip:alice-0x[0-9a-f]+@127\.0\.0\.1:(\d+)(;transport=tcp)?$", first["contact"])
        assert m, first["contact"]
        assert bool(m.group(2)) == (transport == "tcp")
        if transport == "udp":      # UDP: sent from the port of its Contact
            assert first["source"] == ["127.0.0.1", int(m.group(1))]
        else:                       # TCP: from the connection's port; the server keeps it
            assert first["source"][0] == "127.0.0.1" and first["conn_id"] >= 0
        assert 45 <= first["expires"] <= 60     # (60 asked; a loaded machine lags)
        sent = registers(phone.log(), port)
        assert sent and sent[0][0] == f"<sip:alice@127.0.0.1:{port}>", sent   # the port is in To

        # refresh: the same binding, same Call-ID, a higher CSeq, a new expiry
        found = wait_binding(srv, lambda b: len(b) != 1 or b[0]["cseq"] != first["cseq"])
        assert len(found) == 1, found
        second = found[0]
        assert_refreshed(first, second)
        assert second["call_id"] == first["call_id"] and second["cseq"] > first["cseq"]

        # unregister: /quit sends Contact ;expires=0 and waits for the 200
        assert phone.quit() == 0
        assert_gone(srv, "alice")
        last = registers(phone.log(), port)[-1]
        assert last[1].endswith(";expires=0"), last
    finally:
        phone.kill()

    m = srv.metrics()
    assert m['fastsip_replies_total{code="200"}'] >= 3
    assert m['fastsip_received_total{transport="%s"}' % transport] >= 3
    if auth:
        assert m['fastsip_replies_total{code="401"}'] >= 1
    else:
        assert m.get('fastsip_replies_total{code="401"}', 0) == 0
