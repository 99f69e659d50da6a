"""The worker's connections to the Redis primaries: non-blocking, pipelined, in the
worker's event loop.

A connection is opened and logged in here (RESP3, ``CLIENT TRACKING ON NOLOOP``:
the keys this worker reads through it are tracked by Redis, and another client's
write of one arrives as an ``invalidate`` push on the same connection, in order with
the replies), then served by ``Conn`` (``fastsip/server/_conn.pxi``, compiled):
commands are queued with an item that stands for them and written together when the
batch ends; their replies go to their items in order, the common ones handled in C
and the others by the shared location (fastsip/server/shared.py).  A lost
connection answers every item left with ``LOST``.

What blocks (a log-in, a read of the slot map) runs on the worker's ``Dialer``
thread once the worker serves: a node that does not answer (its process stopped,
its host gone) holds up that thread for the call's timeout, never the loop.
"""
from __future__ import annotations

import collections
import os
import queue
import select
import ssl
import threading

import hiredis

from fastsip.cluster.sync import Node
from fastsip.cluster.url import ClusterURL
from fastsip.errors import ClusterError
from fastsip.server._io_c import LOST, Conn, WriteQueue

__all__ = ["LOST", "Conn", "Dialer", "conn_of", "log_in", "open_conn"]

# what a non-blocking TLS socket raises for "not now"
SOFT_ERRORS = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def log_in(url: ClusterURL, addr, timeout: float = 0.5) -> Node:
    """Connect (blocking, at most ``timeout`` per step), log in and turn tracking on:
    a Node ready for ``conn_of``.  Raises ClusterError."""
    node = Node(url, addr[0], addr[1], timeout)
    try:
        node.call(b"CLIENT", b"TRACKING", b"ON", b"NOLOOP")
        if node.reader.has_data():      # Redis sends nothing unasked before a read
            raise ClusterError(f"Redis at {addr[0]}:{addr[1]}: data after the login")
    except Exception:
        node.close()
        raise
    return node


def conn_of(node: Node, loop, queue: WriteQueue, replicas: int) -> Conn:
    """Hand a logged-in node's connection to the loop, reporting to ``queue``."""
    return Conn(node.addr, node.sock, node.reader, loop, queue, replicas, SOFT_ERRORS,
                hiredis.PushNotification, hiredis.ProtocolError)


def open_conn(url: ClusterURL, addr, loop, queue: WriteQueue, replicas: int,
              timeout: float = 0.5) -> Conn:
    """``log_in`` then ``conn_of``, blocking (a worker's start).  Raises ClusterError."""
    return conn_of(log_in(url, addr, timeout), loop, queue, replicas)


class Dialer:
    """Blocking calls to Redis on a thread of the worker: ``ask(key, call)`` runs
    ``call()`` there (one at a time, in order), and its result, or the exception it
    raised, comes back as ``done(key, result)`` on the loop's thread (a pipe the
    loop watches wakes it).  A key's call is asked for once until its result is in."""

    def __init__(self, loop, done) -> None:
        self.loop = loop
        self.done = done
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: collections.deque = collections.deque()
        self.under_way: set = set()
        loop.add(self.rfd, self._wake, select.EPOLLIN)
        self.thread = threading.Thread(target=self._run, name="fastsip-dialer", daemon=True)
        self.thread.start()

    def ask(self, key, call) -> None:
        if key not in self.under_way:
            self.under_way.add(key)
            self.jobs.put((key, call))

    def busy(self, key) -> bool:
        return key in self.under_way

    def _run(self) -> None:
        while True:
            key, call = self.jobs.get()
            if call is None:
                os.close(self.wfd)      # here: no write can follow it, into a reused fd
                return
            try:
                result = call()
            except Exception as e:      # ClusterError, or OSError from a socket
                result = e
            self.results.append((key, result))
            try:
                os.write(self.wfd, b"!")
            except OSError:             # full (the loop has a wake-up waiting) or closed
                pass

    def _wake(self, events: int) -> None:
        try:
            os.read(self.rfd, 4096)
        except BlockingIOError:
            pass
        while self.results:
            key, result = self.results.popleft()
            self.under_way.discard(key)
            self.done(key, result)

    def close(self) -> None:
        """Stop the thread (after the call under way, if any: it is a daemon); a
        result that comes later is dropped."""
        if self.rfd < 0:
            return
        self.jobs.put((None, None))
        self.loop.remove(self.rfd)
        os.close(self.rfd)
        self.rfd = -1
