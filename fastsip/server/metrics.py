"""Counters a worker keeps beside the core's, and the Prometheus text rendering.

A worker reports a plain dict (``Worker.report()``); the supervisor adds the
reports of all workers (and keeps the counters of workers that died, so that
counters never go down) and renders them with ``render()``.
"""
from __future__ import annotations

from bisect import bisect_left

#: Upper bounds (seconds) of the processing-latency histogram.
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

#: Gauges in a report: added across live workers, never carried over from dead ones.
GAUGES = ("bindings", "aors", "tcp_connections", "rate_limit_sources", "state_pending")


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds=LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def as_dict(self) -> dict:
        return {"counts": list(self.counts), "sum": self.sum, "count": self.count}


def add_reports(total: dict, report: dict, with_gauges: bool = True) -> dict:
    """Add ``report`` into ``total`` (nested dicts of numbers, histogram lists)."""
    for k, v in report.items():
        if not with_gauges and k in GAUGES:
            continue
        if isinstance(v, dict):
            add_reports(total.setdefault(k, {}), v, with_gauges)
        elif isinstance(v, list):
            cur = total.setdefault(k, [0] * len(v))
            for i, x in enumerate(v):
                cur[i] += x
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
    return total


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(total: dict, workers_alive: int, workers: int, restarts: int) -> str:
    """The Prometheus text exposition (format 0.0.4) of the summed reports."""
    out = []

    def metric(name, kind, help_, samples):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels)
            out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    core = total.get("core", {})
    metric("fastsip_requests_total", "counter", "SIP requests received, by method.",
           sorted((( ("method", m),), n) for m, n in core.get("requests", {}).items()))
    metric("fastsip_replies_total", "counter", "SIP replies sent, by status code.",
           sorted(((("code", c),), n) for c, n in core.get("replies", {}).items()))
    metric("fastsip_bindings", "gauge", "Live bindings (contacts) held by all workers.",
           [((), core.get("bindings", 0))])
    metric("fastsip_aors", "gauge", "AORs with at least one live binding.",
           [((), core.get("aors", 0))])
    metric("fastsip_expired_bindings_total", "counter", "Bindings removed because they expired.",
           [((), core.get("expired", 0))])
    metric("fastsip_parse_errors_total", "counter",
           "Malformed messages (unparseable datagrams, and TCP streams that could not be framed).",
           [((), core.get("parse_errors", 0) + total.get("framing_errors", 0))])
    metric("fastsip_handoffs_total", "counter",
           "Requests handed from the worker that received them to the worker owning their AOR.",
           [((), total.get("handoffs_sent", 0))])
    metric("fastsip_rate_limited_total", "counter",
           "Messages dropped by the per-source-address rate limit.",
           [((), total.get("rate_limited", 0))])
    drops = total.get("dropped", {})
    metric("fastsip_dropped_total", "counter", "Messages dropped by the server shell, by reason.",
           sorted(((("reason", r),), n) for r, n in drops.items()))
    metric("fastsip_received_total", "counter", "SIP messages received, by transport.",
           sorted(((("transport", t),), n) for t, n in total.get("received", {}).items()))
    metric("fastsip_receive_batches_total", "counter",
           "recvmmsg calls that returned datagrams, by socket kind (UDP, or the hand-off inbox).",
           sorted(((("socket", t),), n) for t, n in total.get("batches", {}).items()))
    metric("fastsip_tcp_connections", "gauge", "Open TCP connections.",
           [((), total.get("tcp_connections", 0))])
    metric("fastsip_tcp_keepalives_total", "counter", "RFC 5626 CRLFCRLF keep-alives answered.",
           [((), total.get("keepalives", 0))])
    metric("fastsip_state_rows_written_total", "counter", "AOR rows written to the state file.",
           [((), total.get("state_rows_written", 0))])
    metric("fastsip_state_pending_changes", "gauge",
           "AOR changes taken from the store and not yet written to the state file.",
           [((), total.get("state_pending", 0))])
    metric("fastsip_state_errors_total", "counter", "Failed writes to the state file.",
           [((), total.get("state_errors", 0))])
    metric("fastsip_internal_errors_total", "counter",
           "Messages on which the registrar core raised (bugs; logged with a traceback).",
           [((), total.get("internal_errors", 0))])
    metric("fastsip_workers", "gauge", "Worker processes running.", [((), workers_alive)])
    metric("fastsip_workers_configured", "gauge", "Worker processes configured.", [((), workers)])
    metric("fastsip_worker_restarts_total", "counter", "Workers restarted after they died.",
           [((), restarts)])
    hist = total.get("latency", {"counts": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0})
    name = "fastsip_processing_seconds"
    out.append(f"# HELP {name} Time from a receive batch to its replies being sent, per message.")
    out.append(f"# TYPE {name} histogram")
    acc = 0
    for bound, n in zip(LATENCY_BUCKETS, hist["counts"]):
        acc += n
        out.append(f'{name}_bucket{{le="{bound:g}"}} {acc}')
    acc += hist["counts"][-1]
    out.append(f'{name}_bucket{{le="+Inf"}} {acc}')
    out.append(f"{name}_sum {hist['sum']:.9f}")
    out.append(f"{name}_count {hist['count']}")
    return "\n".join(out) + "\n"
