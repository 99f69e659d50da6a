"""End-to-end benchmark: a registrar under the bundled load tool.

Starts a registrar (by default ``fastsip serve``), optionally pinned to
chosen cores, runs ``python -m load`` against it at a ladder of open-loop
rates and at a few closed-loop windows, with the load tool pinned to other
cores and measuring the server's CPU, and writes a results table
(Markdown and JSON) and a plot.  ``--peer NAME=COMMAND`` runs the same ladder
against another registrar in the same run (for example Kamailio from the
Debian package), so the figures sit side by side.

    python bench/bench_e2e.py --server-cpus 0 --load-cpus 1 --out bench-out
    python bench/bench_e2e.py --server-cmd "python -m load.responder --fast --listen {host}:{port}"
    python bench/bench_e2e.py --peer "kamailio=kamailio -DD -E -f kam.cfg -l udp:{host}:{port}"

Commands are templates: ``{host}`` and ``{port}`` are filled in; they are
split like a shell would and run without a shell.  Only loopback targets.
This is a script, not a pytest-benchmark suite (it defines no tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVER = "fastsip serve --listen {host}:{port}"

PROBE = ("OPTIONS sip:{host}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {lhost}:{lport};branch=z9hG4bK-probe{n}\r\n"
         "Max-Forwards: 70\r\nFrom: <sip:probe@{host}>;tag=p\r\nTo: <sip:probe@{host}>\r\n"
         "Call-ID: probe{n}@{lhost}\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n")


def _pin(cmd: list, cpus: str | None) -> list:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def wait_ready(host: str, port: int, timeout: float = 10.0) -> bool:
    """Poll the server over UDP until it answers anything (bounded)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(0.2)
    lhost, lport = s.getsockname()
    try:
        for n in range(1, int(timeout / 0.2) + 1):
            s.sendto(PROBE.format(host=host, port=port, lhost=lhost, lport=lport, n=n).encode(),
                     (host, port))
            try:
                s.recvfrom(65535)
                return True
            except socket.timeout:
                continue
        return False
    finally:
        s.close()


class Server:
    """A registrar process the benchmark started (and stops)."""

    def __init__(self, template: str, host: str, port: int, cpus: str | None):
        cmd = _pin(shlex.split(template.format(host=host, port=port)), cpus)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self.cmd = cmd
        if not wait_ready(host, port):
            err = self.stop()
            raise RuntimeError(f"server did not answer on {host}:{port}: {' '.join(cmd)}\n{err}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> str:
        """SIGTERM the process group this benchmark created, then SIGKILL it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        return err[-2000:]


def load_step(args, target: str, server_pid: int, mode: str, value: float, out: Path) -> dict:
    """One run of the load tool; returns its JSON."""
    flag = "--rate" if mode == "open" else "--inflight"
    cmd = _pin([sys.executable, "-m", "load", "--target", target, flag, f"{value:g}",
                "--duration", f"{args.step_duration:g}", "--users", str(args.users),
                "--scenario", args.scenario, "--timeout", f"{args.timeout:g}", "-q",
                "--json", str(out), "--server-pid", str(server_pid)], args.load_cpus)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cp = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=args.step_duration + args.timeout + 120)
    if cp.returncode not in (0, 1):
        raise RuntimeError(f"load tool failed: {' '.join(cmd)}\n{cp.stderr}")
    return json.loads(out.read_text())


def ladder(args, name: str, template: str, outdir: Path) -> list:
    rows = []
    server = Server(template, args.host, args.port, args.server_cpus)
    try:
        steps = [("open", r) for r in args.rates] + [("closed", n) for n in args.inflight]
        for mode, value in steps:
            res = load_step(args, f"{args.host}:{args.port}", server.pid, mode, value,
                            outdir / f"{name}-{mode}-{value:g}.json")
            rows.append({
                "server": name, "mode": mode, "setting": value,
                "offered": res["offered_rate"], "achieved": res["achieved_rate"],
                "loss_pct": round(100.0 * res["timeouts"] / res["sent"], 3) if res["sent"] else 0.0,
                "p50_ms": res["latency_ms"]["p50"], "p99_ms": res["latency_ms"]["p99"],
                "p999_ms": res["latency_ms"]["p999"],
                "server_cpu_pct": res.get("server_cpu_pct"),
                "server_us_per_req": res.get("server_cpu_us_per_request"),
                "generator_cpu_pct": res["generator_cpu_pct"],
                "generator_bound": res["generator_bound"],
            })
            print(f"{name:>10} {mode:>6} {value:>9g}: achieved {res['achieved_rate']:>10,.0f}/s "
                  f"p99 {res['latency_ms']['p99']:.3f} ms, server {res.get('server_cpu_pct')} % CPU",
                  flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list) -> str:
    head = ("| server | mode | rate or inflight | offered/s | 2xx/s | loss % | p50 ms | p99 ms | "
            "p99.9 ms | server CPU % | server us/req | generator CPU % |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        flag = " (gen.-bound)" if r["generator_bound"] else ""
        lines.append(
            f"| {r['server']} | {r['mode']} | {r['setting']:g} | {r['offered']:,.0f} | "
            f"{r['achieved']:,.0f} | {r['loss_pct']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['p999_ms']:.3f} | {r['server_cpu_pct']} | {r['server_us_per_req']} | "
            f"{r['generator_cpu_pct']}{flag} |")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(r["server"] for r in rows):
        pts = [r for r in rows if r["server"] == name and r["mode"] == "open"]
        ax1.plot([r["offered"] for r in pts], [r["achieved"] for r in pts], "o-", label=name)
        ax2.plot([r["offered"] for r in pts], [max(r["p99_ms"], 1e-3) for r in pts], "o-", label=name)
        for r in rows:
            if r["server"] == name and r["mode"] == "closed":
                ax1.axhline(r["achieved"], ls=":", lw=0.8)
    ax1.set_xlabel("offered REGISTER/s")
    ax1.set_ylabel("2xx/s")
    ax1.set_title("throughput (dotted: closed loop)")
    ax2.set_xlabel("offered REGISTER/s")
    ax2.set_ylabel("p99 latency, ms")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-cmd", default=DEFAULT_SERVER,
                   help="start command of the registrar under test ({host}, {port}); "
                        "default %(default)r")
    p.add_argument("--name", default="fastsip", help="its name in the table")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND",
                   help="another registrar to run the same ladder against")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5090)
    p.add_argument("--server-cpus", help="taskset CPU list for the server, e.g. 0")
    p.add_argument("--load-cpus", help="taskset CPU list for the load tool, e.g. 1")
    p.add_argument("--rates", default="10000,25000,50000,100000,150000,200000",
                   help="open-loop ladder, REGISTER/s")
    p.add_argument("--inflight", default="64,512", help="closed-loop windows")
    p.add_argument("--step-duration", type=float, default=5.0, help="seconds per step")
    p.add_argument("--users", type=int, default=50000,
                   help="phones; keep above rate x timeout, or a slow server starves the open loop")
    p.add_argument("--scenario", default="register")
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--out", default="bench-e2e-out", help="output folder")
    args = p.parse_args(argv)
    import ipaddress
    if not ipaddress.ip_address(args.host).is_loopback:
        p.error("the end-to-end benchmark runs on loopback only")
    args.rates = [float(x) for x in args.rates.split(",") if x]
    args.inflight = [int(x) for x in args.inflight.split(",") if x]
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    servers = [(args.name, args.server_cmd)] + [tuple(x.split("=", 1)) for x in args.peer]
    rows = []
    for name, cmd in servers:
        rows += ladder(args, name, cmd, outdir)
    text = table(rows)
    (outdir / "results.md").write_text(
        f"Command: `{' '.join(sys.argv)}`\n\n{text}\n")
    (outdir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    try:
        plot(rows, outdir / "results.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
