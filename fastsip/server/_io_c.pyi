"""Types of the compiled batched datagram I/O (fastsip.server._io_c)."""
from collections.abc import Callable

from typing_extensions import disjoint_base

HANDOFF_HEADER: int
H_UDP: int
H_TCP: int
H_TCP_REPLY: int
H_CONN_CLOSED: int
MAX_HOST: int

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
    # the arguments go to __cinit__ (tp_new); BatchIO has no __init__ of its own
    def __new__(cls, vlen: int = 64, max_size: int = 65535) -> BatchIO: ...
    def recv(self, fd: int) -> list[tuple[bytes, tuple[str, int] | None]]: ...
    def send(self, fd: int, items: list[tuple[bytes, tuple[str, int] | None]]) -> int: ...
    def serve_udp(self, fd: int, serve_shard: Callable[..., bytes | int | None], now: float,
                  shard: int, nshards: int, li: int, queues: list[list[tuple[bytes, None]]],
                  allow: Callable[[bytes, float], bool] | None = None,
                  bug: Callable[[bytes], object] | None = None) -> tuple[int, int]: ...
    def serve_inbox(self, fd: int, serve_shard: Callable[..., bytes | int | None], now: float,
                    udp_fds: list[int], bug: Callable[[bytes], object] | None = None
                    ) -> tuple[int, int, list[tuple[int, int, int, bytes, int, int, bytes]]]: ...
