"""The HTTP endpoint of ``fastsip serve`` under attack (issue #14): slow and many
clients, requests too large.

Real servers in subprocesses, real sockets on 127.0.0.1 (and other loopback
addresses as other sources); every wait is bounded.
"""
import os
import select
import socket
import threading
import time

import pytest

from fastsip.server.admin import MAX_BODY, MAX_CLIENTS, MAX_HEAD, MAX_PER_SOURCE, REQUEST_DEADLINE

pytestmark = pytest.mark.server
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, timeout=10.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


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
