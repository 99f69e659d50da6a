"""End-to-end benchmark: a registrar under the bundled load tool.

Starts a registrar (by default ``fastsip serve`` from this tree), optionally
pinned to chosen cores with ``taskset``, runs ``python -m load`` against it
at a ladder of open-loop rates and at a few closed-loop windows, for each
scenario asked for (each step against a freshly started server, the servers
taking turns step by step), with the load tool pinned to other cores and measuring
the server's CPU (``--server-pid``, the process and all its descendants),
and writes a results table (Markdown and JSON) and a plot.  ``--peer
NAME=COMMAND`` (or ``--kamailio``) runs the same ladder against another
registrar in the same run, so the figures sit side by side.

    # fastsip, 1 worker on core 0, the load tool on core 1
    python bench/bench_e2e.py --workers 1 --server-cpus 0 --load-cpus 1 --out /tmp/be
    # ... and Kamailio (Debian package, bench/kamailio/registrar.cfg) in the same run
    python bench/bench_e2e.py --workers 1 --server-cpus 0 --load-cpus 1 --kamailio --out /tmp/be
    # closed loop only, two scenarios
    python bench/bench_e2e.py --rates "" --inflight 64,256 --scenarios register,refresh
    # any registrar given its start command
    python bench/bench_e2e.py --server-cmd "python -m load.responder --fast --listen {host}:{port}" \\
        --name c-echo

Commands are templates: ``{host}``, ``{port}`` (the SIP port, UDP and TCP),
``{mport}`` (a second free port, for fastsip's metrics endpoint),
``{workers}``, ``{python}``, ``{root}`` (this tree) and ``{rundir}`` (a
fresh temporary folder) are filled in; they are split like a shell would
and run without a shell, in their own process group, which is killed at
the end.  When the command has ``{mport}``, the server's own counters
(``/metrics``) are read around every step: the table then says how many
REGISTERs the server counted and answered 2xx, next to what the tool sent.
Only loopback targets.  This is a script, not a pytest-benchmark suite (it
defines no tests).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load.report import _descendants, process_cpu_ns  # noqa: E402 (needs the sys.path line: run as a script)

DEFAULT_SERVER = ("{python} -m fastsip.server --listen udp:{host}:{port} --listen tcp:{host}:{port} "
                  "--workers {workers} --no-state --metrics {host}:{mport} --log-level warning")
KAMAILIO = ("kamailio -DD -E -f {root}/bench/kamailio/registrar.cfg -l udp:{host}:{port} "
            "-l tcp:{host}:{port} -n {workers} -m 256 -M 16 -x tlsf -Y {rundir} -w {rundir}")

PROBE = ("OPTIONS sip:{host}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {lhost}:{lport};branch=z9hG4bK-probe{n}\r\n"
         "Max-Forwards: 70\r\nFrom: <sip:probe@{host}>;tag=p\r\nTo: <sip:probe@{host}>\r\n"
         "Call-ID: probe{n}@{lhost}\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n")


class BenchError(Exception):
    """A step that cannot run (the server does not start, the load tool fails): main()
    prints it on one line and exits 1."""


def _last_line(text: str, default: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), default)


def _pin(cmd: list, cpus: str | None) -> list:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def free_port(host: str, avoid=()) -> int:
    """A port free for both UDP and TCP on ``host`` right now (never 5060)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(fam, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            if port == 5060 or port in avoid:
                continue
            try:
                with socket.socket(fam, socket.SOCK_STREAM) as t:
                    t.bind((host, port))
            except OSError:
                continue
            return port
    raise BenchError(f"no free port on {host}")


def wait_ready(host: str, port: int, proc, timeout: float = 15.0) -> bool:
    """Poll the server with OPTIONS over UDP until it answers anything (bounded)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(0.2)
    lhost, lport = s.getsockname()[:2]
    try:
        for n in range(1, int(timeout / 0.2) + 1):
            if proc.poll() is not None:
                return False
            s.sendto(PROBE.format(host=host, port=port, lhost=lhost, lport=lport, n=n).encode(),
                     (host, port))
            try:
                s.recvfrom(65535)
                return True
            except TimeoutError:
                continue
        return False
    finally:
        s.close()


def scrape(host: str, mport: int) -> dict | None:
    """fastsip's counters from /metrics: REGISTERs received, replies by code."""
    h = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{h}:{mport}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {"register": 0, "2xx": 0, "replies": 0}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        key, _, value = line.rpartition(" ")
        if key == 'fastsip_requests_total{method="REGISTER"}':
            out["register"] = int(float(value))
        elif key.startswith("fastsip_replies_total{"):
            out["replies"] += int(float(value))
            if key.split('"')[1].startswith("2"):
                out["2xx"] += int(float(value))
    return out


def udp_rcvbuf_errors() -> int:
    """The kernel's UDP receive-buffer drops so far (this network namespace)."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return 0


def cpu_list(text: str | None) -> list | None:
    """``"0,2-3"`` -> ``[0, 2, 3]`` (a taskset list); None for None."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


class Cores:
    """Busy time of the machine's CPUs from /proc/stat (user, nice, system, irq, softirq,
    steal), to tell how much of a step's CPU went to other work on the machine."""

    TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    @staticmethod
    def busy_ns() -> dict:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    v = line.split()
                    out[int(v[0][3:])] = sum(int(v[i]) for i in (1, 2, 3, 6, 7, 8)) * Cores.TICK_NS
        return out

    @staticmethod
    def busy_pct(cpus=None, window=0.5) -> float:
        """Percent of one core the CPUs ``cpus`` (all: None) were busy over ``window`` s."""
        a = Cores.busy_ns()
        time.sleep(window)
        b = Cores.busy_ns()
        keys = cpus if cpus is not None else list(b)
        return 100.0 * sum(b[k] - a.get(k, 0) for k in keys if k in b) / (window * 1e9)


def wait_quiet(max_wait: float, threshold: float, cpus=None) -> tuple:
    """Wait (at most ``max_wait`` s) until the machine is quiet: other work uses at most
    ``threshold`` % of a core on ``cpus``.  Returns (seconds waited, last busy %)."""
    t0 = time.monotonic()
    while True:
        busy = Cores.busy_pct(cpus)
        if busy <= threshold or time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0, busy


def group_cpu_ns(pid: int) -> int:
    """CPU time so far of ``pid`` and its descendants, ns."""
    return sum(process_cpu_ns(p) or 0 for p in _descendants([pid]))


class Server:
    """A registrar process the benchmark started (and stops, with its process group)."""

    def __init__(self, template: str, args, workers: int):
        self.rundir = tempfile.mkdtemp(prefix="bench-e2e-")
        self.host = args.host
        self.port = args.port or free_port(args.host)
        self.mport = free_port(args.host, avoid=(self.port,)) if "{mport}" in template else None
        fields = {"host": args.host, "port": self.port, "mport": self.mport, "workers": workers,
                  "python": shlex.quote(sys.executable), "root": shlex.quote(str(ROOT)),
                  "rundir": self.rundir}
        cmd = _pin(shlex.split(template.format(**fields)), args.server_cpus)
        self.errpath = Path(self.rundir) / "stderr.log"
        self._err = open(self.errpath, "wb")      # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=_env(), cwd=self.rundir,
                                     start_new_session=True)
        self.cmd = cmd
        if not wait_ready(args.host, self.port, self.proc):
            err = self.stop()
            raise BenchError(f"the server did not answer on {args.host}:{self.port} "
                             f"({' '.join(cmd)}): {_last_line(err, 'no output')}")
        time.sleep(0.5)        # let every worker/child finish starting before CPU is measured

    @property
    def pid(self) -> int:
        return self.proc.pid

    def counters(self) -> dict | None:
        return scrape(self.host, self.mport) if self.mport else None

    def stop(self) -> str:
        """SIGTERM the process group this benchmark created, then SIGKILL it."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)     # stragglers of the group
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._err.close()
        err = self.errpath.read_text(errors="replace")
        shutil.rmtree(self.rundir, ignore_errors=True)
        return err[-2000:]


def load_step(args, server: Server, scenario: str, mode: str, value: float, out: Path) -> dict:
    """One run of the load tool; returns its JSON, plus ``_tool_cpu_ns`` (the tool's whole
    CPU time, build included) and ``_wall_ns``, ``_busy`` (/proc/stat busy ns per CPU) and
    ``_server_ns`` (the server group's CPU) over the subprocess's life."""
    flag = "--rate" if mode == "open" else "--inflight"
    host = f"[{args.host}]" if ":" in args.host else args.host
    cmd = _pin([sys.executable, "-m", "load", "--target", f"{host}:{server.port}",
                "--transport", args.transport, flag, f"{value:g}",
                "--duration", f"{args.step_duration:g}", "--users", str(args.users),
                "--scenario", scenario, "--timeout", f"{args.timeout:g}", "-q",
                "--json", str(out), "--server-pid", str(server.pid)], args.load_cpus)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, srv0, t0 = Cores.busy_ns(), group_cpu_ns(server.pid), time.monotonic_ns()
    step = f"load step {scenario} {mode} {value:g} against port {server.port}"
    limit = args.step_duration + args.timeout + 300
    try:
        cp = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True,
                            timeout=limit)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{step}: the load tool did not finish within {limit:g} s") from None
    busy1, srv1, t1 = Cores.busy_ns(), group_cpu_ns(server.pid), time.monotonic_ns()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # exit 1 is a completed run with losses (its JSON says which); anything else failed
    if cp.returncode not in (0, 1) or not out.is_file():
        raise BenchError(f"{step} failed: "
                         f"{_last_line(cp.stderr, f'exit status {cp.returncode}, no output')}")
    res = json.loads(out.read_text())
    res["_tool_cpu_ns"] = int(((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1e9)
    res["_server_ns"] = srv1 - srv0
    res["_wall_ns"] = t1 - t0
    res["_busy"] = {k: busy1[k] - busy0.get(k, 0) for k in busy1}
    return res


def others_pct(res: dict, server_cpus) -> tuple:
    """CPU of other work on the machine during a step, % of one core: on every CPU, and
    on the server's CPUs (when pinned).  /proc/stat's busy time minus what the server
    group and the load tool used (approximate: tick resolution, softirq accounting)."""
    wall = res["_wall_ns"] or 1
    busy = res["_busy"]
    total = sum(busy.values()) - res["_server_ns"] - res["_tool_cpu_ns"]
    on_server = None
    if server_cpus:
        on_server = sum(busy.get(c, 0) for c in server_cpus) - res["_server_ns"]
        on_server = round(max(0.0, 100.0 * on_server / wall), 1)
    return round(max(0.0, 100.0 * total / wall), 1), on_server


def step_row(args, name, scenario, mode, value, rep, res, before, after, drops) -> dict:
    prime = res.get("prime") or {"sent": 0, "ok": 0}
    others, others_srv = others_pct(res, cpu_list(args.server_cpus))
    return {
        "server": name, "scenario": scenario, "mode": mode, "setting": value, "repeat": rep,
        "offered": res["offered_rate"], "achieved": res["achieved_rate"],
        "sent": res["sent_total"], "ok": res["ok"], "timeouts": res["timeouts"],
        "replies": res["replies"], "shortfall": res["open_loop_shortfall"],
        "loss_pct": round(100.0 * res["timeouts"] / res["sent"], 3) if res["sent"] else 0.0,
        "p50_ms": res["latency_ms"]["p50"], "p99_ms": res["latency_ms"]["p99"],
        "p999_ms": res["latency_ms"]["p999"],
        "server_cpu_pct": res.get("server_cpu_pct"),
        "server_us_per_req": res.get("server_cpu_us_per_request"),
        "generator_cpu_pct": res["generator_cpu_pct"],
        "generator_bound": res["generator_bound"],
        "udp_rcvbuf_drops": drops,
        "others_cpu_pct": others, "others_on_server_cpus_pct": others_srv,
        # what the server itself counted during the measured phase (priming taken off)
        "server_seen": (after["register"] - before["register"] - prime["sent"]
                        if before and after else None),
        "server_2xx": (after["2xx"] - before["2xx"] - prime["ok"] if before and after else None),
    }


def run_all(args, servers: list, outdir: Path) -> list:
    """Run every step against every server in turn, so that the servers see the same machine
    (the cores are shared with other work whose load comes and goes).  Each step gets a
    freshly started server: the tool binds new source ports every run and a phone's Contact
    carries its port, so a registrar that lived through earlier steps would hold one more
    binding per phone for each (and answer with longer 200s, and run out of memory)."""
    rows = []
    steps = [("open", r) for r in args.rates] + [("closed", n) for n in args.inflight]
    for scenario in args.scenarios:
        for mode, value in steps:
            for rep in range(args.repeat):
                for name, template in servers:
                    if args.quiet_wait:
                        waited, busy = wait_quiet(args.quiet_wait, args.quiet_threshold)
                        if busy > args.quiet_threshold:
                            print(f"  (machine still busy after {waited:.0f} s: {busy:.0f} % "
                                  "of a core used by other work)", flush=True)
                    server = Server(template, args, args.workers)
                    try:
                        before, drops0 = server.counters(), udp_rcvbuf_errors()
                        res = load_step(args, server, scenario, mode, value,
                                        outdir / f"{name}-{scenario}-{mode}-{value:g}-{rep}.json")
                        drops = udp_rcvbuf_errors() - drops0
                        after = server.counters()
                    finally:
                        err = server.stop()
                        if args.verbose and err.strip():
                            print(f"--- {name} stderr (tail) ---\n{err}", file=sys.stderr)
                    row = step_row(args, name, scenario, mode, value, rep, res, before, after,
                                   drops)
                    rows.append(row)
                    seen = "" if row["server_seen"] is None else \
                        f", server saw {row['server_seen']:,} sent 2xx {row['server_2xx']:,}"
                    print(f"{name:>10} {scenario:>8} {mode:>6} {value:>8g}: offered "
                          f"{row['offered']:>9,.0f}/s achieved {row['achieved']:>9,.0f}/s "
                          f"timeouts {row['timeouts']} p99 {row['p99_ms']:.3f} ms, server "
                          f"{row['server_cpu_pct']} % CPU {row['server_us_per_req']} us/req, "
                          f"tool {row['generator_cpu_pct']} %, others {row['others_cpu_pct']} %"
                          f"{seen}", flush=True)
    return rows


def quietest(rows: list) -> list:
    """One row per (server, scenario, mode, setting): the repeat during which other work on
    the machine used the least CPU."""
    best = {}
    for r in rows:
        key = (r["server"], r["scenario"], r["mode"], r["setting"])
        if key not in best or r["others_cpu_pct"] < best[key]["others_cpu_pct"]:
            best[key] = r
    return list(best.values())


def table(rows: list) -> str:
    head = ("| server | scenario | mode | rate or inflight | offered/s | 2xx/s | loss % | "
            "sent / server saw / server 2xx | p50 ms | p99 ms | p99.9 ms | server CPU % | "
            "server µs/req | tool CPU % | other work, % of a core |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        flag = " (gen.-bound)" if r["generator_bound"] else ""
        seen = (f"{r['sent']:,} / {r['server_seen']:,} / {r['server_2xx']:,}"
                if r["server_seen"] is not None else f"{r['sent']:,} / – / –")
        loss = f"{r['loss_pct']}" + (f" (+{r['shortfall']:,} unsent)" if r["shortfall"] else "")
        other = f"{r['others_cpu_pct']}" + (
            f" ({r['others_on_server_cpus_pct']} on the server's)"
            if r["others_on_server_cpus_pct"] is not None else "")
        lines.append(
            f"| {r['server']} | {r['scenario']} | {r['mode']} | {r['setting']:g} | "
            f"{r['offered']:,.0f} | {r['achieved']:,.0f} | {loss} | {seen} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['p999_ms']:.3f} | {r['server_cpu_pct']} | "
            f"{r['server_us_per_req']} | {r['generator_cpu_pct']}{flag} | {other} |")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    series = list(dict.fromkeys((r["server"], r["scenario"]) for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, scen) in enumerate(series):
        col = colors[k % len(colors)]
        label = f"{name} {scen}"
        pts = [r for r in rows if (r["server"], r["scenario"]) == (name, scen) and r["mode"] == "open"]
        if pts:
            ax1.plot([r["offered"] for r in pts], [r["achieved"] for r in pts], "o-", color=col,
                     label=label)
            ax2.plot([r["offered"] for r in pts], [max(r["p99_ms"], 1e-3) for r in pts], "o-",
                     color=col, label=label)
        for r in rows:
            if (r["server"], r["scenario"]) == (name, scen) and r["mode"] == "closed":
                ax1.axhline(r["achieved"], ls=":", lw=0.8, color=col)
        cl = [r for r in rows if (r["server"], r["scenario"]) == (name, scen) and r["mode"] == "closed"]
        if cl:
            ax3.plot([r["setting"] for r in cl], [r["achieved"] for r in cl], "s-", color=col,
                     label=label)
    ax1.set_xlabel("offered REGISTER/s")
    ax1.set_ylabel("2xx/s")
    ax1.set_title("open loop (dotted: closed-loop maxima)")
    ax2.set_xlabel("offered REGISTER/s")
    ax2.set_ylabel("p99 latency, ms")
    ax2.set_yscale("log")
    ax2.set_title("open-loop p99 latency")
    ax3.set_xlabel("requests in flight")
    ax3.set_ylabel("2xx/s")
    ax3.set_xscale("log", base=2)
    ax3.set_title("closed loop")
    kilo = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k")
    ax1.xaxis.set_major_formatter(kilo)
    ax1.yaxis.set_major_formatter(kilo)
    ax2.xaxis.set_major_formatter(kilo)
    ax3.yaxis.set_major_formatter(kilo)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _list(text: str, conv) -> list:
    return [conv(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-cmd", default=DEFAULT_SERVER,
                   help="start command of the registrar under test (template, see above); "
                        "default %(default)r")
    p.add_argument("--name", default="fastsip", help="its name in the table")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND",
                   help="another registrar to run the same ladder against (repeatable)")
    p.add_argument("--kamailio", action="store_true",
                   help=f"add the peer kamailio={KAMAILIO!r} (skipped when kamailio is not installed)")
    p.add_argument("--workers", type=int, default=1,
                   help="{workers}: fastsip's --workers, Kamailio's -n (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="SIP port (default: a free one per server)")
    p.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    p.add_argument("--server-cpus", help="taskset CPU list for the server, e.g. 0")
    p.add_argument("--load-cpus", help="taskset CPU list for the load tool, e.g. 1")
    p.add_argument("--rates", default="10000,25000,50000,100000,150000,200000",
                   help="open-loop ladder, REGISTER/s ('' for none)")
    p.add_argument("--inflight", default="64,256", help="closed-loop windows ('' for none)")
    p.add_argument("--scenarios", default="register",
                   help="load tool scenarios, comma-separated")
    p.add_argument("--step-duration", type=float, default=5.0, help="seconds per step")
    p.add_argument("--users", type=int, default=50000,
                   help="phones; keep above rate x timeout, or a slow server starves the open loop")
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each step against each server (the table leads with the "
                        "quietest; default %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each step, wait up to S seconds for other work on the machine "
                        "to drop below --quiet-threshold")
    p.add_argument("--quiet-threshold", type=float, default=15.0, metavar="PCT",
                   help="percent of one core other work may use for --quiet-wait (default %(default)s)")
    p.add_argument("--out", default="bench-e2e-out", help="output folder")
    p.add_argument("-v", "--verbose", action="store_true", help="print the servers' stderr")
    args = p.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        p.error("the end-to-end benchmark runs on loopback only")
    if args.port == 5060:
        p.error("not on 5060: pick another port or leave --port out")
    args.rates = _list(args.rates, float)
    args.inflight = _list(args.inflight, int)
    args.scenarios = _list(args.scenarios, str.strip)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if not args.rates and not args.inflight:
        p.error("nothing to run: give --rates and/or --inflight")
    if args.inflight and max(args.inflight) > args.users:
        p.error("--inflight above --users")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    servers = [(args.name, args.server_cmd)]
    for x in args.peer:
        name, sep, cmd = x.partition("=")
        if not sep or not cmd:
            p.error(f"--peer {x!r}: NAME=COMMAND")
        servers.append((name, cmd))
    if args.kamailio:
        if shutil.which("kamailio"):
            servers.append(("kamailio", KAMAILIO))
        else:
            print("kamailio is not installed (Debian: apt-get install kamailio): skipped",
                  file=sys.stderr)
    try:
        rows = run_all(args, servers, outdir)
    except BenchError as exc:
        print(f"bench_e2e: error: {exc}", file=sys.stderr)
        return 1
    text = table(rows)
    if args.repeat > 1:
        text = ("Quietest repeat of each step:\n\n" + table(quietest(rows))
                + "\n\nEvery repeat:\n\n" + text)
    (outdir / "results.md").write_text(
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`\n\n{text}\n")
    (outdir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    try:
        plot(quietest(rows), outdir / "results.png")
        print(f"plot: {outdir / 'results.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
