"""The Redis harness itself (fastsip.server.testing: RedisServer; the fixture
redis_server in conftest.py), on real redis-server processes on loopback: the tests of
the cluster mode build on it."""
import os
import socket

import pytest

from conftest import require_redis
from fastsip.server.testing import CLUSTER_BUS_OFFSET, RedisError, RedisServer, free_port

pytestmark = pytest.mark.server


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
