"""A worker's event loop: one epoll in C (``_io_c.EventLoop``), signals, ``--batch-wait``.

The UDP listeners and the hand-off inbox are served by the compiled loop
itself (``EventLoop.add_udp`` / ``add_inbox``: ``BatchIO.serve_udp`` /
``serve_inbox``, the counters and the latency histogram in C, hand-offs sent
after the wake-up that queued them).  Every other descriptor (TCP listeners
and connections, the control channel, the signal wake-up) is registered with
a Python handler, called with the epoll event mask.  Signals arrive through
a wake-up socket (``signal.set_wakeup_fd``), so a SIGTERM ends a wait at
once.  Python timers run from ``tick`` (``EventLoop.run``), only when the
time they asked for has come; the loop itself knows nothing of SIP.
"""
from __future__ import annotations

import signal
import socket

from fastsip.server._io_c import BATCHES_PER_EVENT, EP_ERR, EP_IN, EP_OUT, EventLoop

__all__ = ["BATCHES_PER_EVENT", "EP_ERR", "EP_IN", "EP_OUT", "Loop"]


class Loop(EventLoop):
    """``EventLoop`` and the worker's signal handling."""

    _wake_r = _wake_w = None

    def catch_signals(self, on_term) -> None:
        """SIGTERM calls ``on_term()``; SIGINT and SIGHUP are the supervisor's to act on."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda signum, frame: on_term())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.add(self._wake_r.fileno(), self._drain_wake)

    def _drain_wake(self, events: int) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except OSError:
            pass
