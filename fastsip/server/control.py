"""The control channel between the supervisor and a worker.

A stream socket pair per worker; every message is a 4-byte big-endian length
and a JSON object.  The supervisor asks (``{"op": "stats"}``, ``lookup``,
``bindings``, ``remove``, ``reload``) and the worker answers each request in
order, repeating its ``id``; the only message a worker sends unasked is
``{"op": "ready", ...}`` once its shard is loaded.
"""
from __future__ import annotations

import itertools
import json
import socket
import struct
import time

_LEN = struct.Struct("!I")
MAX_MESSAGE = 512 * 1024 * 1024


def encode(obj) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(data)) + data


class Reader:
    """Collects complete messages from a stream of bytes."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            if n > MAX_MESSAGE:
                raise ValueError("control message too large")
            if len(self.buf) < 4 + n:
                break
            out.append(json.loads(self.buf[4:4 + n]))
            del self.buf[:4 + n]
        return out


_ids = itertools.count(1)


def request(sock: socket.socket, obj, timeout: float = 5.0, reader: Reader | None = None):
    """Send one request on a blocking socket and wait for its answer (None on timeout/EOF).

    Each request carries an ``id`` that its answer repeats: an answer that comes
    after its request timed out is skipped by the next request instead of being
    taken for its answer.  ``reader`` keeps a partly read answer for the next call
    (one per channel)."""
    rid = next(_ids)
    reader = reader if reader is not None else Reader()
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(encode(dict(obj, id=rid)))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
            data = sock.recv(1 << 20)
            if not data:
                return None
            for msg in reader.feed(data):
                if msg.get("id") == rid:
                    return msg
    except (OSError, ValueError):
        return None
