"""serve --cluster: nodes sharing one location in Redis (docs/cluster.md).

Real redis-server processes (a standalone one, and Redis Clusters of 3 primaries
with a replica each, cluster-node-timeout 2 s; fastsip.server.testing) and real
`fastsip serve` nodes on 127.0.0.1.  What a phone or a proxy would notice: a
binding made through one node is seen through every other, the rules of RFC 3261
10.3 hold across nodes, and no binding whose 200 a phone received is ever lost.
"""
import json
import string
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import fastsip
from conftest import require_redis
from fastsip.cluster.sync import aor_key
from fastsip.registrar import decode_record
from fastsip.server.testing import Phone, ServerProcess, contacts_of, register, request, wait_for

pytestmark = pytest.mark.server


def node(url, *args, workers=2):
    return ServerProcess("--cluster", url, "--min-expires", "1", *args, workers=workers,
                         cwd=tempfile.mkdtemp(prefix="fastsip-node-")).start()


def ask(server, data, transport="udp"):
    phone = Phone(getattr(server, transport), transport)
    try:
        return phone.ask(data)
    finally:
        phone.close()


def stored(redis, aor):
    """(version, {contact: Binding}) of an AOR as Redis holds it (None: no key)."""
    value = redis.command_for_key(aor_key(aor), "GET", aor_key(aor)) \
        if hasattr(redis, "command_for_key") else redis.command("GET", aor_key(aor))
    if value is None:
        return None
    version, bindings = decode_record(value)
    return version, {b.uri: b for b in bindings}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fastsip.cli", *args], capture_output=True,
                          text=True, timeout=30)


# -- one Redis -------------------------------------------------------------------------

def test_a_single_redis_holds_the_bindings_across_a_restart(redis_server):
    n = node(redis_server.url)
    try:
        r = ask(n, register("alice", contact="sip:a@10.0.0.1", expires=600))
        assert r.status == 200 and contacts_of(r) == {"sip:a@10.0.0.1": 600}
        assert "shared at redis://127.0.0.1:" in n.start_line
        version, held = stored(redis_server, "sip:alice@example.com")
        assert list(held) == ["sip:a@10.0.0.1"] and version > 0
        assert 590_000 < redis_server.command("PTTL", aor_key("sip:alice@example.com")) <= 610_000
    finally:
        n.stop()
    # no node running: the location is read directly ...
    out = cli("show", "alice@example.com", "--cluster", redis_server.url)
    assert out.returncode == 0 and "<sip:a@10.0.0.1>" in out.stdout
    out = cli("bindings", "--json", "--cluster", redis_server.url)
    assert [b["contact"] for b in json.loads(out.stdout)] == ["sip:a@10.0.0.1"]
    # ... and a new node answers a fetch with what the first one stored
    n = node(redis_server.url)
    try:
        r = ask(n, register("alice", contact=None, cseq=7))
        assert r.status == 200 and list(contacts_of(r)) == ["sip:a@10.0.0.1"]
        assert n.api("/api/aor?aor=alice@example.com")["bindings"][0][
            "contact"] == "sip:a@10.0.0.1"
    finally:
        n.stop()


def test_udp_registers_are_written_from_the_compiled_loop_and_answered_once(redis_server):
    """The common case (a UDP REGISTER that changes its binding) is queued in C:
    each phone gets exactly one 200 with its contact, Redis holds every record,
    and the writes counted as queued by the loop are all the writes."""
    n = node(redis_server.url, workers=1)
    phones = [Phone(n.udp, "udp") for _ in range(40)]
    try:
        for cseq, expires in ((1, 600), (2, 300)):     # a registration, then a refresh
            for i, phone in enumerate(phones):
                phone.send(register(f"u{i}", contact=f"sip:u{i}@10.0.0.1", cseq=cseq,
                                    call_id=f"c{i}", expires=expires))
            for i, phone in enumerate(phones):
                r = fastsip.parse(phone.recv())
                assert r.status == 200 and contacts_of(r) == {f"sip:u{i}@10.0.0.1": expires}
        assert [phone.recv(timeout=0.2) for phone in phones] == [None] * len(phones)  # no more
        for i in range(len(phones)):
            assert list(stored(redis_server, f"sip:u{i}@example.com")[1]) == \
                [f"sip:u{i}@10.0.0.1"]
            assert 290_000 < redis_server.command("PTTL", aor_key(f"sip:u{i}@example.com")) \
                <= 310_000
        m = wait_for(lambda: (lambda m: m if m["fastsip_cluster_writes_total"] == 80 else None)(
            n.metrics()), timeout=5)
        assert m["fastsip_cluster_queued_writes_total"] == m["fastsip_cluster_batched_writes_total"]
        assert m["fastsip_cluster_queued_writes_total"] >= 80
    finally:
        for phone in phones:
            phone.close()
        n.stop()


class _Loop:
    """The part of the worker's loop a Conn uses; the test calls the handler."""

    def __init__(self):
        self.fds = {}

    def add(self, fd, handler, mask):
        self.fds[fd] = handler

    def modify(self, fd, mask):
        pass

    def remove(self, fd):
        del self.fds[fd]


def _queue(got, pushes, lost):
    """A WriteQueue that hands Python's items, pushes and a lost connection to lists."""
    from fastsip.server._io_c import Recent, WriteQueue

    reg = fastsip.Registrar(shared=True)
    queue = WriteQueue(reg, None, 10.0)
    queue.bind(store=reg.store, recent=Recent(), udp_fds=[], parked={}, reasserting=set(),
               born=[], fresh=[], outbox={}, wait_cmd=b"", connect=None, orphan=None,
               after_batch=None, on_group=None, on_waited=None,
               on_reply=lambda item, reply: got.append((item, reply)), on_push=pushes.append,
               on_lost=lost.append)
    return queue


def test_replies_cut_anywhere_reach_their_commands_whole_and_in_order():
    """Redis's replies may arrive cut at any byte: each command still gets its own
    reply, whole and in order (integers, strings, nulls, errors, nested arrays, a map,
    a reply larger than the connection's buffer), and a push between them goes to the
    shared location.  Bytes that are not RESP drop the connection: every command left
    is answered LOST."""
    import socket

    import hiredis

    from fastsip.cluster.client import LOST, SOFT_ERRORS
    from fastsip.server._io_c import Conn
    from fastsip.server.loop import EP_IN

    big = b"x" * (600 * 1024)
    replies = [b":1\r\n", b":-42\r\n", b"+OK\r\n", b"$5\r\nhello\r\n", b"$-1\r\n", b"_\r\n",
               b"-MOVED 866 127.0.0.1:7001\r\n", b"*2\r\n:1\r\n*1\r\n$0\r\n\r\n",
               b"%1\r\n+k\r\n$1\r\nv\r\n", b"*0\r\n", b",1.5\r\n", b"#t\r\n",
               b"$%d\r\n%s\r\n" % (len(big), big), b":7\r\n"]
    push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$4\r\nfs:k\r\n"
    stream = b"".join(replies[:5]) + push + b"".join(replies[5:])
    reader = hiredis.Reader()
    reader.feed(stream)
    expected = []
    while (reply := reader.gets()) is not False:
        if not isinstance(reply, hiredis.PushNotification):
            expected.append(reply)

    got, pushes, lost = [], [], []
    loop = _Loop()
    ours, redis = socket.socketpair()
    conn = Conn(("fake", 0), ours, hiredis.Reader(), loop, _queue(got, pushes, lost), 0,
                SOFT_ERRORS, hiredis.PushNotification, hiredis.ProtocolError)
    try:
        for i in range(len(replies) + 2):
            conn.push(b"", i)
        head = len(stream) - len(big) - 20
        for k in range(head):                           # a byte at a time
            redis.sendall(stream[k:k + 1])
            loop.fds[conn.fd](EP_IN)
        for k in range(head, len(stream), 1 << 16):     # the large one in pieces
            redis.sendall(stream[k:k + (1 << 16)])
            loop.fds[conn.fd](EP_IN)
        assert [_plain(r) for _, r in got] == [_plain(r) for r in expected]
        assert [i for i, _ in got] == list(range(len(replies)))
        assert [list(p) for p in pushes] == [[b"invalidate", [b"fs:k"]]]
        redis.sendall(b"?not RESP\r\n")
        loop.fds[conn.fd](EP_IN)
        assert got[len(replies):] == [(len(replies), LOST), (len(replies) + 1, LOST)]
        assert lost == [conn] and conn.closed
    finally:
        conn.close()
        redis.close()


def _resp(value) -> bytes:
    """``value`` in RESP3: int, bytes (a bulk string), None (null), str (a simple
    string; "-..." an error), float, bool, list (an array), dict (a map),
    tuple (a set)."""
    if value is None:
        return b"_\r\n"
    if isinstance(value, bool):
        return b"#t\r\n" if value else b"#f\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, float):
        return b",%r\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, str):
        return value.encode() + b"\r\n" if value.startswith("-") else b"+" + value.encode() + b"\r\n"
    if isinstance(value, dict):
        return b"%%%d\r\n" % len(value) + b"".join(_resp(k) + _resp(v) for k, v in value.items())
    head = b"~" if isinstance(value, tuple) else b"*"
    return head + b"%d\r\n" % len(value) + b"".join(_resp(v) for v in value)


def _plain(reply):
    """A reply to compare: an error (hiredis' ReplyError, equal only to itself) as its
    text, containers as their parts."""
    import hiredis

    if isinstance(reply, hiredis.ReplyError):
        return ("error", str(reply))
    if isinstance(reply, list):
        return [_plain(r) for r in reply]
    if isinstance(reply, dict):
        return {k: _plain(v) for k, v in reply.items()}
    return reply


_RESP_LEAVES = (st.integers(-2**63, 2**63 - 1) | st.binary(max_size=40) | st.none()
                | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(string.ascii_letters + " ", max_size=12)
                | st.text(string.ascii_letters + " ", min_size=1, max_size=12).map(
                    lambda t: "-ERR " + t))
_RESP_VALUES = st.recursive(
    _RESP_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.binary(max_size=6), inner, max_size=3), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(_RESP_VALUES, min_size=1, max_size=8), cuts=st.lists(
    st.integers(1, 64), min_size=1, max_size=20))
def test_any_replies_cut_anyhow_reach_their_commands_as_hiredis_reads_them(values, cuts):
    """Whatever RESP3 replies Redis sends (nested, empty, negative, large integers) and
    wherever the reads cut them, each command gets the reply hiredis makes of it."""
    import socket

    import hiredis

    from fastsip.cluster.client import SOFT_ERRORS
    from fastsip.server._io_c import Conn
    from fastsip.server.loop import EP_IN

    stream = b"".join(_resp(v) for v in values)
    reader = hiredis.Reader()
    expected = []
    for v in values:        # one whole reply at a time: its False is RESP3's false
        reader.feed(_resp(v))
        expected.append(reader.gets())
    got, pushes, lost = [], [], []
    loop = _Loop()
    ours, redis = socket.socketpair()
    conn = Conn(("fake", 0), ours, hiredis.Reader(), loop, _queue(got, pushes, lost), 0,
                SOFT_ERRORS, hiredis.PushNotification, hiredis.ProtocolError)
    try:
        for i in range(len(values)):
            conn.push(b"", i)
        k = 0
        for i in range(len(stream)):
            if k >= len(stream):
                break
            size = cuts[i % len(cuts)]
            redis.sendall(stream[k:k + size])
            k += size
            loop.fds[conn.fd](EP_IN)
        assert not lost and [i for i, _ in got] == list(range(len(values)))
        assert [_plain(r) for _, r in got] == [_plain(r) for r in expected]
    finally:
        conn.close()
        redis.close()


def test_a_connection_answers_each_command_in_order_and_every_one_left_when_lost(
        redis_server):
    """The worker's connection to a primary (Conn, compiled, in the worker's loop):
    pipelined commands get their replies in order, a write of a key it read comes
    as an invalidation push, and when Redis drops it every command not answered yet
    is answered LOST, once, in order, and the shared location is told once."""
    import select

    import hiredis

    from fastsip.cluster.client import LOST, open_conn
    from fastsip.cluster.url import parse_url
    from fastsip.server.loop import EP_IN

    got, pushes, lost = [], [], []
    loop = _Loop()
    conn = open_conn(parse_url(redis_server.url), ("127.0.0.1", redis_server.port), loop,
                     _queue(got, pushes, lost), 0)

    def send(*commands):
        for item, *command in commands:
            conn.push(hiredis.pack_command(tuple(command)), item)
        conn.flush()

    def pump(until):
        deadline = time.monotonic() + 5
        while not until() and time.monotonic() < deadline:
            if select.select([conn.fd], [], [], 0.1)[0]:
                loop.fds[conn.fd](EP_IN)
        assert until()

    try:
        send(*[(f"incr{i}", b"INCR", b"fs-test:n") for i in range(3)],
             ("get", b"GET", b"fs-test:k"))
        pump(lambda: len(got) == 4)
        assert got == [("incr0", 1), ("incr1", 2), ("incr2", 3), ("get", None)]
        redis_server.command("SET", "fs-test:k", "x")       # another client writes it
        pump(lambda: pushes)
        assert list(pushes[0]) == [b"invalidate", [b"fs-test:k"]]
        send(("blocked", b"BLPOP", b"fs-test:list", b"5"), ("after", b"PING"))
        time.sleep(0.2)
        redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        pump(lambda: lost)
        assert got[4:] == [("blocked", LOST), ("after", LOST)]
        assert lost == [conn] and conn.closed and conn.fd not in loop.fds
    finally:
        conn.close()


def test_writes_behind_a_pipeline_in_flight_go_out_together_when_it_is_answered(tmp_path):
    """While a primary's pipeline waits for its WAIT, the node holds that primary's
    next writes and sends them as one pipeline once it is answered (so the pipelines
    grow with the load instead of their number): 20 REGISTERs that arrive one by one
    behind a slow one cost one more round trip, not 20, and every phone gets its 200."""
    from fastsip.server.testing import RedisServer
    require_redis()
    with RedisServer(directory=tmp_path / "primary") as primary, \
            RedisServer("--replicaof", "127.0.0.1", str(primary.port),
                        directory=tmp_path / "replica"):
        wait_for(lambda: b"state=online" in primary.command("INFO", "replication"),
                 timeout=10)
        n = node(primary.url, workers=1)
        phones = [Phone(n.udp, "udp") for _ in range(21)]
        try:
            primary.command("CLIENT", "PAUSE", "500", "WRITE")     # the first write waits
            phones[0].send(register("u0", contact="sip:u0@10.0.0.1", call_id="c0", expires=600))
            time.sleep(0.1)
            for i, phone in enumerate(phones[1:], 1):
                phone.send(register(f"u{i}", contact=f"sip:u{i}@10.0.0.1", call_id=f"c{i}",
                                    expires=600))
                time.sleep(0.005)                                   # a batch each
            for i, phone in enumerate(phones):
                r = fastsip.parse(phone.recv())
                assert r.status == 200 and contacts_of(r) == {f"sip:u{i}@10.0.0.1": 600}
            m = n.metrics()
            assert m["fastsip_cluster_writes_total"] == 21
            assert m["fastsip_cluster_round_trips_total"] == 2
            assert m["fastsip_cluster_batched_writes_total"] == 21
        finally:
            for phone in phones:
                phone.close()
            n.stop()


def test_a_queued_write_that_meets_another_nodes_write_is_decided_again(redis_server):
    """Node b has no copy of the AOR and writes it as new from the compiled loop's
    queue; node a stored it first, so the write conflicts, and b decides the request
    again on a's record (in Python): both contacts stay, the phone gets one 200."""
    a, b = node(redis_server.url, workers=1), node(redis_server.url, workers=1)
    try:
        assert ask(a, register("bob", contact="sip:a@10.0.0.1", call_id="ca",
                               expires=600)).status == 200
        r = ask(b, register("bob", contact="sip:b@10.0.0.2", call_id="cb", expires=600))
        assert r.status == 200
        assert contacts_of(r) == {"sip:a@10.0.0.1": 600, "sip:b@10.0.0.2": 600}
        assert set(stored(redis_server, "sip:bob@example.com")[1]) == \
            {"sip:a@10.0.0.1", "sip:b@10.0.0.2"}
        m = b.metrics()
        assert m["fastsip_cluster_conflicts_total"] == 1
        assert m["fastsip_cluster_writes_total"] == 1
        # the first try was queued in C, the second (decided again) went through Python
        assert m["fastsip_cluster_queued_writes_total"] == 1
        assert m["fastsip_cluster_batched_writes_total"] == 2
    finally:
        a.stop()
        b.stop()


def test_the_node_id_names_the_node_in_logs_and_metrics(redis_server):
    n = node(redis_server.url, "--node-id", "edge-7")
    try:
        assert "node edge-7" in n.start_line
        assert n.metrics()['fastsip_node_info{node="edge-7"}'] == 1
        assert "fastsip[edge-7/supervisor]" in n.log()
    finally:
        n.stop()


def test_flows_end_with_their_connection_in_the_shared_location(redis_server):
    """A browser's .invalid contact (and an RFC 5626 flow) over a stream connection
    is removed from the shared record when that connection closes, as on one
    machine; the AOR's other bindings stay."""
    n = node(redis_server.url)
    try:
        assert ask(n, register("wes", contact="sip:desk@10.0.0.1", call_id="u",
                               expires=600)).status == 200
        phone = Phone(n.tcp, "tcp")
        r = phone.ask(register("wes", contact="sip:abc@df7jal23ls0d.invalid;transport=tcp",
                               call_id="w", expires=600, transport="TCP"))
        assert r.status == 200 and len(contacts_of(r)) == 2
        assert len(stored(redis_server, "sip:wes@example.com")[1]) == 2
        phone.close()
        wait_for(lambda: list(stored(redis_server, "sip:wes@example.com")[1]) ==
                 ["sip:desk@10.0.0.1"], timeout=5)
    finally:
        n.stop()


def test_bindings_expire_in_redis_with_no_node_running(redis_server):
    n = node(redis_server.url, "--cluster-grace", "0")
    try:
        assert ask(n, register("brief", contact="sip:b@10.0.0.1", expires=1)).status == 200
    finally:
        n.kill()
    assert stored(redis_server, "sip:brief@example.com") is not None
    wait_for(lambda: stored(redis_server, "sip:brief@example.com") is None, timeout=5)
    assert redis_server.command("KEYS", "fs:*") == []


def test_an_unreachable_cluster_is_one_error_line_at_start():
    out = subprocess.run([sys.executable, "-m", "fastsip.cli", "serve", "--cluster",
                          "redis://:hunter2@127.0.0.1:1", "--listen", "udp:127.0.0.1:0",
                          "--metrics", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith("fastsip serve: error: --cluster: ") and "refused" in out.stderr
    assert "hunter2" not in out.stderr and out.stderr.count("\n") == 1


def test_a_password_from_a_file_never_shows(tmp_path):
    from fastsip.server.testing import RedisServer
    require_redis()
    pw = tmp_path / "pw"
    pw.write_text("s3cret-pass\n")
    with RedisServer() as redis:
        redis.command("CONFIG", "SET", "requirepass", "s3cret-pass")
        url = redis.url
        n = node(url, "--cluster-password-file", str(pw))
        try:
            assert ask(n, register("pat", contact="sip:p@10.0.0.1", expires=600)).status == 200
            assert "s3cret" not in n.start_line and "s3cret" not in n.log()
        finally:
            n.stop()
        bad = subprocess.run([sys.executable, "-m", "fastsip.cli", "serve", "--cluster", url,
                              "--listen", "udp:127.0.0.1:0", "--metrics", "127.0.0.1:0"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "AUTH" in bad.stderr


# -- a Redis Cluster and several nodes -------------------------------------------------

@pytest.fixture(scope="module")
def nodes(redis_cluster):
    """Two nodes of two workers each on one 3x2 Redis Cluster (--max-contacts 3,
    --redirect)."""
    started = []
    try:
        for _ in range(2):
            started.append(node(redis_cluster.url, "--max-contacts", "3", "--redirect"))
        yield started
    finally:
        for n in started:
            n.stop()


def test_a_binding_made_through_one_node_is_seen_through_the_other(nodes, redis_cluster):
    a, b = nodes
    assert ask(a, register("carol", contact="sip:c@10.0.0.1", expires=600)).status == 200
    # a fetch through the other node (which never saw carol) lists it
    r = ask(b, register("carol", contact=None, call_id="other", cseq=1))
    assert r.status == 200 and list(contacts_of(r)) == ["sip:c@10.0.0.1"]
    assert [x["contact"] for x in b.api("/api/aor?aor=carol@example.com")["bindings"]] == \
        ["sip:c@10.0.0.1"]
    # a change through b is seen through a (a's copy was invalidated)
    assert ask(b, register("carol", contact="sip:c2@10.0.0.2", call_id="c2", expires=600,
                           transport="TCP"), "tcp").status == 200
    r = ask(a, register("carol", contact=None, call_id="third", cseq=1))
    assert set(contacts_of(r)) == {"sip:c@10.0.0.1", "sip:c2@10.0.0.2"}
    assert stored(redis_cluster, "sip:carol@example.com")[1].keys() == contacts_of(r).keys()


def test_a_proxy_is_redirected_by_any_node(nodes):
    a, b = nodes
    assert ask(a, register("fred", contact="sip:f@10.0.0.1", expires=600)).status == 200
    for n in (b, a):        # b has no copy of fred: it reads it first
        r = ask(n, request("INVITE", "sip:fred@example.com", call_id=f"inv-{n.udp[1]}"))
        assert r.status == 302 and list(contacts_of(r)) == ["sip:f@10.0.0.1"]
    r = ask(b, request("MESSAGE", "sip:nobody@example.com"))
    assert r.status == 480
    assert ask(b, register("fred", contact="*", call_id="f2", cseq=9, expires=0)).status == 200
    assert ask(a, request("INVITE", "sip:fred@example.com", call_id="inv2")).status == 480


def test_remove_through_the_admin_api_and_the_cli_reaches_every_node(nodes, redis_cluster):
    a, b = nodes
    for i, n in enumerate((a, b)):
        assert ask(n, register("gina", contact=f"sip:g{i}@10.0.0.1", call_id=f"g{i}",
                               expires=600)).status == 200
    # a's admin API removes one contact; b (whose copy is invalidated) sees it gone
    assert a.api("/api/remove", "POST", {"aor": "gina@example.com",
                                         "contact": "<sip:g1@10.0.0.1>"})["removed"] == 1
    r = ask(b, register("gina", contact=None, call_id="q", cseq=1))
    assert list(contacts_of(r)) == ["sip:g0@10.0.0.1"]
    out = cli("remove", "gina@example.com", "--cluster", redis_cluster.url)
    assert out.returncode == 0 and "removed 1 binding" in out.stdout
    assert stored(redis_cluster, "sip:gina@example.com") is None
    assert a.api("/api/aor?aor=gina@example.com")["bindings"] == []


def test_cseq_order_and_contact_star_hold_across_nodes(nodes):
    a, b = nodes
    assert ask(a, register("dave", contact="sip:d@10.0.0.1", call_id="dd", cseq=5,
                           expires=600)).status == 200
    # the same Call-ID with a lower CSeq, through the other node: out of order
    assert ask(b, register("dave", contact="sip:d@10.0.0.1", call_id="dd", cseq=3,
                           expires=600)).status == 400
    r = ask(b, register("dave", contact="*", call_id="dd", cseq=6, expires=0))
    assert r.status == 200 and contacts_of(r) == {}
    r = ask(a, register("dave", contact=None, call_id="x", cseq=1))
    assert r.status == 200 and contacts_of(r) == {}


def test_max_contacts_holds_across_nodes(nodes):
    a, b = nodes
    for i, n in enumerate((a, b, a)):
        assert ask(n, register("erin", contact=f"sip:e{i}@10.0.0.1", call_id=f"e{i}",
                               expires=600)).status == 200
    r = ask(b, register("erin", contact="sip:e9@10.0.0.1", call_id="e9", expires=600))
    assert r.status == 503 and b"max_contacts=3" in r.raw


def test_aors_registered_through_two_nodes_at_once_keep_both_contacts(nodes, redis_cluster):
    a, b = nodes
    users = [f"race{i}" for i in range(48)]
    results = {}

    def run(server, tag):
        phone = Phone(server.udp)
        try:
            for u in users:
                results[(u, tag)] = phone.ask(register(
                    u, contact=f"sip:{tag}@10.0.0.1", call_id=f"{u}-{tag}", expires=600)).status
        finally:
            phone.close()
    threads = [threading.Thread(target=run, args=(a, "a")),
               threading.Thread(target=run, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results.values()) == {200}
    for u in users:
        assert set(stored(redis_cluster, f"sip:{u}@example.com")[1]) == \
            {"sip:a@10.0.0.1", "sip:b@10.0.0.1"}, u
    conflicts = sum(v for k, v in {**a.metrics(), **b.metrics()}.items()
                    if k.startswith("fastsip_cluster_conflicts_total"))
    assert conflicts >= 0      # (how often they raced depends on the scheduler)


# -- failures: nothing acknowledged is lost ----------------------------------------------

def register_many(server, users, tag, *, timeout=3.0, tries=3):
    """REGISTER each user once through ``server`` (retransmitted like a phone):
    {user: final status}, no status when nothing came back."""
    out = {}
    phone = Phone(server.udp)
    try:
        for u in users:
            try:
                out[u] = phone.ask(register(u, contact=f"sip:{tag}@10.0.0.9", call_id=f"{u}-{tag}",
                                            expires=600), timeout=timeout, tries=tries).status
            except (TimeoutError, OSError):
                out[u] = None
    finally:
        phone.close()
    return out


def lost(redis_cluster, acked, tag):
    """The users whose 200 was received but whose binding is not stored."""
    return [u for u in acked
            if f"sip:{tag}@10.0.0.9" not in (stored(redis_cluster, f"sip:{u}@example.com") or
                                             (0, {}))[1]]


def test_a_node_killed_right_after_its_200s_loses_none(make_redis_cluster):
    rc = make_redis_cluster()
    n = node(rc.url)
    users = [f"k{i}" for i in range(150)]
    got = register_many(n, users, "k")
    n.kill()
    acked = [u for u, s in got.items() if s == 200]
    assert len(acked) == len(users)
    assert lost(rc, acked, "k") == []


def test_a_killed_primary_loses_no_acknowledged_binding_and_service_returns(make_redis_cluster):
    rc = make_redis_cluster()
    n = node(rc.url, "--cluster-wait", "4")
    try:
        users = [f"p{i}" for i in range(400)]
        got, done = {}, threading.Event()

        def load():
            got.update(register_many(n, users, "p"))
            done.set()
        t = threading.Thread(target=load)
        t.start()
        time.sleep(0.3)                 # some are acknowledged, more are on their way
        victim = rc.node_for_key(aor_key("sip:p399@example.com"))
        victim.kill()
        rc.wait_failover(victim, timeout=20)
        t.join(120)
        assert done.is_set()
        diagnosis = f"{dict(n.metrics())}\n{n.log()[-4000:]}"
        # every request was answered: 200, or 500 once --cluster-wait had passed
        assert set(got.values()) <= {200, 500}, diagnosis
        acked = [u for u, s in got.items() if s == 200]
        assert lost(rc, acked, "p") == []
        # service is back for every slot, the new primary's too
        again = register_many(n, [f"r{i}" for i in range(60)], "r")
        assert set(again.values()) == {200}, diagnosis
        assert n.metrics()["fastsip_cluster_lost_connections_total"] >= 1
    finally:
        n.stop()


def test_after_a_planned_failover_a_node_answers_from_no_stale_copy(make_redis_cluster):
    """After a planned failover (CLUSTER FAILOVER on a replica: the old primary lives on
    as a replica), a node that learns the new map closes its connection to the old
    primary, and with it the tracking of the copies it read there: it drops them too,
    so a change made later through another node is in the next 302 a proxy gets."""
    rc = make_redis_cluster()
    a, b = (node(rc.url, "--redirect", workers=1) for _ in range(2))
    try:
        assert ask(b, register("alice", contact="sip:a1@10.0.0.1", expires=600)).status == 200
        invite = request("INVITE", "sip:alice@example.com", call_id="i1")
        assert list(contacts_of(ask(a, invite))) == ["sip:a1@10.0.0.1"]     # a reads a copy
        victim = rc.node_for_key(aor_key("sip:alice@example.com"))
        replica = rc.replicas_of(victim)[0]
        assert replica.command("CLUSTER", "FAILOVER") == b"OK"
        assert rc.wait_failover(victim, timeout=30) is replica
        # a learns the new map from its write of another AOR of the slots that moved ...
        user = next(u for u in (f"u{i}" for i in range(10000))
                    if rc.node_for_key(aor_key(f"sip:{u}@example.com")) is replica)
        assert ask(a, register(user, contact="sip:u@10.0.0.9", expires=600)).status == 200
        # ... then alice registers a second phone through b
        assert ask(b, register("alice", contact="sip:a2@10.0.0.2", call_id="a2",
                               expires=600)).status == 200
        invite = request("INVITE", "sip:alice@example.com", call_id="i2")
        assert set(contacts_of(ask(a, invite))) == {"sip:a1@10.0.0.1", "sip:a2@10.0.0.2"}
    finally:
        a.kill()
        b.kill()


def test_a_primary_killed_while_its_replica_is_paused_loses_no_acknowledged_binding(
        make_redis_cluster):
    rc = make_redis_cluster()
    n = node(rc.url, "--cluster-wait", "3")
    try:
        aor = "sip:w0@example.com"
        primary = rc.node_for_key(aor_key(aor))
        replica = rc.replicas_of(primary)[0]
        users = [f"w{i}" for i in range(60)]
        same_slot = [u for u in users
                     if rc.node_for_key(aor_key(f"sip:{u}@example.com")) is primary]
        replica.pause()
        # the replica takes nothing: WAIT comes short, so no 200 for that primary's AORs
        got = register_many(n, same_slot[:5], "w", timeout=5, tries=1)
        assert set(got.values()) == {500}, got
        assert n.metrics()["fastsip_cluster_wait_shortfalls_total"] >= 1
        primary.kill()
        replica.resume()
        rc.wait_failover(primary, timeout=30)
        acked = [u for u, s in got.items() if s == 200]
        assert lost(rc, acked, "w") == []
        again = register_many(n, same_slot[:5], "w2")
        assert set(again.values()) == {200}, f"{dict(n.metrics())}\n{n.log()[-4000:]}"
    finally:
        n.stop()


def test_a_primary_that_stops_answering_is_left_without_stalling_the_other_slots(
        make_redis_cluster):
    """A primary that hangs (SIGSTOP here; a host gone from the network alike) sends no
    reset: its connection stays open, and TCP would wait for minutes.  The node drops
    it once it has owed replies for 2 s with nothing read, and dials and reads the slot
    map on a thread of its own, so the hung node's silence never holds up the loop:
    the other slots' REGISTERs are answered at once throughout, the hung one's get an
    answer (200 after the failover, or 500 past --cluster-wait), and once its replica
    is promoted every one is 200, with nothing acknowledged lost.  (With Redis'
    default cluster-require-full-coverage, every node would refuse every slot with
    CLUSTERDOWN from the moment the primary is marked failed until its replica takes
    over: docs/cluster.md.)"""
    rc = make_redis_cluster(3, 1, "--cluster-require-full-coverage", "no")
    n = node(rc.url, "--cluster-wait", "4")
    victim = rc.node_for_key(aor_key("sip:h0@example.com"))
    try:
        users = [f"h{i}" for i in range(400)]
        hung = [u for u in users if rc.node_for_key(aor_key(f"sip:{u}@example.com")) is victim]
        others = [u for u in users if u not in hung]
        assert set(register_many(n, hung[:2] + others[:2], "a").values()) == {200}
        others_got, stop = {}, threading.Event()

        def others_meanwhile():
            for i, u in enumerate(others[2:]):
                if stop.is_set():
                    return
                # no retransmission, 0.4 s (200 times what it takes): a loop held up
                # by a blocking call to the silent node would miss it
                others_got.update(register_many(n, [u], f"o{i}", timeout=0.4, tries=1))
                time.sleep(0.02)
        victim.pause()
        t = threading.Thread(target=others_meanwhile)
        t.start()
        try:
            got = register_many(n, hung[2:8], "b", timeout=7, tries=1)
            rc.wait_failover(victim, timeout=30)
            after = register_many(n, hung[8:20], "c")
        finally:
            stop.set()
            t.join(60)
        diagnosis = f"{dict(n.metrics())}\n{n.log()[-4000:]}"
        assert len(others_got) > 20 and set(others_got.values()) == {200}, others_got
        assert None not in got.values() and set(got.values()) <= {200, 500}, diagnosis
        assert set(after.values()) == {200}, diagnosis
        assert lost(rc, [u for u, s in got.items() if s == 200], "b") == []
        assert "sent nothing for 2." in n.log()
        assert n.metrics()["fastsip_cluster_lost_connections_total"] >= 1
    finally:
        victim.resume()
        n.stop()


def test_the_admin_api_waits_for_a_silent_primary_without_holding_up_the_metrics(
        make_redis_cluster):
    """The admin API reads the shared location on the client's own thread: a lookup
    that waits for a primary that does not answer (then 503, or the answer of its
    promoted replica) leaves the supervisor's loop free, so /metrics (and the
    workers' care) goes on meanwhile."""
    import urllib.error
    rc = make_redis_cluster()
    n = node(rc.url, workers=1)
    victim = rc.node_for_key(aor_key("sip:alice@example.com"))
    try:
        assert n.api("/api/aor?aor=alice@example.com")["bindings"] == []
        victim.pause()
        got = {}

        def lookup():
            try:
                got["answer"] = n.api("/api/aor?aor=alice@example.com")
            except urllib.error.HTTPError as e:
                got["status"] = e.code
        t = threading.Thread(target=lookup)
        t.start()
        time.sleep(0.3)                 # the lookup waits for the paused primary
        assert t.is_alive()
        start = time.monotonic()
        assert n.metrics()["fastsip_workers"] == 1
        assert time.monotonic() - start < 1.0       # not behind the lookup's timeouts
        t.join(30)
        # 503 once its timeouts are spent, or the answer of the promoted replica
        assert got in ({"status": 503}, {"answer": {"aor": "sip:alice@example.com",
                                                   "bindings": []}}), got
    finally:
        victim.resume()
        n.stop()


def test_rediss_speaks_tls_to_redis(tmp_path):
    from fastsip.server.testing import RedisServer, free_port, make_test_pki
    require_redis()
    pki = make_test_pki(tmp_path)
    port = free_port()
    with RedisServer("--tls-port", str(port), "--tls-cert-file", pki["cert"], "--tls-key-file",
                     pki["key"], "--tls-auth-clients", "no"):
        url = f"rediss://localhost:{port}?ca={pki['ca']}"
        n = node(url)
        try:
            assert "shared at rediss://localhost:" in n.start_line
            assert ask(n, register("tina", contact="sip:t@10.0.0.1", expires=600)).status == 200
        finally:
            n.stop()
        out = cli("show", "tina@example.com", "--cluster", url)
        assert out.returncode == 0 and "<sip:t@10.0.0.1>" in out.stdout
        # a certificate that does not verify is refused
        out = cli("show", "tina@example.com", "--cluster", f"rediss://localhost:{port}")
        assert out.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in out.stderr


def test_a_stored_version_gone_backwards_is_written_again(redis_server):
    """What a failover that lost a write looks like to a node: the stored record is
    older than one the node acknowledged.  The node writes its own back."""
    n = node(redis_server.url, workers=1)
    try:
        assert ask(n, register("olga", contact="sip:o1@10.0.0.1", call_id="o1",
                               expires=600)).status == 200
        before = redis_server.command("GET", aor_key("sip:olga@example.com"))
        assert ask(n, register("olga", contact="sip:o2@10.0.0.1", call_id="o2",
                               expires=600)).status == 200
        # the second write is "lost": Redis holds the first again, with its older version
        redis_server.command("SET", aor_key("sip:olga@example.com"), before)
        r = ask(n, register("olga", contact="sip:o3@10.0.0.1", call_id="o3", expires=600))
        assert r.status == 200
        assert set(contacts_of(r)) == {"sip:o1@10.0.0.1", "sip:o2@10.0.0.1", "sip:o3@10.0.0.1"}
        assert set(stored(redis_server, "sip:olga@example.com")[1]) == set(contacts_of(r))
        assert n.metrics()["fastsip_cluster_reasserted_total"] == 1
    finally:
        n.stop()
