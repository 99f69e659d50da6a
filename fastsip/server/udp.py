"""UDP serving: each readable listener is read, served and answered in batches, in Cython.

``BatchIO.serve_udp`` (``_io_c.pyx``) does one batch per call: one
``recvmmsg``, the core (``serve_shard``) for each datagram, one ``sendmmsg``
of the replies to the addresses they came from; a request for an AOR of
another shard is queued for its owner (``inbox.Handoffs``).  No Python code
runs per datagram, except the rate limiter when ``--rate-limit`` is on.  The
clock is read once per batch.
"""
from __future__ import annotations

import time

from fastsip.server._io_c import BatchIO
from fastsip.server.loop import BATCHES_PER_EVENT


class UdpServer:
    """The worker's UDP listeners (``socks[li]`` is listener ``li``)."""

    def __init__(self, socks, index: int, n: int, reg, cfg, limiter, handoffs, counters, hist,
                 bug) -> None:
        self.socks = socks
        self.fds = [s.fileno() for s in socks]
        self.index = index
        self.n = n
        self.reg = reg
        self.limiter = limiter
        self.handoffs = handoffs
        self.c = counters
        self.hist = hist
        self.bug = bug
        self.io = BatchIO(cfg.batch, cfg.max_message_size)

    def on_readable(self, li: int, events: int = 0) -> None:
        """Serve what waits on listener ``li``, up to ``BATCHES_PER_EVENT`` batches."""
        serve_udp = self.io.serve_udp
        serve_shard = self.reg.serve_shard
        fd = self.fds[li]
        allow = self.limiter.allow if self.limiter.rate else None
        queues = self.handoffs.queues
        index, n, c, hist = self.index, self.n, self.c, self.hist
        vlen = self.io.vlen
        received = handed = 0
        for _ in range(BATCHES_PER_EVENT):
            now = time.time()
            t0 = time.perf_counter()
            got, out = serve_udp(fd, serve_shard, now, index, n, li, queues, allow, self.bug)
            if not got:
                break
            received += got
            handed += out
            c.batches_udp += 1
            hist.observe(time.perf_counter() - t0, got - out)
            if got < vlen:
                break
        if handed:
            self.handoffs.flush()
        c.received_udp += received
        c.handoffs_sent += handed
