"""The shared location (``--cluster``): a worker's bindings live in Redis, and its
core's store is a cache in front of them.

The core decides a REGISTER against the cached copy of its AOR and applies the
plan to the copy; in shared mode it does not answer yet but *stages* the write
(``RegistrarCore.staged``: the AOR's new record with the next version) and
marks the AOR busy.  This room writes it with the ``fastsip_cas`` function
(``fastsip/cluster/library.lua``: a compare-and-set on the AOR's version) on
the connection to the primary that serves the AOR's slot, all writes of a
receive batch in one pipeline, followed by ``WAIT 1`` when the primary has a
replica.  Then, per write:

- written and taken by a replica: the copy is the stored one, the 200 goes out;
- the version did not match: the function returned the stored record; the
  copy becomes it and the request is decided again (at most ``MAX_TRIES``
  times): two nodes racing on one AOR never lose an update;
- no replica took it in time (``WAIT`` came short), or the connection was
  lost: the request is retried against the slot map as it is now, until
  ``--cluster-wait`` seconds after it arrived; then 500 with Retry-After.
  The copy is dropped, so the next request reads the stored one.

Requests for an AOR whose write is under way wait for it (``parked``) and
are decided after it; a request whose AOR has no copy and that would only be
answered (a fetch, a retransmission, a redirect) reads it first (READ).
Another node's write of an AOR this worker holds arrives as an invalidation
(CLIENT TRACKING) and drops the copy.  This worker's acknowledged records of
the last ``RECENT`` seconds are kept, so that one that a failover lost (the
stored version went backwards) is written again.  A stream connection that
closes ends its flows in the records written over it (``flows_end``).

The common case runs in C: the compiled loop calls the core itself and queues
each staged write of a UDP REGISTER in ``WriteQueue`` (``fastsip/server/_writes.pxi``),
one ``WriteGroup`` per primary and batch; at the end of the batch the queue sends the
groups, one pipeline per primary ended by ``WAIT``, on its ``Conn``s
(``fastsip/server/_conn.pxi``), and when Redis answers, the groups take their replies
and acknowledge their writes in C, with no Python per batch or per reply.  This room
is entered only for the rest (``WriteQueue.bind``): a request that waits for a write or
a read, a write of Python's own (a retry, a re-assertion, TCP), a conflict, an error,
a lost connection, WAIT coming short, an invalidation.  A write of a group that meets
one of those is handed over as a ``Pending`` (``_pending_of``), handled as any other.

Nothing here waits for Redis on the loop: once the worker serves, log-ins and reads
of the slot map run on the worker's ``Dialer`` thread (``fastsip/cluster/client.py``).
A primary that goes silent without closing its connection (its process stopped, its
host gone) is noticed by ``tick``: replies owed and nothing read for ``SILENT_AFTER``
seconds, and its connection is dropped as a lost one.
"""
from __future__ import annotations

import collections
import functools
import time

import hiredis

from fastsip.cluster._resp_c import key_slot, pack_cas
from fastsip.cluster.client import LOST, Dialer, conn_of, log_in
from fastsip.cluster.sync import SyncCluster, aor_key
from fastsip.core._core import READ, STAGED, WAIT, make_response
from fastsip.errors import ClusterError
from fastsip.server import logs
from fastsip.server._io_c import Batch, BatchIO, Recent, WriteGroup, WriteQueue

LOG = logs.LOG

MAX_TRIES = 8               # decisions of one request (version conflicts) before 500
RECENT = 30.0               # seconds an acknowledged record is kept for a re-assertion
WAIT_MS = 500               # WAIT 1's timeout: a replica must take a batch within it
REFRESH_EVERY = 0.1         # seconds between slot map refreshes while one is needed
SILENT_AFTER = 2.0          # seconds a primary may owe replies and send nothing (4 x WAIT_MS)
SUSPECT_FOR = 1.0           # seconds a primary that went silent or refused a log-in is not
                            # dialled again, and is asked for the slot map last
MAP = ("map", None)         # the Dialer's key of a slot map read
RETRY_AFTER = [("Retry-After", "5")]
FCALL = b"FCALL"
CAS = b"fastsip_cas"
ONE = b"1"
EMPTY = b""


class Pending:
    """A write, and the request (if any) whose answer waits for it."""

    __slots__ = ("data", "host", "port", "transport", "conn_id", "li", "first", "tries",
                 "aor", "expected", "version", "record", "pxat", "reply", "op", "batch",
                 "closed")

    def __init__(self, data, host, port, transport, conn_id, now):
        self.data = data                # the request; None for a re-assertion
        self.host = host
        self.port = port
        self.transport = transport
        self.conn_id = conn_id
        self.li = -1                    # the UDP listener it came to
        self.first = now
        self.tries = 0
        self.aor = None                 # bytes
        self.expected = 0               # the version it was decided against (0: no key)
        self.version = 0                # the version it writes
        self.record = None              # the record it writes (None: delete the key)
        self.pxat = 0
        self.reply = None               # the 200 it waits to send
        self.op = OP_WRITE              # what its command on a Conn is (OP_*)
        self.batch = None               # the Batch its write went out in
        self.closed = False             # the end of a closed connection's flows (no request)


def _version(record) -> int:
    return 0 if record is None else int.from_bytes(record[1:9], "little")


class SharedLocation:
    """A worker's room for ``--cluster`` (see the module's docstring)."""

    def __init__(self, reg, url, loop, udp_socks, deliver, counters, wait_s, grace):
        self.reg = reg
        self.store = reg.store
        self.url = url
        self.loop = loop
        self.udp_socks = udp_socks
        self.deliver = deliver          # (conn_id, bytes): a reply to a stream connection
        self.c = counters
        self.wait_s = wait_s            # --cluster-wait
        self.grace = grace              # --cluster-grace
        self.conns = {}                 # (host, port) -> Conn, one per primary
        self.slots = None               # SlotMap
        self.born = []                  # requests of this batch that wait (for their listener)
        self.conn_aors = {}             # stream connection id -> AORs written over it
        self.fresh = []                 # writes staged since the last after_batch
        self.outbox = {}                # UDP listener -> [(reply, (host, port))] to send
        self.io = BatchIO(64, 1)        # sends them (its receive side is not used)
        self.send_failed = 0            # replies the socket had no room for
        self.parked = {}                # aor -> [Pending] waiting for its write
        self.parked_checked = 0.0       # time.time() of the last _expire_parked
        self.retry = collections.deque()    # writes waiting for the slot map
        self.recent = Recent()          # aor -> (version, record, pxat, t) acknowledged last
        self.recent_pruned = 0.0        # time.time() of the last Recent.prune
        self.reasserting = set()        # aors being written again
        self.refresh_due = 0.0          # time.monotonic() of the next slot map read; 0: none
        self.read_back_due = False      # the primaries changed: read back once all are dialled
        self.suspects = {}              # (host, port) -> time.monotonic() until it is suspect
        self.silence = {}               # (host, port) -> (Conn, its reads, since): owed, unread
        self.dialer = None              # Dialer: log-ins and map reads once serving (start)
        self.load_library = False       # a primary has no fastsip library: load it
        self._serve = reg.serve_shard
        # The loop calls the core in C and queues its staged writes here, by primary
        # (set_queue); only what waits is a Pending (_slow).  The queue sends them and
        # takes their replies in C, and calls in here for the rest (these objects are
        # never replaced: the queue looks at them to tell whether Python is needed).
        self.primaries = []             # the primaries, as the queue's indices number them
        self.udp_fds = [s.fileno() for s in udp_socks]
        self.wq = WriteQueue(reg, self._slow, grace)
        self.wq.bind(store=self.store, recent=self.recent, udp_fds=self.udp_fds,
                     parked=self.parked, reasserting=self.reasserting, born=self.born,
                     fresh=self.fresh, outbox=self.outbox, wait_cmd=WAIT_CMD,
                     connect=self._connect, orphan=self._orphan, after_batch=self.after_batch,
                     on_group=self._group_replied, on_waited=self._waited,
                     on_reply=self.on_reply, on_push=self.on_push, on_lost=self.on_lost)

    # -- start and stop -------------------------------------------------------------

    def start(self) -> None:
        """Read the slot map and connect to every primary, blocking (ClusterError if no
        node answers); from now on what blocks runs on the Dialer's thread."""
        sync = SyncCluster(self.url)
        sync.close()
        self.slots = sync.slots
        self._set_owners()
        for addr in self.slots.primaries:
            try:
                self._install(addr, log_in(self.url, addr))
            except ClusterError as e:
                LOG.debug("cluster: %s", e)
                self._need_refresh()
        self.dialer = Dialer(self.loop, self._dialed)

    def _set_owners(self) -> None:
        """Tell the queue which primary serves each slot (the map changed)."""
        if self.wq.n:   # writes held behind a pipeline in flight: out to the primary they are for
            self.wq.send_groups(False)
            self.wq.end_batches()
        self.primaries = self.slots.primaries
        index = {addr: i for i, addr in enumerate(self.primaries)}
        self.wq.set_owners([-1 if a is None else index.get(a, -1) for a in self.slots.owner])
        self._relink()

    def _relink(self) -> None:
        """Tell the queue each primary's connection (one was made or lost)."""
        self.wq.set_links([self.conns.get(a) for a in self.primaries])

    def close(self) -> None:
        if self.dialer is not None:
            self.dialer.close()
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()

    def _conn(self, addr):
        """Primary ``addr``'s connection; None while there is none, and it is dialled
        (on the Dialer's thread: ``_dialed`` has the answer) unless it is suspect."""
        conn = self.conns.get(addr)
        if conn is None and self.suspects.get(addr, 0.0) <= time.monotonic():
            self.dialer.ask(("log_in", addr), functools.partial(log_in, self.url, addr))
        return conn

    def _install(self, addr, node) -> None:
        self.conns[addr] = conn_of(node, self.loop, self.wq, self.slots.replicas.get(addr, 0))
        self.suspects.pop(addr, None)
        self.c.cluster_connects += 1
        self._relink()

    def _dialed(self, key, result) -> None:
        """The Dialer's answer: a logged-in Node (or why not) for ``("log_in", addr)``,
        a slot map for ``MAP``."""
        kind, addr = key
        if kind == "map":
            self._mapped(result)
            return
        if isinstance(result, Exception):
            LOG.debug("cluster: %s", result)
            self.suspects[addr] = time.monotonic() + SUSPECT_FOR
            self._need_refresh()
        elif addr in self.conns or addr not in self.slots.replicas:
            result.close()              # a primary no more: the map changed meanwhile
        else:
            self._install(addr, result)
            if self.refresh_due:
                self.refresh_due = time.monotonic()     # the refresh can end now

    def _connect(self, j: int):
        """The queue's: a connection to primary ``j`` (None: none now)."""
        return self._conn(self.primaries[j]) if j < len(self.primaries) else None

    def _orphan(self, group: WriteGroup) -> None:
        """The queue's: ``group``'s primary cannot be reached; its writes wait for
        the slot map."""
        for i in range(group.n):
            self._unsure(self._pending_of(group, i))

    # -- the loop's entries --------------------------------------------------------

    def serve_shard(self, data, host, port, now, transport, conn_id, shard, nshards):
        """The core's ``serve_shard`` for Python callers (TCP, the inbox; the UDP
        loop calls the core in C and queues in ``wq``): every request is this
        worker's (the shared location is the authority, not the worker's shard); a
        REGISTER that changes bindings is answered when its write is done (None now)."""
        r = self._serve(data, host, port, now, transport, conn_id, 0, 1)
        if type(r) is not int:
            return r
        p = Pending(data, host, port, transport, conn_id, now)
        self.born.append(p)
        self._staged_or_parked(p, r)
        return None

    def _slow(self, data, host, port, now, r, li) -> None:
        """The loop's request that the queue does not take (WAIT, READ, or a write
        whose slot has no known primary): a Pending, as ``serve_shard`` makes."""
        p = Pending(data, host, port, "udp", -1, now)
        p.li = li
        self._staged_or_parked(p, r)

    def after_batch(self, li: int = -1) -> None:
        """A batch was read (from UDP listener ``li``; -1: from elsewhere): its writes
        go out now, in one pipeline per primary, each ended by WAIT 1."""
        if self.born:
            for p in self.born:
                p.li = li
            self.born.clear()
        self.wq.send_groups()
        if self.fresh:
            fresh = self.fresh[:]
            self.fresh.clear()
            for p in fresh:
                self._send(p)
        self.wq.end_batches()
        if self.outbox:
            self._send_replies()

    def _pending_of(self, group: WriteGroup, i: int) -> Pending:
        """Write ``i`` of ``group`` as a Pending: Python takes it over."""
        data, host, port, li, first, aor, expected, version, record, pxat, reply = group.hand(i)
        p = Pending(data, host, port, "udp", -1, first)
        p.li, p.aor, p.expected, p.version, p.record, p.pxat, p.reply = \
            li, aor, expected, version, record, pxat, reply
        return p

    def _group_replied(self, group: WriteGroup, lost: bool) -> None:
        """Redis answered every write of ``group`` (``lost``: the connection went
        first).  Other replies than 1 are handled as a Pending's; what was written
        is acknowledged now when no WAIT follows, else when it comes."""
        for i, reply in group.take_odd():
            self._written(self._pending_of(group, i), reply)
        if lost:
            for i in group.indices(0):
                self._unsure(self._pending_of(group, i))
        if not group.wait:
            self._group_done(group, time.time())

    def _group_done(self, group: WriteGroup, now: float) -> None:
        """``_done`` for the written ones of ``group``, in C but for what waited."""
        want = bool(self.parked or self.reasserting)
        self.wq.group_done(group, now, want)
        if want:
            for aor in group.done_aors:
                self.reasserting.discard(aor)
                if aor in self.parked:
                    self._release_parked(aor, now)

    def _send_replies(self) -> None:
        """The UDP replies of what was acknowledged, one sendmmsg per listener."""
        for li, items in self.outbox.items():
            sent = self.io.send(self.udp_socks[li].fileno(), items)
            self.send_failed += len(items) - sent
        self.outbox.clear()

    def counters(self) -> dict:
        """The counters kept apart from WorkerCounters (the queue's, in C, and the
        replies this room could not send), by their names there: the worker adds
        them to its report."""
        r = self.wq.counters()
        r["dropped_send_failed"] += self.send_failed + self.io.send_errors
        return r

    def tick(self, now: float) -> float:
        """Drop a silent primary's connection; read the slot map when due; retry what
        waited for it, fail what waited longer than ``--cluster-wait``.  Returns seconds
        until it wants to run again."""
        mono = time.monotonic()
        self._check_silence(mono)
        if self.refresh_due and mono >= self.refresh_due and not self.dialer.busy(MAP):
            self._refresh(mono)
        if self.retry:
            waiting, self.retry = self.retry, collections.deque()
            for p in waiting:
                if now - p.first > self.wait_s:
                    self._fail(p, "unavailable")
                elif self.refresh_due:
                    self.retry.append(p)
                else:
                    self.c.cluster_retries += 1
                    self._again(p, now)
            self.after_batch()
        elif self.wq.n:
            # writes held behind a pipeline whose connection was lost since
            self.after_batch()
        if self.parked and now - self.parked_checked > 1.0:
            self._expire_parked(now)
        if now - self.recent_pruned > RECENT / 2:
            # (entries older than RECENT are ignored where read; this frees them)
            self.recent_pruned = now
            self.recent.prune(now - RECENT)
        return REFRESH_EVERY if (self.retry or self.refresh_due) else 1.0

    def _check_silence(self, mono: float) -> None:
        """A primary that owes replies and has sent nothing for SILENT_AFTER seconds
        has stopped (paused, or its host is gone: no reset comes, and TCP would wait
        for minutes): its connection is dropped as lost, so that what it owes is
        retried once the slot map names its successor."""
        for addr, conn in list(self.conns.items()):
            seen = self.silence.get(addr)
            if not conn.owed:
                if seen is not None:
                    del self.silence[addr]
            elif seen is None or seen[0] is not conn or seen[1] != conn.reads:
                self.silence[addr] = (conn, conn.reads, mono)
            elif mono - seen[2] >= SILENT_AFTER:
                LOG.warning("cluster: Redis at %s:%d sent nothing for %.1f s while %d replies "
                            "were owed: connection dropped", addr[0], addr[1], mono - seen[2],
                            conn.owed)
                del self.silence[addr]
                self.suspects[addr] = mono + SUSPECT_FOR
                conn.lose()

    def _expire_parked(self, now: float) -> None:
        """A safety net: a request that waited for another's write longer than twice
        --cluster-wait gets its 500 (every write ends in time, so none should)."""
        self.parked_checked = now
        for aor in list(self.parked):
            waiting = self.parked[aor]
            late = [p for p in waiting if now - p.first > 2 * self.wait_s]
            if late:
                self.parked[aor] = [p for p in waiting if p not in late]
                if not self.parked[aor]:
                    del self.parked[aor]
                for p in late:
                    LOG.warning("cluster: a request for %s waited %.1f s for another's write",
                                aor.decode("utf-8", "replace"), now - p.first)
                    p.aor = None
                    self._fail(p, "unavailable")

    # -- the callbacks of a Conn (through the queue) ---------------------------------

    def on_reply(self, item: Pending, reply) -> None:
        """The reply to the command of ``item`` (LOST: it will not come)."""
        if item.op == OP_WRITE:
            self._written(item, reply)
        elif item.op == OP_READ:
            self._got(item, reply)
        else:
            self._read(item.aor, reply)

    def on_push(self, push) -> None:
        """Another client wrote a key this worker holds a copy of: drop the copy
        (unless a write of it is under way: its reply, in order behind this push,
        settles it)."""
        if len(push) < 2 or push[0] != b"invalidate":
            return
        keys = push[1]
        if keys is None:                # FLUSHALL / FLUSHDB: every copy is stale
            self.c.cluster_invalidations += self.store.cache_clear()
            return
        store = self.store
        for key in keys:
            aor = key[len(KEY_HEAD):-1]
            if not store.cache_busy(aor):
                store.cache_drop(aor)
                self.c.cluster_invalidations += 1

    def on_lost(self, conn) -> None:
        """A primary's connection is gone (it died, or failed over): its tracking
        went with it, so every copy is dropped, and the map is read again."""
        self.c.cluster_lost_connections += 1
        self.conns.pop(conn.addr, None)
        self._relink()
        self.store.cache_clear()
        self._need_refresh()

    # -- writes ----------------------------------------------------------------------

    def _staged_or_parked(self, p: Pending, r: int) -> None:
        reg = self.reg
        if r == STAGED:
            p.aor, p.expected, p.version, p.record, latest, p.reply = reg.staged
            p.pxat = int((latest + self.grace) * 1000) if p.record is not None else 0
            self.fresh.append(p)
        elif r == WAIT:
            self.c.cluster_parked += 1
            self.parked.setdefault(reg.waiting_aor, []).append(p)
        elif r == READ:
            p.aor = reg.waiting_aor
            self._read_through(p)
        else:                           # a shard number: not with one shard
            raise AssertionError(f"serve_shard gave {r}")

    def _read_through(self, p: Pending) -> None:
        """The AOR of ``p`` is not in the cache: GET it (the read makes Redis track
        it for this worker), then decide ``p`` again."""
        key = KEY_HEAD + p.aor + b"}"
        conn = self._conn(self.slots.owner[key_slot(key)])
        if conn is None:
            self._wait_for_map(p)
            return
        self.c.cluster_reads += 1
        p.op = OP_READ
        conn.push(hiredis.pack_command((b"GET", key)), p)
        conn.open_batch()

    def _got(self, p: Pending, reply) -> None:
        if reply is LOST or isinstance(reply, hiredis.ReplyError):
            if reply is not LOST:
                self._error(reply)
            self._wait_for_map(p)
            return
        now = time.time()
        aor = p.aor
        if not self.store.cache_busy(aor):
            self.store.cache_put(aor, reply, now)
        self._again(p, now)

    def _send(self, p: Pending) -> None:
        slot, command = pack_cas(p.aor, p.expected, p.record, p.pxat)
        addr = self.slots.owner[slot]
        conn = self._conn(addr) if addr is not None else None
        if conn is None:
            # The write never left, but the copy holds it and marks the AOR busy: drop
            # the copy, or the retry would wait behind its own write for ever.
            self._unsure(p)
            return
        batch = conn.open_batch()
        batch.size += 1
        p.op = OP_WRITE
        p.batch = batch if conn.replicas else None
        conn.push(command, p)

    def _written(self, p: Pending, reply) -> None:
        if reply == 1:
            if p.batch is not None:
                p.batch.acked.append(p)     # the WAIT behind it says when it is safe
            else:
                self._done(p, time.time())
            return
        if reply is LOST or isinstance(reply, hiredis.ReplyError):
            if reply is not LOST:
                self._error(reply)
            self._unsure(p)
            return
        # The version did not match: ``reply`` is the stored record (None: no key).
        now = time.time()
        self.c.cluster_conflicts += 1
        self.reasserting.discard(p.aor)
        self.store.cache_put(p.aor, reply, now)
        self._check_backwards(p.aor, reply, now)
        p.tries += 1
        if p.data is None and not p.closed:     # a re-assertion: someone wrote since
            self._release_parked(p.aor, now)
        elif p.tries > MAX_TRIES:
            self._fail(p, "conflicts")
            self._release_parked(p.aor, now)
        else:
            self._release_parked(p.aor, now, first=p)

    def _waited(self, batch: Batch, reply) -> None:
        now = time.time()
        if type(reply) is int and reply >= 1:
            for p in batch.acked:
                self._done(p, now)
            for group in batch.groups:
                self._group_done(group, now)
            return
        if reply is not LOST:
            self.c.cluster_wait_shortfalls += 1
            if isinstance(reply, hiredis.ReplyError):
                self._error(reply)
        for p in batch.acked:           # stored on the primary only: not acknowledged
            self._unsure(p)
        for group in batch.groups:
            for i in group.indices(1):
                self._unsure(self._pending_of(group, i))

    def _done(self, p: Pending, now: float) -> None:
        """Acknowledged: the copy is the stored one; answer, remember, and decide
        what waited for it."""
        aor = p.aor
        self.store.cache_done(aor)
        self.c.cluster_writes += 1
        if self.reasserting:
            self.reasserting.discard(aor)
        self.recent.put(aor, p.version, p.record, p.pxat, now)
        if p.data is not None:
            self._answer(p, p.reply)
            if p.conn_id >= 0:          # its flows end with the connection (flows_end)
                aors = self.conn_aors.get(p.conn_id)
                if aors is None:
                    aors = self.conn_aors[p.conn_id] = set()
                aors.add(aor)
        if aor in self.parked:
            self._release_parked(aor, now)

    def _unsure(self, p: Pending) -> None:
        """The write may or may not be stored: forget the copy; try again when the
        slot map is right (deciding again, against the stored record)."""
        self.store.cache_drop(p.aor)
        self._wait_for_map(p)
        self.retry.extend(self.parked.pop(p.aor, ()))      # what waited for it waits on

    def _wait_for_map(self, p: Pending) -> None:
        self._need_refresh()
        self.retry.append(p)

    def _release_parked(self, aor: bytes, now: float, first: Pending | None = None) -> None:
        """Decide again what waited for ``aor`` (``first`` before them)."""
        waiting = self.parked.pop(aor, [])
        if first is not None:
            waiting.insert(0, first)
        for p in waiting:
            self._again(p, now)

    def _again(self, p: Pending, now: float) -> None:
        """Decide ``p``'s request again: its AOR's copy changed, or its write is to
        be retried.  (A re-assertion is not retried: _read_back checks again.)"""
        if p.closed:
            self._end_flows(p, now)
            return
        if p.data is None:
            self.reasserting.discard(p.aor)
            return
        try:
            r = self.reg.serve_again(p.data, p.host, p.port, now, p.transport, p.conn_id)
        except Exception:               # noqa: BLE001 - a bug in the core: count, drop
            self.c.internal_errors += 1
            LOG.exception("the registrar core raised deciding a request again")
            return
        if type(r) is int:
            self._staged_or_parked(p, r)
        elif r is not None:
            self._answer(p, r)

    def flows_end(self, conn) -> None:
        """The stream connection ``conn`` closed: its flow bindings (RFC 5626 flows,
        WebSocket ``.invalid`` contacts, see Store.connection_closed) end in the
        shared records of the AORs written over it, as on one machine."""
        aors = self.conn_aors.pop(conn.cid, None)
        if not aors:
            return
        now = time.time()
        for aor in aors:
            p = Pending(None, conn.host, conn.peer[1], conn.transport, conn.cid, now)
            p.closed, p.aor = True, aor
            self._end_flows(p, now)
        self.after_batch()

    def _end_flows(self, p: Pending, now: float) -> None:
        r = self.reg.stage_closed(p.aor, p.conn_id, p.host, p.port, now)
        if r is not None:
            self._staged_or_parked(p, r)

    def _fail(self, p: Pending, reason: str) -> None:
        """Give up on ``p``: 500 with Retry-After (nothing was acknowledged)."""
        self.c.count("cluster_failures", reason)
        if p.aor is not None:           # (its copy: already dropped, or the stored one)
            self.reasserting.discard(p.aor)
            self.retry.extend(self.parked.pop(p.aor, ()))
        if p.data is not None:
            self._answer(p, make_response(p.data, 500, "Location unavailable, try again",
                                          RETRY_AFTER, (p.host.decode(), p.port)))

    def _answer(self, p: Pending, reply) -> None:
        if reply is None:
            return
        if p.conn_id >= 0:
            self.deliver(p.conn_id, reply)
            return
        li = p.li if p.li >= 0 else 0
        items = self.outbox.get(li)
        if items is None:
            items = self.outbox[li] = []
        items.append((reply, (p.host, p.port)))

    # -- the map changing under us ---------------------------------------------------

    def _error(self, reply) -> None:
        text = str(reply)
        word = text.split(" ", 1)[0]
        if word in MAP_ERRORS:
            self._need_refresh()
        elif "function not found" in text.lower():
            self.load_library = True
            self._need_refresh()
        else:
            LOG.warning("cluster: Redis answered %s", text[:200])
        word = word.lower()
        self.c.count("cluster_errors", word if word in ERROR_LABELS else "err")

    def _need_refresh(self) -> None:
        if not self.refresh_due:
            self.refresh_due = time.monotonic()
            self.c.cluster_map_refreshes += 1

    def _refresh(self, mono: float) -> None:
        """Read the slot map again, on the Dialer's thread (``_mapped`` takes it), from
        any node that answers: the seeds and the primaries, the suspect ones last."""
        addrs = list(dict.fromkeys(list(self.url.seeds) +
                                   (self.slots.primaries if self.slots else [])))
        addrs.sort(key=lambda a: self.suspects.get(a, 0.0) > mono)     # (a stable sort)
        self.dialer.ask(MAP, functools.partial(_read_map, self.url, addrs, self.load_library))

    def _mapped(self, result) -> None:
        """The slot map read: connect to its primaries, and read back what this worker
        acknowledged lately once the primaries changed and all are connected."""
        if isinstance(result, Exception):
            LOG.debug("cluster: %s", result)
            self.refresh_due = time.monotonic() + REFRESH_EVERY
            return
        slots, loaded, error = result
        if loaded:
            self.load_library = False
        if error is not None:
            LOG.warning("cluster: %s", error)
        if self.slots is None or slots.owner != self.slots.owner:
            self.read_back_due = True
        self.slots = slots
        self._set_owners()
        for addr in [a for a in self.conns if a not in slots.replicas]:
            # a primary no more (a planned failover: it lives on as a replica): the copies
            # it tracked go with the connection, and what it owes is retried
            self.conns.pop(addr).lose()
        for addr, conn in self.conns.items():
            conn.replicas = slots.replicas[addr]
        if [a for a in slots.primaries if self._conn(a) is None]:   # (each one dialled)
            self.refresh_due = time.monotonic() + REFRESH_EVERY
            return
        self.refresh_due = 0.0
        if self.read_back_due:
            self.read_back_due = False
            self._read_back()

    # -- what a failover may have lost --------------------------------------------------

    def _read_back(self) -> None:
        """After primaries changed: read what this worker acknowledged in the last
        RECENT seconds, and write again what went missing (``_check_backwards``)."""
        now = time.time()
        for aor in self.recent.aors(now - RECENT):
            key = KEY_HEAD + aor + b"}"
            conn = self._conn(self.slots.owner[key_slot(key)])
            if conn is not None:
                p = Pending(None, None, 0, "udp", -1, 0.0)
                p.aor, p.op = aor, OP_READBACK
                conn.push(hiredis.pack_command((b"GET", key)), p)
                conn.open_batch()
        self.after_batch()

    def _read(self, aor: bytes, reply) -> None:
        if reply is LOST or isinstance(reply, hiredis.ReplyError) or \
                self.store.cache_busy(aor):
            return
        self._check_backwards(aor, reply, time.time())

    def _check_backwards(self, aor: bytes, stored, now: float) -> None:
        """``stored`` (the stored record of ``aor``) is older than what this worker
        acknowledged: a failover lost a write.  Write ours again, as it was."""
        mine = self.recent.get(aor)
        if mine is None or now - mine[3] > RECENT or aor in self.reasserting or \
                _version(stored) >= mine[0]:
            return
        if stored is None and mine[1] is None:
            return                      # ours was a removal, and nothing is stored
        self.c.cluster_reasserted += 1
        self.reasserting.add(aor)
        p = Pending(None, None, 0, "udp", -1, now)
        p.aor, p.expected, p.version, p.record, p.pxat = aor, _version(stored), mine[0], \
            mine[1], mine[2]
        self.store.cache_put(aor, mine[1], now)
        self.fresh.append(p)


def _read_map(url, addrs, load_library: bool):
    """The Dialer's: (slot map, library loaded, why not) from the first of ``addrs``
    that answers; ClusterError when none does."""
    sync = SyncCluster(url, REFRESH_TIMEOUT, addrs)
    error = None
    try:
        if load_library:
            sync.load_library()
    except ClusterError as e:
        error = e
    finally:
        sync.close()
    return sync.slots, load_library and error is None, error


OP_WRITE, OP_READ, OP_READBACK = 0, 1, 2     # Pending.op
KEY_HEAD = aor_key(b"")[:-1]        # b"fs:r:{"
WAIT_CMD = hiredis.pack_command((b"WAIT", b"1", str(WAIT_MS).encode()))
REFRESH_TIMEOUT = 0.3       # seconds for each node asked for the slot map
# errors that say the slot map changed or a primary is failing over
ERROR_LABELS = frozenset(("ask", "clusterdown", "loading", "masterdown", "moved", "noreplicas",
                          "readonly", "tryagain"))
MAP_ERRORS = frozenset(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN", "READONLY", "LOADING",
                        "MASTERDOWN", "NOREPLICAS"))
