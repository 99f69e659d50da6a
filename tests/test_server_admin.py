"""The HTTP endpoint of ``fastsip serve`` under attack (issue #14): cross-site
requests, an endpoint beyond loopback, the admin token, slow and many clients.

Real servers in subprocesses, real sockets on 127.0.0.1 (and other loopback
addresses as other sources); every wait is bounded.
"""
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error

import pytest

from fastsip.server.admin import MAX_BODY, MAX_CLIENTS, MAX_HEAD, MAX_PER_SOURCE, REQUEST_DEADLINE
from fastsip.server.testing import register, wait_for

pytestmark = pytest.mark.server
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=30):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastsip.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def raw(addr, request: bytes, timeout=5.0, source=None):
    """Send ``request`` as it is; (status, headers text, body) of the answer."""
    s = socket.create_connection(addr, timeout=timeout,
                                 source_address=(source, 0) if source else None)
    try:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:    # closed with the rest of a refused request unread
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else None
    return status, head.decode("latin-1"), body


def http_request(method, target, headers=(), body=b"", host="127.0.0.1"):
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers,
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


def register_two(srv, phone):
    ua = phone(srv.udp)
    for port in (5071, 5072):
        ua.ask(register("alice", contact=f"sip:alice@127.0.0.1:{port}", call_id=f"secret-{port}",
                        expires=600))
    assert srv.metrics()["fastsip_bindings"] == 2


def token_file(tmp_path, name="token", token="s3cret-token-0123456789abcdef"):
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path), token


# ----------------------------------------------------------------------------- cross-site

def test_cross_site_requests_are_refused_and_the_bindings_stay(start, phone):
    """What a web page in the operator's browser can send: a form POST (text/plain or
    form-urlencoded, with an Origin header), a fetch with an Origin, a page whose name
    was rebound to 127.0.0.1 (a foreign Host): all 403, and nothing is removed."""
    srv = start(state=None)
    register_two(srv, phone)
    target = "/api/remove?aor=sip:alice@example.com"
    evil = "Origin: http://evil.example"
    attacks = [
        http_request("POST", target, [evil, "Content-Type: text/plain"], b"x=1"),
        http_request("POST", target, ["Content-Type: text/plain"], b"x=1"),
        http_request("POST", target, ["Content-Type: application/x-www-form-urlencoded"], b"x=1"),
        http_request("POST", target, ["Content-Type: multipart/form-data; boundary=b"], b"--b--"),
        http_request("POST", target, []),
        http_request("POST", target, [evil, "Content-Type: application/json"], b"{}"),
        http_request("POST", target, ["Origin: null", "Content-Type: application/json"], b"{}"),
        http_request("POST", target, ["Content-Type: application/json"], b"{}",
                     host="evil.example:9060"),                             # DNS rebinding
        http_request("GET", "/api/bindings", [evil]),
        http_request("GET", "/api/bindings", [], host="evil.example"),
    ]
    for attack in attacks:
        status, _, body = raw(srv.metrics_addr, attack)
        assert status == 403, (attack, status, body)
        assert json.loads(body)["error"]
    assert srv.metrics()["fastsip_bindings"] == 2
    assert len(srv.api("/api/bindings")["bindings"]) == 2
    # what fastsip remove sends: a JSON POST, no Origin, an IP address as Host
    status, _, body = raw(srv.metrics_addr, http_request(
        "POST", "/api/remove", ["Content-Type: application/json; charset=utf-8"],
        json.dumps({"aor": "sip:alice@example.com", "contact": "sip:alice@127.0.0.1:5071"})
        .encode()))
    assert status == 200 and json.loads(body)["removed"] == 1
    status, _, _ = raw(srv.metrics_addr, http_request("GET", "/api/bindings", [], host="localhost"))
    assert status == 200
    # a JSON body of something else than strings is refused, not half-understood
    status, _, _ = raw(srv.metrics_addr, http_request(
        "POST", "/api/remove", ["Content-Type: application/json"], b'{"aor": 5}'))
    assert status == 400
    assert srv.metrics()["fastsip_bindings"] == 1
    # /metrics stays open, whoever asks
    status, _, body = raw(srv.metrics_addr, http_request("GET", "/metrics", [evil],
                                                         host="evil.example"))
    assert status == 200 and b"fastsip_bindings 1" in body


def test_metrics_holds_no_per_binding_data(start, phone):
    srv = start(state=None)
    register_two(srv, phone)
    text = srv.http("/metrics").decode()
    for private in ("secret-5071", "alice", "5071", "127.0.0.1"):
        assert private not in text


# ----------------------------------------------------------------------------- beyond loopback

def test_beyond_loopback_the_admin_api_is_off_without_a_token(start, phone):
    """--metrics 0.0.0.0: the start line warns; /metrics answers, the admin API says it
    is off (also to a client on 127.0.0.1: the rule is about the listen address)."""
    srv = start("--metrics", "0.0.0.0:0", state=None)
    assert ("/metrics (WARNING: beyond loopback: /metrics open to the network, admin API off "
            "without --admin-token-file); ") in srv.start_line, srv.start_line
    assert wait_for(lambda: re.search(r"WARNING fastsip\[supervisor\]: fastsip serve: listening "
                                      r"on .*admin API off", srv.log()), 5), srv.log()
    register_two(srv, phone)
    for request in (http_request("GET", "/api/bindings"),
                    http_request("GET", "/api/workers"),
                    http_request("POST", "/api/remove", ["Content-Type: application/json"],
                                 b'{"aor": "sip:alice@example.com"}')):
        status, _, body = raw(srv.metrics_addr, request)
        assert status == 403
        assert "the admin API is off" in json.loads(body)["error"]
        assert "--admin-token-file" in json.loads(body)["error"]
    assert srv.metrics()["fastsip_bindings"] == 2
    out = cli("show", "alice@example.com", "--metrics", "%s:%d" % srv.metrics_addr)
    assert out.returncode == 2 and "the admin API is off" in out.stderr
    assert out.stderr.count("\n") == 1


def test_beyond_loopback_with_a_token_every_admin_request_needs_it(start, phone, tmp_path):
    path, token = token_file(tmp_path)
    srv = start("--metrics", "0.0.0.0:0", "--admin-token-file", path, state=None)
    assert "admin API on with the --admin-token-file token)" in srv.start_line
    register_two(srv, phone)
    remove = ["Content-Type: application/json"], b'{"aor": "sip:alice@example.com"}'
    for auth in ([], ["Authorization: Bearer wrong-token-0123456789"],
                 [f"Authorization: Bearer {token}x"], [f"Authorization: Bearer {token[:-1]}"],
                 [f"Authorization: Basic {token}"], ["Authorization: Bearer"]):
        for request in (http_request("GET", "/api/bindings", auth),
                        http_request("POST", "/api/remove", auth + remove[0], remove[1])):
            status, head, _ = raw(srv.metrics_addr, request)
            assert status == 401, (auth, head)
            assert 'WWW-Authenticate: Bearer realm="fastsip"' in head
    assert srv.metrics()["fastsip_bindings"] == 2
    ok = [f"Authorization: Bearer {token}"]
    status, _, body = raw(srv.metrics_addr, http_request("GET", "/api/bindings", ok,
                                                         host="registrar.example"))
    assert status == 200 and len(json.loads(body)["bindings"]) == 2
    # the token does not lift the cross-site rules
    status, _, _ = raw(srv.metrics_addr, http_request(
        "POST", "/api/remove", ok + ["Origin: http://evil.example"] + remove[0], remove[1]))
    assert status == 403
    status, _, _ = raw(srv.metrics_addr, http_request(
        "POST", "/api/remove", ok + ["Content-Type: text/plain"], remove[1]))
    assert status == 403
    assert srv.metrics()["fastsip_bindings"] == 2
    # fastsip show/bindings/remove: with the token file, or the server's config file
    ep = "%s:%d" % srv.metrics_addr
    out = cli("show", "alice@example.com", "--metrics", ep)
    assert out.returncode == 2 and "needs the server's token" in out.stderr
    out = cli("show", "alice@example.com", "--metrics", ep, "--admin-token-file", path)
    assert out.returncode == 0 and "2 binding(s)" in out.stdout, out.stderr
    conf = tmp_path / "fastsip.toml"
    conf.write_text(f'metrics = "0.0.0.0:{srv.metrics_addr[1]}"\nadmin-token-file = "{path}"\n')
    out = cli("bindings", "--config", str(conf))
    assert out.returncode == 0 and "2 binding(s) of 1 AOR(s)" in out.stdout, out.stderr
    out = cli("remove", "alice@example.com", "<sip:alice@127.0.0.1:5071>", "--config", str(conf))
    assert out.returncode == 0 and "removed 1 binding" in out.stdout, out.stderr
    assert srv.metrics()["fastsip_bindings"] == 1
    # SIGHUP re-reads the token file: the old token is refused, the new one accepted
    new = "another-token-9876543210fedcba"
    (tmp_path / "token").write_text(new)
    srv.signal(signal.SIGHUP)
    srv.token = new
    assert wait_for(lambda: _status(srv) == 200, 5)
    srv.token = token
    assert _status(srv) == 401


def _status(srv):
    try:
        srv.http("/api/workers")
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_token_on_loopback_is_required_too(start, tmp_path):
    path, token = token_file(tmp_path)
    srv = start("--admin-token-file", path, state=None)
    assert "/metrics (admin API with the --admin-token-file token); " in srv.start_line
    assert _status(srv) == 401
    srv.token = token
    assert _status(srv) == 200
    out = cli("bindings", "--metrics", "%s:%d" % srv.metrics_addr, "--admin-token-file", path)
    assert out.returncode == 0 and "0 binding(s)" in out.stdout, out.stderr


@pytest.mark.parametrize("content, why", [
    ("", "the file is empty"),
    ("short", "shorter than 16 characters"),
    ("two words-0123456789abcdef", "one word of printable ASCII"),
    (None, "No such file or directory"),
])
def test_an_unusable_token_file_stops_the_start(tmp_path, content, why):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    out = cli("serve", "--no-state", "--workers", "1", "--listen", "udp:127.0.0.1:0",
              "--metrics", "127.0.0.1:0", "--admin-token-file", str(path))
    assert out.returncode == 2
    assert out.stderr.startswith(f"fastsip serve: error: --admin-token-file {path}: ")
    assert why in out.stderr and out.stderr.count("\n") == 1, out.stderr


# ----------------------------------------------------------------------------- slow and many clients

def test_a_slow_client_is_closed_at_its_deadline_while_metrics_answers(start):
    """One byte a second (a timeout per recv would never fire): /metrics answers at
    once meanwhile, and the slow client is closed once REQUEST_DEADLINE has passed."""
    srv = start(workers=1, state=None)
    slow = socket.create_connection(srv.metrics_addr, timeout=5)
    closed_after = []

    def drip():
        t0 = time.monotonic()
        try:
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"y" * 30:
                slow.send(bytes([byte]))
                if select.select([slow], [], [], 1.0)[0]:
                    if not slow.recv(100):
                        break
            else:
                return
        except OSError:
            pass
        closed_after.append(time.monotonic() - t0)
    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        for _ in range(3):
            time.sleep(0.7)
            t0 = time.monotonic()
            assert srv.metrics()["fastsip_workers"] == 1
            assert time.monotonic() - t0 < 2.0
        t.join(REQUEST_DEADLINE + 5)
        assert closed_after, "the slow client was not closed"
        assert REQUEST_DEADLINE - 0.5 <= closed_after[0] <= REQUEST_DEADLINE + 2.5
    finally:
        slow.close()


def _hold(addr, n, source):
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=5, source_address=(source, 0))
        socks.append(s)
    return socks


def _answered_at_once(socks, wait=0.5):
    """How many of ``socks`` got an answer (503) within ``wait`` seconds: the others are held."""
    deadline = time.monotonic() + wait
    answered = set()
    while time.monotonic() < deadline and len(answered) < len(socks):
        ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.05)
        for s in ready:
            try:
                data = s.recv(200)
            except OSError:
                data = b""
            assert not data or data.startswith(b"HTTP/1.0 503 "), data
            answered.add(s)
    return len(answered)


def test_many_connections_are_bounded(start):
    """Clients that connect and say nothing: at most MAX_PER_SOURCE from one address and
    MAX_CLIENTS in all are held; the next are answered 503 at once; other sources still
    get /metrics while one source is at its cap; when they go, all is answered again."""
    srv = start(workers=1, state=None)
    held = []
    try:
        one = _hold(srv.metrics_addr, MAX_PER_SOURCE + 4, "127.0.0.2")
        held += one
        assert _answered_at_once(one) == 4
        t0 = time.monotonic()
        assert srv.metrics()["fastsip_workers"] == 1           # from 127.0.0.1
        assert time.monotonic() - t0 < 2.0
        for i in range(3, 3 + MAX_CLIENTS // MAX_PER_SOURCE):
            more = _hold(srv.metrics_addr, MAX_PER_SOURCE, f"127.0.0.{i}")
            held += more
        # 32 held in all: 8 from 127.0.0.2, 24 of the 32 others; 8 more were turned away
        assert _answered_at_once(held[len(one):]) == MAX_PER_SOURCE
        status, _, body = raw(srv.metrics_addr, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert status == 503 and body == b"busy\n"
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: raw(srv.metrics_addr, b"GET /metrics HTTP/1.0\r\n\r\n")[0] == 200, 3)


def test_requests_too_large_are_refused(start):
    srv = start(workers=1, state=None)
    status, _, _ = raw(srv.metrics_addr, b"GET /metrics HTTP/1.0\r\nX-Big: "
                       + b"a" * MAX_HEAD + b"\r\n\r\n")
    assert status == 431
    status, _, _ = raw(srv.metrics_addr, b"GET /metrics HTTP/1.0\r\n"
                       + b"X-Many: a\r\n" * 2000 + b"\r\n")
    assert status == 431
    status, _, _ = raw(srv.metrics_addr, http_request(
        "POST", "/api/remove", ["Content-Type: application/json", f"Content-Length: {MAX_BODY + 1}"]
    ).replace(b"Content-Length: 0\r\n", b""))
    assert status == 413
    assert srv.metrics()["fastsip_workers"] == 1
