"""The hand-off channel between workers: a queue per peer, and this worker's inbox.

A request for an AOR of another shard is queued for its owner (as a hand-off
datagram, ``_io_c.encode_handoff`` / ``handoff.pxd``) and the queues are sent
in batches (``sendmmsg``) to the owners' inboxes, ``AF_UNIX`` datagram
sockets.  A peer whose inbox is full keeps its queue until the next try, up
to ``MAX_PENDING_HANDOFF`` datagrams (older ones are dropped and counted).

This worker's inbox is read in batches by ``BatchIO.serve_inbox`` (from the
compiled loop, ``EventLoop.add_inbox``), which serves the UDP hand-offs and
answers them from the listener their client sent to; the loop sends the
queues after each wake-up that filled them.  Requests that came over a stream connection (TCP, TLS, WS, WSS)
are served here and their replies go back to the worker that holds the
connection (as an ``H_TCP_REPLY`` hand-off, or straight to the connection
when that is this worker); replies handed in are written to their
connection.  When a connection closes, the workers it handed requests to
are told (``H_CONN_CLOSED``), so that each removes the flows it holds for
that connection.
"""
from __future__ import annotations

from fastsip.core._core import TRANSPORTS
from fastsip.server._io_c import (
    H_CONN_CLOSED,
    H_TCP,
    H_TCP_REPLY,
    HANDOFF_HEADER,
    BatchIO,
    encode_handoff,
)

MAX_PENDING_HANDOFF = 20000  # per peer, while its inbox is full


class Handoffs:
    """``queues[j]``: hand-off datagrams ``(blob, None)`` waiting for worker j.

    ``deliver(conn_id, data)`` sends on one of this worker's stream connections
    (``TcpServer.deliver``) and ``closed(conn_id)`` removes the flows of a
    connection another worker closed (``TcpServer.reg_closed``); both are set
    once the stream side exists.
    """

    def __init__(self, index: int, n: int, inbox, peers, udp_socks, reg, cfg, counters,
                 bug) -> None:
        self.index = index
        self.n = n
        self.inbox = inbox              # this worker's receiving end
        self.peers = peers              # [sending end of worker j's inbox]
        self.peer_fds = [-1 if p is None else p.fileno() for p in peers]
        self.udp_fds = [s.fileno() for s in udp_socks]     # replies leave from listener li
        self.reg = reg
        self.c = counters
        self.bug = bug
        self.queues: list = [[] for _ in range(n)]
        self.io = BatchIO(cfg.batch, min(65535, cfg.max_message_size + HANDOFF_HEADER + 300))
        self.deliver = None
        self.closed = None

    def flush(self) -> None:
        """Send what is queued; a full inbox keeps the rest for the next call.  (The
        loop does this itself after each wake-up; this is for the shutdown.)"""
        self.c.dropped_handoff_overflow += self.io.flush(self.peer_fds, self.queues,
                                                         MAX_PENDING_HANDOFF)

    def tcp_request(self, owner: int, host: bytes, conn_id: int, port: int, data: bytes,
                    transport: int) -> None:
        """Queue a request that came over one of this worker's stream connections (transport
        number ``transport``, an index of TRANSPORTS) for its owner."""
        self.queues[owner].append(
            (encode_handoff(H_TCP, transport, self.index, host, conn_id, port, data), None))

    def conn_closed(self, workers: int, conn_id: int) -> None:
        """Tell each worker j with bit j set in ``workers`` that ``conn_id`` closed."""
        blob = encode_handoff(H_CONN_CLOSED, 0, self.index, b"", conn_id, 0, b"")
        for j in range(self.n):
            if workers >> j & 1:
                self.queues[j].append((blob, None))

    def tcp_reply(self, origin: int, conn_id: int, reply: bytes) -> None:
        """Send a reply to the TCP connection ``conn_id`` that worker ``origin`` holds."""
        if origin == self.index:
            self.deliver(conn_id, reply)
        elif origin < self.n:
            self.queues[origin].append(
                (encode_handoff(H_TCP_REPLY, 0, self.index, b"", conn_id, 0, reply), None))

    def serve_others(self, others: list, now: float) -> int:
        """The hand-offs ``serve_inbox`` left (the compiled loop's ``on_handoffs``):
        stream requests are served here, replies and closes go to this worker's
        connections (they need them).  Returns how many requests were served."""
        serve_shard = self.reg.serve_shard
        count = 0
        for kind, code, origin, host, cid, port, data in others:
            if kind == H_TCP_REPLY:
                self.deliver(cid, data)
                continue
            if kind == H_CONN_CLOSED:
                self.closed(cid)
                continue
            if kind != H_TCP or code >= len(TRANSPORTS):
                continue
            count += 1
            try:
                reply = serve_shard(data, host, port, now, TRANSPORTS[code], cid, 0, 1)
            except Exception:       # noqa: BLE001 - a bug in the core: log, go on
                self.bug(data)
                continue
            if reply is not None:
                self.tcp_reply(origin, cid, reply)
        return count
