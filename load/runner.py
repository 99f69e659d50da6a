"""One load run: set up sockets, phones and templates, drive the engine,
collect the figures.

:class:`LoadRun` is what the command line uses and what tests and the
end-to-end benchmark can call directly::

    run = LoadRun(Options(target="127.0.0.1:5060", count=1000, inflight=50))
    result = run.execute()          # a dict, see load/README.md for the schema

Several targets (a cluster measured as a whole): ``target`` a list of
``HOST:PORT``, and ``spread`` (``"hash"`` or ``"round-robin"``) says how
the requests go to them.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

from .netutil import (
    TargetError,
    check_target,
    family_of,
    format_target,
    open_raw_socket,
    open_stream_connections,
    open_udp_sockets,
    parse_target,
    phone_address,
    sockaddr,
    tls_client_context,
)
from .report import CpuMeter, ProcCpu, build_result
from .scenario import (
    MALFORMED,
    SCENARIOS,
    SPREADS,
    STREAMS,
    BuildConfig,
    Phone,
    answer_challenge,
    build_templates,
    mix_pattern,
    parse_mix,
    read_replay,
    reply_cseq,
    request_fields,
    scenario_requests,
    spread_targets,
    write_pcap,
)

try:
    from ._loadio_c import Engine
except ImportError as exc:  # pragma: no cover - only without the compiled helper
    raise ImportError(
        "load._loadio_c is not built: run `pip install -e '.[load]'` in the fastsip tree "
        "(it builds the compiled modules; needs a C compiler)") from exc

__all__ = ["Options", "LoadRun", "OptionsError", "MAX_TARGETS"]

#: The most targets of one run (the engine counts per target up to this many).
MAX_TARGETS = 64


class OptionsError(ValueError):
    """Options that do not make a run."""


@dataclass
class Options:
    """Everything a run needs; the command-line flags map onto these fields."""

    target: str | list = "127.0.0.1:5060"    # or several: a list of HOST:PORT
    spread: str = "hash"                      # several targets: "hash" or "round-robin"
    transport: str = "udp"
    scenario: str = "register"
    users: int = 1000
    rate: float | None = None
    inflight: int | None = None
    duration: float | None = None
    count: int | None = None
    domain: str | None = None
    user_pattern: str = "u{i:06d}"
    password_pattern: str | None = None
    expires: int = 3600
    contacts: int = 3
    mix: str | None = None
    malformed_ratio: float = 0.0
    timeout: float = 2.0
    retransmit: bool = False
    t1: float = 0.5
    t2: float = 4.0
    sockets: int | None = None
    pcap_out: str | None = None
    replay: str | None = None
    raw: bool = False
    tls_ca: str | None = None
    tls_insecure: bool = False
    allow_remote: bool = False
    server_pid: list = field(default_factory=list)
    interval: float = 1.0
    no_prime: bool = False
    dry_run: bool = False
    acked: str | None = None                  # write each phone's last acknowledged request here


class LoadRun:
    """Prepares and executes one run (see the module docstring)."""

    def __init__(self, opts: Options, log=None):
        self.opts = opts
        self.log = log or (lambda msg: None)
        self._validate()
        self.target_names = _target_list(opts.target)
        self.targets = [parse_target(t) for t in self.target_names]
        for host, _ in self.targets:
            check_target(host, opts.allow_remote)
        self.host, self.port = self.targets[0]
        self.family = family_of(self.host)
        seen = set()
        for host, port in self.targets:
            if family_of(host) != self.family:
                raise TargetError("the targets must all be IPv4 or all IPv6")
            if format_target(host, port) in seen:
                raise TargetError(f"target {format_target(host, port)} given twice")
            seen.add(format_target(host, port))
        self.socks = []
        self.rawsock = None
        self.engine = None

    # ---------------------------------------------------------- checks

    def _validate(self):
        o = self.opts
        ntargets = len(_target_list(o.target))
        if ntargets > MAX_TARGETS:
            raise OptionsError(f"at most {MAX_TARGETS} targets")
        if o.spread not in SPREADS:
            raise OptionsError(f"--spread must be one of {', '.join(SPREADS)}")
        if o.raw and ntargets > 1:
            raise OptionsError("--raw sends to one target (its packets carry the address)")
        if o.transport not in ("udp", *STREAMS):
            raise OptionsError(f"--transport must be one of udp, {', '.join(STREAMS)}")
        if (o.tls_ca or o.tls_insecure) and o.transport not in ("tls", "wss"):
            raise OptionsError("--tls-ca and --tls-insecure go with --transport tls or wss")
        if o.tls_ca and o.tls_insecure:
            raise OptionsError("give --tls-ca or --tls-insecure, not both")
        if o.scenario not in SCENARIOS:
            raise OptionsError(f"unknown scenario {o.scenario!r} (one of {', '.join(SCENARIOS)})")
        if (o.rate is None) == (o.inflight is None):
            raise OptionsError("give exactly one of --rate (open loop) or --inflight (closed loop)")
        if o.rate is not None and o.rate <= 0:
            raise OptionsError("--rate must be > 0")
        if o.duration is None and o.count is None:
            raise OptionsError("give --duration or --count (every run is bounded)")
        if o.duration is not None and not 0 < o.duration <= 3600:
            raise OptionsError("--duration must be within (0, 3600] seconds")
        if o.count is not None and o.count < 1:
            raise OptionsError("--count must be >= 1")
        if o.users < 1:
            raise OptionsError("--users must be >= 1")
        if o.inflight is not None and not 1 <= o.inflight <= o.users:
            raise OptionsError("--inflight must be within 1..--users (a phone has one request outstanding)")
        if not 0 <= o.malformed_ratio < 1:
            raise OptionsError("--malformed-ratio must be within [0, 1)")
        if o.timeout <= 0 or o.timeout > 64:
            raise OptionsError("--timeout must be within (0, 64] seconds")
        if o.retransmit and o.transport in STREAMS:
            raise OptionsError(f"no retransmissions over {o.transport.upper()} (a reliable transport)")
        if o.raw and o.transport != "udp":
            raise OptionsError("--raw sends UDP")
        if o.replay and o.transport != "udp":
            raise OptionsError("--replay replays UDP captures")
        if o.scenario == "auth" and not o.password_pattern:
            o.password_pattern = "secret"
        if not 0.01 <= o.interval <= 60:
            raise OptionsError("--interval must be within [0.01, 60] seconds")
        if o.contacts < 1 or o.contacts > 50:
            raise OptionsError("--contacts must be within 1..50")

    # ---------------------------------------------------------- set-up

    def prepare(self):
        """Open sockets, make the phones, build the templates, make the engine."""
        o = self.opts
        spec = SCENARIOS[o.scenario]
        self.kinds = list(spec.kinds)
        if spec.prime and "refresh" not in self.kinds:
            self.kinds.append("refresh")        # what the priming phase sends
        weights = parse_mix(o.mix) if (o.mix and o.scenario == "mixed") else spec.weights
        v4 = self.family == socket.AF_INET
        self.cfg = BuildConfig(self.host, self.port, o.domain or self.host, transport=o.transport,
                               expires=o.expires, contacts=o.contacts)
        replayed = read_replay(o.replay) if o.replay else None
        users = len(replayed) if replayed else o.users
        if replayed and o.inflight and o.inflight > users:
            raise OptionsError(f"--inflight {o.inflight} exceeds the {users} requests of the capture")

        # phones' addresses
        if replayed:
            addrs = [r.src if _is_loopback_v4(r.src) else phone_address(i)
                     for i, r in enumerate(replayed)]
        elif v4:
            addrs = [phone_address(i) for i in range(users)]
        else:
            addrs = [self.host] * users

        # sockets (source ports) or connections
        tls = None
        ntargets = len(self.targets)
        if o.transport in STREAMS:
            n = min(o.sockets or min(users, 64), users)
            self.log(f"opening {n} {o.transport.upper()} connections"
                     + (f" to each of {ntargets} targets" if ntargets > 1 else ""))
            ctx = (tls_client_context(o.tls_ca, o.tls_insecure)
                   if o.transport in ("tls", "wss") else None)
            sources = [addrs[i * users // n] if v4 else None for i in range(n)]
            tls = [] if o.transport in ("tls", "wss") else None
            try:
                for host, port in self.targets:
                    # connection k to every target from the same address and port: a
                    # phone's Via and Contact are right whichever target it talks to
                    socks, states = open_stream_connections(
                        host, port, n, sources, o.transport, ctx, shared=ntargets > 1,
                        fd_need=n * ntargets)
                    self.socks += socks
                    if tls is not None:
                        tls += states
                    sources = [s.getsockname()[:2] for s in self.socks[:n]]
            except BaseException:
                self.close()
                raise
            sock_of = [i * n // users for i in range(users)]
            addrs = [s.getsockname()[0] for s in (self.socks[k] for k in sock_of)]
            ports = [self.socks[k].getsockname()[1] for k in sock_of]
        elif replayed:
            wanted = sorted({r.sport for r in replayed})[:1024]
            try:
                self.socks = open_udp_sockets(self.family, len(wanted), ports=wanted)
            except OSError:
                self.log("cannot bind the capture's source ports; using ephemeral ones")
                self.socks = open_udp_sockets(self.family, len(wanted))
            index = {p: k for k, p in enumerate(wanted)}
            sock_of = [index.get(r.sport, i % len(wanted)) for i, r in enumerate(replayed)]
            ports = [self.socks[k].getsockname()[1] for k in sock_of]
        else:
            n = min(o.sockets or 16, users)
            self.socks = open_udp_sockets(self.family, n)
            sock_of = [i * n // users for i in range(users)]
            ports = [self.socks[k].getsockname()[1] for k in sock_of]

        self.phones = [
            Phone(i, o.user_pattern.format(i=i), "", addrs[i], ports[i], sock_of[i])
            for i in range(users)]
        # several targets: the one of each phone's first request (all of them, by hash)
        self.phone_targets = spread_targets(
            [f"sip:{p.user}@{self.cfg.domain}" for p in self.phones] if ntargets > 1 else (),
            [format_target(h, p) for h, p in self.targets], o.spread)
        if o.password_pattern:
            for p in self.phones:
                p.password = o.password_pattern.format(i=p.index, user=p.user)

        # templates
        t = time.perf_counter()
        if replayed:
            self.kinds = ["replay"]
            self.tpls = [r.template for r in replayed]
            if o.raw:
                raise OptionsError("--raw with --replay is not supported")
            flat = [(x.data, x.sites, x.callid) for x in self.tpls]
            weights = {"replay": 1}
        else:
            # over TCP and TLS a Content-Length beyond the body would stall the stream
            mal = [k for k, tcp_ok in MALFORMED.items()
                   if tcp_ok or o.transport not in ("tcp", "tls")]
            self.mal_kinds = mal if o.malformed_ratio > 0 else []
            all_kinds = tuple(self.kinds) + tuple(self.mal_kinds)
            self.log(f"building {users * len(all_kinds)} requests with scapy")
            flat, self.tpls = build_templates(self.phones, all_kinds, self.cfg, raw=o.raw)
            self.kinds = list(all_kinds)
        self.build_s = time.perf_counter() - t
        self.nkinds = len(self.kinds)
        self.pattern = mix_pattern(weights, tuple(self.kinds))
        self.mal_idx = [self.kinds.index(k) for k in getattr(self, "mal_kinds", [])]

        # engine
        rate_guess = o.rate or 400_000
        need = int(rate_guess * (o.timeout + 1)) + 1024
        ring_bits = min(26, max(12, need.bit_length()))
        if o.raw:
            self.rawsock = open_raw_socket()
        dests = [sockaddr(host, port) for host, port in self.targets]
        self.engine = Engine("raw" if o.raw else o.transport, dests, [s.fileno() for s in self.socks],
                             rawfd=self.rawsock.fileno() if self.rawsock else -1,
                             ring_bits=ring_bits, pktinfo=v4)
        srcs = [_ip_int(p.addr) if v4 else 0 for p in self.phones]
        self.engine.set_phones([p.sock for p in self.phones], srcs, self.phone_targets,
                               rotate=o.spread == "round-robin")
        self.engine.set_templates(flat, self.nkinds)
        if tls is not None:
            self.engine.set_tls(tls)
        if o.acked:
            self.engine.track_acks()

    def write_pcap(self, path: str) -> int:
        """Write the scenario (what the run sends, in order) to ``path``."""
        o = self.opts
        count = o.count if o.count is not None else len(self.phones) * len(self.pattern)
        count = min(count, 200_000)
        reqs = scenario_requests(count, len(self.phones), self.pattern, self.mal_idx,
                                 o.malformed_ratio)
        target_of = None
        if self.phone_targets is not None:
            users, first, ntargets = len(self.phones), self.phone_targets, len(self.targets)
            rotate = o.spread == "round-robin"

            def target_of(n, phone):        # request n is the phone's (n // users)-th
                return self.targets[(first[phone] + (n // users if rotate else 0)) % ntargets]
        return write_pcap(path, self.phones, self.tpls, self.nkinds, reqs, self.cfg,
                          o.rate or 10_000.0, raw=o.raw, target_of=target_of)

    def acked(self) -> list:
        """Every phone's last request answered 2xx (the priming phase's too), as the
        dicts ``--acked`` writes (load/README.md): the ones a registrar promised to
        keep.  Needs ``Options.acked`` (the engine tracks them from the start)."""
        out = []
        names = self.target_names
        for phone, seq, kind, cid_seq, authed, tgt, later in self.engine.acked():
            tpl = self.tpls[phone * self.nkinds + kind]
            req = request_fields(tpl.render(cid_seq), tpl.callid, 28 if self.opts.raw else 0)
            user = self.phones[phone].user or req["user"]
            out.append({"user": user, "aor": req["aor"],
                        "contact": req["contacts"][0] if req["contacts"] else None,
                        "contacts": req["contacts"], "call_id": req["call_id"], "cseq": seq,
                        "expires": req["expires"], "kind": self.kinds[kind], "auth": authed,
                        "target": names[tgt], "later": later})
        return out

    def write_acked(self, path: str) -> dict:
        """Write :meth:`acked` to ``path``, one JSON object a line, in phone order;
        returns the result's ``acked`` entry."""
        lines = self.acked()
        with open(path, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, separators=(",", ":")) + "\n")
        return {"path": path, "phones": len(lines),
                "last": sum(1 for line in lines if line["later"] == 0)}

    def close(self):
        for s in self.socks:
            s.close()
        if self.rawsock:
            self.rawsock.close()
        self.socks = []

    # ---------------------------------------------------------- run

    def _answer(self):
        """Answer the digest challenges the engine handed over."""
        eng = self.engine
        items, eng.challenges = eng.challenges, []
        for phone, kind, reply in items:
            ph = self.phones[phone]
            try:
                if not ph.password:
                    raise ValueError("no password (give --password-pattern)")
                base = self.tpls[phone * self.nkinds + kind]
                answer = answer_challenge(reply, base, ph, raw=self.opts.raw)
                eng.push_override(phone, answer, kind, reply_cseq(reply))
            except ValueError as exc:
                self.auth_errors += 1
                if self.auth_errors == 1:
                    self.log(f"cannot answer a challenge: {exc}")
                eng.release(phone)

    def _phase(self, progress=None, slice_s=0.05):
        """Run the configured phase until it is done; return the interval samples."""
        eng = self.engine
        samples = []
        next_sample = time.monotonic() + self.opts.interval
        t0 = time.monotonic()
        try:
            while True:
                state = eng.run(slice_s)
                if state == "challenges":
                    self._answer()
                now = time.monotonic()
                if now >= next_sample:
                    iv = eng.take_interval()
                    iv["t"] = round(now - t0, 3)
                    samples.append(iv)
                    next_sample += self.opts.interval
                    if progress:
                        progress(self, now - t0, iv)
                if state == "done":
                    break
        except KeyboardInterrupt:
            eng.stop_sending()
            self.log("interrupted: waiting for outstanding replies")
            while eng.run(slice_s) != "done":
                if eng.challenges:
                    eng.challenges = []
        iv = eng.take_interval()
        if iv["sent"] or iv["finals"] or iv["timeouts"]:
            iv["t"] = round(time.monotonic() - t0, 3)
            samples.append(iv)
        return samples

    def _prime(self):
        """Register every phone once (not measured), for refresh-type scenarios."""
        o = self.opts
        users = len(self.phones)
        self.engine.configure(pattern=[self.kinds.index("refresh")], closed_loop=True,
                              inflight=min(users, 64), max_new=users,
                              duration=max(10.0, users / 2000.0), timeout=o.timeout,
                              answer_challenges=bool(o.password_pattern))
        self._phase()
        eng = self.engine
        return {"sent": eng.sent_new, "ok": eng.ok, "replies": _str_keys(eng.status_counts()),
                "timeouts": eng.timeouts}

    def execute(self, progress=None) -> dict:
        """Prepare (if needed), run and return the result dict."""
        o = self.opts
        if self.engine is None:
            self.prepare()
        try:
            if o.pcap_out:
                n = self.write_pcap(o.pcap_out)
                self.log(f"wrote {n} requests to {o.pcap_out}")
            if o.dry_run:
                return {"dry_run": True, "phones": len(self.phones), "kinds": self.kinds,
                        "pcap_out": o.pcap_out}
            self.auth_errors = 0
            prime = None
            if SCENARIOS[o.scenario].prime and not o.no_prime and not o.replay:
                self.log(f"priming: registering {len(self.phones)} phones")
                prime = self._prime()
            eng = self.engine
            server = ProcCpu(o.server_pid) if o.server_pid else None
            cpu = CpuMeter()
            eng.configure(pattern=self.pattern, malformed_kinds=self.mal_idx,
                          malformed_ratio=o.malformed_ratio,
                          closed_loop=o.inflight is not None, rate=o.rate or 0.0,
                          inflight=o.inflight or 0, max_new=o.count, duration=o.duration or 0.0,
                          timeout=o.timeout, t1=o.t1 if o.retransmit else 0.0, t2=o.t2,
                          answer_challenges=bool(o.password_pattern))
            samples = self._phase(progress)
            self.end_ns = time.monotonic_ns()       # every request answered or timed out
            cpu.stop()
            if server:
                server.stop()
            res = build_result(self, eng, cpu, server, samples, prime)
            if o.acked:
                res["acked"] = self.write_acked(o.acked)
            return res
        finally:
            self.close()


def _target_list(target) -> list:
    """``--target`` as a list: one ``HOST:PORT`` or several."""
    names = [target] if isinstance(target, str) else list(target)
    if not names:
        raise OptionsError("give a --target")
    return names


def _str_keys(d: dict) -> dict:
    return {str(k): v for k, v in sorted(d.items())}


def _is_loopback_v4(addr: str) -> bool:
    return addr.startswith("127.") and ":" not in addr


def _ip_int(addr: str) -> int:
    a, b, c, d = (int(x) for x in addr.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d

