"""The control channel between the supervisor and a worker.

A stream socket pair per worker; every message is a 4-byte big-endian length
and a JSON object.  The supervisor asks (``{"op": "stats"}``, ``lookup``,
``bindings``, ``remove``, ``reload``) and the worker answers each request in
order; the only message a worker sends unasked is ``{"op": "ready", ...}``
once its shard is loaded.
"""
from __future__ import annotations

import json
import socket
import struct

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


def request(sock: socket.socket, obj, timeout: float = 5.0):
    """Send one request on a blocking socket and wait for its answer (None on timeout/EOF)."""
    sock.settimeout(timeout)
    try:
        sock.sendall(encode(obj))
        reader = Reader()
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return None
            msgs = reader.feed(data)
            if msgs:
                return msgs[0]
    except (OSError, ValueError):
        return None
