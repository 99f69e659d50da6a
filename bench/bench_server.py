"""Throughput and CPU cost of ``fastsip serve`` under SIPp (a script, not a test).

For each offered rate it starts a fresh server on 127.0.0.1, drives it with
SIPp with one UDP socket per call (``-t un``, so SO_REUSEPORT spreads the
calls over the workers) for ``--duration`` seconds, and reports:

- achieved rate: successful calls / SIPp's elapsed time;
- failures: failed calls / calls started (a rate is *sustained* at <= 1 %);
- server CPU per REGISTER: the CPU time (user + system, from
  /proc/PID/task/*/schedstat, nanoseconds: every thread) of the supervisor and all workers during
  the run, divided by the successful registrations;
- SIPp's own CPU time, for scale (it shares the cores).

    python3 bench/bench_server.py                       # 5k..30k/s, no auth, state file on
    python3 bench/bench_server.py --no-state --rates 10000,20000
    python3 bench/bench_server.py --auth                # REGISTER, 401, REGISTER with digest, 200
    python3 bench/bench_server.py --rates 10000 --echo --kamailio   # and the floor and Kamailio
    python3 bench/bench_server.py --auth --rates 10000 --echo --kamailio   # the same with digest
    python3 bench/bench_server.py --both-states --echo --kamailio   # fastsip with and without state

With ``--echo`` and ``--kamailio`` the same SIPp run is made, turn by turn, against
the I/O floor (``load.responder --fast --processes WORKERS``: a compiled echo that
answers 200 and stores nothing, one process per fastsip worker) and Kamailio
(``bench/kamailio/registrar.cfg``, ``-x tlsf``, ``--workers`` UDP processes), and
the summary gives each one's median and fastsip's CPU per REGISTER divided by it.
With ``--auth`` as well, every server gets the same digest run (REGISTER, 401,
REGISTER with credentials, 200; users user{i} with password pw{i}, realm 127.0.0.1,
MD5, qop=auth) and the figures are per registration (two requests): Kamailio runs
``bench/kamailio/registrar_auth.cfg`` (the auth module: ``pv_www_authenticate``, the
nonce-count check, the password made from the user name, no database), the floor
``load.responder --fast --auth`` (the same compiled echo answering 401 with a fixed
challenge to a request without Authorization and 200 to one with it: the two round
trips, no digest check). ``--both-states`` runs fastsip twice in each turn, on its
defaults (state file) and with ``--no-state`` (the row ``no-state``), and the
summary gives each one's ratio.

Needs sipp (Debian: apt-get install sip-tester) and the compiled modules
(``python setup.py build_ext --inplace``).  Only 127.0.0.1 is used.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_e2e import KAMAILIO, Server, group_cpu_ns  # noqa: E402
from fastsip.server.testing import ServerProcess  # noqa: E402
from load.report import _descendants, process_cpu_ns  # noqa: E402

SCENARIOS = os.path.join(ROOT, "tests", "sipp")

#: Other servers measured in the same run (``--echo``, ``--kamailio``; bench_e2e templates).
#: echo: the I/O floor, a compiled UDP echo that answers 200 and stores nothing, in as many
#: processes as fastsip has workers (on one port, SO_REUSEPORT), as issue #11 compares them.
PEERS = {"echo": "{python} -m load.responder --fast --processes {workers} --transport udp "
                 "--listen {host}:{port} --duration 100000",
         "kamailio": KAMAILIO}
#: The same with digest authentication (``--auth``): the realm is fastsip's (``--realm``).
REALM = "127.0.0.1"
PEERS_AUTH = {"echo": PEERS["echo"] + f" --auth --qop --realm {REALM}",
              "kamailio": KAMAILIO.replace("/registrar.cfg", "/registrar_auth.cfg")
              + f" -A 'REALM=\"{REALM}\"'"}


def cpu_ns(pid: int) -> int:
    """CPU time of one process, all its threads (a worker commits the state file on
    a thread of its own), ns: load.report.process_cpu_ns."""
    return process_cpu_ns(pid) or 0


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of one process, every thread (its
    wake-ups, mostly; /proc/PID/status alone counts the main thread's)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:         # the thread ended meanwhile
            pass
    return total


def server_pids(srv) -> list:
    return [srv.proc.pid] + [p for p in srv.worker_pids() if p]


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_sipp(args, target, rate, workdir, inject_file):
    """SIPp against ``target`` (host, port) at ``rate`` for ``--duration`` seconds:
    (its output, its rusage, its exit code, the wall time, the calls asked for)."""
    calls = int(rate * args.duration)
    scenario = "register_auth.xml" if args.auth else "register.xml"
    cmd = [args.sipp, "%s:%d" % target, "-sf", os.path.join(SCENARIOS, scenario),
           "-t", "un", "-r", str(rate), "-m", str(calls), "-i", "127.0.0.1", "-p", "0",
           "-nostdin", "-max_socket", str(args.max_socket), "-timeout",
           str(int(args.duration * 4 + 20)), "-recv_timeout", "2000"]
    if args.auth:
        cmd += ["-inf", inject_file]
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as so:
        proc = subprocess.Popen(cmd, stdout=so, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_raise_nofile, cwd=workdir)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if proc.poll() is None:
                proc.kill()
        so.seek(0)
        text = so.read()
    return text, usage, os.waitstatus_to_exitcode(status), time.monotonic() - t0, calls


def result(server, rate, text, usage, code, wall, calls, server_ns, switches=None, metrics=None,
           requests_per_call=1):
    """The figures of one run, from SIPp's output and the server's CPU time
    (``requests_per_call``: 2 with digest, for a server without counters)."""
    def cumulative(label):
        m = re.findall(rf"{label}\s*\|\s*\S+\s*\|\s*(\S+)", text)
        return m[-1] if m else None
    ok = int(cumulative("Successful call") or 0)
    failed = int(cumulative("Failed call") or 0)
    start = re.findall(r"Start Time\s*\|.*?(\d+\.\d+)\s*$", text, re.M)
    end = re.findall(r"Current Time\s*\|.*?(\d+\.\d+)\s*$", text, re.M)
    elapsed_s = float(end[-1]) - float(start[-1]) if start and end else wall
    retrans = sum(int(r) for r in re.findall(r"REGISTER -+>\s+\d+\s+(\d+)", text))
    started = max(calls, ok + failed)
    metrics = metrics or {}
    replies = (sum(v for k, v in metrics.items() if k.startswith("fastsip_replies_total"))
               or ok * requests_per_call)
    return {
        "server": server,
        "offered_rate": rate,
        "calls": calls,
        "successful": ok,
        "failed": failed,
        "failure_pct": round(100.0 * (started - ok) / started, 3),
        "achieved_rate": round(ok / elapsed_s, 1) if elapsed_s else 0,
        "server_cpu_s": round(server_ns / 1e9, 3),
        "server_cpu_us_per_register": round(server_ns / 1e3 / ok, 2) if ok else None,
        "server_replies": int(replies),
        "server_cpu_us_per_reply": round(server_ns / 1e3 / replies, 2) if replies else None,
        "handoffs": int(metrics.get("fastsip_handoffs_total", 0)),
        "switches_per_register": round(switches / ok, 2) if ok and switches is not None else None,
        "sipp_exit": code,
        "retransmissions": retrans,
        "sipp_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def run_rate(args, rate, workdir, users_file, inject_file, with_state, name="fastsip"):
    """One SIPp run against a fresh ``fastsip serve`` (``with_state``: a state file)."""
    flags = ["--log-level", "warning", "--max-expires", "3600"] + args.server_flags
    if args.auth:
        flags += ["--realm", REALM, "--users", users_file, "--auth-algorithms", "MD5"]
    # a new file each run, as each peer's {rundir}: a file left by the turn before would
    # make this run's REGISTERs rewrites of existing rows, and its start a load
    state = (os.path.join(tempfile.mkdtemp(prefix="state-", dir=workdir), "state.sqlite3")
             if with_state else None)
    srv = ServerProcess(*flags, workers=args.workers, state=state, cwd=workdir,
                        transports=("udp",))
    srv.start()
    try:
        pids = server_pids(srv)
        before = {p: cpu_ns(p) for p in pids}
        switches = {p: ctx_switches(p) for p in pids}
        text, usage, code, wall, calls = run_sipp(args, srv.udp, rate, workdir, inject_file)
        # the state writer and the supervisor's fold run behind: count their work too.
        # One flush interval (as for every peer), then the fold --fold-interval would
        # run a little later; no polling of /metrics meanwhile (it costs CPU too)
        if with_state:
            time.sleep(1.2)
            srv.api("/api/state/fold", "POST")
        server_ns = sum(cpu_ns(p) - before[p] for p in pids)
        switches = sum(ctx_switches(p) - switches[p] for p in pids)
        metrics = srv.metrics()
        if with_state and metrics.get("fastsip_state_pending_changes", 0):
            print(f"bench_server: {name} at {rate}/s: {metrics['fastsip_state_pending_changes']}"
                  " changes were still unwritten when its CPU was read", file=sys.stderr)
    finally:
        srv.stop()
    return result(name, rate, text, usage, code, wall, calls, server_ns, switches, metrics)


def run_peer(args, name, template, rate, workdir, inject_file):
    """The same SIPp run against another server, started from a bench_e2e ``template``
    (its CPU: the process and its children)."""
    srv = Server(template, SimpleNamespace(host="127.0.0.1", port=None, server_cpus=None),
                 args.workers)
    try:
        pids = _descendants([srv.pid])
        before = group_cpu_ns(srv.pid)
        switches = {p: ctx_switches(p) for p in pids}
        text, usage, code, wall, calls = run_sipp(args, (srv.host, srv.port), rate, workdir,
                                                  inject_file)
        time.sleep(1.2)     # as for fastsip: work left behind (a fastsip peer's last flush)
        server_ns = group_cpu_ns(srv.pid) - before
        switches = sum(ctx_switches(p) - switches[p] for p in pids)
    finally:
        srv.stop()
    return result(name, rate, text, usage, code, wall, calls, server_ns, switches,
                  requests_per_call=2 if args.auth else 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="5000,10000,15000,20000,25000,30000",
                    help="offered REGISTER rates per second, comma-separated")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per rate (default 5)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per rate; the summary gives the median (default 1)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--auth", action="store_true",
                    help="digest authentication (MD5, as SIPp); with --echo, --kamailio theirs too")
    ap.add_argument("--no-state", dest="state", action="store_false",
                    help="no state file (as Kamailio's in-memory usrloc)")
    ap.add_argument("--both-states", action="store_true",
                    help="fastsip twice per turn: with the state file and with --no-state")
    ap.add_argument("--max-socket", type=int, default=15000, help="sipp -max_socket")
    ap.add_argument("--sipp", default=shutil.which("sipp"), help="path to sipp")
    ap.add_argument("--echo", action="store_true",
                    help="also measure the I/O floor: load.responder --fast (a C echo)")
    ap.add_argument("--kamailio", action="store_true",
                    help="also measure Kamailio (bench/kamailio/registrar.cfg, -x tlsf; "
                         "with --auth registrar_auth.cfg)")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND",
                    help="another server in the same turns (repeatable), a start command with "
                         "{python} {host} {port} {workers} {rundir} {mport}, e.g. fastsip's "
                         "previous commit built in /tmp/prev: \"prev=env PYTHONPATH=/tmp/prev "
                         "{python} -m fastsip.server --listen udp:{host}:{port} --workers "
                         "{workers} --state {rundir}/s.sqlite3 --log-level warning\"")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("server_flags", nargs="*", metavar="-- FLAG",
                    help="more flags for fastsip serve, after --, e.g. -- --batch-wait 200")
    args = ap.parse_args(argv)
    if not args.sipp:
        print("bench_server: sipp not found (apt-get install sip-tester)", file=sys.stderr)
        return 2
    rates = [int(r) for r in args.rates.split(",")]
    known = PEERS_AUTH if args.auth else PEERS
    peers = {p: known[p] for p in PEERS if getattr(args, p)}
    for spec in args.peer:
        name, sep, template = spec.partition("=")
        if not (sep and name and template) or name in peers or name in ("fastsip", "no-state"):
            print(f"bench_server: --peer {spec!r}: NAME=COMMAND, a new name", file=sys.stderr)
            return 2
        peers[name] = template
    if args.both_states and not args.state:
        print("bench_server: --both-states runs fastsip with and without the state file: "
              "not with --no-state", file=sys.stderr)
        return 2
    mine = ["fastsip", "no-state"] if args.both_states else ["fastsip"]
    if args.kamailio and not shutil.which("kamailio"):
        print("bench_server: kamailio not found (apt-get install kamailio)", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="fastsip-bench-") as workdir:
        users_file = os.path.join(workdir, "users.htdigest")
        inject_file = os.path.join(workdir, "users.csv")
        if args.auth:
            n = max(rates) * int(args.duration) + 10
            with open(users_file, "w") as uf, open(inject_file, "w") as cf:
                cf.write("SEQUENTIAL\n")
                for i in range(n):
                    ha1 = hashlib.md5(f"user{i}:{REALM}:pw{i}".encode()).hexdigest()
                    uf.write(f"user{i}:{REALM}:{ha1}\n")
                    cf.write(f"user{i};[authentication username=user{i} password=pw{i}]\n")
        states = ("state file and no state" if args.both_states
                  else "state file" if args.state else "no state")
        print(f"# fastsip serve, {args.workers} workers, {'digest auth, ' if args.auth else ''}"
              f"{states}; SIPp -t un, {args.duration:g} s per rate; "
              f"{os.cpu_count()} CPUs")
        print(f"{'server':>9} {'offered/s':>10} {'achieved/s':>11} {'fail %':>7} "
              f"{'µs CPU/reg' if args.auth else 'µs CPU/REG':>11} {'µs/reply':>9} "
              f"{'hand-offs':>10} {'ctxsw/REG':>10} "
              f"{'retrans':>8} {'SIPp CPU s':>11}")
        for rate in rates:
            for _ in range(args.repeat):
                for server in mine + list(peers):       # the servers take turns
                    r = (run_rate(args, rate, workdir, users_file, inject_file,
                                  args.state and server == "fastsip", server)
                         if server in mine else run_peer(args, server, peers[server], rate,
                                                         workdir, inject_file))
                    results.append(r)
                    print(f"{r['server']:>9} {r['offered_rate']:>10} {r['achieved_rate']:>11} "
                          f"{r['failure_pct']:>7} {r['server_cpu_us_per_register']!s:>11} "
                          f"{r['server_cpu_us_per_reply']!s:>9} {r['handoffs']:>10} "
                          f"{r['switches_per_register']!s:>10} {r['retransmissions']:>8} "
                          f"{r['sipp_cpu_s']:>11}", flush=True)
    others = len(mine) > 1 or peers
    if args.repeat > 1 or others:
        print("# medians per server and offered rate: achieved/s, failure %, µs CPU per "
              + ("registration (2 requests)" if args.auth else "REGISTER")
              + ("".join(f", {m}'s µs / this server's" for m in mine) if others else ""))
        def median_us(server, rate):
            return statistics.median(r["server_cpu_us_per_register"] or 0 for r in results
                                     if r["offered_rate"] == rate and r["server"] == server)
        for rate in rates:
            refs = [median_us(m, rate) for m in mine]
            for server in mine + list(peers):
                rs = [r for r in results if r["offered_rate"] == rate and r["server"] == server]
                us = median_us(server, rate)
                ratios = "".join(f" {ref / us:>6.2f}×" for ref in refs) if others and us else ""
                print(f"# {server:>9} {rate:>8} "
                      f"{statistics.median(r['achieved_rate'] for r in rs):>11} "
                      f"{statistics.median(r['failure_pct'] for r in rs):>7} {us:>11}{ratios}")
    sustained = [r["achieved_rate"] for r in results
                 if r["failure_pct"] <= 1.0 and r["server"] in mine]
    print(f"# highest achieved rate with <= 1 % failures: {max(sustained) if sustained else 0}/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
