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
"""
from __future__ import annotations

import ssl

import hiredis

from fastsip.cluster.sync import Node
from fastsip.cluster.url import ClusterURL
from fastsip.errors import ClusterError
from fastsip.server._io_c import LOST, Conn, WriteQueue

__all__ = ["LOST", "Conn", "open_conn"]

# what a non-blocking TLS socket raises for "not now"
SOFT_ERRORS = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def open_conn(url: ClusterURL, addr, loop, queue: WriteQueue, replicas: int,
              timeout: float = 0.5) -> Conn:
    """Connect (blocking, at most ``timeout``), log in, turn tracking on, and hand
    the connection to the loop, reporting to ``queue`` (see ``Conn``).
    Raises ClusterError."""
    node = Node(url, addr[0], addr[1], timeout)
    try:
        node.call(b"CLIENT", b"TRACKING", b"ON", b"NOLOOP")
        if node.reader.has_data():      # Redis sends nothing unasked before a read
            raise ClusterError(f"Redis at {addr[0]}:{addr[1]}: data after the login")
    except Exception:
        node.close()
        raise
    return Conn(node.addr, node.sock, node.reader, loop, queue, replicas, SOFT_ERRORS,
                hiredis.PushNotification, hiredis.ProtocolError)
