"""The worker's connections to the Redis primaries: non-blocking, pipelined, in the
worker's event loop.

Each ``Conn`` is one TCP (or TLS) connection to one primary, logged in with
RESP3 and ``CLIENT TRACKING ON NOLOOP``: the keys this worker reads through it
are tracked by Redis, and another client's write of one arrives as an
``invalidate`` push on the same connection, in order with the replies.
Commands are queued with an item that stands for them (``push``) and written
together when the batch ends (``flush``); hiredis' reader parses the replies,
and each goes to the owner with the item of its command, in order
(``on_reply(item, reply)``).  A ``WriteGroup`` (fastsip/server/_writes.pxi) is
one item for many commands: it takes their replies itself, and the owner gets
the group once, after its last.  A lost connection hands every item left to the
owner with ``LOST`` and tells it (``on_lost``).
"""
from __future__ import annotations

import collections
import ssl

import hiredis

from fastsip.cluster.sync import Node
from fastsip.cluster.url import ClusterURL
from fastsip.server._io_c import WriteGroup
from fastsip.server.loop import EP_IN, EP_OUT

LOST = object()         # the reply of a command whose connection was lost before it came
READ_SIZE = 1 << 18


class Conn:
    """One connection to one primary."""

    __slots__ = ("addr", "sock", "fd", "reader", "buf", "out", "pending", "waiting", "loop",
                 "on_reply", "on_push", "on_lost", "on_replies", "replicas", "closed",
                 "want_out")

    def __init__(self, node: Node, loop, owner, replicas: int):
        self.addr = node.addr
        self.sock = node.sock
        self.reader = node.reader       # the login's reader: nothing is lost between the two
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        # replies are read into this one buffer (the reader copies them): a recv()
        # would allocate READ_SIZE bytes and shrink them for every read
        self.buf = bytearray(READ_SIZE)
        self.out = []                   # packed commands not yet written
        self.pending = b""              # written in part: the rest
        self.waiting = collections.deque()   # items, one per command written or queued
        self.loop = loop
        self.on_reply = owner.on_reply      # (item, reply): a command's reply
        self.on_push = owner.on_push        # (PushNotification): an invalidation
        self.on_lost = owner.on_lost        # (Conn): the connection is gone
        self.on_replies = owner.on_replies  # (): replies were handed over
        self.replicas = replicas        # of this primary, as the slot map says (WAIT needs one)
        self.closed = False
        self.want_out = False
        loop.add(self.fd, self._on_events, EP_IN)

    def push(self, packed: bytes, item) -> None:
        self.out.append(packed)
        self.waiting.append(item)

    def flush(self) -> None:
        """Write what is queued (the rest waits for the socket to take it)."""
        if self.closed or not (self.out or self.pending):
            return
        data = self.pending + b"".join(self.out)
        self.out.clear()
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            n = 0
        except OSError:
            self.lose()
            return
        self.pending = data[n:]
        if self.pending and not self.want_out:
            self.want_out = True
            self.loop.modify(self.fd, EP_IN | EP_OUT)
        elif not self.pending and self.want_out:
            self.want_out = False
            self.loop.modify(self.fd, EP_IN)

    def _on_events(self, events: int) -> None:
        if events & EP_OUT:
            self.flush()
        if self.closed:
            return
        reader, buf = self.reader, self.buf
        while True:
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                break
            except OSError:
                self.lose()
                return
            if not n:
                self.lose()
                return
            reader.feed(buf, 0, n)
            if n < READ_SIZE and not isinstance(self.sock, ssl.SSLSocket):
                break
        waiting = self.waiting
        on_reply = self.on_reply
        try:
            while True:
                if waiting and type(waiting[0]) is WriteGroup:
                    # a WriteGroup stands for many commands and takes their replies
                    # itself; the owner hears of it once, after its last
                    reply = waiting[0].take_from(reader, hiredis.PushNotification)
                    if reply is True:
                        on_reply(waiting.popleft(), None)
                        continue
                else:
                    reply = reader.gets()
                if reply is False:
                    break
                if type(reply) is hiredis.PushNotification:
                    self.on_push(reply)
                elif waiting:
                    on_reply(waiting.popleft(), reply)
        except hiredis.ProtocolError:
            self.lose()
            return
        self.on_replies()

    def lose(self) -> None:
        """The connection is gone: every item left is answered LOST, the owner is told."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove(self.fd)
        except (OSError, KeyError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        waiting, self.waiting = self.waiting, collections.deque()
        for item in waiting:
            self.on_reply(item, LOST)
        self.on_lost(self)

    def close(self) -> None:
        """Close without telling anyone (the worker is stopping)."""
        if not self.closed:
            self.closed = True
            try:
                self.loop.remove(self.fd)
            except (OSError, KeyError):
                pass
            self.sock.close()


def open_conn(url: ClusterURL, addr, loop, owner, replicas: int, timeout: float = 0.5) -> Conn:
    """Connect (blocking, at most ``timeout``), log in, turn tracking on, and hand
    the connection to the loop; ``owner`` has the callbacks (see ``Conn``).
    Raises ClusterError."""
    node = Node(url, addr[0], addr[1], timeout)
    try:
        node.call(b"CLIENT", b"TRACKING", b"ON", b"NOLOOP")
    except Exception:
        node.close()
        raise
    return Conn(node, loop, owner, replicas)
