"""A small blocking Redis Cluster client: what the worker needs at start (the slot
map, the function library) and what ``fastsip show/bindings --cluster`` reads with
no node running.  The worker's requests go through ``fastsip.cluster.client``
(non-blocking, pipelined); both speak RESP3 through hiredis' reader.
"""
from __future__ import annotations

import os
import socket

import hiredis

from fastsip.cluster._resp_c import key_slot
from fastsip.cluster.url import ClusterURL
from fastsip.errors import ClusterError

KEY_PREFIX = b"fs:r:"
SLOTS = 16384
LIBRARY = os.path.join(os.path.dirname(__file__), "library.lua")


def aor_key(aor) -> bytes:
    """The key of an AOR's record: ``fs:r:{AOR}`` (the AOR is the hash tag, so
    one AOR lives in one slot)."""
    if isinstance(aor, str):
        aor = aor.encode("utf-8", "surrogateescape")
    return KEY_PREFIX + b"{" + aor + b"}"


def key_aor(key: bytes) -> str:
    """The AOR of a record's key."""
    return key[len(KEY_PREFIX) + 1:-1].decode("utf-8", "surrogateescape")


def library() -> str:
    with open(LIBRARY, encoding="utf-8") as f:
        return f.read()


def login_commands(url: ClusterURL) -> list:
    """HELLO 3 (with AUTH when the URL has a password) and nothing else."""
    hello = [b"HELLO", b"3"]
    if url.password is not None:
        hello += [b"AUTH", (url.username or "default").encode(), url.password.encode()]
    return [hello]


class Node:
    """One blocking connection to one node (``timeout`` seconds per call)."""

    def __init__(self, url: ClusterURL, host: str, port: int, timeout: float = 2.0):
        self.addr = (host, port)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ctx = url.ssl_context()
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname=host)
        except (OSError, ValueError) as e:
            raise ClusterError(f"Redis at {host}:{port}: {e}") from None
        self.sock = sock
        self.reader = hiredis.Reader()
        for cmd in login_commands(url):
            self.call(*cmd)

    def call(self, *args):
        """Send one command, return its reply (a ReplyError raises ClusterError)."""
        return self.pipeline([args])[0]

    def pipeline(self, commands) -> list:
        """Send ``commands`` at once; their replies in order (errors as ReplyError
        objects except for a lost connection, which raises ClusterError)."""
        try:
            self.sock.sendall(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
            out = []
            while len(out) < len(commands):
                reply = self.reader.gets()
                if reply is False:
                    data = self.sock.recv(1 << 16)
                    if not data:
                        raise OSError("connection closed")
                    self.reader.feed(data)
                    continue
                if isinstance(reply, hiredis.PushNotification):
                    continue
                out.append(reply)
        except OSError as e:
            raise ClusterError(f"Redis at {self.addr[0]}:{self.addr[1]}: {e}") from None
        if len(commands) == 1 and isinstance(out[0], hiredis.ReplyError):
            raise ClusterError(f"Redis at {self.addr[0]}:{self.addr[1]}: {out[0]}")
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SlotMap:
    """Which primary serves each slot, and how many replicas it has.

    ``standalone``: the seed is one Redis without cluster mode (every slot is
    its own)."""

    def __init__(self, ranges, standalone=False):
        self.ranges = ranges            # [(start, end, (host, port), replicas)]
        self.standalone = standalone
        self.owner = [None] * SLOTS     # slot -> (host, port)
        self.replicas = {}              # (host, port) -> number of replicas
        for start, end, addr, replicas in ranges:
            for s in range(start, end + 1):
                self.owner[s] = addr
            self.replicas[addr] = replicas

    @property
    def primaries(self) -> list:
        return list(self.replicas)

    def complete(self) -> bool:
        return all(a is not None for a in self.owner)

    def node_for(self, key: bytes):
        return self.owner[key_slot(key)]


def read_slot_map(node: Node) -> SlotMap:
    """The slot map as ``node`` sees it (CLUSTER SLOTS; a Redis without cluster
    mode serves every slot).  Replicas are not counted here (``count_replicas``)."""
    try:
        slots = node.call(b"CLUSTER", b"SLOTS")
    except ClusterError as e:
        if "cluster support disabled" not in str(e):
            raise
        return SlotMap([(0, SLOTS - 1, node.addr, 0)], standalone=True)
    ranges = []
    for entry in slots:
        start, end, primary = entry[0], entry[1], entry[2]
        host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
        if not host or host == "?":
            host = node.addr[0]
        ranges.append((int(start), int(end), (host, int(primary[1])), 0))
    return SlotMap(ranges)


def online_replicas(info) -> int:
    """The replicas a primary streams to (``INFO replication``: ``slaveN:...,state=online``).

    These are the ones WAIT 1 waits for: a replica that stopped answering stays
    here until the primary's repl-timeout (60 s by default) drops it, so writes
    go on being refused rather than acknowledged unreplicated while it may come
    back; a replica that died with its connection (or a failed primary that the
    cluster now lists as a replica) is not here, so it stops nothing."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    return sum(1 for line in text.splitlines()
               if line.startswith("slave") and ":" in line and "state=online" in line)


class SyncCluster:
    """The shared location, read and prepared with blocking calls.  The slot map
    comes from the first of ``addrs`` (default: the URL's seeds) that answers
    with a complete one."""

    def __init__(self, url: ClusterURL, timeout: float = 2.0, addrs=None):
        self.url = url
        self.timeout = timeout
        self.nodes = {}
        errors = []
        for addr in dict.fromkeys(addrs or url.seeds):
            try:
                slots = read_slot_map(self.node(addr))
            except ClusterError as e:
                errors.append(str(e))
                continue
            if slots.complete():
                self.slots = slots
                self._count_replicas()
                return
            errors.append(f"{addr[0]}:{addr[1]} does not serve every slot (cluster_state "
                          "is not ok)")
        self.close()
        raise ClusterError(f"no node of {url.redacted()} gives a slot map: " + "; ".join(errors))

    def _count_replicas(self) -> None:
        """Each primary's online replicas (``online_replicas``); a primary that does
        not answer counts none (its slots are not writable anyway)."""
        counts = {}
        for _s, _e, addr, _r in self.slots.ranges:
            if addr not in counts:
                try:
                    counts[addr] = online_replicas(self.node(addr).call(b"INFO", b"replication"))
                except ClusterError:
                    counts[addr] = 0
        self.slots = SlotMap([(s, e, a, counts[a]) for s, e, a, _ in self.slots.ranges],
                             self.slots.standalone)

    def node(self, addr) -> Node:
        n = self.nodes.get(addr)
        if n is None:
            n = self.nodes[addr] = Node(self.url, addr[0], addr[1], self.timeout)
        return n

    def load_library(self) -> None:
        """FUNCTION LOAD REPLACE the fastsip library on every primary."""
        code = library().encode()
        for addr in self.slots.primaries:
            self.node(addr).call(b"FUNCTION", b"LOAD", b"REPLACE", code)

    def get(self, aor) -> bytes | None:
        key = aor_key(aor)
        return self.node(self.slots.node_for(key)).call(b"GET", key)

    def scan(self, count: int = 1000):
        """Every AOR record: (aor, record) from each primary in turn (SCAN and
        GET in pipelines of ``count``; a key that expires meanwhile is skipped)."""
        for addr in self.slots.primaries:
            node = self.node(addr)
            cursor = b"0"
            while True:
                cursor, keys = node.call(b"SCAN", cursor, b"MATCH", KEY_PREFIX + b"*",
                                         b"COUNT", str(count).encode())
                if keys:
                    values = node.pipeline([(b"GET", k) for k in keys])
                    for k, v in zip(keys, values, strict=True):
                        if isinstance(v, bytes):
                            yield key_aor(k), v
                if cursor in (b"0", 0):
                    break

    def close(self) -> None:
        for n in self.nodes.values():
            n.close()
        self.nodes.clear()
