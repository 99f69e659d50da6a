"""The hand-off channel between workers: a queue per peer, and this worker's inbox.

A request for an AOR of another shard is queued for its owner (as a hand-off
datagram, ``_io_c.encode_handoff`` / ``handoff.pxd``) and the queues are sent
in batches (``sendmmsg``) to the owners' inboxes, ``AF_UNIX`` datagram
sockets.  A peer whose inbox is full keeps its queue until the next try, up
to ``MAX_PENDING_HANDOFF`` datagrams (older ones are dropped and counted).

This worker's inbox is read in batches by ``BatchIO.serve_inbox``, which
serves the UDP hand-offs and answers them from the listener their client
sent to.  Requests that came over a stream connection (TCP, TLS, WS, WSS)
are served here and their replies go back to the worker that holds the
connection (as an ``H_TCP_REPLY`` hand-off, or straight to the connection
when that is this worker); replies handed in are written to their
connection.  When a connection closes, the workers it handed requests to
are told (``H_CONN_CLOSED``), so that each removes the flows it holds for
that connection.
"""
from __future__ import annotations

import time

from fastsip.core._core import TRANSPORTS
from fastsip.server._io_c import (
    H_CONN_CLOSED,
    H_TCP,
    H_TCP_REPLY,
    HANDOFF_HEADER,
    BatchIO,
    encode_handoff,
)
from fastsip.server.loop import BATCHES_PER_EVENT

MAX_PENDING_HANDOFF = 20000  # per peer, while its inbox is full


class Handoffs:
    """``queues[j]``: hand-off datagrams ``(blob, None)`` waiting for worker j.

    ``deliver(conn_id, data)`` sends on one of this worker's stream connections
    (``TcpServer.deliver``) and ``closed(conn_id)`` removes the flows of a
    connection another worker closed (``TcpServer.reg_closed``); both are set
    once the stream side exists.
    """

    def __init__(self, index: int, n: int, inbox, peers, udp_socks, reg, cfg, counters, hist,
                 bug) -> None:
        self.index = index
        self.n = n
        self.inbox = inbox              # this worker's receiving end
        self.peers = peers              # [sending end of worker j's inbox]
        self.udp_fds = [s.fileno() for s in udp_socks]     # replies leave from listener li
        self.reg = reg
        self.c = counters
        self.hist = hist
        self.bug = bug
        self.queues: list = [[] for _ in range(n)]
        self.io = BatchIO(cfg.batch, min(65535, cfg.max_message_size + HANDOFF_HEADER + 300))
        self.deliver = None
        self.closed = None

    @property
    def pending(self) -> bool:
        return any(self.queues)

    def flush(self) -> None:
        """Send what is queued; a full inbox keeps the rest for the next call."""
        for j, q in enumerate(self.queues):
            if not q:
                continue
            sent = self.io.send(self.peers[j].fileno(), q)
            if sent >= len(q):
                q.clear()
            else:
                del q[:sent]
                if len(q) > MAX_PENDING_HANDOFF:
                    drop = len(q) - MAX_PENDING_HANDOFF
                    del q[:drop]
                    self.c.dropped_handoff_overflow += drop

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

    def on_readable(self, events: int = 0) -> None:
        """Serve what other workers handed over: UDP requests in ``serve_inbox``,
        stream requests, replies and closes here (they need this worker's connections)."""
        serve_inbox = self.io.serve_inbox
        serve_shard = self.reg.serve_shard
        fd = self.inbox.fileno()
        udp_fds = self.udp_fds
        for _ in range(BATCHES_PER_EVENT):
            now = time.time()
            t0 = time.perf_counter()
            got, count, others = serve_inbox(fd, serve_shard, now, udp_fds, self.bug)
            if not got:
                break
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
            self.c.handoffs_received += count
            self.c.batches_inbox += 1
            self.hist.observe(time.perf_counter() - t0, count)
            if got < self.io.vlen:
                break
