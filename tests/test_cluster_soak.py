"""A soak of serve --cluster: the load tool across two nodes while things are killed,
checked against the 200s it received (issue #12).

A real Redis Cluster of 3 primaries with a replica each (cluster-node-timeout 2 s),
two ``fastsip serve --cluster`` nodes of two workers each (--cluster-wait 5), and
``python -m load`` driving both at a modest open-loop rate with retransmissions on,
writing what was acknowledged (``--acked``: each phone's last request answered 2xx).
The scenario is ``refresh`` (one Call-ID per phone, the CSeq growing), so a stored
binding can only move forward: after the kills, with no node running, every
acknowledged contact must be stored under its Call-ID with a CSeq number at least
the acknowledged one.  Losses must be exactly zero; nothing here depends on how fast
the machine is, beyond the generous timeouts.

Then service must be back: a second run of the same phones (the same AORs, so one
a node left stuck would show) gets a 2xx for every request.

- a node and a primary: the phones are spread by hash (each keeps its node); one node
  is killed -9 (its phones time out from then on: fine), then one Redis primary (its
  replica takes over; the other node's requests wait for it, or get 500);
- a primary under round robin: every request of a phone goes to the other node than
  its last (both nodes write every AOR) while a primary is killed -9;
- a primary killed while its replica is paused: the writes of that primary's AORs
  reach no replica (WAIT 1 comes short: no 200) until the primary is killed and the
  replica, resumed, takes over without them.
- a planned failover: CLUSTER FAILOVER on a replica while the load runs (the old
  primary lives on as a replica).

Each test takes about 20 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from fastsip.cluster.sync import aor_key
from fastsip.registrar import decode_record
from fastsip.server.testing import ServerProcess

pytestmark = pytest.mark.server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS = 3000            # phones
RATE = 800              # new REGISTERs per second (open loop)
DURATION = 7.0          # seconds of sending
AFTER_RATE = 1000       # the second run's rate: every phone once


def node(url, workdir):
    return ServerProcess("--cluster", url, "--min-expires", "1", "--cluster-wait", "5",
                         workers=2, cwd=tempfile.mkdtemp(prefix="node-", dir=workdir)).start()


def addr(n) -> str:
    return "%s:%d" % n.udp


class Load:
    """``python -m load`` in a subprocess (refresh scenario, example.com, --acked and
    --json in ``workdir``); ``started`` is set once it reports its first interval of
    sending."""

    def __init__(self, workdir, name, targets, *args):
        self.acked_path = os.path.join(workdir, f"{name}-acked.jsonl")
        self.json_path = os.path.join(workdir, f"{name}.json")
        cmd = [sys.executable, "-m", "load", *(a for t in targets for a in ("--target", addr(t))),
               "--domain", "example.com", "--scenario", "refresh", "--no-prime",
               "--users", str(USERS), "--retransmit", "--interval", "0.5",
               "--acked", self.acked_path, "--json", self.json_path, *args]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.started = threading.Event()
        self.err = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.err.append(line)
            if line.startswith("["):
                self.started.set()
        self.started.set()

    def wait(self, timeout=90):
        """The result (the --json dict) and the acknowledged lines."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the load tool did not finish: "
                                 + "".join(self.err[-20:])) from None
        finally:
            self._reader.join(5)
            self.proc.stderr.close()
        assert self.proc.returncode in (0, 1), "".join(self.err)
        with open(self.json_path) as f:
            res = json.load(f)
        with open(self.acked_path) as f:
            acked = [json.loads(line) for line in f]
        return res, acked


def cluster_metrics(*nodes) -> dict:
    """The fastsip_cluster_* metrics of the running ``nodes`` (non-zero ones), by node."""
    out = {}
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            out[addr(n)] = {k[len("fastsip_cluster_"):]: v for k, v in n.metrics().items()
                            if k.startswith("fastsip_cluster_") and v}
    return out


def figures(res) -> str:
    return (f"{res['users']} phones, {res['sent']} requests ({res['retransmissions']} "
            f"retransmissions), replies {res['replies']}, {res['timeouts']} timeouts "
            f"({res['late']} replies came later), "
            "per target (2xx, 5xx, timeouts) "
            f"{[(t['target'], t['ok'], t['5xx'], t['timeouts']) for t in res.get('per_target', ())]}"
            f", acked {res['acked']}")


def lost(rc, acked, later_runs=()) -> list:
    """The acknowledged requests whose binding is not stored as promised: the contact
    under the acknowledged Call-ID with a CSeq number at least the acknowledged one.
    A later run's request of the same phone may have replaced it (its socket got the
    same source port, so the same contact): a Call-ID of one of ``later_runs`` (their
    run ids, the Call-ID's prefix) counts as kept."""
    out = []
    for line in acked:
        key = aor_key(line["aor"])
        value = rc.command_for_key(key, "GET", key)
        stored = {b.uri: b for b in decode_record(value)[1]} if value is not None else {}
        b = stored.get(line["contact"])
        if b is not None and b.call_id.split("-", 1)[0] in later_runs:
            continue
        if b is None or b.call_id != line["call_id"] or b.cseq < line["cseq"]:
            out.append((line, None if b is None else (b.call_id, b.cseq)))
    return out


def run_id(acked) -> str:
    return acked[0]["call_id"].split("-", 1)[0]


def service_is_back(workdir, targets, spread):
    """Every phone of the first run REGISTERs once more through ``targets`` (open
    loop, so that AORs a node left stuck cannot hold up the others).  Returns the
    acknowledged lines and what went wrong ("" when each got a 2xx)."""
    load = Load(workdir, "after", targets, "--rate", str(AFTER_RATE), "--count", str(USERS),
                "--timeout", "4", "--spread", spread)
    res, acked = load.wait()
    print(f"after the kills, through {[addr(n) for n in targets]}: {figures(res)}")
    if res["ok"] == USERS and res["timeouts"] == 0 and res["replies"] == {"200": USERS}:
        return acked, ""
    stuck = sorted({f"u{i:06d}" for i in range(USERS)} - {x["user"] for x in acked})
    return acked, (f"service did not come back: {figures(res)}; {len(stuck)} AORs got no "
                   f"2xx, e.g. {stuck[:8]}")


def check(rc, first, after, problem, metrics, logs):
    """With no node running: nothing acknowledged is lost (and ``problem``, what the
    second run found, is empty)."""
    gone = lost(rc, first, later_runs={run_id(after)} if after else ())
    gone_after = lost(rc, after)
    print(f"losses: {len(gone)} of {len(first)} acknowledged in the soak, {len(gone_after)} "
          f"of {len(after)} after it; fastsip_cluster_* {metrics}")
    detail = "".join(f"\n  {line['aor']} acked {line['call_id']} CSeq {line['cseq']} via "
                     f"{line['target']} (later {line['later']}): stored {got}"
                     for line, got in (gone + gone_after)[:20])
    assert gone == [] and gone_after == [] and not problem, (
        f"{len(gone)} + {len(gone_after)} acknowledged bindings lost{detail}\n{problem}\n"
        f"fastsip_cluster_* {metrics}\n{logs}")


def logs_of(*nodes) -> str:
    return "".join(f"--- log of {addr(n)} (end):\n{n.log()[-2000:]}\n" for n in nodes)


def soak(rc, tmp_path, label, event, spread="hash"):
    """The load tool across two nodes (``spread``) while ``event(a, b)`` happens; then
    service through the nodes still running and, with no node running, nothing
    acknowledged lost.  Returns the load tool's result and the survivors' metrics."""
    a, b = node(rc.url, tmp_path), node(rc.url, tmp_path)
    try:
        load = Load(tmp_path, "soak", [a, b], "--rate", str(RATE), "--duration", str(DURATION),
                    "--spread", spread)
        assert load.started.wait(60), "".join(load.err)
        event(a, b)
        res, first = load.wait()
        print(f"soak ({label}): {figures(res)}")
        assert len(first) >= USERS // 3 and {x["target"] for x in first} == {addr(a), addr(b)}
        survivors = [n for n in (a, b) if n.proc is not None and n.proc.poll() is None]
        after, problem = service_is_back(tmp_path, survivors, spread)
        metrics = cluster_metrics(*survivors)
        logs = logs_of(a, b)
    finally:
        a.kill()
        b.kill()                                    # no node running from here on
    check(rc, first, after, problem, metrics, logs)
    return res, metrics


def test_a_node_and_a_primary_killed_under_load_lose_no_acknowledged_binding(
        make_redis_cluster, tmp_path):
    rc = make_redis_cluster()
    nodes = []

    def kills(a, b):
        nodes.extend((addr(a), addr(b)))
        time.sleep(1.5)
        a.kill()                                    # its phones time out from now on
        time.sleep(1.0)
        victim = rc.primaries()[1]
        victim.kill()
        rc.wait_failover(victim, timeout=30)

    res, metrics = soak(rc, tmp_path, "hash; a node, then a primary killed", kills)
    by_target = {t["target"]: t for t in res["per_target"]}
    assert by_target[nodes[0]]["timeouts"] > 0 and by_target[nodes[1]]["ok"] > 0
    assert [m.get("lost_connections_total", 0) >= 1 for m in metrics.values()] == [True]


def test_a_primary_killed_under_round_robin_load_loses_no_acknowledged_binding(
        make_redis_cluster, tmp_path):
    rc = make_redis_cluster()

    def kill(a, b):
        time.sleep(2.0)
        victim = rc.primaries()[2]
        victim.kill()
        rc.wait_failover(victim, timeout=30)

    soak(rc, tmp_path, "round robin; a primary killed", kill, spread="round-robin")


def test_a_primary_killed_while_its_replica_is_paused_under_load_loses_no_acknowledged_binding(
        make_redis_cluster, tmp_path):
    rc = make_redis_cluster()

    def kill(a, b):
        time.sleep(1.0)
        victim = rc.primaries()[0]
        replica = rc.replicas_of(victim)[0]
        replica.pause()                 # the victim's writes are on it alone from now on
        time.sleep(1.5)
        victim.kill()
        replica.resume()                # and it is promoted without them
        rc.wait_failover(victim, timeout=30)

    _, metrics = soak(rc, tmp_path, "hash; a replica paused, its primary killed", kill)
    assert all(m.get("wait_shortfalls_total", 0) >= 1 for m in metrics.values()), metrics


def test_a_planned_failover_under_load_loses_no_acknowledged_binding(
        make_redis_cluster, tmp_path):
    """The operator's failover (CLUSTER FAILOVER on a replica, as for a rolling
    upgrade): the old primary lives on as a replica, the nodes move to the new one, and
    whatever was in flight to the old one is answered or retried, never forgotten."""
    rc = make_redis_cluster()

    def failover(a, b):
        time.sleep(2.0)
        victim = rc.primaries()[1]
        replica = rc.replicas_of(victim)[0]
        assert replica.command("CLUSTER", "FAILOVER") == b"OK"
        assert rc.wait_failover(victim, timeout=30) is replica

    soak(rc, tmp_path, "hash; a planned failover", failover)
