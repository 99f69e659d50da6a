"""Types of the compiled batched datagram I/O (fastsip._io_c)."""

class BatchIO:
    """Receive and send many datagrams per system call (recvmmsg / sendmmsg)."""
    vlen: int
    max_size: int
    oversized: int
    send_errors: int
    def __init__(self, vlen: int = 64, max_size: int = 65535) -> None: ...
    def recv(self, fd: int) -> list[tuple[bytes, tuple[str, int] | None]]: ...
    def send(self, fd: int, items: list[tuple[bytes, tuple[str, int] | None]]) -> int: ...
