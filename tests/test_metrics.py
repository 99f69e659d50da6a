"""The metrics table (fastsip/server/metrics.py): every counter declared up front,
the worker's counters made from it, the Prometheus text rendered from it."""
import json

import pytest

from fastsip.server.metrics import GAUGES, METRICS, WorkerCounters, add_reports, render


def test_worker_counters_are_the_declared_ones_and_nothing_else():
    c = WorkerCounters()
    report = c.report()
    assert report["received"] == {"tcp": 0, "udp": 0}
    assert report["dropped"]["tcp_overflow"] == 0 and report["internal_errors"] == 0
    c.received_udp += 3
    assert c.report()["received"]["udp"] == 3
    with pytest.raises(AttributeError):
        c.not_declared = 1          # no counter is added on first use
    declared = {key for m in METRICS for key in m.keys
                if not key.startswith(("core.", "supervisor.")) and m.kind != "histogram"}
    assert set(report) == declared


def test_render_names_every_exported_metric_once_from_the_table():
    c = WorkerCounters()
    c.framing_errors = 2
    c.dropped_oversized = 1
    report = json.loads(json.dumps(dict(
        c.report(), core={"requests": {"REGISTER": 3}, "replies": {200: 3}, "bindings": 2,
                          "aors": 1, "expired": 0, "parse_errors": 1},
        latency={"counts": [0] * 16, "sum": 0.0, "count": 0})))
    total = add_reports(add_reports({}, report), report, with_gauges=False)
    assert total["core"]["bindings"] == 2 and total["core"]["requests"]["REGISTER"] == 6
    text = render(total, 2, 2, 1)
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert types == [m.name for m in METRICS if m.name is not None]
    assert "fastsip_parse_errors_total 6\n" in text         # the core's and the framing errors
    assert 'fastsip_dropped_total{reason="oversized"} 2\n' in text
    assert 'fastsip_replies_total{code="200"} 6\n' in text
    assert "\nfastsip_workers 2\n" in text and "\nfastsip_worker_restarts_total 1\n" in text
    assert ("core", "bindings") in GAUGES and ("tcp_connections",) in GAUGES
