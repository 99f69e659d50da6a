import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

VECTORS = Path(__file__).parent / "vectors"
TORTURE = VECTORS / "torture"
REAL = VECTORS / "real"
JS = Path(__file__).parent / "js"         # the JavaScript clients (package.json, npm ci)


def crlf(data: bytes) -> bytes:
    """Wire form of a file stored with bare LF line ends."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def torture_entries():
    return json.loads((TORTURE / "manifest.json").read_text())


def torture_bytes(entry) -> bytes:
    data = (TORTURE / entry["file"]).read_bytes()
    return crlf(data) if entry["rfc"] == 5118 else data


def real_files(kind="register"):
    return sorted(REAL.glob(f"*-{kind}.sip"))


def require_client(name: str, apt_package: str) -> str:
    """The path of the interop client executable ``name`` (Debian package ``apt_package``).

    Missing: the test is skipped on a developer machine, but under CI (``CI`` set,
    where .ci/run installs every client of the matrix) it FAILS: a client that
    cannot be installed must not turn the interop matrix green.  Three other forms:
    ``python:MODULE`` (``apt_package`` is then the pip package; the path returned is
    the module's file), ``perl:Module::Name`` (the path returned is perl's) and
    ``npm:PACKAGE``, a package of tests/js/package.json in tests/js/node_modules, with
    the ``node`` command (``apt_package`` is then the npm package; the path returned
    is the package's folder)."""
    kind, _, module = (name.partition(":") if name.startswith(("python:", "perl:", "npm:"))
                       else ("", "", name))
    how = f"apt-get install {apt_package}"
    path = None
    if kind == "npm":
        folder = JS / "node_modules" / module
        if shutil.which("node") is not None and (folder / "package.json").is_file():
            path = str(folder)
        how = f"cd tests/js && npm ci: {apt_package}"
    elif kind == "python":
        import importlib.util
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        path = spec.origin if spec is not None else None
        how = f"pip install {apt_package}"
    elif kind == "perl":
        import subprocess
        perl = shutil.which("perl")
        if perl is not None and subprocess.run(
                [perl, f"-M{module}", "-e", "1"], stdin=subprocess.DEVNULL,
                capture_output=True, timeout=30).returncode == 0:
            path = perl
    else:
        path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed ({how}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def connect():
    """connect(addr) -> a plain TCP socket to addr (5 s timeout), closed at the end."""
    import socket
    made = []

    def _connect(addr):
        made.append(socket.create_connection(addr, timeout=5))
        return made[-1]
    try:
        yield _connect
    finally:
        for s in made:
            s.close()


@pytest.fixture
def softphone_register() -> bytes:
    return (VECTORS / "valid" / "softphone-register.sip").read_bytes()


@pytest.fixture
def skip_without_steering():
    """skip_without_steering(): skip the test unless the kernel loads the
    steering program (fastsip.server.steer needs CAP_BPF)."""
    def _skip():
        from fastsip.server.testing import steering_unavailable
        reason = steering_unavailable()
        if reason:
            pytest.skip(reason)
    return _skip


def coverage_measures() -> bool:
    """Whether coverage measures this run (pytest --cov).  Then the servers a test
    started are stopped with SIGTERM before the kill: a killed process writes no
    coverage data ([tool.coverage.run] patch in pyproject.toml measures them)."""
    try:
        import coverage
    except ImportError:
        return False
    return coverage.Coverage.current() is not None


@pytest.fixture
def start(tmp_path):
    """start(*flags, workers=2, state=True, **kw) -> a running ``fastsip serve``
    (fastsip.server.testing.ServerProcess) in tmp_path; state=True: a state file
    there, None: --no-state.  Every server's process group is killed at the end
    (under coverage, after a SIGTERM and a bounded wait)."""
    from fastsip.server.testing import ServerProcess
    servers = []

    def _start(*args, workers=2, state=True, **kw):
        path = tmp_path / "state.sqlite3" if state is True else state
        srv = ServerProcess(*args, workers=workers, state=path or None, cwd=str(tmp_path), **kw)
        servers.append(srv)
        return srv.start()
    try:
        yield _start
    finally:
        graceful = coverage_measures()
        for srv in servers:
            if graceful and srv.proc is not None and srv.proc.poll() is None:
                try:
                    srv.stop(10.0)
                except subprocess.TimeoutExpired:
                    pass
            srv.kill()


@pytest.fixture
def phone():
    """phone(server_addr, transport="udp", source=None, ca=None) -> a Phone
    (fastsip.server.testing), closed at the end; ``source``: the local address to send
    from; ``ca``: for "tls", the CA file the server's certificate is checked against."""
    from fastsip.server.testing import Phone
    phones = []

    def _phone(addr, transport="udp", source=None, ca=None):
        p = Phone(addr, transport, source, ca)
        phones.append(p)
        return p
    try:
        yield _phone
    finally:
        for p in phones:
            p.close()


# -- Redis (fastsip.server.testing: RedisServer, RedisCluster) -----------------------------------

def require_redis(cluster=False):
    """Skip (or under CI fail, see require_client) without redis-server, and for a
    cluster without redis-cli (Debian's redis-tools, which redis-server depends on)."""
    require_client("redis-server", "redis-server")
    if cluster:
        require_client("redis-cli", "redis-tools")


@pytest.fixture
def redis_server(tmp_path):
    """A running standalone redis-server (fastsip.server.testing.RedisServer: ``.url``,
    ``.port``, ``.command(*args)``, ``.kill()``, ``.pause()``, ``.resume()``,
    ``.restart()``) on a free loopback port, no persistence, its directory and log in
    tmp_path/redis; stopped at the end."""
    require_redis()
    from fastsip.server.testing import RedisServer
    with RedisServer(directory=tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A running Redis Cluster (fastsip.server.testing.RedisCluster) of 3 primaries with a
    replica each, shared by the tests of a module (forming one takes seconds): do not
    kill, pause or restart its nodes (make_redis_cluster gives a test its own), and use
    keys of the test's own.  Stopped after the module."""
    require_redis(cluster=True)
    from fastsip.server.testing import RedisCluster
    with RedisCluster(directory=tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def make_redis_cluster(tmp_path):
    """make_redis_cluster(primaries=3, replicas=1, *args, **kw) -> a running RedisCluster
    of the test's own (its nodes may be killed, paused, restarted), in tmp_path; ``args``
    and ``kw`` go to RedisCluster.  Every one made is stopped at the end."""
    require_redis(cluster=True)
    from fastsip.server.testing import RedisCluster
    made = []

    def _make(primaries=3, replicas=1, *args, **kw):
        kw.setdefault("directory", tmp_path / f"redis-cluster{len(made)}")
        cluster = RedisCluster(primaries, replicas, *args, **kw)
        made.append(cluster)
        return cluster.start()
    try:
        yield _make
    finally:
        for cluster in made:
            cluster.stop()
