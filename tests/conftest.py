import json
from pathlib import Path

import pytest

VECTORS = Path(__file__).parent / "vectors"
TORTURE = VECTORS / "torture"
REAL = VECTORS / "real"


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


@pytest.fixture
def start(tmp_path):
    """start(*flags, workers=2, state=True, **kw) -> a running ``fastsip serve``
    (fastsip.server.testing.ServerProcess) in tmp_path; state=True: a state file
    there, None: --no-state.  Every server's process group is killed at the end."""
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
        for srv in servers:
            srv.kill()
