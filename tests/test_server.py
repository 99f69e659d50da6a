"""``fastsip serve`` end to end: the real server in a subprocess, real sockets on 127.0.0.1.

Every server runs on kernel-chosen ports and is killed (its whole process
group) when its test ends; every wait is bounded.
"""
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

import fastsip
from fastsip.server.testing import contacts_of, md5_authorization, register, request, wait_for

pytestmark = pytest.mark.server
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=30):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastsip.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# ----------------------------------------------------------------------------- basics

def test_register_refresh_fetch_unregister_over_udp(start, phone):
    srv = start()
    ua = phone(srv.udp)
    me = f"sip:alice@127.0.0.1:{ua.local[1]}"
    r = ua.ask(register("alice", contact=me, call_id="a1", cseq=1, expires=600))
    assert r.status == 200 and contacts_of(r) == {me: 600}
    r = ua.ask(register("alice", contact=me, call_id="a1", cseq=2, expires=1200))
    assert r.status == 200 and contacts_of(r) == {me: 1200}
    r = ua.ask(register("alice", call_id="a1", cseq=3))              # fetch: no Contact
    assert r.status == 200 and list(contacts_of(r)) == [me]
    assert 1190 <= contacts_of(r)[me] <= 1200
    out = cli("show", "sip:alice@example.com", "--metrics", "%s:%d" % srv.metrics_addr)
    assert out.returncode == 0 and me in out.stdout and "udp from 127.0.0.1:%d" % ua.local[1] in out.stdout
    r = ua.ask(register("alice", contact=me, call_id="a1", cseq=4, expires=0))
    assert r.status == 200 and contacts_of(r) == {}
    r = ua.ask(register("alice", call_id="a1", cseq=5))
    assert contacts_of(r) == {}
    out = cli("show", "sip:alice@example.com", "--json", "--metrics", "%s:%d" % srv.metrics_addr)
    assert out.returncode == 0 and json.loads(out.stdout) == []
    m = srv.metrics()
    assert m['fastsip_requests_total{method="REGISTER"}'] == 5
    assert m['fastsip_replies_total{code="200"}'] == 5
    assert m["fastsip_bindings"] == 0
    # an emptied AOR leaves the store when its change is taken for the state file (<= 1 s)
    assert wait_for(lambda: srv.metrics()["fastsip_aors"] == 0, 5)


def test_ipv6_and_expiry(start, phone):
    srv = start("--listen", "udp:[::1]:0", "--listen", "tcp:[::1]:0", "--min-expires", "1")
    v6 = dict((t, a) for t, a in srv.listen if ":" in a[0])
    for transport in ("udp", "tcp"):
        ua = phone(v6[transport], transport)
        me = f"sip:frank-{transport}@[::1]:{ua.local[1]}"
        r = ua.ask(register(f"frank-{transport}", contact=me, expires=1, transport=transport.upper(),
                            local=("[::1]", ua.local[1])))
        assert r.status == 200 and contacts_of(r) == {me: 1}
    shown = srv.api("/api/bindings")["bindings"]
    assert sorted(b["source"][0] for b in shown) == ["::1", "::1"]
    # both expire after a second: removed by the workers' expiry timer and counted
    assert wait_for(lambda: srv.metrics()["fastsip_expired_bindings_total"] == 2, 5)
    assert srv.metrics()["fastsip_bindings"] == 0


def test_register_over_tcp_keepalive_and_the_connection_is_recorded(start, phone):
    srv = start()
    ua = phone(srv.tcp, "tcp")
    me = f"sip:bob@127.0.0.1:{ua.local[1]};transport=tcp"
    r = ua.ask(register("bob", contact=me, transport="TCP", local=ua.local, expires=300))
    assert r.status == 200 and contacts_of(r) == {me: 300}
    ua.send(fastsip.PING)                                         # RFC 5626 CRLFCRLF
    assert ua.recv(3) == fastsip.PONG
    # two requests in one segment, the second split across two writes
    a = request("OPTIONS", call_id="o1")
    b = request("OPTIONS", call_id="o2")
    ua.send(a + b[:30])
    time.sleep(0.05)
    ua.send(b[30:])
    replies = [fastsip.parse(ua.recv(3)), fastsip.parse(ua.recv(3))]
    assert [(x.status, x.call_id) for x in replies] == [(200, "o1"), (200, "o2")]
    shown = srv.api("/api/aor?aor=sip:bob@example.com")["bindings"]
    assert len(shown) == 1 and shown[0]["transport"] == "tcp"
    assert shown[0]["source"] == ["127.0.0.1", ua.local[1]] and shown[0]["conn_id"] != -1
    m = srv.metrics()
    assert m["fastsip_tcp_connections"] == 1 and m["fastsip_tcp_keepalives_total"] == 1
    # a stream that cannot be framed (no Content-Length) closes the connection
    ua.send(b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKx\r\n\r\n")
    with pytest.raises(ConnectionError):
        ua.recv(3)
    assert wait_for(lambda: srv.metrics()["fastsip_tcp_connections"] == 0, 5)
    assert srv.metrics()["fastsip_parse_errors_total"] >= 1


def test_tcp_requests_for_the_other_workers_aors_are_answered_on_the_connection(start, phone):
    """Over one TCP connection, REGISTERs for AORs of both shards: the worker holding the
    connection hands the other shard's to their owner (H_TCP) and the replies come back
    through it (H_TCP_REPLY), in order, on the same connection."""
    srv = start(workers=2, state=None)
    users = {0: [], 1: []}
    i = 0
    while min(len(v) for v in users.values()) < 3:
        users[fastsip.shard_of(f"sip:x{i}@example.com", 2)].append(f"x{i}")
        i += 1
    ua = phone(srv.tcp, "tcp")
    names = users[0][:3] + users[1][:3]
    for name in names:
        me = f"sip:{name}@127.0.0.1:{ua.local[1]};transport=tcp"
        r = ua.ask(register(name, contact=me, transport="TCP", local=ua.local, expires=300,
                            call_id=f"tcp-{name}"))
        assert (r.status, r.call_id, contacts_of(r)) == (200, f"tcp-{name}", {me: 300})
    assert srv.metrics()["fastsip_handoffs_total"] == 3
    for name in names:
        (b,) = srv.api(f"/api/aor?aor=sip:{name}@example.com")["bindings"]
        assert b["worker"] == fastsip.shard_of(f"sip:{name}@example.com", 2)
        assert b["transport"] == "tcp" and b["source"] == ["127.0.0.1", ua.local[1]]


def test_many_tcp_connections_and_idle_timeout(start, phone):
    srv = start("--tcp-idle-timeout", "1")
    phones = [phone(srv.tcp, "tcp") for _ in range(40)]
    for i, p in enumerate(phones):
        p.send(register(f"t{i}", contact=f"sip:t{i}@127.0.0.1:{p.local[1]};transport=tcp",
                        transport="TCP", local=p.local, expires=300, call_id=f"t{i}"))
    for i, p in enumerate(phones):
        reply = fastsip.parse(p.recv(5))
        assert reply.status == 200 and reply.call_id == f"t{i}"
    assert srv.metrics()["fastsip_tcp_connections"] == 40
    # silent for longer than the idle timeout: closed by the server
    assert wait_for(lambda: srv.metrics()["fastsip_tcp_connections"] == 0, 6)
    with pytest.raises(ConnectionError):
        phones[0].recv(1)


def test_two_phones_of_one_aor_on_different_workers_see_each_other(start, phone):
    # without kernel steering, so that the probes below spread by source port
    srv = start("--no-steer", workers=2)

    def worker_counts():
        out = {}
        for w in srv.api("/api/workers")["workers"]:
            out[w["index"]] = w["received_udp"]
        return out
    # find two source ports that the kernel hands to different workers (bounded search)
    chosen = {}
    for _ in range(40):
        p = phone(srv.udp)
        before = worker_counts()
        r = p.ask(request("OPTIONS", call_id=f"probe{p.local[1]}"))
        assert r.status == 200
        after = worker_counts()
        got = [i for i in after if after[i] != before[i]]
        assert len(got) == 1
        chosen.setdefault(got[0], p)
        if len(chosen) == 2:
            break
    assert len(chosen) == 2, "40 source ports all landed on one worker"
    p0, p1 = chosen[0], chosen[1]
    c0 = f"sip:carol@127.0.0.1:{p0.local[1]}"
    c1 = f"sip:carol@127.0.0.1:{p1.local[1]}"
    r = p0.ask(register("carol", contact=c0, call_id="desk", expires=600))
    assert contacts_of(r) == {c0: 600}
    r = p1.ask(register("carol", contact=c1, call_id="mobile", expires=300))
    assert contacts_of(r) == {c0: 600, c1: 300}
    r = p0.ask(register("carol", contact=c0, call_id="desk", cseq=2, expires=600))
    assert set(contacts_of(r)) == {c0, c1}
    # one of the two workers does not own carol: its requests were handed to the owner
    assert srv.metrics()["fastsip_handoffs_total"] >= 1
    owner = {b["worker"] for b in srv.api("/api/aor?aor=sip:carol@example.com")["bindings"]}
    assert len(owner) == 1


def test_kernel_steering_delivers_each_register_to_its_aor_owner(start, phone,
                                                                skip_without_steering):
    """With the eBPF steering program, phones on 30 source ports registering 30
    AORs (two ports per AOR for some) reach the owner of the AOR directly: no
    hand-off, both workers busy, every binding held by shard_of(aor, 2)."""
    skip_without_steering()
    srv = start(workers=2)
    assert "kernel steering by AOR on" in srv.start_line
    for i in range(30):
        p = phone(srv.udp)
        user = f"s{i % 20}"
        c = f"sip:{user}@127.0.0.1:{p.local[1]}"
        r = p.ask(register(user, contact=c, call_id=f"st{i}", expires=600))
        assert r.status == 200 and c in contacts_of(r)
    m = srv.metrics()
    assert m["fastsip_handoffs_total"] == 0
    assert all(w["received_udp"] for w in srv.api("/api/workers")["workers"])
    for b in srv.api("/api/bindings")["bindings"]:
        assert b["worker"] == fastsip.shard_of(b["aor"], 2), b
    assert m["fastsip_aors"] == 20 and m["fastsip_bindings"] == 30


def test_digest_auth_challenge_and_answer(start, tmp_path, phone):
    users = tmp_path / "users.htdigest"
    ha1 = hashlib.md5(b"dave:example.com:secret").hexdigest()
    users.write_text(f"dave:example.com:{ha1}\n")
    srv = start("--realm", "example.com", "--users", str(users), workers=2)
    ua = phone(srv.udp)
    me = f"sip:dave@127.0.0.1:{ua.local[1]}"
    r = ua.ask(register("dave", contact=me, call_id="d1", cseq=1, expires=600))
    assert r.status == 401
    challenges = [c for c in r.www_authenticate if c.params.get("algorithm") == "MD5"]
    assert challenges, r.headers.getall("WWW-Authenticate")
    nonce = challenges[0].params["nonce"]
    # answer from another socket (it may reach the other worker: nonces are shared)
    other = phone(srv.udp)

    def answer(password, cseq):
        return other.ask(register("dave", contact=me, call_id="d1", cseq=cseq, expires=600,
                                  extra=[md5_authorization("dave", password, nonce, cseq)]))
    assert answer("wrong", 2).status == 401
    r = answer("secret", 3)
    assert r.status == 200 and contacts_of(r) == {me: 600}
    m = srv.metrics()
    assert m['fastsip_replies_total{code="401"}'] == 2 and m['fastsip_replies_total{code="200"}'] == 1


def test_sighup_reads_the_users_file_again(start, tmp_path, phone):
    """The HA1s a worker checks against (a C table built from the file) follow
    the file on SIGHUP: a changed password, a removed user."""
    users = tmp_path / "users.htdigest"

    def write(**passwords):
        users.write_text("".join(
            f"{u}:example.com:{hashlib.md5(f'{u}:example.com:{p}'.encode()).hexdigest()}\n"
            for u, p in passwords.items()))
    write(dave="secret", erin="pw")
    srv = start("--realm", "example.com", "--users", str(users), "--log-format", "text",
                workers=2)
    ua = phone(srv.udp)

    def register_as(user, password, cseq):
        me = f"sip:{user}@127.0.0.1:{ua.local[1]}"
        r = ua.ask(register(user, contact=me, call_id=f"{user}-{cseq}", cseq=1, expires=600))
        assert r.status == 401
        nonce = r.www_authenticate[0].params["nonce"]
        return ua.ask(register(user, contact=me, call_id=f"{user}-{cseq}", cseq=2, expires=600,
                               extra=[md5_authorization(user, password, nonce)])).status
    assert register_as("dave", "secret", 1) == 200
    assert register_as("erin", "pw", 1) == 200
    write(dave="changed")
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: "SIGHUP: logs reopened" in srv.log(), 5)
    assert register_as("dave", "secret", 2) == 401
    assert register_as("dave", "changed", 3) == 200
    assert register_as("erin", "pw", 2) == 401


def test_options_405_404_responses_and_acks(start, phone):
    srv = start("--domain", "example.com", "--domain", "*.example.org")
    ua = phone(srv.udp)
    r = ua.ask(request("OPTIONS"))
    assert r.status == 200
    r = ua.ask(request("INVITE", "sip:bob@example.com"))
    assert r.status == 405 and "REGISTER" in r.headers.get("Allow")
    r = ua.ask(register("eve", "evilexample.com", contact="sip:eve@127.0.0.1:9"))
    assert r.status == 404
    r = ua.ask(register("eve", "a.example.org", contact="sip:eve@127.0.0.1:9", expires=60))
    assert r.status == 200
    # a response and an ACK get no answer
    ua.send(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKr\r\nCall-ID: x\r\n"
               b"CSeq: 1 OPTIONS\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nContent-Length: 0\r\n\r\n")
    ua.send(request("ACK", "sip:bob@example.com"))
    assert ua.recv(0.5) is None
    m = srv.metrics()
    assert m['fastsip_replies_total{code="405"}'] == 1 and m['fastsip_replies_total{code="404"}'] == 1
    assert m['fastsip_requests_total{method="OPTIONS"}'] == 1


@pytest.fixture
def narrow_path():
    """A loopback address whose route has an MTU of 1,000 bytes (``ip route``, root):
    datagrams to it larger than that must go out in fragments."""
    host = "127.0.0.77"
    route = ["local", f"{host}/32", "dev", "lo", "table", "local"]
    made = subprocess.run(["ip", "route", "add", *route, "mtu", "lock", "1000"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot set a route's MTU: {made.stderr.strip()}")
    try:
        yield host
    finally:
        subprocess.run(["ip", "route", "del", *route], capture_output=True)


def test_a_200_larger_than_the_path_mtu_reaches_the_phone(start, phone, narrow_path):
    """The UDP listeners set DF (the kernel then skips its IP ID generator per reply);
    a 200 that lists more contacts than fit the path's MTU still reaches the phone, in
    fragments, as it would without DF."""
    srv = start(state=None)
    ua = phone(srv.udp, source=narrow_path)
    contacts = [f"sip:phone{i}-{'x' * 90}@10.0.0.{i}" for i in range(8)]
    for i, contact in enumerate(contacts):
        r = ua.ask(register("wide", contact=contact, call_id=f"w{i}", expires=600))
        assert r.status == 200 and set(contacts_of(r)) == set(contacts[:i + 1])
    assert len(r.raw) > 1000
    assert srv.metrics()['fastsip_dropped_total{reason="send_failed"}'] == 0


def test_garbage_and_oversized_datagrams_while_good_clients_are_served(start, phone):
    srv = start("--max-message-size", "4000")
    good = phone(srv.udp)
    bad = phone(srv.udp)
    garbage = [
        b"\x00\xff" * 50,
        b"REGISTER\r\n\r\n",
        b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKg\r\n"
        b"CSeq: banana\r\nContent-Length: 0\r\n\r\n",
        os.urandom(300),
        b"x" * 6000,                                   # over --max-message-size
        b"OPTIONS sip:a SIP/2.0\r\n" + b"X: " + b"y" * 5000 + b"\r\n\r\n",   # also too large
    ]
    served = 0
    for i in range(30):
        for g in garbage:
            bad.send(g)
        me = f"sip:good{i}@127.0.0.1:{good.local[1]}"
        r = good.ask(register(f"good{i}", contact=me, call_id=f"g{i}", expires=120))
        served += r.status == 200 and me in contacts_of(r)
    assert served == 30
    # malformed input that can be answered gets 400; the rest is dropped
    answers = []
    while (raw := bad.recv(0.5)) is not None:
        answers.append(fastsip.parse(raw).status)
    assert answers and set(answers) == {400}
    m = srv.metrics()
    assert m['fastsip_dropped_total{reason="oversized"}'] == 60
    assert m["fastsip_parse_errors_total"] >= 30 * 3
    assert m["fastsip_aors"] == 30


def test_rate_limit_per_source_address(start, phone):
    srv = start("--rate-limit", "5", "--rate-burst", "5", workers=1)
    ua = phone(srv.udp)
    for i in range(30):
        ua.send(request("OPTIONS", call_id=f"rl{i}"))
    answered = 0
    while ua.recv(0.5) is not None:
        answered += 1
    assert 5 <= answered <= 7
    assert srv.metrics()["fastsip_rate_limited_total"] >= 23


def test_metrics_endpoint_format_and_cli_bindings_remove(start, phone):
    srv = start()
    ua = phone(srv.udp)
    for user in ("u1", "u2"):
        for port in (5071, 5072):
            ua.ask(register(user, contact=f"sip:{user}@127.0.0.1:{port}", call_id=f"{user}{port}",
                               expires=600))
    text = srv.http("/metrics").decode()
    assert "# TYPE fastsip_requests_total counter" in text
    assert "# TYPE fastsip_processing_seconds histogram" in text
    assert 'fastsip_processing_seconds_bucket{le="+Inf"} ' in text
    m = srv.metrics()
    assert m["fastsip_bindings"] == 4 and m["fastsip_aors"] == 2
    assert m["fastsip_processing_seconds_count"] >= 4
    ep = "%s:%d" % srv.metrics_addr
    out = cli("bindings", "--metrics", ep)
    assert out.returncode == 0 and "4 binding(s) of 2 AOR(s)" in out.stdout
    assert json.loads(cli("bindings", "--json", "--metrics", ep).stdout)[0]["aor"] == "sip:u1@example.com"
    out = cli("remove", "sip:u1@example.com", "sip:u1@127.0.0.1:5071", "--metrics", ep)
    assert out.returncode == 0 and "removed 1 binding" in out.stdout
    out = cli("remove", "sip:u2@example.com", "--metrics", ep)
    assert out.returncode == 0 and "removed 2 binding" in out.stdout
    r = ua.ask(register("u1", call_id="f"))
    assert list(contacts_of(r)) == ["sip:u1@127.0.0.1:5072"]
    assert srv.metrics()["fastsip_bindings"] == 1
    out = cli("show", "sip:nobody@example.com", "--metrics", ep)
    assert out.returncode == 1 and "no bindings" in out.stdout
    out = cli("show", "sip:u1@example.com", "--metrics", "127.0.0.1:1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no fastsip server" in out.stderr


def test_slow_http_clients_do_not_stall_the_endpoint(start):
    """Clients that connect and send nothing, or half a request, hold a thread of the
    endpoint each (until their timeout), not the supervisor: others are answered at once."""
    srv = start(workers=1, state=None)
    silent = [socket.create_connection(srv.metrics_addr, timeout=5) for _ in range(3)]
    try:
        silent[0].sendall(b"GET /metr")
        silent[1].sendall(b"POST /api/remove HTTP/1.0\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.1)
        t0 = time.monotonic()
        assert srv.api("/api/workers")["workers"][0]["ready"]
        assert srv.metrics()["fastsip_workers"] == 1
        assert time.monotonic() - t0 < 1.5
    finally:
        for s in silent:
            s.close()


# ----------------------------------------------------------------------------- lifecycle

def test_graceful_restart_keeps_bindings_and_reshards(start, tmp_path, phone):
    state = tmp_path / "keep.sqlite3"
    srv = start("--flush-interval", "30", workers=1, state=state)     # only the stop writes
    ua = phone(srv.udp)
    for i in range(50):
        ua.ask(register(f"k{i}", contact=f"sip:k{i}@127.0.0.1:{6000 + i}", call_id=f"k{i}",
                           expires=900))
    t0 = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 5
    assert "stopped; state written" in srv.log()
    srv = start(workers=2, state=state)                                 # re-sharded on load
    assert re.search(r"loaded \d+ bindings of \d+ AORs", srv.log())
    m = srv.metrics()
    assert m["fastsip_bindings"] == 50 and m["fastsip_aors"] == 50
    ua = phone(srv.udp)
    for i in (0, 17, 49):
        r = ua.ask(register(f"k{i}", call_id="fetch"))               # fetch, via the owner
        exp = contacts_of(r)[f"sip:k{i}@127.0.0.1:{6000 + i}"]
        assert 880 <= exp <= 900                                        # not reset by the restart


def test_a_state_file_of_the_previous_format_is_converted_at_start(start, tmp_path, phone):
    """A file written before records (marshal of 13-field rows) is converted by the
    first start, which says so; its bindings are served and written back as records."""
    from fastsip.registrar import decode_record
    from fastsip.server.state import FORMAT, StateFile
    from test_record import write_old_state_file
    path = str(tmp_path / "old.sqlite3")
    now = time.time()
    write_old_state_file(path, {
        f"sip:m{i}@example.com": [fastsip.Binding(f"sip:m{i}@127.0.0.1:{7000 + i}", now + 900,
                                                  call_id=f"m{i}", cseq=1,
                                                  source=("127.0.0.1", 7000 + i))]
        for i in range(20)})
    srv = start(workers=2, state=path)
    assert f"converted 20 rows from format marshal4-rows13 to {FORMAT}" in srv.log()
    assert srv.metrics()["fastsip_bindings"] == 20
    r = phone(srv.udp).ask(register("m7", call_id="fetch"))
    assert list(contacts_of(r)) == ["sip:m7@127.0.0.1:7007"]
    assert srv.stop() == 0
    state = StateFile(path)
    rows = dict(state.db.execute("SELECT aor, bindings FROM aors").fetchall())
    state.close()
    assert len(rows) == 20
    assert [b.uri for b in decode_record(rows["sip:m3@example.com"])[1]] == [
        "sip:m3@127.0.0.1:7003"]


def state_rows(path) -> set:
    db = sqlite3.connect(path)
    try:
        return {aor for (aor,) in db.execute("SELECT aor FROM aors")}
    finally:
        db.close()


def test_the_file_follows_the_change_logs_and_a_kill_9_of_the_server_loses_no_flush(
        start, tmp_path, phone):
    """Workers append their flushes to change logs; the supervisor folds them into the
    SQLite file every --fold-interval, so a reader of the file sees the bindings while
    the server runs.  After a kill -9 of the whole server (supervisor and workers),
    what was flushed and not yet folded is folded by the next start, before the
    workers load: every binding flushed before the kill is served again."""
    path = str(tmp_path / "fold.sqlite3")
    srv = start("--flush-interval", "0.2", "--fold-interval", "0.5", workers=2, state=path)
    ua = phone(srv.udp)
    for i in range(30):
        ua.ask(register(f"f{i}", contact=f"sip:f{i}@127.0.0.1:7000", call_id=f"f{i}", expires=900))
    assert wait_for(lambda: srv.metrics()["fastsip_state_folded_changes_total"] >= 30, 5)
    assert state_rows(path) == {f"sip:f{i}@example.com" for i in range(30)}
    srv.stop()
    srv = start("--flush-interval", "0.2", "--fold-interval", "3600", workers=1, state=path)
    ua = phone(srv.udp)
    ua.ask(register("g", contact="sip:g@127.0.0.1:7000", call_id="g", expires=900))
    assert wait_for(lambda: srv.metrics()["fastsip_state_rows_written_total"] >= 1, 5)
    assert srv.api("/api/state/fold", "POST")["changes"] == 1           # now, not in an hour
    assert "sip:g@example.com" in state_rows(path)
    ua.ask(register("g", call_id="g", cseq=2, expires=0, contact="*"))
    srv.stop()
    srv = start("--flush-interval", "0.2", "--fold-interval", "3600", workers=2, state=path)
    ua = phone(srv.udp)
    for i in range(30, 50):
        ua.ask(register(f"f{i}", contact=f"sip:f{i}@127.0.0.1:7000", call_id=f"f{i}", expires=900))
    ua.ask(register("f3", call_id="f3", cseq=2, expires=0, contact="*"))        # one removed
    assert wait_for(lambda: srv.metrics()["fastsip_state_rows_written_total"] >= 21, 5)
    assert len(state_rows(path)) == 30                      # flushed, not folded (an hour)
    assert os.listdir(path + ".changes")
    srv.kill()                                              # supervisor and workers: kill -9
    srv = start(workers=1, state=path)
    assert "21 changes of the last run written from its change log" in srv.log()
    assert srv.metrics()["fastsip_bindings"] == 49
    assert state_rows(path) == {f"sip:f{i}@example.com" for i in range(50) if i != 3}
    srv.stop()
    assert not os.path.exists(path + ".changes")            # a stopped server: the file alone


def test_rows_that_expired_while_the_server_was_down_are_purged(start, tmp_path):
    """A row whose bindings all expired before the start is never loaded, so no
    worker's change deletes it: the supervisor's purge does, within seconds."""
    from fastsip.server.state import StateFile, row_of
    path = str(tmp_path / "purge.sqlite3")
    now = time.time()
    f = StateFile(path)
    f.write([row_of(f"sip:{u}@example.com", [fastsip.Binding(f"sip:{u}@127.0.0.1:7000", t,
                                                             call_id=u, cseq=1)])
             for u, t in (("gone", now - 60), ("kept", now + 900))])
    f.close()
    srv = start(workers=1, state=path)
    assert srv.metrics()["fastsip_bindings"] == 1
    assert wait_for(lambda: state_rows(path) == {"sip:kept@example.com"}, 15)


def test_a_fold_asked_of_a_server_without_a_change_log_is_refused(start):
    import urllib.error
    srv = start(workers=1, state=None)
    with pytest.raises(urllib.error.HTTPError) as err:
        srv.api("/api/state/fold", "POST")
    assert err.value.code == 409 and b"no change log" in err.value.read()


def thread_nices(pid) -> tuple[int, list]:
    """The nice of process ``pid``'s main thread, and those of its other threads."""
    main, others = None, []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            nice = int(f.read().rsplit(")", 1)[1].split()[16])      # field 19
        if int(tid) == pid:
            main = nice
        else:
            others.append(nice)
    return main, others


def test_the_state_files_threads_are_nicer_than_the_receive_loop(start, phone):
    """An append to a change log (a worker's writer) or a fold and WAL checkpoint
    (the supervisor's) never takes the core from a receive loop first."""
    srv = start("--flush-interval", "0.2", workers=1)
    ua = phone(srv.udp)
    ua.ask(register("nice", contact="sip:nice@127.0.0.1:7000", call_id="nice", expires=900))
    assert wait_for(lambda: srv.metrics()["fastsip_state_rows_written_total"] >= 1, 5)
    main, others = thread_nices(srv.worker_pids()[0])
    nicer = min(19, main + 10)
    assert others == [nicer]                                    # the writer's thread, alone
    time.sleep(1.2)                                             # a checkpoint has run
    sup_main, sup_others = thread_nices(srv.proc.pid)
    assert sup_main == main
    assert sup_others.count(nicer) == 1                         # the checkpoint's thread
    assert set(sup_others) <= {main, nicer}                     # (and the admin API's)


def test_kill_9_of_a_worker_restarts_it_with_its_shard(start, phone):
    srv = start("--flush-interval", "0.2", workers=2)
    ua = phone(srv.udp)
    for i in range(40):
        ua.ask(register(f"w{i}", contact=f"sip:w{i}@127.0.0.1:7000", call_id=f"w{i}", expires=900))
    assert wait_for(lambda: srv.metrics()["fastsip_state_rows_written_total"] >= 40, 5)
    pids = srv.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    assert wait_for(lambda: (lambda w: w[0]["pid"] not in (0, pids[0]) and w[0]["ready"])(
        srv.api("/api/workers")["workers"]), 10)
    assert srv.worker_pids()[1] == pids[1]
    m = srv.metrics()
    assert m["fastsip_worker_restarts_total"] == 1 and m["fastsip_workers"] == 2
    assert m["fastsip_bindings"] == 40
    for i in range(40):
        r = ua.ask(register(f"w{i}", call_id="fetch"))
        assert list(contacts_of(r)) == [f"sip:w{i}@127.0.0.1:7000"]
    # counters of the dead worker are kept (never go down)
    assert srv.metrics()['fastsip_requests_total{method="REGISTER"}'] >= 80
    assert "died (killed by signal 9); restarting" in srv.log()


def _restarted(srv, index, old_pid, timeout=10):
    return wait_for(lambda: (lambda w: w["pid"] not in (0, old_pid) and w["ready"])(
        srv.api("/api/workers")["workers"][index]), timeout)


def test_counters_carry_on_across_a_kill_9_of_a_worker_exactly(start, phone):
    """A worker's counts since the last scrape are not lost with it: it writes them to
    shared memory every PUBLISH_EVERY seconds (and at exit), and the restarted
    worker's counts are added to its predecessors'.  Counted exactly, twice over."""
    from fastsip.server.worker import PUBLISH_EVERY
    srv = start(workers=2, state=None)
    ua = phone(srv.udp)
    key, reg = 'fastsip_replies_total{code="200"}', 'fastsip_requests_total{method="REGISTER"}'
    sent = 0

    def burst(tag, n=30):
        nonlocal sent
        for i in range(n):
            ua.ask(register(f"{tag}{i}", contact=f"sip:{tag}{i}@127.0.0.1:7000", call_id=f"{tag}{i}"))
        ua.ask(request("OPTIONS", call_id=f"o-{tag}"))
        sent += n + 1

    burst("a")
    assert srv.metrics()[key] == sent
    for kill in range(2):
        pid = srv.worker_pids()[0]
        burst(f"k{kill}-")                  # not scraped before the kill
        time.sleep(4 * PUBLISH_EVERY)
        before = sent
        os.kill(pid, signal.SIGKILL)
        assert _restarted(srv, 0, pid)
        m = srv.metrics()
        assert m[key] == before, (m[key], before)     # none lost, and never down
        assert m[reg] == before - 2 - kill
        workers = srv.api("/api/workers")["workers"]
        assert sum(w["received_udp"] for w in workers) == before
        assert workers[0]["restarts"] == kill + 1
    burst("z")
    assert srv.metrics()[key] == sent


def test_a_worker_that_exits_cleanly_hands_over_its_final_counts(start, phone):
    """SIGTERM to one worker: it writes its final counters as it exits, so even what
    it answered a moment before counts, with no wait."""
    srv = start(workers=1, state=None)
    ua = phone(srv.udp)
    pid = srv.worker_pids()[0]
    for i in range(50):
        ua.ask(register(f"t{i}", contact=f"sip:t{i}@127.0.0.1:7000", call_id=f"t{i}"))
    os.kill(pid, signal.SIGTERM)
    assert _restarted(srv, 0, pid)
    assert srv.metrics()['fastsip_replies_total{code="200"}'] == 50
    assert "died (exit status 0)" in srv.log()


def test_metrics_never_go_down_while_a_worker_is_slow(start, phone):
    srv = start(workers=2)
    ua = phone(srv.udp)
    for i in range(20):
        ua.ask(register(f"s{i}", contact=f"sip:s{i}@127.0.0.1:7000", call_id=f"s{i}"))
    key = 'fastsip_requests_total{method="REGISTER"}'
    assert wait_for(lambda: srv.metrics()[key] == 20, 5)
    stopped = srv.worker_pids()[0]
    os.kill(stopped, signal.SIGSTOP)       # answers no stats request until continued
    try:
        assert srv.metrics()[key] == 20    # its last report still counts
    finally:
        os.kill(stopped, signal.SIGCONT)


def test_sighup_reloads_live_settings(start, tmp_path, phone):
    conf = tmp_path / "fastsip.toml"
    conf.write_text('domain = ["example.com"]\nlog-format = "text"\n')
    srv = start("--config", str(conf))
    ua = phone(srv.udp)
    assert ua.ask(register("h", "example.net", contact="sip:h@127.0.0.1:9", expires=60)).status == 404
    conf.write_text('domain = ["example.com", "example.net"]\nlog-format = "json"\n'
                    'min-expires = 120\nbatch = 32\n')
    srv.signal(signal.SIGHUP)

    def reloaded():
        return ua.ask(register("h", "example.net", contact="sip:h@127.0.0.1:9", expires=120,
                                  call_id=os.urandom(4).hex())).status == 200
    assert wait_for(reloaded, 5)
    # the expiry limits are live too: 60 s is now too brief
    r = ua.ask(register("h", "example.net", contact="sip:h@127.0.0.1:9", expires=60,
                        call_id=os.urandom(4).hex()))
    assert (r.status, r.min_expires) == (423, 120)
    # the supervisor logs that line after every worker has answered the reload, and the
    # workers answer REGISTERs from that moment: wait for it (bounded)
    assert wait_for(lambda: "SIGHUP: logs reopened" in srv.log(), 5)
    log = srv.log()
    assert "batch changed" in log and "next start" in log
    last = log.strip().splitlines()[-1]
    assert json.loads(last)["msg"].startswith("SIGHUP: logs reopened")
    assert srv.proc.poll() is None


# ----------------------------------------------------------------------------- command line

def test_bad_flags_and_unusable_addresses_exit_2(tmp_path):
    for args, words in [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--listen", "sctp:1.2.3.4:5"], "expected PROTO:HOST:PORT, PROTO one of udp, tcp, tls, ws, wss"),
        (["--workers", "zero"], "expected a whole number"),
        (["--realm", "x"], "--realm and --users go together"),
        (["--listen", "udp:192.0.2.1:5060"], "cannot listen on udp:192.0.2.1:5060"),
    ]:
        out = cli("serve", "--no-state", "--metrics", "127.0.0.1:0", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    # a port another program holds (without SO_REUSEPORT) is refused, not shared
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    try:
        out = cli("serve", "--no-state", "--metrics", "127.0.0.1:0",
                  "--listen", "udp:127.0.0.1:%d" % holder.getsockname()[1])
        assert out.returncode == 2 and "Address already in use" in out.stderr
    finally:
        holder.close()
    out = cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--listen", "--workers", "--domain", "--min-expires", "--max-expires",
                 "--default-expires", "--max-contacts", "--realm", "--users", "--state",
                 "--no-state", "--metrics", "--config", "--rate-limit", "--log-level",
                 "--log-format", "--flush-interval"):
        assert flag in out.stdout


def _stream(p, n=200):
    """n OPTIONS as a stream (not one datagram train); the set of Call-IDs answered.
    The replies are read after the last request: the phone's receive buffer must
    hold them all (the default one holds about 185 on loopback)."""
    p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for i in range(n):
        p.send(request("OPTIONS", call_id=f"burst{i}"))
        if i % 20 == 0:
            time.sleep(0.001)
    got = set()
    for _ in range(n):
        raw = p.recv(5)
        assert raw is not None, f"{len(got)} of {n} replies"
        got.add(fastsip.parse(raw).call_id)
    return got


def test_batch_wait_answers_a_steady_stream_and_a_lone_request(start, phone):
    """--batch-wait 2000: a worker woken again within 4 ms sleeps 2 ms before
    reading (counted: batch_waits in /api/workers); a stream of 200 requests is
    still answered in full, and so is a request after a quiet spell.  With
    --batch-wait 0 the worker never waits."""
    srv = start("--batch-wait", "2000", workers=1, state=None)
    p = phone(srv.udp)
    assert _stream(p) == {f"burst{i}" for i in range(200)}
    time.sleep(0.05)
    assert p.ask(request("OPTIONS", call_id="alone")).status == 200
    assert srv.metrics()['fastsip_replies_total{code="200"}'] == 201
    (w,) = srv.api("/api/workers")["workers"]
    assert w["batch_waits"] >= 1 and w["received_udp"] == 201

    srv = start("--batch-wait", "0", workers=1, state=None)
    p = phone(srv.udp)
    assert len(_stream(p)) == 200
    (w,) = srv.api("/api/workers")["workers"]
    assert w["batch_waits"] == 0 and w["received_udp"] == 200


# ----------------------------------------------------------------------------- the start line

def _read_until(fd, needle, timeout):
    """Bytes read from fd until needle appears (or EOF, or the timeout)."""
    import select as _select
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        r, _, _ = _select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:              # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        out += chunk
    return out


def test_start_line_shows_once_on_a_terminal(start, tmp_path):
    """Run in a shell (stdout and the stderr log on one terminal), the start
    line appears once; with stdout and the log apart, each has it."""
    import pty
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "fastsip.cli", "serve", "--workers", "2",
                             "--no-state", "--metrics", "127.0.0.1:0",
                             "--listen", "udp:127.0.0.1:0"],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=tmp_path,
                            env=env, start_new_session=True)
    os.close(slave)
    try:
        seen = _read_until(master, b"/metrics", 20)
        assert b"listening on" in seen, seen
        proc.send_signal(signal.SIGTERM)
        seen += _read_until(master, b"stopped", 15)
        assert proc.wait(15) == 0
        seen += _read_until(master, b"\0", 0.2)     # anything left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    text = seen.decode(errors="replace")
    assert "stopped" in text, text
    assert text.count("listening on") == 1, text
    srv = start(state=None)
    assert "listening on" in srv.start_line
    assert wait_for(lambda: srv.start_line in srv.log(), 5), srv.log()   # logged just after


def _htdigest(path, *entries):
    path.write_text("".join(f"{user}:{realm}:{hashlib.md5(f'{user}:{realm}:pw'.encode()).hexdigest()}\n"
                            for user, realm in entries))
    return str(path)


def test_start_line_says_whether_digest_auth_is_on_and_counts_the_realms_users(start, tmp_path):
    srv = start(state=None)
    assert "; digest authentication off" in srv.start_line
    users = _htdigest(tmp_path / "u1", ("alice", "example.com"), ("bob", "example.com"),
                      ("carol", "other.org"))
    srv = start("--realm", "example.com", "--users", users, state=None)
    assert f"; digest authentication on, realm example.com: 2 users in {users}" in srv.start_line
    assert "WARNING" not in srv.start_line
    # a file with no user of the realm: the server starts, and says nobody can register
    users = _htdigest(tmp_path / "u2", ("carol", "other.org"))
    srv = start("--realm", "example.com", "--users", users, state=None)
    assert (f"digest authentication on, realm example.com: 0 users in {users} (WARNING: none "
            "of this realm, so no phone can register)") in srv.start_line
    assert wait_for(lambda: re.search(r"WARNING fastsip\[supervisor\]: fastsip serve: listening "
                                      r"on .*: 0 users", srv.log()), 5), srv.log()


def test_start_line_says_kernel_steering_off_and_why(start):
    srv = start("--no-steer", state=None)
    assert srv.start_line.rstrip().endswith("; kernel steering by AOR off (--no-steer)")
    from fastsip.server.testing import steering_unavailable
    prefix = ()
    if not steering_unavailable():
        # the kernel would load it here (root): run the server without CAP_BPF/CAP_SYS_ADMIN
        setpriv = "/usr/bin/setpriv" if os.path.exists("/usr/bin/setpriv") else None
        if os.geteuid() != 0 or setpriv is None:
            pytest.skip("steering loads here and setpriv cannot take the capability away")
        caps = "-bpf,-sys_admin,-perfmon"
        prefix = (setpriv, "--bounding-set", caps, "--inh-caps", caps)
    srv = start(state=None, prefix=prefix)
    assert re.search(r"; kernel steering by AOR off \(.+\)$", srv.start_line.rstrip()), srv.start_line
