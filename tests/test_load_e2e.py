"""The load tool against the real server, end to end.

``python -m load`` (a subprocess, ``--json`` report) drives ``fastsip serve``
(a subprocess, two workers, kernel-chosen ports on 127.0.0.1, no state
file) at a low rate, and the tool's report is checked against the server's
own counters (``GET /metrics``) and bindings (the admin API).

What the tool sends, exactly: every new request once (no retransmissions
unless ``--retransmit``), plus, for the scenarios that need registered
phones (``refresh``, ...), one priming REGISTER per phone before the
measured phase (reported under ``prime``), plus, with digest auth, one
answer per challenge (counted in ``sent``, not in ``sent_new``).  So the
server must have counted ``sent_total + prime.sent`` REGISTERs and, code by
code, exactly the replies the report lists (measured + priming).

Each run is bounded by ``--count`` at a few hundred requests per second;
the whole file takes about 15 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

pytestmark = pytest.mark.server
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def serve(start):
    """serve(*flags, transports=("udp",)) -> a running ``fastsip serve`` (2 workers,
    --no-state), its process group killed at the end."""
    return lambda *args, transports=("udp",): start(*args, state=None, transports=transports)


def load(tmp_path, target, *flags, timeout=60):
    """Run ``python -m load`` against ``target``; return (exit status, JSON report)."""
    out = tmp_path / f"load-{time.monotonic_ns()}.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "load", "--target", f"{target[0]}:{target[1]}", "-q",
           "--json", str(out), *flags]
    cp = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                        timeout=timeout)
    assert out.exists(), f"no report from {' '.join(cmd)}: rc {cp.returncode}\n{cp.stderr}"
    return cp.returncode, json.loads(out.read_text())


def counters(srv) -> dict:
    """The server's counters as plain names: ``REGISTER``, ``200``, ``udp``, ... (see below)."""
    m = srv.metrics()
    out = {"requests": {}, "replies": {}, "received": {}, "dropped": 0}
    for key, value in m.items():
        name, _, labels = key.partition("{")
        label = labels.split('"')[1] if labels else None
        if name == "fastsip_requests_total":
            out["requests"][label] = int(value)
        elif name == "fastsip_replies_total":
            out["replies"][label] = int(value)
        elif name == "fastsip_received_total":
            out["received"][label] = int(value)
        elif name == "fastsip_dropped_total":
            out["dropped"] += int(value)
        elif name in ("fastsip_parse_errors_total", "fastsip_internal_errors_total",
                      "fastsip_handoffs_total", "fastsip_bindings", "fastsip_aors",
                      "fastsip_tcp_connections", "fastsip_worker_restarts_total",
                      "fastsip_rate_limited_total"):
            out[name[len("fastsip_"):]] = int(value)
    return out


def settled(srv, expect_requests: int, timeout=5.0) -> dict:
    """The counters once the server has counted ``expect_requests`` REGISTERs (or after
    ``timeout``); then once more, so a late extra count shows too."""
    deadline = time.monotonic() + timeout
    while True:
        c = counters(srv)
        if c["requests"].get("REGISTER", 0) >= expect_requests or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    return counters(srv)


def expected(res: dict) -> tuple:
    """(REGISTERs the server must have received, replies by code it must have sent)."""
    prime = res["prime"] or {"sent": 0, "replies": {}}
    requests = res["sent_total"] + prime["sent"]
    replies = Counter({int(k): v for k, v in res["replies"].items()})
    replies.update({int(k): v for k, v in prime["replies"].items()})
    return requests, {str(k): v for k, v in sorted(replies.items()) if v}


def check_against_server(res: dict, c: dict, transport="udp"):
    """The report and the server's counters tell the same story."""
    requests, replies = expected(res)
    assert res["timeouts"] == 0 and res["late"] == 0 and res["duplicates"] == 0
    assert res["retransmissions"] == 0 and res["send_errors"] == 0
    assert not any(res["unmatched"].values()), res["unmatched"]
    assert res["ok"] == res["sent_new"], "every new request ends in a 2xx at this rate"
    assert c["requests"] == {"REGISTER": requests}, (c["requests"], requests)
    assert c["received"].get(transport, 0) == requests
    assert sum(c["received"].values()) == requests
    assert {k: v for k, v in c["replies"].items() if v} == replies
    assert c["replies"].get("200", 0) == res["replies"]["200"] + (
        res["prime"]["ok"] if res["prime"] else 0)
    assert c["parse_errors_total"] == 0 and c["internal_errors_total"] == 0
    assert c["dropped"] == 0 and c["rate_limited_total"] == 0
    assert c["worker_restarts_total"] == 0


def workers_received(srv, transport="udp") -> list:
    return [w[f"received_{transport}"] for w in srv.api("/api/workers")["workers"]]


def test_udp_register_matches_server_counters(serve, tmp_path):
    """Open loop, 300 new registrations/s for 2 s over UDP: every REGISTER the tool sent
    was counted and answered 200 by the server, one binding per phone, each with the
    phone's own source address (IP_PKTINFO), spread over both workers (SO_REUSEPORT)."""
    srv = serve()
    rc, res = load(tmp_path, srv.udp, "--scenario", "register", "--rate", "300",
                   "--count", "600", "--duration", "4", "--users", "1000")
    assert rc == 0
    assert res["sent_new"] == 600 and res["sent_total"] == 600 and res["prime"] is None
    assert res["replies"] == {"200": 600}
    assert 200 <= res["offered_rate"] <= 450          # paced, not a burst
    c = settled(srv, 600)
    check_against_server(res, c)
    assert c["aors"] == c["bindings"] == 600         # phones 0..599, one contact each
    assert all(n > 0 for n in workers_received(srv)), "SO_REUSEPORT spreads the phones"
    assert sum(workers_received(srv)) == 600
    # each REGISTER reached the owner of its AOR: kernel steering, or a hand-off
    assert c["handoffs_total"] == 0 if "steering by AOR on" in srv.start_line else \
        c["handoffs_total"] > 0
    for i, addr in ((0, "127.1.0.1"), (599, "127.1.2.92")):
        (b,) = srv.api(f"/api/aor?aor=sip:u{i:06d}@127.0.0.1")["bindings"]
        assert b["source"][0] == addr and b["transport"] == "udp"
        assert b["user_agent"].startswith("fastsip-load")
    assert srv.api("/api/aor?aor=sip:u000600@127.0.0.1")["bindings"] == []


def test_udp_refresh_counts_priming(serve, tmp_path):
    """Closed loop refreshes: the priming REGISTERs (one per phone) reach the server too,
    and refreshes update the bindings instead of adding any."""
    srv = serve()
    rc, res = load(tmp_path, srv.udp, "--scenario", "refresh", "--inflight", "16",
                   "--count", "1000", "--users", "200")
    assert rc == 0
    assert res["prime"]["sent"] == 200 and res["prime"]["ok"] == 200
    assert res["sent_new"] == 1000 and res["replies"] == {"200": 1000}
    c = settled(srv, 1200)
    check_against_server(res, c)
    assert c["requests"]["REGISTER"] == 1200
    assert c["aors"] == c["bindings"] == 200
    (b,) = srv.api("/api/aor?aor=sip:u000007@127.0.0.1")["bindings"]
    assert b["source"][0] == "127.1.0.8"


def _htdigest(path, realm, users, pattern):
    with open(path, "w") as f:
        for i in range(users):
            user, password = f"u{i:06d}", pattern.format(i=i)
            s = f"{user}:{realm}:{password}".encode()
            f.write(f"{user}:{realm}:{hashlib.md5(s).hexdigest()}"
                    f":SHA-256={hashlib.sha256(s).hexdigest()}\n")


@pytest.mark.parametrize("algorithms", ["SHA-256,MD5", "MD5"])
def test_auth_scenario_against_digest_server(serve, tmp_path, algorithms):
    """--scenario auth against --realm/--users: each registration is REGISTER, 401,
    REGISTER with credentials, 200; the server counted both requests and both replies."""
    realm = "e2e.example"
    _htdigest(tmp_path / "users.htdigest", realm, 300, "pw-{i}")
    srv = serve("--realm", realm, "--users", str(tmp_path / "users.htdigest"),
                "--auth-algorithms", algorithms)
    rc, res = load(tmp_path, srv.udp, "--scenario", "auth", "--domain", realm,
                   "--password-pattern", "pw-{i}", "--rate", "250", "--count", "400",
                   "--duration", "4", "--users", "300")
    assert rc == 0, res["replies"]
    assert res["sent_new"] == 400 and res["sent"] == 800 and res["sent_total"] == 800
    assert res["auth"] == {"challenged": 400, "unanswerable": 0}
    assert res["replies"] == {"200": 400, "401": 400}
    c = settled(srv, 800)
    check_against_server(res, c)
    assert c["replies"] == {"200": 400, "401": 400}
    assert c["aors"] == c["bindings"] == 300


def test_auth_wrong_password_is_seen_by_both(serve, tmp_path):
    """Phones whose password the server does not know: a second 401 is final for the
    tool (counted, no 2xx) and the server counted the same challenges."""
    realm = "e2e.example"
    _htdigest(tmp_path / "users.htdigest", realm, 50, "pw-{i}")
    srv = serve("--realm", realm, "--users", str(tmp_path / "users.htdigest"))
    rc, res = load(tmp_path, srv.udp, "--scenario", "auth", "--domain", realm,
                   "--password-pattern", "wrong-{i}", "--rate", "200", "--count", "100",
                   "--duration", "2", "--users", "50")
    assert rc == 1                                     # no 2xx at all
    assert res["ok"] == 0 and res["timeouts"] == 0
    assert res["replies"] == {"401": 200}              # challenge + rejection, 100 times
    c = settled(srv, 200)
    assert c["requests"] == {"REGISTER": 200}
    assert c["replies"] == {"401": 200}
    assert c["aors"] == c["bindings"] == 0


def test_tcp_register_matches_server_counters(serve, tmp_path):
    """The same over TCP: 20 connections from phone addresses; the server counts the
    requests as TCP, records the bindings as TCP with their connection, and sees the
    connections close when the tool ends."""
    srv = serve(transports=("udp", "tcp"))
    rc, res = load(tmp_path, srv.tcp, "--transport", "tcp", "--scenario", "register",
                   "--rate", "300", "--count", "600", "--duration", "4", "--users", "600",
                   "--sockets", "20")
    assert rc == 0
    assert res["transport"] == "tcp" and res["sockets"] == 20
    assert res["replies"] == {"200": 600} and res["connections_closed"] == 0
    c = settled(srv, 600)
    check_against_server(res, c, transport="tcp")
    assert c["received"].get("udp", 0) == 0
    assert c["aors"] == c["bindings"] == 600
    (b,) = srv.api("/api/aor?aor=sip:u000000@127.0.0.1")["bindings"]
    assert b["transport"] == "tcp" and b["conn_id"] != -1 and b["source"][0] == "127.1.0.1"
    deadline = time.monotonic() + 5
    while counters(srv)["tcp_connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counters(srv)["tcp_connections"] == 0
