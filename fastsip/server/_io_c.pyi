"""Types of the compiled batched datagram I/O and worker loop (fastsip.server._io_c)."""
import os
from collections.abc import Callable, Iterable
from typing import Any, final

from typing_extensions import Self, disjoint_base

from fastsip.core._core import Store

HANDOFF_HEADER: int
H_UDP: int
H_TCP: int
H_TCP_REPLY: int
H_CONN_CLOSED: int
MAX_HOST: int
RATE_SOURCES_MAX: int
BATCHES_PER_EVENT: int
EP_IN: int
EP_OUT: int
EP_ERR: int

def encode_handoff(kind: int, listener: int, origin: int, host: bytes, conn_id: int, port: int,
                   data: bytes) -> bytes: ...
def decode_handoff(blob: bytes) -> tuple[int, int, int, bytes, int, int, bytes]: ...

@disjoint_base
class BatchIO:
    """Receive and send many datagrams per system call (recvmmsg / sendmmsg)."""
    vlen: int
    max_size: int
    oversized: int
    send_errors: int
    served_c: int
    # the arguments go to __cinit__ (tp_new); BatchIO has no __init__ of its own
    def __new__(cls, vlen: int = 64, max_size: int = 65535) -> BatchIO: ...
    def recv(self, fd: int) -> list[tuple[bytes, tuple[str, int] | None]]: ...
    def send(self, fd: int, items: list[tuple[bytes, tuple[str | bytes, int] | None]]) -> int: ...
    def flush(self, fds: list[int], queues: list[list[tuple[bytes, None]]],
              max_pending: int) -> int: ...
    def serve_udp(self, fd: int, serve_shard: Callable[..., bytes | int | None], now: float,
                  shard: int, nshards: int, li: int, queues: list[list[tuple[bytes, None]]],
                  allow: RateLimiter | Callable[[bytes, float], bool] | None = None,
                  bug: Callable[[bytes], object] | None = None) -> tuple[int, int]: ...
    def serve_inbox(self, fd: int, serve_shard: Callable[..., bytes | int | None], now: float,
                    udp_fds: list[int], bug: Callable[[bytes], object] | None = None
                    ) -> tuple[int, int, list[tuple[int, int, int, bytes, int, int, bytes]]]: ...

def monotonic() -> float: ...

@disjoint_base
class Histogram:
    """Durations (seconds) counted in buckets with fixed upper bounds."""
    bounds: tuple[float, ...]
    sum: float
    count: int
    def __init__(self, bounds: Iterable[float]) -> None: ...
    def observe(self, value: float, n: int = 1) -> None: ...
    @property
    def counts(self) -> list[int]: ...
    def as_dict(self) -> dict[str, Any]: ...

@final
class RateLimiter:
    """A token bucket per source host."""
    rate: float
    burst: float
    max_sources: int
    refused: int
    def __new__(cls, rate: float = 0.0, burst: float = 0.0,
                max_sources: int = 100000) -> RateLimiter: ...
    def configure(self, rate: float, burst: float) -> None: ...
    def __len__(self) -> int: ...
    def allow(self, host: bytes, now: float) -> bool: ...

@disjoint_base
class EventLoop:
    """A worker's event loop: epoll, the UDP listeners and the inbox served in C."""
    batch_wait: float
    received_udp: int
    batches_udp: int
    handoffs_sent: int
    handoffs_received: int
    batches_inbox: int
    batch_waits: int
    dropped_handoff_overflow: int
    def __new__(cls, *args: Any, **kwargs: Any) -> Self: ...
    def close(self) -> None: ...
    def add(self, fd: int, handler: Callable[[int], object], mask: int = ...) -> None: ...
    def modify(self, fd: int, mask: int) -> None: ...
    def remove(self, fd: int) -> None: ...
    def add_udp(self, fd: int, li: int) -> None: ...
    def add_inbox(self, fd: int) -> None: ...
    def serve(self, udp_io: BatchIO, inbox_io: BatchIO,
              serve_shard: Callable[..., bytes | int | None], shard: int, nshards: int,
              queues: list[list[tuple[bytes, None]]], peer_fds: list[int | None],
              udp_fds: list[int], limiter: RateLimiter, hist: Histogram,
              bug: Callable[[bytes], object] | None,
              on_handoffs: Callable[[list[tuple[int, int, int, bytes, int, int, bytes]], float],
                                    int],
              max_pending: int) -> None: ...
    def set_after(self, after: Callable[[int], object] | None) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def stop(self) -> None: ...
    @property
    def stopping(self) -> bool: ...
    def run(self, tick: Callable[[bool], tuple[float, float]]) -> None: ...


@final
class SqlWriter:
    """The state file's writer in C: a Store's changed AORs straight into SQLite."""

    @property
    def rows_written(self) -> int: ...
    def __new__(cls, path: str | os.PathLike[str], library: bytes, busy_timeout_ms: int = 5000,
                checkpoints: bool = True) -> SqlWriter: ...
    def close(self) -> None: ...
    def write(self, store: Store, limit: int) -> int: ...
