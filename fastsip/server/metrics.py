"""The metrics: every counter and gauge declared in one table, and their Prometheus text.

``METRICS`` declares each one: its name in ``/metrics``, its kind, its help
text, its label and where its value is in a worker's report.  A worker keeps
its own counters in a :class:`WorkerCounters` (one attribute per counter and
label value, all made from the table and starting at zero: none is added on
first use; the counts of every datagram are kept by the compiled loop and
added at report time, ``report(loop.counters())``) and reports them with the
core's (``RegistrarCore.stats()``, under ``core``) as a plain dict; the
supervisor adds the reports of all workers (a restarted worker's on top of its
predecessors', so that counters never go down, see :func:`add_reports` and
:func:`latest_report`) and renders them with :func:`render`.
"""
from __future__ import annotations

from typing import NamedTuple

from fastsip.server._io_c import Histogram as _CHistogram

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

#: Upper bounds (seconds) of the processing-latency histogram.
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metric(NamedTuple):
    """One declared metric.

    ``keys`` say where its value is in a (summed) report, added up when there
    are several: ``"received"`` is a worker's own counter, ``"core.requests"``
    the core's (``RegistrarCore.stats()["requests"]``), ``"supervisor.restarts"``
    the supervisor's.  With a ``label`` the report holds ``{label value: n}``;
    ``values`` are the label values a worker counts (the core's are whatever
    its stats hold).  ``name`` None: reported by the workers, not exported.
    """
    name: str | None
    kind: str
    help: str
    keys: tuple[str, ...]
    label: str | None = None
    values: tuple[str, ...] = ()


METRICS: tuple[Metric, ...] = (
    Metric("fastsip_requests_total", COUNTER, "SIP requests received, by method.",
           ("core.requests",), "method"),
    Metric("fastsip_replies_total", COUNTER, "SIP replies sent, by status code.",
           ("core.replies",), "code"),
    Metric("fastsip_bindings", GAUGE, "Live bindings (contacts) held by all workers.",
           ("core.bindings",)),
    Metric("fastsip_aors", GAUGE, "AORs with at least one live binding.", ("core.aors",)),
    Metric("fastsip_expired_bindings_total", COUNTER, "Bindings removed because they expired.",
           ("core.expired",)),
    Metric("fastsip_parse_errors_total", COUNTER,
           "Malformed messages (unparseable datagrams, and TCP streams that could not be framed).",
           ("core.parse_errors", "framing_errors")),
    Metric("fastsip_auth_failures_total", COUNTER,
           "Failed digest authentications, by reason (wrong: a wrong password or unknown "
           "user; throttled: refused by the failure budget; stale, replayed, unknown_nonce, "
           "forbidden, bad).", ("core.auth_failures",), "reason"),
    Metric("fastsip_redirects_total", COUNTER,
           "Requests the redirect server (--redirect) answered, by outcome (moved: 302; "
           "unavailable: 480, no binding; not_found: 404, a domain not served; unknown_user: "
           "404, not in --users; loop: 404, the only contact is the Request-URI; in_dialog and "
           "cancel: 481).", ("core.redirects",), "outcome"),
    Metric("fastsip_redirects_truncated_total", COUNTER,
           "302s that listed fewer contacts than the AOR has, to fit one datagram.",
           ("core.redirects_truncated",)),
    Metric("fastsip_max_bindings_refused_total", COUNTER,
           "REGISTERs refused with 503 because they would add bindings beyond --max-bindings.",
           ("core.max_bindings_refused",)),
    Metric("fastsip_handoffs_total", COUNTER,
           "Requests handed from the worker that received them to the worker owning their AOR.",
           ("handoffs_sent",)),
    Metric("fastsip_rate_limited_total", COUNTER,
           "Messages dropped by the per-source-address rate limit.", ("rate_limited",)),
    Metric("fastsip_dropped_total", COUNTER, "Messages dropped by the server shell, by reason.",
           ("dropped",), "reason",
           ("handoff_overflow", "max_connections", "oversized", "send_failed", "state_overflow",
            "tcp_overflow")),
    Metric("fastsip_received_total", COUNTER, "SIP messages received, by transport.",
           ("received",), "transport", ("tcp", "tls", "udp", "ws", "wss")),
    Metric("fastsip_receive_batches_total", COUNTER,
           "recvmmsg calls that returned datagrams, by socket kind (UDP, or the hand-off inbox).",
           ("batches",), "socket", ("inbox", "udp")),
    Metric("fastsip_tcp_connections", GAUGE,
           "Open stream connections (TCP, and TLS and WebSocket over TCP).",
           ("tcp_connections",)),
    Metric("fastsip_connections", GAUGE, "Open stream connections, by transport.",
           ("connections",), "transport", ("tcp", "tls", "ws", "wss")),
    Metric("fastsip_tcp_keepalives_total", COUNTER, "RFC 5626 CRLFCRLF keep-alives answered.",
           ("keepalives",)),
    # TCP hardening (issue #14)
    Metric("fastsip_tcp_refused_total", COUNTER,
           "TCP connections closed as they were accepted, by reason: every slot taken "
           "(--max-connections), or the source's cap reached (--max-connections-per-source).",
           ("tcp_refused",), "reason", ("max_connections", "per_source")),
    Metric("fastsip_tcp_closed_total", COUNTER,
           "TCP connections closed by the server, by reason: a message not complete in time "
           "(--tcp-message-timeout), a TLS handshake or WebSocket upgrade not complete in that "
           "time, silent too long (--tcp-idle-timeout), or evicted for a newcomer when every "
           "slot was taken (the oldest of the source holding the most).",
           ("tcp_closed",), "reason", ("evicted", "handshake_timeout", "idle", "message_timeout")),
    # TLS and WebSocket (issue #13)
    Metric("fastsip_tls_handshake_failures_total", COUNTER,
           "TLS handshakes that failed, by reason: not TLS at all (plaintext on a TLS port), "
           "a version older than TLS 1.2, a client certificate missing or not trusted "
           "(--tls-verify-client), other.",
           ("tls_handshake_failures",), "reason", ("certificate", "not_tls", "other", "version")),
    Metric("fastsip_ws_refused_total", COUNTER,
           "WebSocket connections closed for a bad upgrade or frame, by reason (handshake: "
           "malformed upgrade; subprotocol: no 'sip' offered; version; origin: not in "
           "--ws-origin; unmasked, too_big, utf8, protocol: a frame breaking RFC 6455).",
           ("ws_refused",), "reason",
           ("handshake", "origin", "protocol", "subprotocol", "too_big", "unmasked", "utf8",
            "version")),
    Metric("fastsip_flow_bindings_removed_total", COUNTER,
           "Bindings removed because the connection they lived through closed (RFC 5626 "
           "flows, RFC 7118 .invalid contacts).", ("core.flow_bindings_removed",)),
    Metric("fastsip_tcp_sources", GAUGE,
           "Sources (IPv4 addresses, IPv6 /64s) holding TCP connections, summed over workers.",
           ("tcp_sources",)),
    Metric("fastsip_state_rows_written_total", COUNTER,
           "AOR changes written to the change logs (or straight into the state file).",
           ("state_rows_written",)),
    Metric("fastsip_state_folded_changes_total", COUNTER,
           "AOR changes read from the change logs into the state file (every --fold-interval).",
           ("supervisor.folded",)),
    Metric("fastsip_state_pending_changes", GAUGE,
           "AOR changes taken from the store and not yet written to the state file.",
           ("state_pending",)),
    Metric("fastsip_state_errors_total", COUNTER, "Failed writes to the state file.",
           ("state_errors",)),
    # the shared location (--cluster, issue #12, docs/cluster.md)
    Metric("fastsip_cluster_writes_total", COUNTER,
           "AOR records written to the shared location and acknowledged (a replica took them "
           "when the primary has one).", ("cluster_writes",)),
    Metric("fastsip_cluster_round_trips_total", COUNTER,
           "Pipelines sent to a Redis primary (one per primary per receive batch).",
           ("cluster_round_trips",)),
    Metric("fastsip_cluster_batched_writes_total", COUNTER,
           "Writes sent in those pipelines (divided by the round trips: the mean batch).",
           ("cluster_batched",)),
    Metric("fastsip_cluster_queued_writes_total", COUNTER,
           "Of those, the ones the compiled loop queued in C (a UDP REGISTER staged on its "
           "first decision); the others went through Python (TCP, decided again, retried).",
           ("cluster_queued",)),
    Metric("fastsip_cluster_reads_total", COUNTER,
           "AOR records read from the shared location because the cache had no copy.",
           ("cluster_reads",)),
    Metric("fastsip_cluster_conflicts_total", COUNTER,
           "Writes refused because the stored version was not the one decided on: another "
           "node or worker wrote the AOR, or the write was decided on no copy (a first "
           "sight of the AOR, or after an invalidation or a lost connection) and the key "
           "existed; the request was decided again on the stored record.",
           ("cluster_conflicts",)),
    Metric("fastsip_cluster_retries_total", COUNTER,
           "Requests decided again after a lost connection, a moved slot or a WAIT that came "
           "short.", ("cluster_retries",)),
    Metric("fastsip_cluster_wait_shortfalls_total", COUNTER,
           "WAIT 1 that came back without a replica's acknowledgement in time (the batch was "
           "not acknowledged to the phones, but retried).", ("cluster_wait_shortfalls",)),
    Metric("fastsip_cluster_map_refreshes_total", COUNTER,
           "Times the slot map had to be read again (a primary lost, failing over, or moved).",
           ("cluster_map_refreshes",)),
    Metric("fastsip_cluster_failures_total", COUNTER,
           "Requests answered 500 with Retry-After by reason: unavailable (no primary took the "
           "write within --cluster-wait), conflicts (decided again too often).",
           ("cluster_failures",), "reason", ("conflicts", "unavailable")),
    Metric("fastsip_cluster_errors_total", COUNTER, "Error replies from Redis, by their first word.",
           ("cluster_errors",), "error",
           ("ask", "clusterdown", "err", "loading", "masterdown", "moved", "noreplicas",
            "readonly", "tryagain")),
    Metric("fastsip_cluster_invalidations_total", COUNTER,
           "Cached AORs dropped because another client wrote them (CLIENT TRACKING).",
           ("cluster_invalidations",)),
    Metric("fastsip_cluster_parked_total", COUNTER,
           "REGISTERs that waited for a write of their AOR already under way.",
           ("cluster_parked",)),
    Metric("fastsip_cluster_reasserted_total", COUNTER,
           "Acknowledged records written again because the stored version went backwards "
           "(a failover lost them).", ("cluster_reasserted",)),
    Metric("fastsip_cluster_lost_connections_total", COUNTER,
           "Connections to Redis primaries lost.", ("cluster_lost_connections",)),
    Metric("fastsip_cluster_connects_total", COUNTER, "Connections made to Redis primaries.",
           ("cluster_connects",)),
    Metric("fastsip_internal_errors_total", COUNTER,
           "Messages on which the registrar core raised (bugs; logged with a traceback).",
           ("internal_errors",)),
    Metric("fastsip_workers", GAUGE, "Worker processes running.", ("supervisor.workers_alive",)),
    Metric("fastsip_workers_configured", GAUGE, "Worker processes configured.",
           ("supervisor.workers",)),
    Metric("fastsip_worker_restarts_total", COUNTER, "Workers restarted after they died.",
           ("supervisor.restarts",)),
    Metric("fastsip_processing_seconds", HISTOGRAM,
           "Time from a receive batch to its replies being sent, per message.", ("latency",)),
    # reported by the workers (GET /api/workers), not exported
    Metric(None, COUNTER, "Hand-offs this worker served for others.", ("handoffs_received",)),
    Metric(None, GAUGE, "Source addresses the rate limiter tracks.", ("rate_limit_sources",)),
    Metric(None, COUNTER, "Sleeps of --batch-wait before reading (steady traffic: the receive "
           "batch was let grow).", ("batch_waits",)),
)

_OTHERS = ("core.", "supervisor.")


def _worker_keys() -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """(report key, label values, kind) of every counter or gauge a worker keeps itself."""
    out = []
    for m in METRICS:
        for key in m.keys:
            if m.kind != HISTOGRAM and not key.startswith(_OTHERS):
                out.append((key, m.values, m.kind))
    return tuple(out)


#: What a WorkerCounters holds: (report key, label values, kind).
WORKER_KEYS = _worker_keys()

#: Report paths of gauges: added across live workers, never carried over from dead ones.
GAUGES = frozenset(tuple(key.split(".")) for m in METRICS if m.kind == GAUGE
                   for key in m.keys if not key.startswith("supervisor."))


def _attr(key: str, value: str | None = None) -> str:
    return f"{key}_{value}" if value is not None else key


class WorkerCounters:
    """A worker's own counters and gauges: one attribute per declared counter
    (``keepalives``) or per label value (``received_udp``, ``dropped_tcp_overflow``),
    all from ``METRICS``, all zero at the start."""

    __slots__ = tuple(_attr(key, v) for key, values, _ in WORKER_KEYS
                      for v in (values or (None,)))

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def count(self, key: str, value: str, n: int = 1) -> None:
        """Add ``n`` to the counter of ``key`` for label ``value`` (``count("received", "tls")``)."""
        name = f"{key}_{value}"
        setattr(self, name, getattr(self, name) + n)

    def report(self, extra: dict | None = None) -> dict:
        """The counters as a worker reports them: ``{key: n}`` or ``{key: {value: n}}``;
        ``extra``: counts kept elsewhere (the compiled loop's ``EventLoop.counters()``),
        by attribute name, added to these."""
        extra = extra or {}

        def get(name):
            return getattr(self, name) + extra.get(name, 0)
        return {key: ({v: get(_attr(key, v)) for v in values} if values else get(key))
                for key, values, _ in WORKER_KEYS}


class Histogram(_CHistogram):
    """The processing-latency histogram (compiled, ``_io_c.Histogram``: the worker's
    loop adds to it without entering Python): ``observe(seconds, n)``, ``as_dict()``."""

    def __init__(self, bounds=LATENCY_BUCKETS) -> None:
        super().__init__(bounds)


def add_reports(total: dict, report: dict, with_gauges: bool = True, _path: tuple = ()) -> dict:
    """Add ``report`` into ``total`` (nested dicts of numbers, histogram lists);
    without ``with_gauges``, the gauges (``GAUGES``) are left out."""
    for k, v in report.items():
        path = _path + (k,)
        if not with_gauges and path in GAUGES:
            continue
        if isinstance(v, dict):
            add_reports(total.setdefault(k, {}), v, with_gauges, path)
        elif isinstance(v, list):
            cur = total.setdefault(k, [0] * len(v))
            for i, x in enumerate(v):
                cur[i] += x
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
    return total


def latest_report(a: dict, b: dict) -> dict:
    """Two reports of one worker taken at different times, as one: the larger of each
    value (a counter only grows, so the later report's).  Gauges come out as
    meaningless maxima: keep them out (``add_reports(..., with_gauges=False)``)."""
    out: dict = {}
    for k in a.keys() | b.keys():
        x, y = a.get(k), b.get(k)
        if x is None or y is None:
            out[k] = x if y is None else y
        elif isinstance(x, dict) and isinstance(y, dict):
            out[k] = latest_report(x, y)
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            out[k] = [max(i, j) for i, j in zip(x, y, strict=True)]
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)):
            out[k] = max(x, y)
        else:
            out[k] = y
    return out


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(total: dict, key: str):
    """The value at a dotted report key (``core.requests``), or None."""
    v = total
    for part in key.split("."):
        if not isinstance(v, dict):
            return None
        v = v.get(part)
    return v


def _histogram(out: list, m: Metric, hist) -> None:
    if not hist:
        hist = {"counts": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0}
    name = m.name
    out.append(f"# HELP {name} {m.help}")
    out.append(f"# TYPE {name} histogram")
    acc = 0
    for bound, n in zip(LATENCY_BUCKETS, hist["counts"][:-1], strict=True):   # then +Inf
        acc += n
        out.append(f'{name}_bucket{{le="{bound:g}"}} {acc}')
    acc += hist["counts"][-1]
    out.append(f'{name}_bucket{{le="+Inf"}} {acc}')
    out.append(f"{name}_sum {hist['sum']:.9f}")
    out.append(f"{name}_count {hist['count']}")


def render(total: dict, workers_alive: int, workers: int, restarts: int,
           node: str | None = None, folded: int = 0) -> str:
    """The Prometheus text exposition (format 0.0.4) of the summed reports; ``node``:
    the --node-id of a node of a cluster, given as ``fastsip_node_info{node=...} 1``;
    ``folded``: the changes the supervisor read from the change logs (``state.Folder``)."""
    total = dict(total, supervisor={"workers_alive": workers_alive, "workers": workers,
                                    "restarts": restarts, "folded": folded})
    out: list[str] = []
    if node is not None:
        out += ["# HELP fastsip_node_info This node of a cluster (--node-id); always 1.",
                "# TYPE fastsip_node_info gauge", f'fastsip_node_info{{node="{_esc(node)}"}} 1']
    for m in METRICS:
        if m.name is None:
            continue
        if m.kind == HISTOGRAM:
            _histogram(out, m, _value(total, m.keys[0]))
            continue
        out.append(f"# HELP {m.name} {m.help}")
        out.append(f"# TYPE {m.name} {m.kind}")
        if m.label is None:
            value = sum(_value(total, key) or 0 for key in m.keys)
            out.append(f"{m.name} {value}")
            continue
        by_value: dict = {v: 0 for v in m.values}
        for key in m.keys:
            for v, n in (_value(total, key) or {}).items():
                by_value[str(v)] = by_value.get(str(v), 0) + n
        for v, n in sorted(by_value.items()):
            out.append(f'{m.name}{{{m.label}="{_esc(v)}"}} {n}')
    return "\n".join(out) + "\n"
