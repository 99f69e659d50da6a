"""TLS and WebSocket benchmark: fastsip beside Kamailio, in one run.

Starts each registrar with a TLS and a WSS listener and a certificate from a
test CA (``fastsip.server.testing.make_test_pki``), pinned to one core with
``taskset``, and measures, with the bundled load tool pinned to another:

1. TLS REGISTER/s: ``python -m load --transport tls`` closed loop;
2. WSS REGISTER/s: the same with ``--transport wss`` (the ``sip``
   subprotocol, masked frames, one message per frame);
3. TLS handshakes/s: ``python -m load.handshake rate``: new connection, TLS
   handshake, one REGISTER answered, close (``--handshake-only``: without the
   REGISTER); the server's CPU per handshake gives the per-core figure even
   when the (Python) client is the limit;
4. memory per idle TLS connection: the server's processes' memory (PSS and
   RSS, summed over all of them, from /proc) before and after ``--idle``
   connections past their handshakes are held open by ``python -m
   load.handshake hold`` processes, divided by the number held; for
   Kamailio also its own accounting (shared memory and every process's pkg
   memory, through ``kamcmd``);
5. (``--steps ...,floor``) the load tool's own floor: the same closed loop over
   TCP, TLS, WS and WSS against the responder's C stream echo on the server's
   core; the tool's CPU per REGISTER there gives its ceiling on one core.

With ``--repeat N`` each rate step runs N times per server (the servers taking
turns); the table gives the median and the range.  Each rate step also says
how much CPU other work on the machine took meanwhile (/proc/stat busy time
minus the server's and the tool's, from the tool's first progress line to its
last).

    python bench/bench_tls.py --server-cpus 0 --load-cpus 1 --out /tmp/bt
    python bench/bench_tls.py --servers kamailio --idle 10000       # one server only
    python bench/bench_tls.py --steps tls,wss --quiet-wait 60        # wait for a quiet machine
    python bench/bench_tls.py --repeat 3 --steps tls,wss,hs,idle,floor --quiet-wait 30

fastsip: ``fastsip serve --workers 1 --no-state --listen tls:127.0.0.1:0
--listen wss:127.0.0.1:0 --tls-cert --tls-key`` (defaults otherwise, but
``--max-connections`` raised above ``--idle``).  Kamailio (Debian packages
kamailio, kamailio-tls-modules, kamailio-websocket-modules):
``bench/kamailio/tls.cfg``, ``-x tlsf``, in-memory usrloc, 2 TLS readers.
Every step gets a freshly started server, the two servers taking turns step
by step.  Each server process may hold at most ``RLIMIT_NOFILE`` descriptors
(the hard limit; raising it needs CAP_SYS_RESOURCE): ``--idle`` is cut to
fit, and the table says so.  Loopback only; every loop is bounded in count
and time.  This is a script, not a pytest-benchmark suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_e2e import Cores, _env, _pin, free_port, group_cpu_ns, wait_quiet  # noqa: E402 (run as a script)
from fastsip.server.testing import ServerProcess, make_test_pki  # noqa: E402
from load.report import _descendants, process_cpu_ns  # noqa: E402

KAMAILIO = ("kamailio -DD -E -f {root}/bench/kamailio/tls.cfg -l tls:127.0.0.1:{tls} "
            "-l tls:127.0.0.1:{wss} -A 'TLS_CERT=\"{cert}\"' -A 'TLS_KEY=\"{key}\"' "
            "-A 'CTL_SOCKET=\"unix:{rundir}/ctl.sock\"' -m 4096 -M 64 -x tlsf -Y {rundir} -w {rundir}")


class BenchError(Exception):
    """A step that cannot run: main() prints it on one line and exits 1."""


def _tls_ready(port: int, ca: str, proc, timeout: float = 20.0) -> bool:
    """Poll ``port`` with TLS handshakes until one succeeds (bounded)."""
    ctx = ssl.create_default_context(cafile=ca)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s, \
                    ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                return True
        except (OSError, ssl.SSLError):
            time.sleep(0.2)
    return False


class Fastsip:
    name = "fastsip"

    def __init__(self, args, pki, workers=1):
        extra = ["--tls-cert", pki["cert"], "--tls-key", pki["key"],
                 "--max-connections", str(max(60000, args.idle + 1000)),
                 "--log-level", "warning"]
        self.srv = ServerProcess(*extra, workers=workers, transports=("tls", "wss"),
                                 prefix=["taskset", "-c", args.server_cpus] if args.server_cpus
                                 else (), cwd=args.rundir)
        try:
            self.srv.start()
        except RuntimeError as exc:
            self.srv.kill()
            raise BenchError(f"fastsip did not start: {str(exc).splitlines()[0]}") from None
        if self.srv.tls is None or self.srv.wss is None:
            self.srv.kill()
            raise BenchError(f"fastsip did not listen on tls and wss: {self.srv.start_line.strip()}")
        self.tls, self.wss = self.srv.tls[1], self.srv.wss[1]
        self.pid = self.srv.proc.pid
        if not _tls_ready(self.tls, pki["ca"], self.srv.proc):
            self.stop()
            raise BenchError("fastsip does not complete a TLS handshake")
        time.sleep(0.5)

    def own_memory(self) -> dict:
        return {}

    def trouble(self) -> str | None:
        """What went wrong in the server so far (a worker that died), or None."""
        m = re.search(r"worker \d+ \(pid \d+\) died[^\n]*", self.srv.log())
        return m.group(0) if m else None

    def stop(self) -> None:
        self.srv.stop(timeout=10)


class Kamailio:
    name = "kamailio"

    def __init__(self, args, pki):
        self.rundir = tempfile.mkdtemp(prefix="bench-tls-kam-")
        self.tls = free_port("127.0.0.1")
        self.wss = free_port("127.0.0.1", avoid=(self.tls,))
        cmd = KAMAILIO.format(root=shlex.quote(str(ROOT)), tls=self.tls, wss=self.wss,
                              cert=pki["cert"], key=pki["key"], rundir=self.rundir)
        self.cmd = _pin(shlex.split(cmd), args.server_cpus)
        self.errpath = Path(self.rundir) / "stderr.log"
        self._err = open(self.errpath, "wb")       # noqa: SIM115 - open while Kamailio runs
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self._err,
                                     stdin=subprocess.DEVNULL, cwd=self.rundir,
                                     start_new_session=True)
        self.pid = self.proc.pid
        if not _tls_ready(self.tls, pki["ca"], self.proc):
            err = self.stop()
            raise BenchError(f"kamailio did not start: {err.strip().splitlines()[-1:]}")
        time.sleep(1.0)

    def trouble(self) -> str | None:
        """What went wrong in Kamailio so far (a process killed by a signal, a memory
        BUG report), or None.  Kamailio 5.6.3 with OpenSSL 3 (Debian 12) has a known
        double free in its tls module (kamailio issue #3791; 5.7.5 and later add
        tls_threads_mode against it), seen here when many TLS connections close or
        give up their handshakes at once."""
        try:
            text = self.errpath.read_text(errors="replace")
        except OSError:
            return None
        m = re.search(r"[^\n]*(exited by a signal|BUG: [^\n]*)[^\n]*", text)
        return m.group(0).strip() if m else None

    def _kamcmd(self, *cmd) -> str:
        cp = subprocess.run(["kamcmd", "-s", f"unix:{self.rundir}/ctl.sock", *cmd],
                            capture_output=True, text=True, timeout=30, check=False)
        return cp.stdout

    def own_memory(self) -> dict:
        """Kamailio's own accounting: shared memory in use, pkg memory of every process
        (a few tries: busy with many connections, it may not answer the first)."""
        for _ in range(5):
            shm = re.search(r"real_used: (\d+)", self._kamcmd("core.shmmem"))
            pkg = re.findall(r"real_used: (\d+)", self._kamcmd("pkg.stats"))
            if shm and pkg:
                return {"shm_used": int(shm.group(1)), "pkg_used": sum(int(x) for x in pkg)}
            time.sleep(1.0)
        return {"shm_used": None, "pkg_used": None}

    def stop(self) -> str:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
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


SERVERS = {"fastsip": Fastsip, "kamailio": Kamailio}


def memory(pid: int) -> dict:
    """RSS and PSS, bytes, summed over ``pid`` and its descendants."""
    rss = pss = 0
    pids = _descendants([pid])
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return {"rss": rss, "pss": pss, "processes": len(pids)}


def _run_json(cmd: list, limit: float, what: str) -> dict:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=_env(),
                            check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no result within {limit:g} s") from None
    lines = [x for x in cp.stdout.splitlines() if x.startswith("{")]
    if cp.returncode not in (0, 1) or not lines:
        tail = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
        raise BenchError(f"{what} failed: {tail}")
    return json.loads(lines[-1])


class Echo:
    """The load tool's own floor: the responder's C stream echo (``python -m
    load.responder --fast``) on the server's core, one listener per transport."""

    name = "echo"

    def __init__(self, args, pki, transport):
        cmd = _pin([sys.executable, "-m", "load.responder", "--fast", "--listen", "127.0.0.1:0",
                    "--transport", transport, "--tls-cert", pki["cert"], "--tls-key", pki["key"],
                    "--duration", "600"], args.server_cpus)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True, env=_env(),
                                     start_new_session=True)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline()
        m = re.match(r"listening \S+:(\d+)", line)
        if not m:
            self.stop()
            raise BenchError(f"the echo did not start: {line!r}")
        self.tls = self.wss = int(m.group(1))

    def trouble(self) -> str | None:
        return None if self.proc.poll() is None else "the echo exited"

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


def _others(busy0: dict, wall: float, used_ns: float) -> float:
    """Other work on the machine since ``busy0`` (/proc/stat), % of one core: busy time
    of every CPU minus ``used_ns`` (what the server and the client used)."""
    busy = sum(Cores.busy_ns().values()) - sum(busy0.values())
    return round(max(0.0, 100 * (busy - used_ns) / 1e9 / wall), 1)


def step_register(args, srv, pki, transport: str) -> dict:
    """One closed-loop run of the load tool over ``transport`` against ``srv``."""
    port = srv.wss if transport in ("ws", "wss") else srv.tls
    out = Path(args.rundir) / f"{srv.name}-{transport}.json"
    cmd = _pin([sys.executable, "-m", "load", "--target", f"127.0.0.1:{port}",
                "--transport", transport, "--inflight", str(args.inflight),
                "--sockets", str(args.sockets), "--duration", f"{args.duration:g}",
                "--users", str(args.users), "--scenario", args.scenario, "--timeout", "2",
                "--json", str(out), "--server-pid", str(srv.pid)]
               + (["--tls-ca", pki["ca"]] if transport in ("tls", "wss") else []), args.load_cpus)
    cp = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=_env())
    # other work on the machine over the measured phase: from the tool's first progress line
    # (one a second, only while it measures) to the last
    lines, mark, others = [], None, None
    try:
        for line in cp.stderr:          # ends when the tool exits (bounded by --duration)
            lines.append(line)
            if line.startswith("["):
                now = (Cores.busy_ns(), time.monotonic(), group_cpu_ns(srv.pid),
                       process_cpu_ns(cp.pid) or 0)
                if mark is None:
                    mark = now
                elif now[1] - mark[1] > 0.5:
                    used = (now[2] - mark[2]) + (now[3] - mark[3])
                    busy = sum(now[0].values()) - sum(mark[0].values())
                    others = round(max(0.0, 100 * (busy - used) / 1e9 / (now[1] - mark[1])), 1)
        cp.wait(timeout=args.duration + 120)
    except subprocess.TimeoutExpired:
        cp.kill()
        raise BenchError(f"{srv.name} {transport}: the load tool did not finish") from None
    finally:
        cp.stderr.close()
    err = "".join(x for x in lines if not x.startswith("["))
    if cp.returncode not in (0, 1) or not out.is_file():
        tail = (err.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
        raise BenchError(f"{srv.name} {transport}: the load tool failed: {tail}")
    r = json.loads(out.read_text())
    out.unlink()
    return {"rate": r["achieved_rate"], "ok": r["ok"], "timeouts": r["timeouts"],
            "replies": r["replies"], "p50_ms": r["latency_ms"]["p50"],
            "p99_ms": r["latency_ms"]["p99"], "server_cpu_pct": r.get("server_cpu_pct"),
            "server_us": r.get("server_cpu_us_per_request"),
            "tool_cpu_pct": r["generator_cpu_pct"],
            "tool_us": round(r["generator_cpu_pct"] / 100 * r["elapsed_s"] * 1e6 / r["ok"], 2)
            if r["ok"] else None,
            "others_pct": others}


def step_handshakes(args, srv, pki) -> dict:
    cmd = _pin([sys.executable, "-m", "load.handshake", "rate", "--target", f"127.0.0.1:{srv.tls}",
                "--transport", "tls", "--tls-ca", pki["ca"], "--duration", f"{args.duration:g}",
                "--concurrency", str(args.concurrency), "--server-pid", str(srv.pid)]
               + (["--handshake-only"] if args.handshake_only else []), args.load_cpus)
    b0, t0 = Cores.busy_ns(), time.monotonic()
    r = _run_json(cmd, args.duration + 60, f"{srv.name} handshakes")
    # the client's start-up is in the wall time but not in its CPU: a rough figure
    used = (r.get("server_cpu_pct", 0) + r["client_cpu_pct"]) / 100 * r["elapsed_s"] * 1e9
    r["others_pct"] = _others(b0, time.monotonic() - t0, used + 0.5e9)
    r["server_us"] = r.get("server_cpu_us")
    return r


def step_idle(args, srv, pki, n: int) -> dict:
    """Memory before and after ``n`` idle TLS connections are held."""
    time.sleep(1.0)
    before, own0 = memory(srv.pid), srv.own_memory()
    per = args.idle_per_process
    holders = []
    try:
        for k in range(0, n, per):
            cmd = _pin([sys.executable, "-m", "load.handshake", "hold", "--target",
                        f"127.0.0.1:{srv.tls}", "--transport", "tls", "--tls-ca", pki["ca"],
                        "--count", str(min(per, n - k)), "--first", str(k), "--duration", "900",
                        "--concurrency", "32"], args.load_cpus)
            holders.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=_env(),
                                            start_new_session=True))
        held, failed = 0, {}
        for h in holders:
            line = h.stdout.readline()          # bounded: the holder gives up after 600 s
            if not line.startswith("{"):
                raise BenchError(f"{srv.name} idle: a holder failed: "
                                 f"{h.stderr.read().strip().splitlines()[-1:]}")
            got = json.loads(line)
            held += got["held"]
            for why, c in got["failed"].items():
                failed[why] = failed.get(why, 0) + c
        time.sleep(3.0)                     # the server finishes the last handshakes
        after, own1 = memory(srv.pid), srv.own_memory()
        trouble = srv.trouble()             # before the holders close their connections
    finally:
        for h in holders:
            try:
                h.stdin.close()
            except OSError:
                pass
        for h in holders:
            try:
                h.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(h.pid, signal.SIGKILL)
                h.wait(timeout=10)
            h.stdout.close()
            h.stderr.close()
    res = {"held": held, "failed": failed, "before": before, "after": after, "trouble": trouble,
           "trouble_at_close": srv.trouble() if srv.trouble() != trouble else None,
           "pss_per_conn": round((after["pss"] - before["pss"]) / held) if held else None,
           "rss_per_conn": round((after["rss"] - before["rss"]) / held) if held else None}
    if own0 and None not in (own0["shm_used"], own1["shm_used"]):
        res["shm_per_conn"] = round((own1["shm_used"] - own0["shm_used"]) / held) if held else None
        res["pkg_per_conn"] = round((own1["pkg_used"] - own0["pkg_used"]) / held) if held else None
        res["own_before"], res["own_after"] = own0, own1
    return res


def _good(rs):
    """The runs during which the server did not crash."""
    return [r for r in rs or [] if not r.get("trouble")]


def _median(rs: list, key: str):
    vals = sorted(r[key] for r in _good(rs) if r.get(key) is not None)
    return vals[len(vals) // 2] if vals else None


def _cell(rs, key, unit="", scale=1.0):
    """The median of the repeats, with their range when there are several."""
    if not rs:
        return "–"
    m = _median(rs, key)
    if m is None:
        return "–"
    txt = _fmt(m * scale, unit)
    vals = [r[key] * scale for r in _good(rs) if r.get(key) is not None]
    if len(vals) > 1:
        txt += f" ({_fmt(min(vals))}–{_fmt(max(vals))})"
    return txt


def _trouble_short(text: str) -> str:
    m = re.search(r"(freeing already freed pointer|exited by a signal \d+|died \([^)]*\)|BUG: \w+)",
                  text or "")
    return m.group(1) if m else (text or "")[:60]


def _fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) < 10:
        return f"{v:,.2f}{unit}"
    if isinstance(v, float) and abs(v) < 100:
        return f"{v:,.1f}{unit}"
    return f"{v:,.0f}{unit}"


def _ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


def table(res: dict) -> str:
    f, k = res.get("fastsip", {}), res.get("kamailio", {})
    rows = ["| figure (median of the repeats; their range) | fastsip | Kamailio | fastsip / Kamailio |",
            "|---|---|---|---|"]

    def row(label, step, key, unit="", scale=1.0):
        a, b = f.get(step), k.get(step)
        ma, mb = a and _median(a, key), b and _median(b, key)
        rows.append(f"| {label} | {_cell(a, key, unit, scale)} | {_cell(b, key, unit, scale)} | "
                    f"{_ratio(ma, mb)} |")

    for tp in ("tls", "wss"):
        row(f"{tp.upper()} REGISTER/s, server on 1 core", tp, "rate")
        row(f"{tp.upper()}: server CPU % during it", tp, "server_cpu_pct")
        row(f"{tp.upper()}: server CPU µs per REGISTER", tp, "server_us")
        for r in f.get(tp, []) + k.get(tp, []):
            r["per_core"] = 1e6 / r["server_us"] if r.get("server_us") else None
        row(f"{tp.upper()}: REGISTER/s per core (1 / CPU per REGISTER)", tp, "per_core")
    row("TLS handshakes/s achieved" + (" (handshake only)" if res.get("_handshake_only")
                                       else " (+ 1 REGISTER, close)"), "hs", "rate")
    row("TLS handshakes: server CPU µs per connection", "hs", "server_us")
    for r in f.get("hs", []) + k.get("hs", []):
        r["per_core"] = 1e6 / r["server_us"] if r.get("server_us") else None
    row("TLS handshakes/s per core (1 / CPU per connection)", "hs", "per_core")
    held = {name: _median(res.get(name, {}).get("idle"), "held")
            for name in ("fastsip", "kamailio")}
    row("memory per idle TLS connection, PSS (held: "
        + ", ".join(f"{name} {n:,}" for name, n in held.items() if n) + ")", "idle",
        "pss_per_conn", " KiB", 1 / 1024)
    row("memory per idle TLS connection, RSS summed over the processes", "idle", "rss_per_conn",
        " KiB", 1 / 1024)
    if k.get("idle") and k["idle"][0].get("shm_per_conn") is not None:
        rows.append(f"| Kamailio's own count per connection: shm, pkg | – | "
                    f"{_cell(k['idle'], 'shm_per_conn', ' KiB', 1 / 1024)}, "
                    f"{_cell(k['idle'], 'pkg_per_conn', ' KiB', 1 / 1024)} | |")
    bad = [f"{name} {step} ({_trouble_short(r['trouble'])})"
           for name, srv in (("fastsip", f), ("Kamailio", k))
           for step, rs in srv.items() for r in rs if r.get("trouble")]
    if bad:
        rows.append("\nLeft out of the medians, the server having reported memory corruption or "
                    "lost a process during the step: " + "; ".join(bad) + ".")
    others = [r["others_pct"] for srv in (f, k) for step in ("tls", "wss", "hs")
              for r in srv.get(step, []) if r.get("others_pct") is not None]
    if others:
        rows.append(f"\nOther work on the machine during the rate steps: {min(others):.0f}–"
                    f"{max(others):.0f} % of a core.")
    return "\n".join(rows)


def floor_table(res: dict) -> str:
    rows = ["| transport | tool and C echo, REGISTER/s | tool CPU % | tool CPU µs per REGISTER | "
            "tool's ceiling on 1 core (1 / CPU per REGISTER) | echo CPU % |", "|---|---|---|---|---|---|"]
    for tp, rs in res.items():
        for r in rs:
            r["ceiling"] = 1e6 / r["tool_us"] if r.get("tool_us") else None
        rows.append(f"| {tp} | {_cell(rs, 'rate')} | {_cell(rs, 'tool_cpu_pct')} | "
                    f"{_cell(rs, 'tool_us')} | {_cell(rs, 'ceiling')} | {_cell(rs, 'server_cpu_pct')} |")
    return "\n".join(rows)


def _say(name, step, r) -> None:
    if r.get("trouble") or r.get("trouble_at_close"):
        print(f"{name:>9} {step}: SERVER TROUBLE: {r.get('trouble') or ''} "
              f"{r.get('trouble_at_close') or ''}", flush=True)
    if step == "idle":
        print(f"{name:>9} idle: {r['held']:,} held, PSS {r['pss_per_conn']} B, RSS "
              f"{r['rss_per_conn']} B per connection"
              + (f", shm {r['shm_per_conn']} B, pkg {r['pkg_per_conn']} B" if "shm_per_conn" in r
                 else "") + f"; failed {r['failed']}", flush=True)
    elif step == "hs":
        print(f"{name:>9}   hs: {r['rate']:>9,.0f} connections/s, server {r.get('server_cpu_pct')} % "
              f"{r.get('server_cpu_us')} us each, client {r['client_cpu_pct']} % "
              f"{r['client_cpu_us']} us each, failed {r['failed']}, other work "
              f"{r['others_pct']} %", flush=True)
    else:
        print(f"{name:>9} {step:>4}: {r['rate']:>9,.0f} REGISTER/s, server {r['server_cpu_pct']} % "
              f"{r['server_us']} us each, tool {r['tool_cpu_pct']} % {r['tool_us']} us each, "
              f"timeouts {r['timeouts']}, p99 {r['p99_ms']} ms, other work {r['others_pct']} %",
              flush=True)


STEPS = ("tls", "wss", "hs", "idle", "floor")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="fastsip,kamailio", help="comma-separated (default %(default)s)")
    p.add_argument("--server-cpus", default="0", help="taskset CPU list for the server")
    p.add_argument("--load-cpus", default="1", help="taskset CPU list for the clients")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per rate step")
    p.add_argument("--inflight", type=int, default=1024)
    p.add_argument("--sockets", type=int, default=16, help="connections of the REGISTER steps")
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--scenario", default="register")
    p.add_argument("--concurrency", type=int, default=32, help="handshakes under way at once")
    p.add_argument("--handshake-only", action="store_true",
                   help="handshake steps without the REGISTER")
    p.add_argument("--idle", type=int, default=50000, help="idle TLS connections to hold")
    p.add_argument("--idle-per-process", type=int, default=8000)
    p.add_argument("--steps", default="tls,wss,hs,idle",
                   help="of tls, wss, hs, idle, floor (the tool against its C echo over tcp, "
                        "tls, ws, wss); default %(default)s")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each step per server, taking turns (default %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each step, wait up to S seconds for other work on the machine "
                        "to drop below 15 %% of a core")
    p.add_argument("--out", default="bench-tls-out")
    args = p.parse_args(argv)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if any(s not in SERVERS for s in servers) or any(s not in STEPS for s in steps):
        p.error(f"--servers: fastsip, kamailio; --steps: {', '.join(STEPS)}")
    if "kamailio" in servers and not shutil.which("kamailio"):
        print("kamailio is not installed (Debian: kamailio kamailio-tls-modules "
              "kamailio-websocket-modules): skipped", file=sys.stderr)
        servers.remove("kamailio")
    if (not 1 <= args.idle <= 200000 or not 0 < args.duration <= 600
            or not 1 <= args.repeat <= 20):
        p.error("--idle within 1..200000, --duration within (0, 600], --repeat within 1..20")
    # every server process holds its connections' descriptors: the hard limit bounds --idle
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Kamailio's TCP main process holds every connection; fastsip's workers share them,
    # so for the idle step fastsip runs as many workers as the connections need
    n_idle = min(args.idle, hard - 1000)
    idle_workers = -(-args.idle * 11 // 10 // (hard - 1000))   # 10 % spare: the kernel's spread
    if n_idle < args.idle and "idle" in steps and "kamailio" in servers:
        print(f"bench_tls: Kamailio holds {n_idle:,} idle connections, not {args.idle:,}: a "
              f"process may have {hard:,} open files here (RLIMIT_NOFILE hard limit); fastsip "
              f"holds {args.idle:,} with {idle_workers} workers", file=sys.stderr)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    args.rundir = tempfile.mkdtemp(prefix="bench-tls-")
    load0 = os.getloadavg()
    res = {s: {} for s in servers}
    floor = {}

    def quiet():
        if args.quiet_wait:
            waited, busy = wait_quiet(args.quiet_wait, 15.0)
            if busy > 15.0:
                print(f"  (machine still busy after {waited:.0f} s: {busy:.0f} % of a core "
                      "used by other work)", flush=True)

    try:
        pki = make_test_pki(args.rundir)
        for step in steps:
            for _ in range(args.repeat):
                if step == "floor":
                    for tp in ("tcp", "tls", "ws", "wss"):
                        quiet()
                        srv = Echo(args, pki, tp)
                        try:
                            r = step_register(args, srv, pki, tp)
                            r["trouble"] = srv.trouble()
                        finally:
                            srv.stop()
                        _say(f"echo {tp}", tp, r)
                        floor.setdefault(tp, []).append(r)
                    continue
                for name in servers:
                    quiet()
                    idle = step == "idle" and name == "fastsip"
                    srv = (SERVERS[name](args, pki, workers=idle_workers) if idle
                           else SERVERS[name](args, pki))
                    try:
                        # a step during which the server crashed measured something else
                        if step in ("tls", "wss"):
                            r = step_register(args, srv, pki, step)
                            r["trouble"] = srv.trouble()
                        elif step == "hs":
                            r = step_handshakes(args, srv, pki)
                            r["trouble"] = srv.trouble()
                        else:
                            r = step_idle(args, srv, pki, args.idle if idle else n_idle)
                    finally:
                        srv.stop()
                    _say(name, step, r)
                    res[name].setdefault(step, []).append(r)
    except BenchError as exc:
        print(f"bench_tls: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(args.rundir, ignore_errors=True)
    load1 = os.getloadavg()
    res["_handshake_only"] = args.handshake_only
    text = table(res) if any(res[s] for s in servers) else ""
    if floor:
        text += "\n\nThe load tool against its own floor (the C stream echo):\n\n" + floor_table(floor)
    head = (f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`\n\n"
            f"Load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
            f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}\n\n")
    (outdir / "results.md").write_text(head + text + "\n")
    (outdir / "results.json").write_text(json.dumps({"servers": res, "floor": floor}, indent=2) + "\n")
    print("\n" + head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
