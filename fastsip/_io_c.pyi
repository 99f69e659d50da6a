"""Types of the compiled batched datagram I/O (fastsip._io_c)."""
from typing import Callable

class BatchIO:
    """Receive and send many datagrams per system call (recvmmsg / sendmmsg)."""
    vlen: int
    max_size: int
    oversized: int
    send_errors: int
    def __init__(self, vlen: int = 64, max_size: int = 65535) -> None: ...
    def recv(self, fd: int) -> list[tuple[bytes, tuple[str, int] | None]]: ...
    def send(self, fd: int, items: list[tuple[bytes, tuple[str, int] | None]]) -> int: ...
    def serve_udp(self, fd: int, serve_shard: Callable[..., bytes | int | None], now: float,
                  shard: int, nshards: int, li: int, queues: list[list[tuple[bytes, None]]],
                  allow: Callable[[bytes, float], bool] | None = None,
                  bug: Callable[[bytes], object] | None = None) -> tuple[int, int]: ...
    def serve_inbox(self, fd: int, serve_shard: Callable[..., bytes | int | None], now: float,
                    udp_fds: list[int], bug: Callable[[bytes], object] | None = None
                    ) -> tuple[int, int, list[tuple[int, int, int, bytes, int, int, bytes]]]: ...
