"""What ``fastsip serve --cluster`` (issue #12) costs a node, and Redis, per REGISTER
(a script, not a test).

One run, everything on 127.0.0.1, three parts (``--parts``, default all):

(a) fixed rates (``--rates``, open loop of the bundled load tool) against one node
    (``--workers``, default 1) in three set-ups, taking turns rate by rate:

    - ``no-state``: ``fastsip serve --no-state`` (bindings in the worker only);
    - ``redis``:    ``--cluster`` on one standalone Redis (no replica: no WAIT);
    - ``cluster``:  ``--cluster`` on a Redis Cluster of 3 primaries with a replica
      each (every pipeline ends with ``WAIT 1``);

    and reports, per set-up and rate: 2xx/s, losses, latency p50/p99 (the load tool's,
    first send to reply), the node's CPU per REGISTER (all its processes, from
    /proc/PID/task/*/schedstat), Redis's CPU per REGISTER (primaries and replicas
    apart), and from the node's /metrics: REGISTERs per UDP receive batch
    (``fastsip_receive_batches_total{socket="udp"}``: recvmmsg calls), Redis round
    trips per such batch (``fastsip_cluster_round_trips_total``; a worker sends its
    pipelines once per readiness event, after up to 16 recvmmsg calls, so this may be
    below 1), writes per round trip (``fastsip_cluster_batched_writes_total`` over the
    round trips; before that counter counted, it read 0: then the writes acknowledged
    plus the conflicts are used), reads, conflicts.
(b) saturation: the load tool's closed loop (``--inflight``) against one node of one
    worker, in each set-up: REGISTER/s and the node's CPU per REGISTER.
(c) nodes: 1 node and then each of ``--nodes`` nodes (default 2, 3; one worker each)
    on the same Redis Cluster, the load tool sending to all of them (``--target``
    repeated, ``--spread hash``: a phone keeps its node), closed loop: total REGISTER/s
    and which process is busy (nodes, each primary, the load tool).

Every step is a freshly started node (nodes) and a flushed Redis (FLUSHALL on every
primary; the Redis processes live for the whole run), the load tool's ``refresh``
scenario: every phone registered once first (not measured: each AOR's first write,
into an empty Redis), then ``--duration`` seconds of refreshes.  CPU is counted from the
end of that priming to the last reply; /metrics is read at the same two moments.

Placement (``taskset``; ``--no-pin`` leaves it to the kernel): the node(s) on
``--node-cpus`` (default 0), Redis (every redis-server) and the load tool on
``--other-cpus`` (default 1).  The load tool runs inside this script (load.runner),
so this script is pinned there too.  So a node never shares its core with Redis or
the generator, and in (b) the node core's CPU is the node's alone; Redis and the
generator share the other core (there is no third).  Per CPU group the table shows the
other work (/proc/stat user + system time less the processes measured here) and the
interrupt time (irq + softirq: on loopback much of a packet's way from one socket to
another runs there, and it is in no process's CPU time), in % of one core; a row is
marked `` *`` when other work took more than 10 % of a core on either group.

Columns: ``nodeµs`` the node's CPU µs per REGISTER answered (all its processes) and
``node%`` its CPU in % of one core; ``primµs``, ``replµs`` the Redis primaries' and
replicas' CPU µs per REGISTER, ``redis%`` all of Redis in % of a core; ``REG/bt``
REGISTERs per recvmmsg batch, ``RT/bt`` round trips per batch, ``wr/RT`` writes per
round trip, ``bw/REG`` ``--batch-wait`` sleeps per REGISTER (``/api/workers``: a
wake-up within two waits of the previous one sleeps 200 µs first; in cluster mode the
Redis replies wake the worker too); ``tool%`` the load tool; then other work and
interrupts per CPU group.  The summary gives the ratios (cluster or redis over
no-state, in the same run) and checks the issue's targets.

The machine's cores are shared with other work: compare rows of one run, not runs.

    python3 bench/bench_cluster.py                         # (a), (b), (c): about 3 minutes
    python3 bench/bench_cluster.py --parts b --duration 8 --json /tmp/bc.json
    python3 bench/bench_cluster.py --parts b --profile     # and where a node's CPU goes
    python3 bench/bench_cluster.py --parts a -- --batch-wait 0   # flags for every node

``--profile``: at the end, one more closed-loop step against a ``no-state`` node and one
against a ``cluster`` node (not in the tables), each sampled with ``perf record`` on its
worker (when perf is installed: shared objects, system calls, symbols; printed as µs
of the worker per REGISTER, side by side) and with py-spy (when installed: the Python
functions, ``--nonblocking``).

Needs redis-server and redis-cli (Redis 7: functions), scapy, and the compiled
modules (``python3 setup.py build_ext --inplace``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from fastsip.server.testing import RedisCluster, RedisServer, ServerProcess  # noqa: E402
from load.report import _descendants, process_cpu_ns  # noqa: E402
from load.runner import LoadRun, Options  # noqa: E402
from load.scenario import SCENARIOS  # noqa: E402

SETUPS = ("no-state", "redis", "cluster")
METRICS = {      # short name -> /metrics key (summed over the nodes)
    "registers": 'fastsip_requests_total{method="REGISTER"}',
    "batches": 'fastsip_receive_batches_total{socket="udp"}',
    "round_trips": "fastsip_cluster_round_trips_total",
    "batched": "fastsip_cluster_batched_writes_total",
    "writes": "fastsip_cluster_writes_total",
    "reads": "fastsip_cluster_reads_total",
    "conflicts": "fastsip_cluster_conflicts_total",
    "parked": "fastsip_cluster_parked_total",
    "retries": "fastsip_cluster_retries_total",
    "wait_shortfalls": "fastsip_cluster_wait_shortfalls_total",
    "batch_waits": "batch_waits",       # from /api/workers (see counters)
}


class BenchError(Exception):
    """A step that cannot run: main() prints it on one line and exits 1."""


def counters(node) -> dict:
    """The node's /metrics, and its workers' --batch-wait sleeps (/api/workers) as
    ``batch_waits`` (not in /metrics)."""
    out = node.metrics()
    out["batch_waits"] = sum(w.get("batch_waits", 0) for w in node.api("/api/workers")["workers"])
    return out


def proc_stat() -> dict:
    """{cpu: {"task": ns, "irq": ns, "steal": ns}} from /proc/stat: time the CPU ran
    tasks (user, nice, system), served interrupts (irq, softirq: on loopback, much of
    the packets' way between sockets), or was taken by the hypervisor (steal)."""
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    out = {}
    with open("/proc/stat") as f:
        for text in f:
            if text.startswith("cpu") and text[3].isdigit():
                v = [int(x) for x in text.split()[1:]]
                out[int(text.split()[0][3:])] = {"task": (v[0] + v[1] + v[2]) * tick,
                                                 "irq": (v[5] + v[6]) * tick, "steal": v[7] * tick}
    return out


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (at most ``max_wait`` s, in half-second looks) until tasks on the machine use at
    most ``threshold`` % of a core (between steps nothing of this benchmark runs but idle
    Redis); returns the last look's figure."""
    deadline = time.monotonic() + max_wait
    while True:
        a = proc_stat()
        time.sleep(0.5)
        b = proc_stat()
        busy = 100.0 * sum(b[c]["task"] - a[c]["task"] for c in b) / 0.5e9
        if busy <= threshold or time.monotonic() >= deadline:
            return busy


def group_cpu(pids) -> dict:
    """{pid: CPU ns so far} of ``pids`` (each with its threads)."""
    return {p: process_cpu_ns(p) or 0 for p in pids}


def delta_ns(before: dict) -> int:
    return sum((process_cpu_ns(p) or c0) - c0 for p, c0 in before.items())


class Meters:
    """CPU of named process groups, the machine's busy time and the nodes' counters,
    from ``start`` to ``stop``."""

    def __init__(self, groups: dict, nodes: list):
        self.groups = groups        # name -> [pid]
        self.nodes = nodes          # ServerProcess
        self.t0 = self.t1 = 0

    def start(self):
        self.m0 = [counters(n) for n in self.nodes]
        self.c0 = {name: group_cpu(pids) for name, pids in self.groups.items()}
        self.self0 = process_cpu_ns(os.getpid()) or 0
        self.stat0 = proc_stat()
        self.t0 = time.monotonic_ns()

    def stop(self) -> dict:
        self.t1 = time.monotonic_ns()
        stat1 = proc_stat()
        cpu = {name: delta_ns(c0) for name, c0 in self.c0.items()}
        per_pid = {name: {p: (process_cpu_ns(p) or c) - c for p, c in c0.items()}
                   for name, c0 in self.c0.items()}
        cpu["tool"] = (process_cpu_ns(os.getpid()) or 0) - self.self0
        per_pid["tool"] = {os.getpid(): cpu["tool"]}
        m1 = [counters(n) for n in self.nodes]
        counts = {k: int(sum(b.get(key, 0) - a.get(key, 0) for a, b in zip(self.m0, m1, strict=True)))
                  for k, key in METRICS.items()}
        stat = {c: {k: v - self.stat0[c][k] for k, v in d.items()} for c, d in stat1.items()}
        return {"wall_ns": self.t1 - self.t0, "cpu_ns": cpu, "per_pid_ns": per_pid,
                "counts": counts, "stat_ns": stat}


class MeteredRun(LoadRun):
    """The load tool, with ``on_primed`` called between its priming and its measured phase."""

    def __init__(self, opts, on_primed):
        super().__init__(opts)
        self.on_primed = on_primed

    def _prime(self):
        out = super()._prime()
        self.on_primed()
        return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="fastsip-bench-cluster-")
        self.redis = None           # RedisServer: standalone
        self.cluster = None         # RedisCluster
        self.idle = {}              # setup -> Redis CPU, % of a core, with no load
        self.pin_node = ["taskset", "-c", args.node_cpus] if args.pin else []

    # -- Redis ----------------------------------------------------------------------
    def start_redis(self, setups):
        if "redis" in setups:
            self.redis = RedisServer(directory=os.path.join(self.workdir, "redis")).start()
        if "cluster" in setups:
            t = time.monotonic()
            self.cluster = RedisCluster(3, 1, directory=os.path.join(self.workdir, "cluster")).start()
            print(f"# Redis Cluster 3x2 ready in {time.monotonic() - t:.1f} s", flush=True)
        for setup in ("redis", "cluster"):
            if setup in setups:
                prim, repl = self.redis_pids(setup)
                c0 = group_cpu(prim + repl)
                time.sleep(1.0)
                self.idle[setup] = round(100.0 * delta_ns(c0) / 1e9, 2)

    def redis_pids(self, setup) -> tuple:
        """(primaries' pids, replicas' pids)."""
        if setup == "redis":
            return [self.redis.pid], []
        if setup == "cluster":
            prim = [n.pid for n in self.cluster.primaries()]
            return prim, [n.pid for n in self.cluster.nodes if n.pid not in prim]
        return [], []

    def url(self, setup):
        return {"redis": self.redis.url if self.redis else None,
                "cluster": self.cluster.url if self.cluster else None}.get(setup)

    def flush(self, setup):
        if setup == "redis":
            self.redis.command("FLUSHALL")
        elif setup == "cluster":
            for node in self.cluster.primaries():
                node.command("FLUSHALL")

    def stop(self):
        if self.cluster:
            self.cluster.stop()
        if self.redis:
            self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- one step -------------------------------------------------------------------
    def start_node(self, setup, workers):
        flags = ["--log-level", "warning", "--max-expires", "3600", *self.args.server_flags]
        if setup != "no-state":
            flags += ["--cluster", self.url(setup)]
        srv = ServerProcess(*flags, workers=workers, cwd=self.workdir, transports=("udp",),
                            prefix=self.pin_node)
        try:
            srv.start()
        except RuntimeError as exc:
            raise BenchError(f"fastsip serve ({setup}) did not start: {str(exc)[:300]}") from None
        return srv

    def step(self, part, setup, nodes=1, rate=None, inflight=None, profile=False) -> dict:
        a = self.args
        if a.quiet_wait:
            busy = wait_quiet(a.quiet_wait, a.quiet_threshold)
            if busy > a.quiet_threshold:
                print(f"#   (other work still at {busy:.0f} % of a core after {a.quiet_wait:g} s)",
                      flush=True)
        if setup != "no-state":
            self.flush(setup)
        srvs = []
        try:
            for _ in range(nodes):
                srvs.append(self.start_node(setup, a.workers if part == "a" else 1))
            time.sleep(0.3)         # the workers finish starting
            node_pids = _descendants([s.proc.pid for s in srvs])
            prim, repl = self.redis_pids(setup)
            groups = {"node": node_pids, "primaries": prim, "replicas": repl}
            meters = Meters(groups, srvs)
            prof = []

            def on_primed():
                meters.start()
                if profile:
                    worker = srvs[0].worker_pids()[0]
                    prof.extend(start_profilers(worker, a.duration, self.workdir))

            opts = Options(target=["%s:%d" % s.udp for s in srvs] if nodes > 1
                           else "%s:%d" % srvs[0].udp, spread="hash", scenario=a.scenario,
                           users=a.users, rate=rate, inflight=inflight, duration=a.duration,
                           timeout=a.timeout)
            run = MeteredRun(opts, on_primed)
            if not SCENARIOS[a.scenario].prime:
                run.prepare()
                on_primed()
            res = run.execute()
            m = meters.stop()
            profiles = finish_profilers(prof) if profile else None
        finally:
            for s in srvs:
                s.stop()
        return self.row(part, setup, nodes, rate, inflight, res, m, profiles)

    def row(self, part, setup, nodes, rate, inflight, res, m, profiles) -> dict:
        wall = m["wall_ns"] or 1
        cpu, c = m["cpu_ns"], m["counts"]
        answered = res["finals"] or 1
        regs = c["registers"] or answered
        pct = {k: round(100.0 * v / wall, 1) for k, v in cpu.items()}
        per_pid_pct = {g: {str(p): round(100.0 * v / wall, 1) for p, v in d.items()}
                       for g, d in m["per_pid_ns"].items()}
        stat = m["stat_ns"]
        a = self.args
        groups = ([("node", _cpus(a.node_cpus), ("node",)),
                   ("other", _cpus(a.other_cpus), ("primaries", "replicas", "tool"))]
                  if a.pin else [("all", list(stat), tuple(cpu))])
        cores = {}
        for name, cpus, mine in groups:
            cpus = [int(c) for c in cpus if int(c) in stat]
            task = sum(stat[c]["task"] for c in cpus)
            cores[name] = {
                # tasks' time on these CPUs other than the processes measured here
                "others_pct": round(max(0.0, 100.0 * (task - sum(cpu[k] for k in mine)) / wall), 1),
                "irq_pct": round(100.0 * sum(stat[c]["irq"] for c in cpus) / wall, 1),
                "steal_pct": round(100.0 * sum(stat[c]["steal"] for c in cpus) / wall, 1)}
        idle_pct = self.idle.get(setup, 0.0)
        redis_ns = cpu["primaries"] + cpu["replicas"]
        return {
            "part": part, "setup": setup, "nodes": nodes,
            "mode": "open" if rate else "closed", "setting": rate or inflight,
            "offered": res["offered_rate"], "achieved": res["achieved_rate"],
            "sent": res["sent"], "ok": res["ok"], "timeouts": res["timeouts"],
            "non_2xx": res["finals"] - res["ok"],
            "loss_pct": round(100.0 * (res["sent"] - res["ok"]) / res["sent"], 3) if res["sent"] else 0.0,
            "p50_ms": res["latency_ms"]["p50"], "p99_ms": res["latency_ms"]["p99"],
            "p999_ms": res["latency_ms"]["p999"],
            "node_us_per_reg": round(cpu["node"] / 1e3 / answered, 2),
            "node_cpu_pct": pct["node"],
            "primaries_us_per_reg": round(cpu["primaries"] / 1e3 / answered, 2),
            "replicas_us_per_reg": round(cpu["replicas"] / 1e3 / answered, 2),
            "redis_cpu_pct": round(100.0 * redis_ns / wall, 1),
            "redis_idle_cpu_pct": idle_pct,
            # Redis's CPU less what it uses with no load at all (cron, cluster bus)
            "redis_net_us_per_reg": round(max(0.0, redis_ns - idle_pct / 100.0 * wall) / 1e3
                                          / answered, 2) if redis_ns else 0.0,
            "tool_cpu_pct": pct["tool"],
            "cores": cores,
            "per_pid_cpu_pct": per_pid_pct,
            "counts": c,
            "regs_per_batch": round(regs / c["batches"], 2) if c["batches"] else None,
            # --batch-wait sleeps: a wake-up within two waits of the last one sleeps first
            "batch_waits_per_reg": round(c["batch_waits"] / regs, 3) if regs else None,
            "round_trips_per_batch": round(c["round_trips"] / c["batches"], 3) if c["batches"] else None,
            # FCALLs per pipeline (an older fastsip counted no batched writes: then the
            # writes acknowledged and refused, which is the same in a run without failures)
            "writes_per_round_trip": (round((c["batched"] or c["writes"] + c["conflicts"])
                                            / c["round_trips"], 2) if c["round_trips"] else None),
            "per_target": [{"target": t["target"], "ok": t["ok"]} for t in res.get("per_target", ())],
            "profile": profiles,
        }


# -- profiles ------------------------------------------------------------------------------

def start_profilers(pid, duration, workdir) -> list:
    """py-spy (and perf, when installed) on ``pid`` for about ``duration`` seconds."""
    out = []
    secs = max(1, int(duration) - 1)
    if shutil.which("py-spy"):
        path = os.path.join(workdir, "py-spy.txt")
        out.append(("py-spy", path, subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--duration", str(secs), "--rate", "250",
             "--format", "raw", "--output", path, "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    if shutil.which("perf"):
        path = os.path.join(workdir, "perf.data")
        out.append(("perf", path, subprocess.Popen(
            ["perf", "record", "-F", "499", "-g", "-o", path, "-p", str(pid), "--", "sleep",
             str(secs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    return out


def finish_profilers(prof) -> dict:
    out = {}
    for name, path, proc in prof:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            out[name] = read_pyspy(path) if name == "py-spy" else read_perf(path)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            out[name] = {"error": str(exc)[:200]}
    return out


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({os.path.basename(where)})" if where else name


def read_pyspy(path) -> dict:
    """py-spy's collapsed stacks: the leaf functions' share of the samples (self) and the
    share of the samples a function is anywhere on the stack (total)."""
    leaf, anywhere, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            frames = [_short(x) for x in stack.split(";")]
            total += n
            leaf[frames[-1]] += n
            for fr in set(frames):
                anywhere[fr] += n
    top = lambda c: [(k, round(100.0 * v / total, 1)) for k, v in c.most_common(15)]  # noqa: E731
    return {"samples": total, "self": top(leaf), "total": top(anywhere)}


def read_perf(path) -> dict:
    """perf's samples by shared object and by symbol (self time), and the system calls
    (inclusive: each ``__x64_sys_*`` with what runs under it), as shares of the samples."""
    def report(sort, children=False, limit="0.8"):
        cp = subprocess.run(["perf", "report", "-i", path, "--stdio", "-g", "none",
                             "--children" if children else "--no-children",
                             "--percent-limit", limit, "--sort", sort], capture_output=True,
                            text=True, timeout=120)
        rows = []
        for text in cp.stdout.splitlines():
            fields = text.split()
            if not fields or text.startswith("#") or not fields[0].endswith("%"):
                continue
            try:
                share = float(fields[0].rstrip("%"))
            except ValueError:
                continue
            rest = fields[2:] if children else fields[1:]
            rows.append((" ".join(rest), share))
        return rows
    syscalls = [(k.split()[-1].replace("__x64_sys_", ""), v)
                for k, v in report("sym", children=True, limit="0.3") if "__x64_sys_" in k]
    return {"by_dso": report("dso")[:8], "by_symbol": report("dso,sym")[:15],
            "syscalls": syscalls[:8]}


# -- the report ----------------------------------------------------------------------------

NOISY = 10.0    # % of a core of other work on a CPU group: the row is marked " *"
HEAD = (f"{'part':>4} {'setup':>8} {'nodes':>5} {'load':>8} {'2xx/s':>7} {'loss%':>5} "
        f"{'p50ms':>6} {'p99ms':>6} {'nodeµs':>7} {'node%':>6} {'primµs':>7} {'replµs':>7} "
        f"{'redis%':>6} {'REG/bt':>6} {'RT/bt':>6} {'wr/RT':>6} {'bw/REG':>6} {'tool%':>6}  "
        "others%/irq% by CPU group")


def line(r) -> str:
    load = f"{r['setting']}/s" if r["mode"] == "open" else f"inf{r['setting']}"
    f = lambda v, spec="": "-" if v is None else format(v, spec)  # noqa: E731
    cores = " ".join(f"{k}:{v['others_pct']:.0f}/{v['irq_pct']:.0f}" for k, v in r["cores"].items())
    noisy = " *" if any(v["others_pct"] > NOISY for v in r["cores"].values()) else ""
    return (f"{r['part']:>4} {r['setup']:>8} {r['nodes']:>5} {load:>8} {r['achieved']:>7.0f} "
            f"{r['loss_pct']:>5} {r['p50_ms']:>6.2f} {r['p99_ms']:>6.2f} {r['node_us_per_reg']:>7} "
            f"{r['node_cpu_pct']:>6} {r['primaries_us_per_reg']:>7} {r['replicas_us_per_reg']:>7} "
            f"{r['redis_cpu_pct']:>6} {f(r['regs_per_batch']):>6} {f(r['round_trips_per_batch']):>6} "
            f"{f(r['writes_per_round_trip']):>6} {f(r['batch_waits_per_reg']):>6} "
            f"{r['tool_cpu_pct']:>6}  {cores}{noisy}")


def find(rows, **kw):
    return next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)


def summary(rows, args) -> list:
    """The ratios, side by side in this run, and the issue's targets."""
    out = []
    for rate in args.rates:
        base = find(rows, part="a", setup="no-state", setting=rate)
        for setup in ("redis", "cluster"):
            r = find(rows, part="a", setup=setup, setting=rate)
            if not (base and r):
                continue
            out.append(
                f"(a) {rate}/s {setup}/no-state: node CPU per REGISTER "
                f"{r['node_us_per_reg'] / base['node_us_per_reg']:.2f}x "
                f"({r['node_us_per_reg']} vs {base['node_us_per_reg']} µs); "
                f"latency added p50 {r['p50_ms'] - base['p50_ms']:+.2f} ms, "
                f"p99 {r['p99_ms'] - base['p99_ms']:+.2f} ms; "
                f"Redis {r['redis_net_us_per_reg']} µs/REGISTER net of idle "
                f"(idle {r['redis_idle_cpu_pct']} % of a core); "
                f"{r['round_trips_per_batch']} round trips per batch of {r['regs_per_batch']}")
    base = find(rows, part="b", setup="no-state")
    for setup in ("redis", "cluster"):
        r = find(rows, part="b", setup=setup)
        if not (base and r):
            continue
        cap = 1e6 / r["node_us_per_reg"] if r["node_us_per_reg"] else 0
        out.append(
            f"(b) inflight {r['setting']} {setup}/no-state: REGISTER/s {r['achieved']:.0f} vs "
            f"{base['achieved']:.0f} ({r['achieved'] / base['achieved']:.2f}x); node CPU per "
            f"REGISTER {r['node_us_per_reg'] / base['node_us_per_reg']:.2f}x "
            f"({r['node_us_per_reg']} vs {base['node_us_per_reg']} µs); node at "
            f"{r['node_cpu_pct']} % of its core -> one core would take {cap:,.0f} REGISTER/s "
            f"at this cost; {r['writes_per_round_trip']} writes per round trip")
    one = find(rows, part="c", nodes=1) or find(rows, part="b", setup="cluster")
    for n in args.nodes:
        r = find(rows, part="c", nodes=n)
        if one and r:
            out.append(f"(c) {n} nodes / 1 node: {r['achieved']:.0f} / {one['achieved']:.0f} "
                       f"REGISTER/s = {r['achieved'] / one['achieved']:.2f}x; {core_use(r)}")
    if one:
        out.append(f"(c) 1 node: {core_use(one)}")
    prim = find(rows, part="b", setup="cluster")
    if prim and prim["primaries_us_per_reg"]:
        us = prim["primaries_us_per_reg"]
        out.append(f"(c) Redis primaries: {us} µs of primary CPU per REGISTER in (b) (each REGISTER "
                   f"is one FCALL on one primary, plus its share of the pipeline and WAIT): a "
                   f"primary on a core of its own would be saturated near {1e6 / us:,.0f} "
                   f"REGISTER/s to its slots, three near {3e6 / us:,.0f}/s (a projection from "
                   "this cost, not a measurement)")
    out += targets(rows, args)
    return out


def targets(rows, args) -> list:
    """Issue #12's targets, each against the rows of this run that bear on it."""
    out = []
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    cpu = []
    for part, setting in [("a", r) for r in args.rates] + [("b", args.inflight)]:
        base = find(rows, part=part, setup="no-state", setting=setting)
        mine = find(rows, part=part, setup="cluster", setting=setting)
        if base and mine:
            cpu.append((f"{part} {setting}", mine["node_us_per_reg"] / base["node_us_per_reg"]))
    if cpu:
        out.append("target: node CPU per REGISTER, cluster <= 1.5x no-state: "
                   + ", ".join(f"{k} {v:.2f}x" for k, v in cpu) + f" -> {ok(max(v for _, v in cpu) <= 1.5)}")
    b = [r for r in rows if r["part"] == "b" and r["setup"] != "no-state"]
    if b:
        caps = {r["setup"]: 1e6 / r["node_us_per_reg"] for r in b}
        out.append("target: >= 100k REGISTER/s per node core (1e6 / node µs per REGISTER at "
                   "saturation; the node core was not always full): "
                   + ", ".join(f"{k} {v:,.0f}/s" for k, v in caps.items())
                   + f" -> {ok(min(caps.values()) >= 100_000)}")
    rt = [(f"{r['part']} {r['setup']} {r['setting']}", r["round_trips_per_batch"], r["setup"])
          for r in rows if r["part"] in "ab" and r["setup"] != "no-state" and r["round_trips_per_batch"]]
    if rt:
        # the cluster has 3 primaries: one round trip per batch per primary written to
        out.append("target: <= 1 Redis round trip per batch (per primary written to): "
                   + ", ".join(f"{k} {v}" for k, v, _ in rt)
                   + f" -> {ok(all(v <= (3 if s == 'cluster' else 1) for _, v, s in rt))}")
    lat = []
    for rate in args.rates:
        base = find(rows, part="a", setup="no-state", setting=rate)
        for setup in ("redis", "cluster"):
            mine = find(rows, part="a", setup=setup, setting=rate)
            if base and mine:
                lat.append((f"{setup} {rate}/s", mine["p99_ms"] - base["p99_ms"]))
    if lat:
        out.append("target: p99 latency added <= 2 ms (fixed rates): "
                   + ", ".join(f"{k} {v:+.2f} ms" for k, v in lat)
                   + f" -> {ok(max(v for _, v in lat) <= 2.0)}")
    one = find(rows, part="c", nodes=1) or find(rows, part="b", setup="cluster")
    three = find(rows, part="c", nodes=3)
    if one and three:
        x = three["achieved"] / one["achieved"]
        out.append(f"target: 3 nodes >= 2.5x one node: {x:.2f}x -> {ok(x >= 2.5)} (on this machine "
                   "the nodes share one core and Redis another: see (c) for which one was full)")
    return out


def core_use(r) -> str:
    """Who used the CPUs during a step (% of one core)."""
    busiest = max(((g, p, v) for g, d in r["per_pid_cpu_pct"].items() for p, v in d.items()),
                  key=lambda x: x[2])
    parts = [f"nodes {r['node_cpu_pct']} %", f"Redis {r['redis_cpu_pct']} %",
             f"load tool {r['tool_cpu_pct']} %"]
    parts += [f"{k} CPU(s): others {v['others_pct']} %, irq {v['irq_pct']} %"
              for k, v in r["cores"].items()]
    return ", ".join(parts) + f"; busiest process: {busiest[0]} (pid {busiest[1]}) at {busiest[2]} %"


def print_profile(profiles: dict):
    """The profiles of the extra steps: perf side by side (µs of the worker per REGISTER:
    the share of its samples times the node's µs per REGISTER in that step), then py-spy."""
    perf = {setup: (r, r["profile"].get("perf", {})) for setup, r in profiles.items()}
    perf = {k: v for k, v in perf.items() if "by_dso" in v[1]}
    if perf:
        print("# perf, µs of the worker per REGISTER (share of its samples x node µs/REGISTER): "
              + "; ".join(f"{k}: {r['node_us_per_reg']} µs at {r['achieved']:.0f}/s"
                          for k, (r, _) in perf.items()))
        for title, key in (("by shared object (self)", "by_dso"),
                           ("system calls (inclusive)", "syscalls"),
                           ("top symbols (self)", "by_symbol")):
            names = list(dict.fromkeys(n for _, d in perf.values() for n, _ in d[key]))
            print(f"#   {title}: " + "  ".join(f"{k:>16}" for k in perf))
            for n in names:
                cells = []
                for r, d in perf.values():
                    share = dict(d[key]).get(n)
                    cells.append(f"{share:5.1f}% {share / 100 * r['node_us_per_reg']:5.2f}µs"
                                 if share is not None else f"{'-':>16}")
                print(f"#     {'  '.join(cells)}  {n}")
    for setup, r in profiles.items():
        data = r["profile"].get("py-spy")
        if not data:
            continue
        if "error" in data:
            print(f"# py-spy {setup}: {data['error']}")
            continue
        print(f"# py-spy, {setup}: {data['samples']} samples of the worker when busy, Python "
              "frames (a frame's self time includes the C it calls)")
        for k, v in data["self"][:12]:
            print(f"#   self {v:5.1f} %  {k}")
        for k, v in [x for x in data["total"] if x[1] < 99.5][:8]:
            print(f"#   incl {v:5.1f} %  {k}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--parts", default="abc", help="which parts to run: a, b, c (default abc)")
    ap.add_argument("--rates", default="2000,10000",
                    help="(a) offered REGISTER/s, comma-separated (default 2000,10000)")
    ap.add_argument("--inflight", type=int, default=256,
                    help="(b), (c) requests outstanding, closed loop (default 256)")
    ap.add_argument("--nodes", default="2,3", help="(c) node counts besides 1 (default 2,3)")
    ap.add_argument("--setups", default=",".join(SETUPS),
                    help=f"(a), (b) set-ups, comma-separated (default {','.join(SETUPS)})")
    ap.add_argument("--duration", type=float, default=5.0,
                    help="seconds measured per step (default 5; at most 30)")
    ap.add_argument("--users", type=int, default=10000, help="phones (default 10000)")
    ap.add_argument("--scenario", default="refresh", choices=sorted(SCENARIOS),
                    help="the load tool's scenario (default refresh)")
    ap.add_argument("--timeout", type=float, default=1.0,
                    help="seconds until a request counts as lost (default 1)")
    ap.add_argument("--workers", type=int, default=1, help="(a) the node's workers (default 1)")
    ap.add_argument("--node-cpus", default="0", help="taskset CPUs of the nodes (default 0)")
    ap.add_argument("--other-cpus", default="1",
                    help="taskset CPUs of Redis and the load tool (this script) (default 1)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="no taskset at all")
    ap.add_argument("--profile", action="store_true",
                    help="two more steps (no-state, cluster) sampled with perf and py-spy")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each step, wait up to S s for other work on the machine to drop "
                         "below --quiet-threshold (default 0: no wait)")
    ap.add_argument("--quiet-threshold", type=float, default=15.0, metavar="PCT",
                    help="%% of one core other work may use for --quiet-wait (default 15)")
    ap.add_argument("--json", metavar="FILE", help="also write every row and the ratios as JSON")
    ap.add_argument("server_flags", nargs="*", metavar="-- FLAG",
                    help="more flags for every fastsip serve, after --, e.g. -- --batch-wait 0")
    args = ap.parse_args(argv)
    args.rates = [int(x) for x in args.rates.split(",") if x.strip()]
    args.nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not set(setups) <= set(SETUPS) or not setups:
        ap.error(f"--setups: some of {', '.join(SETUPS)}")
    if not set(args.parts) <= set("abc") or not args.parts:
        ap.error("--parts: some of a, b, c")
    if not 0 < args.duration <= 30:
        ap.error("--duration: within (0, 30] seconds")
    if any(n < 2 or n > 8 for n in args.nodes):
        ap.error("--nodes: counts within 2..8")
    if args.inflight > args.users:
        ap.error("--inflight above --users")
    for tool in ("redis-server", "redis-cli") + (("taskset",) if args.pin else ()):
        if not shutil.which(tool):
            print(f"bench_cluster: {tool} not found", file=sys.stderr)
            return 2
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    need = set(setups) if set(args.parts) & {"a", "b"} else set()
    if "c" in args.parts or args.profile:
        need.add("cluster")
    if args.pin:
        os.sched_setaffinity(0, {int(c) for c in _cpus(args.other_cpus)})
    bench = Bench(args)
    rows = []
    t_start = time.monotonic()
    print(f"# fastsip serve --cluster: {os.cpu_count()} CPUs; "
          + (f"node(s) on CPU {args.node_cpus}, Redis and the load tool on CPU {args.other_cpus}"
             if args.pin else "not pinned")
          + f"; {args.scenario}, {args.users} phones, {args.duration:g} s per step; "
          "µs = CPU µs per REGISTER answered")
    try:
        bench.start_redis(need)
        if bench.idle:
            print("# Redis CPU with no load: " + ", ".join(f"{k} {v} % of a core"
                                                          for k, v in bench.idle.items()))
        print(HEAD, flush=True)

        def add(r):
            rows.append(r)
            print(line(r), flush=True)

        if "a" in args.parts:
            for rate in args.rates:
                for setup in setups:
                    add(bench.step("a", setup, rate=rate))
        if "b" in args.parts:
            for setup in setups:
                add(bench.step("b", setup, inflight=args.inflight))
        if "c" in args.parts:
            if not find(rows, part="b", setup="cluster"):
                add(bench.step("c", "cluster", inflight=args.inflight))
            for n in args.nodes:
                add(bench.step("c", "cluster", nodes=n, inflight=args.inflight))
        profiles = {}
        if args.profile:
            for setup in [x for x in ("no-state", "cluster") if x in need or x == "no-state"]:
                r = profiles[setup] = bench.step("profile", setup, inflight=args.inflight,
                                                 profile=True)
                print(f"# profiled step, {setup} (not in the table): {r['achieved']:.0f} "
                      f"REGISTER/s, node {r['node_cpu_pct']} % of a core, "
                      f"{r['node_us_per_reg']} µs per REGISTER (profilers attached)", flush=True)
    except BenchError as exc:
        print(f"bench_cluster: error: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stop()
    print("# ratios (this run, side by side):")
    ratios = summary(rows, args)
    for s in ratios:
        print("# " + s)
    print_profile(profiles)
    print(f"# {time.monotonic() - t_start:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "ratios": ratios,
                       "profiles": profiles}, f, indent=1)
    return 0


def _cpus(text):
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += [str(c) for c in range(int(a), int(b or a) + 1)]
    return out


if __name__ == "__main__":
    sys.exit(main())
