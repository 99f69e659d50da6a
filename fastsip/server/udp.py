"""UDP serving: each readable listener is read, served and answered in batches, in C.

The worker's compiled loop (``_io_c.EventLoop``, ``add_udp``) calls
``BatchIO.serve_udp`` for a ready listener, one batch per call: one
``recvmmsg``, the core (``serve_shard``) for each datagram, one ``sendmmsg``
of the replies to the addresses they came from; a request for an AOR of
another shard is queued for its owner (``inbox.Handoffs``).  No Python code
runs per datagram or per batch (the rate limiter is compiled too).  The clock
is read once per batch.
"""
from __future__ import annotations

from fastsip.server._io_c import BatchIO


class UdpServer:
    """The worker's UDP listeners (``socks[li]`` is listener ``li``) and their buffers."""

    def __init__(self, socks, cfg) -> None:
        self.socks = socks
        self.fds = [s.fileno() for s in socks]
        self.io = BatchIO(cfg.batch, cfg.max_message_size)

    def listen(self, loop) -> None:
        """Let the loop serve the listeners (after ``loop.serve``)."""
        for li, fd in enumerate(self.fds):
            loop.add_udp(fd, li)
