"""The command line: ``python -m load`` / ``fastsip-load``.

Exit status: 0 when the run completed, 1 when it completed with timeouts
or no 2xx at all, 2 for bad options, a refused target or a missing scapy.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .netutil import TargetError

__all__ = ["main", "make_parser"]

# scapy is an extra of the fastsip package (pip install -e '.[load]'), not a dependency
NO_SCAPY = ("fastsip-load: error: scapy is not installed; install the load tool's extra: "
            "pip install -e '.[load]' (in the fastsip tree) or pip install 'scapy>=2.5'")


def _missing_scapy() -> bool:
    try:
        import scapy.layers.inet  # noqa: F401  (what the packet builder imports first)
    except ImportError:
        return True
    return False


def make_parser() -> argparse.ArgumentParser:
    from .scenario import SCENARIOS  # imports scapy

    p = argparse.ArgumentParser(
        prog="fastsip-load",
        description="Drive a SIP registrar with REGISTERs from many simulated phones and "
                    "measure rate, latency, losses and CPU. Loopback targets only, unless "
                    "--allow-remote.",
        epilog="scenarios: " + "; ".join(f"{k}: {v.description}" for k, v in SCENARIOS.items()))
    a = p.add_argument
    g = p.add_argument_group("target")
    g.add_argument("--target", action="append", metavar="HOST:PORT",
                   help="registrar address (an IP; [::1]:PORT for IPv6); default 127.0.0.1:5060. "
                        "Repeat it to drive several (a cluster), as --spread says")
    g.add_argument("--spread", choices=("hash", "round-robin"), default="hash",
                   help="several targets: hash: all requests of a phone to one target, picked "
                        "by a hash of its AOR; round-robin: each request of a phone to the next "
                        "target (default %(default)s)")
    g.add_argument("--transport", choices=("udp", "tcp", "tls", "ws", "wss"), default="udp",
                   help="ws and wss: SIP over WebSocket (RFC 7118), the sip subprotocol, "
                        "one message per masked frame (default %(default)s)")
    g.add_argument("--tls-ca", metavar="PEM",
                   help="tls, wss: check the server's certificate against these CAs "
                        "(default: the system's)")
    g.add_argument("--tls-insecure", action="store_true",
                   help="tls, wss: do not check the server's certificate")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow a target outside 127.0.0.0/8 and ::1")
    g.add_argument("--raw", action="store_true",
                   help="send scapy's whole IP/UDP packets through a raw socket (root)")
    g = p.add_argument_group("scenario")
    g.add_argument("--scenario", choices=tuple(SCENARIOS), default="register")
    g.add_argument("--users", type=int, default=1000, help="simulated phones (default %(default)s)")
    g.add_argument("--domain", help="the registrar's domain (default: the target host)")
    g.add_argument("--user-pattern", default="u{i:06d}",
                   help="user name of phone i, a Python format (default %(default)s)")
    g.add_argument("--password-pattern", metavar="PATTERN",
                   help="password of phone i ({i}, {user}); answer 401/407 challenges "
                        "(default for --scenario auth: 'secret')")
    g.add_argument("--expires", type=int, default=3600, help="Expires of new bindings")
    g.add_argument("--contacts", type=int, default=3, help="Contacts per request (multi-contact)")
    g.add_argument("--mix", metavar="KIND=W,...",
                   help="weights of the mixed scenario "
                        "(default register=10,refresh=70,fetch=15,unregister=5)")
    g.add_argument("--malformed-ratio", type=float, default=0.0, metavar="F",
                   help="share of deliberately malformed requests (0..1)")
    g.add_argument("--no-prime", action="store_true",
                   help="skip registering the phones before refresh/unregister/fetch/mixed")
    g.add_argument("--replay", metavar="FILE", help="replay the SIP requests of a pcap file")
    g = p.add_argument_group("load (one of --rate/--inflight, one or both of --duration/--count)")
    m = g.add_mutually_exclusive_group(required=True)
    m.add_argument("--rate", type=float, help="open loop: new requests per second")
    m.add_argument("--inflight", type=int, help="closed loop: requests outstanding at once")
    g.add_argument("--duration", type=float, help="seconds of sending")
    g.add_argument("--count", type=int, help="new requests to send")
    g.add_argument("--timeout", type=float, default=2.0,
                   help="seconds until a request counts as timed out (default %(default)s)")
    g.add_argument("--retransmit", action="store_true",
                   help="retransmit over UDP like RFC 3261 timer E (off by default)")
    g.add_argument("--t1", type=float, default=0.5, help="timer T1 in seconds (default %(default)s)")
    g.add_argument("--t2", type=float, default=4.0, help="timer T2 in seconds (default %(default)s)")
    g.add_argument("--sockets", type=int,
                   help="UDP source ports (default 16) or connections (default min(users, 64))")
    g = p.add_argument_group("output")
    g.add_argument("--server-pid", type=int, nargs="+", default=[], metavar="PID",
                   help="measure the CPU of these processes and their children")
    g.add_argument("--json", metavar="FILE", help="write the result as JSON ('-' for stdout)")
    g.add_argument("--acked", metavar="FILE",
                   help="at the end, write every phone's last request answered 2xx (user, AOR, "
                        "contact, Call-ID, CSeq, expires, target, and how many of its later "
                        "requests got no 2xx), one JSON object a line: what the registrar "
                        "promised to keep")
    g.add_argument("--plot", metavar="FILE.png", help="plot rate and latency over time")
    g.add_argument("--pcap-out", metavar="FILE", help="write the scenario's requests to a pcap")
    g.add_argument("--dry-run", action="store_true", help="build (and --pcap-out) but send nothing")
    g.add_argument("--interval", type=float, default=1.0, help="seconds per progress/plot sample")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    a("--version", action="version", version=f"fastsip-load {__version__}")
    return p


def main(argv=None) -> int:
    if _missing_scapy():
        print(NO_SCAPY, file=sys.stderr)
        return 2
    args = make_parser().parse_args(argv)
    targets = args.target or ["127.0.0.1:5060"]
    from .report import plot, progress_printer, summary
    try:
        from .runner import LoadRun, Options, OptionsError
    except ImportError as exc:          # the compiled helper is not built
        print(f"fastsip-load: error: {exc}", file=sys.stderr)
        return 2

    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"fastsip-load: {msg}", file=sys.stderr))
    opts = Options(
        target=targets[0] if len(targets) == 1 else targets, spread=args.spread,
        transport=args.transport, scenario=args.scenario, users=args.users,
        rate=args.rate, inflight=args.inflight, duration=args.duration, count=args.count,
        domain=args.domain, user_pattern=args.user_pattern, password_pattern=args.password_pattern,
        expires=args.expires, contacts=args.contacts, mix=args.mix,
        malformed_ratio=args.malformed_ratio, timeout=args.timeout, retransmit=args.retransmit,
        t1=args.t1, t2=args.t2, sockets=args.sockets, pcap_out=args.pcap_out, replay=args.replay,
        raw=args.raw, tls_ca=args.tls_ca, tls_insecure=args.tls_insecure,
        allow_remote=args.allow_remote, server_pid=args.server_pid,
        interval=args.interval, no_prime=args.no_prime, dry_run=args.dry_run, acked=args.acked)
    try:
        run = LoadRun(opts, log=log)
        progress = None if args.quiet else progress_printer()
        res = run.execute(progress=progress)
        if progress:
            progress.done()
    except (OptionsError, TargetError, ValueError, OSError) as exc:
        print(f"fastsip-load: error: {exc}", file=sys.stderr)
        return 2
    if res.get("dry_run"):
        if args.json:
            _write_json(res, args.json)
        return 0
    if args.json:
        _write_json(res, args.json)
    if args.plot:
        plot(res, args.plot)
    if not args.quiet:
        print(summary(res), file=sys.stderr if args.json == "-" else sys.stdout)
    if not heard_from(res):
        print(f"fastsip-load: no replies: is a registrar listening on {', '.join(targets)} "
              f"({args.transport})?", file=sys.stderr)
    else:
        for t in res.get("per_target", ()):
            if t["sent"] and not (t["ok"] or t["non_2xx"]):
                print(f"fastsip-load: no replies from {t['target']} ({args.transport}): "
                      f"{t['sent']} requests sent to it", file=sys.stderr)
    return 0 if res["ok"] and not res["timeouts"] else 1


def heard_from(res: dict) -> bool:
    """Whether anything at all came back from the target during the run."""
    return bool(res["replies"] or res["malformed"]["replies"] or any(res["unmatched"].values())
                or res["late"] or (res["prime"] or {}).get("replies"))


def _write_json(res: dict, path: str) -> None:
    text = json.dumps(res, indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
