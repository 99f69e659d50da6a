"""The Redis harness itself (fastsip.server.testing: RedisServer, RedisCluster; the
fixtures redis_server, redis_cluster and make_redis_cluster in conftest.py), on real
redis-server processes on loopback: the tests of the cluster mode build on it.

A cluster here is 3 primaries with a replica each and cluster-node-timeout 2000 ms: a
killed or paused primary is failed over in about 4-5 s.  The tests that kill or pause
nodes make their own cluster; the others share one per module."""
import os
import socket
import time

import pytest

from conftest import require_redis
from fastsip.server.testing import CLUSTER_BUS_OFFSET, RedisError, RedisServer, free_port

pytestmark = pytest.mark.server


def keys_on_every_primary(cluster, prefix):
    """One key per primary, each in another slot: ``{primary: key}``."""
    out = {}
    for i in range(200):
        key = f"{prefix}{i}"
        out.setdefault(cluster.node_for_key(key), key)
        if len(out) == len(cluster.primaries()):
            return out
    raise AssertionError(f"200 keys did not reach every primary: {out}")


# -- one server -------------------------------------------------------------------------------

def test_server_commands_and_replies(redis_server):
    r = redis_server
    assert r.url == f"redis://127.0.0.1:{r.port}"
    assert r.command("PING") == b"PONG"
    assert r.command("SET", "k", b"\x00\xff\r\n") == b"OK"
    assert r.command("GET", "k") == b"\x00\xff\r\n"
    assert r.command("GET", "missing") is None
    assert r.command("INCRBY", "n", 5) == 5
    assert r.command("RPUSH", "l", "a", "b") == 2
    assert r.command("LRANGE", "l", 0, -1) == [b"a", b"b"]
    with pytest.raises(RedisError, match="^WRONGTYPE"):
        r.command("INCR", "l")
    assert r.command("PING") == b"PONG"          # an error reply leaves the connection usable
    assert r.command("MULTI") == b"OK"
    r.command("INCR", "n")
    r.command("INCR", "l")
    done = r.command("EXEC")                     # an error inside an array is an element
    assert done[0] == 6 and isinstance(done[1], RedisError)
    assert r.command("CONFIG", "GET", "save") == [b"save", b""]
    assert r.info("persistence")["aof_enabled"] == "0"


def test_server_pause_resume_kill_restart(redis_server):
    r = redis_server
    r.command("SET", "k", "v")
    pid = r.pid
    r.pause()
    with pytest.raises(TimeoutError):
        r.command("PING", timeout=0.3)
    r.resume()
    assert r.command("GET", "k") == b"v"         # the same process, its data kept
    r.kill()
    assert not r.running and r.pid is None
    with pytest.raises(ConnectionRefusedError):
        r.command("PING", timeout=1.0)
    port = r.port
    r.restart()
    assert r.port == port and r.pid not in (None, pid)
    assert r.command("GET", "k") is None         # no persistence


def test_server_port_taken_and_free_ports(tmp_path):
    require_redis()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="(?s)did not start.*Address already in use"):
            RedisServer(port=taken.getsockname()[1], directory=tmp_path).start()
    for _ in range(5):
        port = free_port(bus=True)
        for p in (port, port + CLUSTER_BUS_OFFSET):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))


def test_server_own_directory_removed():
    require_redis()
    with RedisServer() as r:
        directory, pid = r.directory, r.pid
        assert os.path.isdir(directory)
    assert not os.path.exists(directory)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- a cluster, shared ------------------------------------------------------------------------

def test_cluster_formed(redis_cluster):
    c = redis_cluster
    assert len(c.nodes) == 6
    assert c.url == "redis://" + ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
    primaries = c.primaries()
    assert len(primaries) == 3
    replicas = []
    for p in primaries:
        [replica] = c.replicas_of(p)
        info = replica.info("replication")
        assert info["role"] == "slave" and info["master_port"] == str(p.port)
        assert info["master_link_status"] == "up"
        replicas.append(replica)
    assert sorted(n.port for n in primaries + replicas) == sorted(n.port for n in c.nodes)
    for node in c.nodes:
        assert b"cluster_state:ok" in node.command("CLUSTER", "INFO")
    assert c.wait_ok(1.0) < 1.0
    with pytest.raises(TimeoutError, match="no replica of node"):
        c.wait_failover(primaries[0], timeout=0.3)


def test_cluster_commands_by_key(redis_cluster):
    c = redis_cluster
    by_primary = keys_on_every_primary(c, "harness:slot:")
    assert len({c.keyslot(k) for k in by_primary.values()}) == 3
    for node, key in by_primary.items():
        assert c.command_for_key(key, "SET", key, key) == b"OK"
        assert c.command_for_key(key, "GET", key) == key.encode()
        assert node.command("GET", key) == key.encode()
        other = next(p for p in by_primary if p is not node)
        with pytest.raises(RedisError, match=rf"^MOVED {c.keyslot(key)} 127\.0\.0\.1:{node.port}$"):
            other.command("GET", key)
    # keys with one {hash tag} share a slot, so a multi-key command works on them
    a, b = "{harness:alice}:contacts", "{harness:alice}:expiry"
    assert c.keyslot(a) == c.keyslot(b) == c.keyslot("harness:alice")
    assert c.node_for_key(a) is c.node_for_key(b)
    assert c.command_for_key(a, "MSET", a, "1", b, "2") == b"OK"
    assert c.command_for_key(b, "MGET", a, b) == [b"1", b"2"]


def test_cluster_all_keys(redis_cluster):
    c = redis_cluster
    keys = [f"harness:scan:{i}" for i in range(40)]
    for key in keys:
        c.command_for_key(key, "SET", key, 1)
    assert c.all_keys("harness:scan:*") == sorted(k.encode() for k in keys)
    assert len({c.node_for_key(k) for k in keys}) == 3      # the keys were on every primary
    assert c.all_keys("harness:nothing:*") == []


# -- a cluster of the test's own --------------------------------------------------------------

def test_cluster_kill_failover_restart(make_redis_cluster):
    c = make_redis_cluster()
    key = "{harness:kill}"
    old = c.node_for_key(key)
    [replica] = c.replicas_of(old)
    c.command_for_key(key, "SET", key, "before")
    assert old.command("WAIT", 1, 2000) == 1                 # the replica has it
    t0 = time.monotonic()
    old.kill()
    with pytest.raises(TimeoutError, match=rf"{old.name} serves slots .* not running"):
        c.wait_ok(0.2)
    new = c.wait_failover(old, timeout=10.0)
    assert new is replica
    assert time.monotonic() - t0 < 10.0
    c.wait_ok(10.0)
    assert old not in c.primaries() and new in c.primaries()
    assert c.node_for_key(key) is new
    assert c.command_for_key(key, "GET", key) == b"before"
    # restarted from its directory (nodes.conf), it rejoins as the new primary's replica
    old.restart()
    c.wait_ok(15.0)
    assert c.replicas_of(new) == [old]
    assert old.info("replication")["master_port"] == str(new.port)
    c.command_for_key(key, "SET", key, "after")
    assert new.command("WAIT", 1, 2000) == 1
    assert old.command("READONLY") == b"OK"
    assert old.command("GET", key) == b"after"


def test_cluster_pause_resume_and_stop(make_redis_cluster):
    c = make_redis_cluster()
    primary = c.primaries()[0]
    [replica] = c.replicas_of(primary)
    # a pause well under the node timeout changes nothing
    primary.pause()
    time.sleep(0.3)
    primary.resume()
    c.wait_ok(5.0)
    assert c.primaries()[0] is primary
    # a longer one is failed over; resumed, the old primary follows the new one
    primary.pause()
    assert c.wait_failover(primary, timeout=10.0) is replica
    primary.resume()
    c.wait_ok(15.0)
    assert c.replicas_of(replica) == [primary]
    pids = [n.pid for n in c.nodes]
    c.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
