"""A worker's event loop: one epoll, a handler per file descriptor, signals, ``--batch-wait``.

Every socket a worker reads (UDP listeners, TCP listeners and connections,
the hand-off inbox, the control channel) is registered with a handler,
called with the epoll event mask.  Signals arrive through a wake-up socket
(``signal.set_wakeup_fd``), so a SIGTERM ends a wait at once.  Between two
waits the worker runs its timers (``timers.py``); the loop itself knows
nothing of SIP.
"""
from __future__ import annotations

import select
import signal
import socket
import time

EP_IN = select.EPOLLIN
EP_OUT = select.EPOLLOUT
EP_ERR = select.EPOLLHUP | select.EPOLLERR

#: Batches read from one socket per readiness event before the others get their turn.
BATCHES_PER_EVENT = 16


class Loop:
    """``add(fd, handler)``, then ``poll(timeout)`` again and again.

    ``batch_wait`` (seconds, ``--batch-wait``; may change at a SIGHUP): when
    the loop is woken again within two waits of the last wake-up (steady
    traffic), it sleeps that long before reading, so a receive batch collects
    what arrives meanwhile; slower traffic is read at once.  Those sleeps are
    counted in :attr:`batch_waits`.
    """

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: dict = {}         # fd -> handler(events)
        self.batch_wait = 0.0
        self.batch_waits = 0
        self._last_wake = 0.0
        self._wake_r = self._wake_w = None

    def add(self, fd: int, handler, mask: int = EP_IN) -> None:
        self.ep.register(fd, mask)
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self.ep.modify(fd, mask)

    def remove(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass

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

    def poll(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds and call the handler of every ready descriptor;
        how many were ready."""
        events = self.ep.poll(timeout)
        if events and self.batch_wait:
            # Steady traffic (woken again within two waits): let the batch grow.
            # Slower traffic would pay a second wake-up for nothing.
            t = time.monotonic()
            wait = self.batch_wait
            if t - self._last_wake < 2 * wait:
                time.sleep(wait)
                self.batch_waits += 1
            self._last_wake = t
        handlers = self.handlers
        for fd, ev in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler(ev)
        return len(events)

    def close(self) -> None:
        self.ep.close()
