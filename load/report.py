"""Figures of a run: CPU meters, the result dict (the JSON), the live
progress line, the summary table and the plot."""

from __future__ import annotations

import glob
import math
import os
import sys
import time

__all__ = ["CpuMeter", "ProcCpu", "build_result", "progress_printer", "summary", "plot"]

#: At or above this share of one core the generator, not the target, may
#: have set the pace.
GENERATOR_BOUND_PCT = 95.0


class CpuMeter:
    """CPU time of this process over wall time, from creation to :meth:`stop`."""

    def __init__(self):
        self.cpu0 = time.process_time_ns()
        self.wall0 = time.monotonic_ns()
        self.cpu_ns = self.wall_ns = 0

    def stop(self):
        self.cpu_ns = time.process_time_ns() - self.cpu0
        self.wall_ns = time.monotonic_ns() - self.wall0

    @property
    def pct(self) -> float:
        return 100.0 * self.cpu_ns / self.wall_ns if self.wall_ns else 0.0


def _descendants(pids) -> list:
    """``pids`` and every process below them (by the parent pid in /proc)."""
    children = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(rest[1]), []).append(int(path.split("/")[2]))
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(children.get(p, ()))
    return out


def process_cpu_ns(pid: int) -> int | None:
    """CPU time used so far by process ``pid`` (all its threads), in ns.

    Sums ``/proc/PID/task/*/schedstat`` (nanoseconds); falls back to the
    clock ticks of ``/proc/PID/stat``.  ``None`` when the process is gone.
    """
    total = 0
    tasks = glob.glob(f"/proc/{pid}/task/*/schedstat")
    try:
        if tasks:
            for t in tasks:
                with open(t) as f:
                    total += int(f.read().split()[0])
            return total
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        rest = stat[stat.rfind(b")") + 2:].split()
        return (int(rest[11]) + int(rest[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ProcCpu:
    """CPU time of the server processes (and their children) over a run."""

    def __init__(self, pids):
        self.pids = _descendants([int(p) for p in pids])
        missing = [p for p in self.pids if process_cpu_ns(p) is None]
        if missing:
            raise ValueError(f"no such process: {', '.join(map(str, missing))}")
        self.start = {p: process_cpu_ns(p) for p in self.pids}
        self.wall0 = time.monotonic_ns()
        self.cpu_ns = self.wall_ns = 0

    def stop(self):
        self.wall_ns = time.monotonic_ns() - self.wall0
        for p, c0 in self.start.items():
            c1 = process_cpu_ns(p)
            if c1 is not None:
                self.cpu_ns += c1 - c0


def build_result(run, eng, cpu: CpuMeter, server, samples: list, prime) -> dict:
    """The machine-readable result of a run (schema in load/README.md)."""
    o = run.opts
    t_first = eng.first_send_ns
    # the achieved rate's window: first send to last reply (or last send)
    window = max(eng.last_send_ns, eng.last_final_ns) - t_first if t_first else 0
    send_window = eng.last_send_ns - t_first if t_first else 0
    # the run itself lasted until its last request was answered or timed out
    # (run.end_ns: the same CLOCK_MONOTONIC as the engine's stamps)
    end = max(eng.last_send_ns, eng.last_final_ns, getattr(run, "end_ns", 0))
    elapsed = (end - t_first) / 1e9 if t_first else 0.0
    lat = eng.latency()
    distinct = eng.sent_total - eng.retransmissions
    shortfall = 0
    if o.rate and o.duration:
        due = math.ceil(o.rate * o.duration)
        shortfall = max(0, min(due, o.count or due) - eng.sent_new)
    res = {
        "tool": "fastsip-load",
        "target": ",".join(run.target_names),
        "transport": "raw-udp" if o.raw else o.transport,
        "scenario": "replay" if o.replay else o.scenario,
        "mode": "closed" if o.inflight is not None else "open",
        "users": len(run.phones),
        "sockets": len(run.socks),
        "target_rate": o.rate,
        "inflight": o.inflight,
        "duration": o.duration,
        "count": o.count,
        "timeout_s": o.timeout,
        "retransmit": {"t1": o.t1, "t2": o.t2} if o.retransmit else None,
        # n sends spread evenly over a window make n - 1 gaps
        "offered_rate": (round((eng.sent_new - 1) / (send_window / 1e9), 1) if send_window > 0
                         else round(eng.sent_new / elapsed, 1) if elapsed > 0 else 0.0),
        "achieved_rate": round(eng.ok / (window / 1e9), 1) if window > 0 else 0.0,
        "elapsed_s": round(elapsed, 6),
        "send_window_s": round(send_window / 1e9, 6),
        "sent": distinct,
        "sent_new": eng.sent_new,
        "sent_total": eng.sent_total,
        "replies": {str(k): v for k, v in sorted(eng.status_counts().items())},
        "finals": eng.finals,
        "ok": eng.ok,
        "timeouts": eng.timeouts,
        "retransmissions": eng.retransmissions,
        "duplicates": eng.duplicates,
        "late": eng.late,
        "provisional": eng.provisional,
        "unmatched": {"stale": eng.stale, "wrong_call_id": eng.mismatched,
                      "not_a_response": eng.not_response, "unparsable": eng.unparsable},
        "send_errors": eng.send_errors,
        "connections_closed": eng.conn_closed,
        "latency_ms": {k: round(lat[k], 4) for k in ("p50", "p90", "p99", "p999", "max", "mean")},
        "latency_count": lat["count"],
        "max_lag_ms": round(eng.max_lag_ns / 1e6, 3),
        "stalls": {"all_phones_busy": eng.stalls_busy, "ring_full": eng.stalls_ring},
        "open_loop_shortfall": shortfall,
        "auth": {"challenged": eng.challenged, "unanswerable": getattr(run, "auth_errors", 0)},
        "malformed": {"ratio": o.malformed_ratio, "sent": eng.mal_sent,
                      "replies": {str(k): v for k, v in sorted(eng.status_counts(True).items())},
                      "unanswered": eng.mal_timeouts},
        "generator_cpu_pct": round(cpu.pct, 1),
        "generator_bound": cpu.pct >= GENERATOR_BOUND_PCT,
        "build_s": round(run.build_s, 3),
        "prime": prime,
        "intervals": [{**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}}
                      for s in samples],
    }
    if len(run.target_names) > 1:
        # per target (the requests' target): they add up to sent, ok, finals - ok, timeouts
        phones = ([run.phone_targets.count(k) for k in range(len(run.target_names))]
                  if o.spread == "hash" else [None] * len(run.target_names))
        res["targets"] = list(run.target_names)
        res["spread"] = o.spread
        res["per_target"] = [{"target": name, "phones": n, **counts} for name, n, counts
                             in zip(run.target_names, phones, eng.target_counts(), strict=True)]
    if server is not None:
        answered = eng.finals + eng.mal_finals
        res["server_pids"] = server.pids
        res["server_cpu_pct"] = round(100.0 * server.cpu_ns / server.wall_ns, 1) if server.wall_ns else 0.0
        res["server_cpu_us_per_request"] = (round(server.cpu_ns / 1e3 / answered, 3)
                                            if answered else None)
    return res


def progress_printer(stream=None, every: float = 1.0):
    """A progress callback: one line per interval (rewritten in place on a TTY)."""
    stream = stream or sys.stderr
    tty = stream.isatty()

    def show(run, elapsed, iv):
        eng = run.engine
        o = run.opts
        total = f"/{o.duration:g}s" if o.duration else ""
        left = f" {eng.sent_new}/{o.count}" if o.count else ""
        per = run.opts.interval
        line = (f"[{elapsed:6.1f}s{total}]{left} sent {iv['sent'] / per:9.0f}/s  "
                f"2xx {iv['ok'] / per:9.0f}/s  finals {eng.finals}  to {eng.timeouts}  "
                f"rtx {eng.retransmissions}  out {eng.outstanding}  "
                f"p50 {iv['p50']:.3f} p99 {iv['p99']:.3f} ms")
        if tty:
            stream.write("\r" + line[:150] + "\033[K")
        else:
            stream.write(line + "\n")
        stream.flush()

    def done():
        if tty:
            stream.write("\n")
            stream.flush()

    show.done = done
    return show


def summary(res: dict) -> str:
    """The human summary table of a result dict."""
    lat = res["latency_ms"]
    rows = [
        ("target", f"{res['target']} ({res['transport']}, scenario {res['scenario']}, "
                   f"{res['users']} phones, {res['sockets']} sockets)"),
        ("mode", f"{res['mode']} loop" + (f", rate {res['target_rate']:g}/s" if res["target_rate"]
                                          else f", {res['inflight']} in flight")),
        ("elapsed", f"{res['elapsed_s']:.3f} s"),
        ("offered rate", f"{res['offered_rate']:,.0f} requests/s ({res['sent_new']} new)"),
        ("achieved rate", f"{res['achieved_rate']:,.0f} 2xx/s ({res['ok']} 2xx)"),
        ("sent", f"{res['sent']} requests, {res['retransmissions']} retransmissions"),
        ("replies", ", ".join(f"{k}: {v}" for k, v in res["replies"].items()) or "none"),
        ("timeouts", f"{res['timeouts']} (timeout {res['timeout_s']:g} s); late {res['late']}, "
                     f"duplicates {res['duplicates']}"),
        ("latency ms", f"p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  "
                       f"p99.9 {lat['p999']:.3f}  max {lat['max']:.3f}" if res["latency_count"]
                       else "none (no reply matched)"),
        ("generator CPU", f"{res['generator_cpu_pct']:.1f} % of a core"
                          + ("  ** GENERATOR-BOUND: figures are a floor **"
                             if res["generator_bound"] else "")),
    ]
    if res.get("per_target"):
        rows.append(("spread", f"{res['spread']} over {len(res['per_target'])} targets"))
        rows += [(f"  {t['target']}", f"{t['sent']} sent, {t['ok']} 2xx, {t['non_2xx']} non-2xx"
                  + (f" ({t['5xx']} 5xx)" if t.get("5xx") else "") + f", {t['timeouts']} timeouts"
                  + (f" ({t['phones']} phones)" if t["phones"] is not None else ""))
                 for t in res["per_target"]]
    un = res["unmatched"]
    if any(un.values()) or res["send_errors"]:
        rows.append(("unmatched", ", ".join(f"{k} {v}" for k, v in un.items())
                     + f"; send errors {res['send_errors']}"))
    if res["mode"] == "open" and (res["max_lag_ms"] > 10 or res["open_loop_shortfall"]):
        why = (f"; {res['open_loop_shortfall']} requests never sent"
               + (" (all phones busy: raise --users)" if res["stalls"]["all_phones_busy"] else "")
               if res["open_loop_shortfall"] else "")
        rows.append(("pacing", f"fell behind the schedule by up to {res['max_lag_ms']:.1f} ms{why}"))
    if res["auth"]["challenged"]:
        rows.append(("auth", f"{res['auth']['challenged']} challenges answered"
                             f" ({res['auth']['unanswerable']} could not be)"))
    if res["malformed"]["sent"]:
        m = res["malformed"]
        rows.append(("malformed", f"{m['sent']} sent; replies "
                     + (", ".join(f"{k}: {v}" for k, v in m["replies"].items()) or "none")
                     + f"; unanswered {m['unanswered']}"))
    if "server_cpu_us_per_request" in res:
        per = res["server_cpu_us_per_request"]
        rows.append(("server CPU", f"{res['server_cpu_pct']:.1f} % of a core, "
                     + (f"{per:.2f} us per answered request" if per is not None else "no replies")
                     + f" (pids {', '.join(map(str, res['server_pids']))})"))
    if res.get("acked"):
        a = res["acked"]
        rows.append(("acked", f"{a['phones']} phones got a 2xx ({a['last']} to their last request)"
                              f", written to {a['path']}"))
    if res.get("prime"):
        p = res["prime"]
        rows.append(("priming", f"{p['sent']} sent, {p['ok']} 2xx, {p['timeouts']} timeouts"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(res: dict, path: str) -> None:
    """Draw rate and latency over time into the PNG ``path`` (matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iv = res["intervals"]
    ts = [s["t"] for s in iv]
    prev = 0.0
    widths = []
    for t in ts:
        widths.append(max(t - prev, 1e-9))
        prev = t
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(ts, [s["sent"] / w for s, w in zip(iv, widths, strict=True)], label="sent (new)/s")
    ax1.plot(ts, [s["ok"] / w for s, w in zip(iv, widths, strict=True)], label="2xx/s")
    ax1.plot(ts, [s["timeouts"] / w for s, w in zip(iv, widths, strict=True)], label="timeouts/s")
    ax1.set_ylabel("per second")
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    ax1.set_title(f"{res['target']} {res['transport']} {res['scenario']} ({res['mode']} loop): "
                  f"{res['achieved_rate']:,.0f} 2xx/s")
    for key in ("p50", "p99", "max"):
        ax2.plot(ts, [max(s[key], 1e-4) for s in iv], label=key)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency, ms")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
