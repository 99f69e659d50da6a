"""The metrics table (fastsip/server/metrics.py): every counter declared up front,
the worker's counters made from it, the Prometheus text rendered from it."""
import json
import os

import pytest

from fastsip.server.metrics import GAUGES, METRICS, WorkerCounters, add_reports, latest_report, render
from fastsip.server.statsblock import StatsBlock


def test_worker_counters_are_the_declared_ones_and_nothing_else():
    c = WorkerCounters()
    report = c.report()
    assert report["received"] == {"tcp": 0, "tls": 0, "udp": 0, "ws": 0, "wss": 0}
    assert report["dropped"]["tcp_overflow"] == 0 and report["internal_errors"] == 0
    c.received_udp += 3
    c.count("received", "wss", 2)
    assert c.report()["received"]["udp"] == 3 and c.report()["received"]["wss"] == 2
    with pytest.raises(AttributeError):
        c.count("received", "sctp")     # nor a label value
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


def test_latest_report_takes_the_later_of_two_reports_of_one_worker():
    early = {"received": {"udp": 5, "tcp": 1}, "core": {"replies": {"200": 4}},
             "latency": {"counts": [1, 2], "sum": 0.5, "count": 3}}
    late = {"received": {"udp": 9, "tcp": 1}, "core": {"replies": {"200": 7, "404": 1}},
            "latency": {"counts": [1, 5], "sum": 0.9, "count": 6}}
    assert latest_report(early, late) == late == latest_report(late, early)
    assert latest_report({}, late) == late and latest_report(early, {}) == early


def test_stats_block_is_shared_with_a_child_and_survives_a_torn_write():
    block = StatsBlock(half=4096)
    assert block.read() == {}
    pid = os.fork()
    if pid == 0:                            # the "worker": writes twice, then dies at once
        block.write({"received": {"udp": 1}})
        block.write({"received": {"udp": 2}})
        os._exit(0)
    os.waitpid(pid, 0)
    assert block.read() == {"received": {"udp": 2}}
    # a third write cut short: its JSON in place, its header half written
    block.generation = 2
    block.write({"received": {"udp": 3}})
    block.mem[4096 + 8:4096 + 12] = b"\xff\xff\x00\x00"    # half 1: the length torn
    assert block.read() == {"received": {"udp": 2}}         # the previous one (half 0)
    block.mem[4096 + 8:4096 + 16] = bytes(8)                # length and CRC zeroed
    assert block.read() == {"received": {"udp": 2}}
    assert not block.write({"big": "x" * 5000})             # does not fit: nothing written
    block.clear()
    assert block.read() == {}
    block.close()
