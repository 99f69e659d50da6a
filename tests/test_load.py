"""Tests of the load tool (load/): packet building, matching, latency
accounting, rate control, pcap round trip, auth, TCP, the command line.

Real sockets on 127.0.0.1 only; every run is bounded by a count or a
duration of at most a second or two.  The reference responder
(``python -m load.responder``) runs as a subprocess.
"""

import ast
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from load import sip
from load._echo_c import _build_ok
from load._scan_c import _frame_length, _scan_reply
from load._stats_c import _hist_roundtrip
from load.netutil import TargetError, phone_address
from load.runner import LoadRun, Options, OptionsError
from load.scenario import (
    BuildConfig,
    Phone,
    answer_challenge,
    build_sip,
    build_templates,
    mix_pattern,
    read_replay,
    spread_targets,
)

LOAD_ROOT = str(Path(sip.__file__).resolve().parent.parent)


# ------------------------------------------------------------------ fixtures

class Responder:
    """``python -m load.responder`` in a subprocess; ``stop()`` returns its counters."""

    def __init__(self, *args):
        env = dict(os.environ, PYTHONPATH=LOAD_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "load.responder", "--listen", "127.0.0.1:0", "--duration", "60",
             *args], stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.match(r"listening (\S+):(\d+)", line)
        if not m:                       # reap it: a dead child left behind fails a later test
            self.proc.kill()
            self.proc.communicate(timeout=10)
            self.proc.stdout.close()
        assert m, f"responder did not start: {line!r}"
        self.target = f"127.0.0.1:{m.group(2)}"
        self.pid = self.proc.pid

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        self.proc.stdout.close()
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def responder():
    made = []

    def start(*args):
        r = Responder(*args)
        made.append(r)
        return r

    yield start
    for r in made:
        if r.proc.poll() is None:
            r.stop()


def run(**kw):
    kw.setdefault("timeout", 1.0)
    kw.setdefault("users", 50)
    return LoadRun(Options(**kw)).execute()


# ------------------------------------------------------------ packet building

CFG = BuildConfig("127.0.0.1", 5060, "example.com", run_id="abcd0123")
PHONE = Phone(7, "u000007", "secret", "127.1.0.8", 40000, 0)


@pytest.mark.parametrize("kind", ["register", "refresh", "unregister", "fetch", "multi",
                                  "bad-expires", "bad-contact", "no-to", "cseq-method"])
def test_scapy_dissects_what_was_built(kind):
    from scapy.layers.inet import IP, UDP

    from load.scenario import ip_udp
    pkt = ip_udp(PHONE, CFG, build_sip(PHONE, kind, CFG))
    back = IP(bytes(pkt))
    assert back[UDP].sport == 40000 and back[UDP].dport == 5060
    s = back[sip.SIP]
    assert s.method == b"REGISTER"
    assert s.header("via").startswith(b"SIP/2.0/UDP 127.1.0.8:40000;rport;branch=z9hG4bK-")
    assert s.header("i").startswith(b"abcd0123-7")
    assert s.header("CSeq").startswith(sip.SEQ_MARKER)
    contacts = s.header_all("m")
    assert len(contacts) == {"fetch": 0, "multi": 3}.get(kind, 1)
    if kind == "unregister":
        assert s.header("expires") == b"0"
    if kind == "no-to":
        assert s.header("to") is None
    else:
        assert s.header("t") == b"<sip:u000007@example.com>"


def test_every_request_unique():
    t = sip.templatize(bytes(build_sip(PHONE, "register", CFG)))
    assert len(t.sites) == 4                       # Call-ID, From tag, branch, CSeq
    seen = set()
    for seq in range(sip.SEQ_BASE, sip.SEQ_BASE + 200):
        s = sip.SIP(t.render(seq))
        key = (s.header("call-id"), s.header("from"), s.header("via"), s.header("cseq"))
        assert b"#" not in b"".join(key)
        assert int(s.header("cseq").split()[0]) == seq
        seen.add(key)
        for part in key:
            seen.add(part)
    assert len(seen) == 200 * 5
    # refresh: one Call-ID per phone, a new CSeq and branch per request
    phones = [Phone(i, f"u{i}", "", phone_address(i), 40000 + i % 3, 0) for i in range(20)]
    _, tpls = build_templates(phones, ("refresh",), CFG)
    callids = {t.data[t.callid[0]:t.callid[0] + t.callid[1]] for t in tpls}
    assert len(callids) == 20
    sent = {tp.render(sip.SEQ_BASE + n * 20 + i) for n in range(5) for i, tp in enumerate(tpls)}
    assert len(sent) == 100


def test_phone_addresses_unique_loopback():
    addrs = [phone_address(i) for i in range(70000)]
    assert len(set(addrs)) == 70000
    assert all(a.startswith("127.") and not a.endswith((".0", ".255")) for a in addrs)


def test_mix_pattern_weights():
    kinds = ("register", "refresh", "fetch", "unregister")
    p = mix_pattern({"register": 10, "refresh": 70, "fetch": 15, "unregister": 5}, kinds)
    assert len(p) == 20
    assert [p.count(i) for i in range(4)] == [2, 14, 3, 1]


# ------------------------------------------------------------------ digest

def test_digest_md5_real_pjsua_exchange():
    # pjsua2 2.15.1 answering Kamailio 5.6.3 (shared/real-registers, password "secret")
    chal = sip.parse_challenge(b'Digest realm="127.0.0.1", nonce="awesXmsHqzLzBjCc5meQAoFQNjrQaPRv"')
    value = sip.digest_authorization(chal, "REGISTER", "sip:127.0.0.1:5271",
                                     "pjsua179566469028226", "secret")
    assert 'response="88bf6fa7c4c9746f5fe194f5ed70500a"' in value


@pytest.mark.parametrize("algorithm,expect", [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_digest_rfc7616_vectors(algorithm, expect):
    chal = {"realm": "http-auth@example.org", "qop": "auth, auth-int", "algorithm": algorithm,
            "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"}
    value = sip.digest_authorization(chal, "GET", "/dir/index.html", "Mufasa", "Circle of Life",
                                     cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")
    assert f'response="{expect}"' in value and "nc=00000001" in value


def test_answer_challenge_keeps_dialog_and_renumbers():
    t = sip.templatize(bytes(build_sip(PHONE, "register", CFG)))
    sent = sip.SIP(t.render(sip.SEQ_BASE + 5))
    reply = (b"SIP/2.0 401 Unauthorized\r\nVia: " + sent.header("via") + b"\r\nCall-ID: "
             + sent.header("call-id") + b"\r\nCSeq: 1000000005 REGISTER\r\n"
             b'WWW-Authenticate: Digest realm="r", nonce="n1", qop="auth"\r\n\r\n')
    data, sites, cid = answer_challenge(reply, t, PHONE)
    ans = sip.SIP(sip.Template(data, sites, cid).render(sip.SEQ_BASE + 9))
    assert ans.header("call-id") == sent.header("call-id")
    assert ans.header("from") == sent.header("from")
    assert ans.header("cseq") == b"1000000009 REGISTER"
    assert ans.header("via") != sent.header("via")
    assert b'username="u000007"' in ans.header("authorization")


# ------------------------------------------------------ C parsing and histogram

def test_scan_reply_forms():
    r = b"SIP/2.0 200 OK\r\nv: SIP/2.0/UDP x\r\ni:  abc@h \r\nCSEQ:1000000123 REGISTER\r\n\r\n"
    assert _scan_reply(r) == (200, 1000000123, b"abc@h")
    assert _scan_reply(b"REGISTER sip:x SIP/2.0\r\nCall-ID: a\r\nCSeq: 1 REGISTER\r\n\r\n") == -1
    assert _scan_reply(b"SIP/2.0 200 OK\r\nCSeq: 1 REGISTER\r\n\r\n") == -2
    assert _scan_reply(b"SIP/2.0 2x0 OK\r\n\r\n") == -1


def test_frame_length():
    msg = b"SIP/2.0 200 OK\r\nl: 3\r\n\r\nabc"
    assert _frame_length(msg + b"SIP/2.0") == len(msg)
    assert _frame_length(msg[:-1]) == 0
    assert _frame_length(b"\r\n\r\nSIP") == 4


def test_build_ok_echo():
    req = (b"REGISTER sip:x SIP/2.0\r\nVia: SIP/2.0/UDP a:1;branch=z9hG4bK1\r\nf: <sip:a@x>;tag=1\r\n"
           b"To: <sip:a@x>\r\nCall-ID: c1\r\nCSeq: 1000000001 REGISTER\r\nContact: <sip:a@b>\r\n\r\n")
    out = _build_ok(req)
    assert _scan_reply(out) == (200, 1000000001, b"c1")
    assert b"To: <sip:a@x>;tag=fl\r\n" in out and b"Contact" not in out
    assert _build_ok(b"SIP/2.0 200 OK\r\n\r\n") == b""


def test_fast_auth_echo_challenges_requests_without_credentials(responder):
    """``--fast --auth``, the digest floor of bench_server.py: 401 with the challenge to a
    REGISTER without Authorization, 200 to one with it (whatever it holds)."""
    r = responder("--transport", "udp", "--fast", "--auth", "--qop", "--realm", "floor.test")
    host, port = r.target.split(":")
    req = (b"REGISTER sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bK1\r\n"
           b"From: <sip:a@x>;tag=1\r\nTo: <sip:a@x>\r\nCall-ID: c1\r\nCSeq: 7 REGISTER\r\n"
           b"Content-Length: 0\r\n\r\n")
    signed = req.replace(b"CSeq: 7", b'Authorization: Digest username="a", response="0"\r\nCSeq: 8')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(req, (host, int(port)))
        challenge, _ = s.recvfrom(65535)
        s.sendto(signed, (host, int(port)))
        ok, _ = s.recvfrom(65535)
    assert _scan_reply(challenge) == (401, 7, b"c1")
    assert re.search(rb'\r\nWWW-Authenticate: Digest realm="floor.test", nonce="[\w-]{43}", '
                     rb'algorithm=MD5, qop="auth"\r\n', challenge)
    assert _scan_reply(ok) == (200, 8, b"c1") and b"WWW-Authenticate" not in ok


def test_latency_histogram_percentiles():
    values = [i * 1000 for i in range(1, 10001)]          # 1 us .. 10 ms
    h = _hist_roundtrip(values)
    assert h["count"] == 10000
    assert h["max"] == pytest.approx(10.0)
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p999")):
        assert h[key] == pytest.approx(q * 10.0, rel=0.02)
    assert h["mean"] == pytest.approx(5.0005, rel=1e-6)
    assert _hist_roundtrip([])["p99"] == 0


LOAD_DIR = Path(sip.__file__).resolve().parent
COMPILED = sorted(f"load.{p.stem}" for p in LOAD_DIR.glob("_*_c.pyx"))


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_module_and_its_stub(name):
    """Every load/_*_c.pyx is built and imported as an extension, and its
    .pyi names what it defines (``mypy.stubtest`` checks the signatures)."""
    mod = importlib.import_module(name)
    assert mod.__file__.endswith((".so", ".pyd")), f"{name} is not the compiled extension"
    tree = ast.parse((LOAD_DIR / (name.split(".")[-1] + ".pyi")).read_text())
    stub_names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    runtime = {n for n in dir(mod) if not n.startswith("__") and callable(getattr(mod, n))}
    assert stub_names == runtime


# ------------------------------------------------------------ against a responder

def test_closed_loop_matches_everything(responder):
    r = responder()
    res = run(target=r.target, inflight=20, count=500)
    stats = r.stop()
    assert res["sent"] == 500 and res["ok"] == 500 and res["replies"] == {"200": 500}
    assert res["timeouts"] == res["duplicates"] == 0
    assert res["latency_count"] == 500
    assert not any(res["unmatched"].values())
    assert stats["received"] == 500 and stats["replies"] == {"200": 500}
    assert 0 < res["latency_ms"]["p50"] <= res["latency_ms"]["p99"] <= res["latency_ms"]["max"]


def test_lost_and_duplicated_replies(responder):
    r = responder("--drop", "0.2", "--dup", "0.25", "--seed", "7")
    res = run(target=r.target, inflight=25, count=600, timeout=0.3)
    stats = r.stop()
    assert stats["dropped"] > 50 and stats["duplicated"] > 50
    assert res["timeouts"] == stats["dropped"]
    assert res["duplicates"] == stats["duplicated"]
    assert res["ok"] == 600 - stats["dropped"]
    assert res["latency_count"] == res["ok"]


def test_retransmissions_recover_losses(responder):
    r = responder("--drop", "0.3", "--seed", "3")
    res = run(target=r.target, inflight=20, count=300, timeout=1.0, retransmit=True, t1=0.04, t2=0.2)
    stats = r.stop()
    assert res["retransmissions"] > 50
    assert stats["received"] == 300 + res["retransmissions"]
    assert res["ok"] + res["timeouts"] == 300
    assert res["timeouts"] <= 3
    assert res["sent_total"] == 300 + res["retransmissions"]


def test_rate_control_at_low_rate(responder):
    r = responder()
    res = run(target=r.target, rate=200, duration=1.0, interval=0.25)
    r.stop()
    assert res["sent"] == 200                 # request k goes at k / rate
    assert res["send_window_s"] == pytest.approx(199 / 200, abs=0.01)
    assert res["offered_rate"] == pytest.approx(200, rel=0.02)
    assert res["open_loop_shortfall"] == 0
    assert res["ok"] == 200
    per_interval = [s["sent"] for s in res["intervals"]][:4]
    assert all(abs(n - 50) <= 3 for n in per_interval), per_interval


@pytest.mark.parametrize("algorithm,qop", [("MD5", False), ("SHA-256", True)])
def test_auth_scenario(responder, algorithm, qop):
    r = responder("--auth", "--algorithm", algorithm, *(["--qop"] if qop else []),
                  "--password-pattern", "pw{i}")
    res = run(target=r.target, scenario="auth", inflight=10, count=100, password_pattern="pw{i}")
    stats = r.stop()
    assert res["auth"] == {"challenged": 100, "unanswerable": 0}
    assert res["replies"] == {"200": 100, "401": 100}
    assert res["ok"] == 100 and res["sent"] == 200
    assert stats["auth_ok"] == 100 and stats["auth_failed"] == 0


def test_wrong_password_is_reported(responder):
    r = responder("--auth")
    res = run(target=r.target, scenario="auth", inflight=5, count=20, password_pattern="nope")
    stats = r.stop()
    assert res["ok"] == 0 and res["replies"] == {"401": 40}
    assert stats["auth_failed"] == 20


def test_tcp_transport(responder):
    r = responder("--transport", "tcp")
    res = run(target=r.target, transport="tcp", inflight=30, count=400, sockets=8)
    r.stop()
    assert res["ok"] == 400 and res["timeouts"] == 0 and res["sockets"] == 8
    assert res["connections_closed"] == 0


@pytest.mark.parametrize("scenario", ["refresh", "unregister", "fetch", "mixed", "multi-contact"])
def test_scenarios(responder, scenario):
    r = responder()
    res = run(target=r.target, scenario=scenario, inflight=10, count=120, users=30)
    stats = r.stop()
    assert res["ok"] == 120
    primed = scenario in ("refresh", "unregister", "fetch", "mixed")
    assert (res["prime"] or {}).get("ok", 0) == (30 if primed else 0)
    assert stats["received"] == 120 + (30 if primed else 0)


def test_malformed_share(responder):
    r = responder()
    res = run(target=r.target, inflight=10, count=1000, malformed_ratio=0.1)
    r.stop()
    m = res["malformed"]
    assert 70 <= m["sent"] <= 130
    assert m["replies"] == {"400": m["sent"]} and m["unanswered"] == 0
    assert res["replies"] == {"200": 1000 - m["sent"]}


def test_server_cpu_per_request(responder):
    r = responder()
    res = run(target=r.target, inflight=10, count=300, server_pid=[r.pid])
    r.stop()
    assert res["server_pids"] == [r.pid]
    assert 0 < res["server_cpu_us_per_request"] < 100_000


def test_wrong_call_id_and_stale_replies_counted():
    """A broken registrar: echoes the CSeq but mangles the Call-ID, then a reply
    for a request never sent."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(0.5)
    port = srv.getsockname()[1]

    def serve():
        for _ in range(10):
            try:
                data, addr = srv.recvfrom(4096)
            except OSError:
                return
            ok = _build_ok(data)
            srv.sendto(ok.replace(b"Call-ID: ", b"Call-ID: x"), addr)
            srv.sendto(re.sub(rb"CSeq: \d+", b"CSeq: 1999999999", ok), addr)

    th = threading.Thread(target=serve)
    th.start()
    try:
        res = run(target=f"127.0.0.1:{port}", inflight=1, count=3, timeout=0.2, users=3)
    finally:
        th.join()
        srv.close()
    assert res["timeouts"] == 3
    assert res["unmatched"]["wrong_call_id"] == 3 and res["unmatched"]["stale"] == 3


# ------------------------------------------------------------------ pcap

def test_pcap_round_trip_and_replay(tmp_path, responder):
    from scapy.utils import rdpcap
    path = str(tmp_path / "scenario.pcap")
    res = run(target="127.0.0.1:5060", users=25, count=50, inflight=5, pcap_out=path, dry_run=True)
    assert res["dry_run"]
    pkts = rdpcap(path)
    assert len(pkts) == 50
    cseqs = {p[sip.SIP].header("cseq") for p in pkts}
    assert len(cseqs) == 50 and all(p[sip.SIP].method == b"REGISTER" for p in pkts)
    reqs = read_replay(path)
    assert len(reqs) == 50 and all(q.src.startswith("127.") for q in reqs)
    r = responder()
    res = run(target=r.target, replay=path, inflight=5, count=100)
    r.stop()
    assert res["scenario"] == "replay" and res["users"] == 50 and res["ok"] == 100


def test_replay_real_register_capture(tmp_path, responder):
    """A REGISTER in the style of Net::SIP (odd header case, no rport) replays."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import wrpcap
    msg = (b"REGISTER sip:127.0.0.1:5270 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:41234;"
           b"branch=z9hG4bK3c2a\r\nCall-id: 6d3f@127.0.0.1\r\nContact: sip:n@127.0.0.1:41234\r\n"
           b"Expires: 120\r\nFrom: sip:n@127.0.0.1;tag=9e1\r\nMax-forwards: 70\r\n"
           b"To: sip:n@127.0.0.1\r\nCseq: 1 REGISTER\r\nContent-length: 0\r\n\r\n")
    path = str(tmp_path / "netsip.pcap")
    wrpcap(path, [IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=41234, dport=5270) / msg])
    (req,) = read_replay(path)
    assert req.template.render(sip.SEQ_BASE).count(b"1000000000") == 2   # CSeq and branch
    r = responder()
    res = run(target=r.target, replay=path, inflight=1, count=5)
    r.stop()
    assert res["ok"] == 5


# ------------------------------------------------------------------ options

def test_refuses_non_loopback_target():
    with pytest.raises(TargetError):
        LoadRun(Options(target="192.0.2.1:5060", count=1, inflight=1))
    LoadRun(Options(target="192.0.2.1:5060", count=1, inflight=1, allow_remote=True))  # no send


@pytest.mark.parametrize("kw", [
    {"count": 1},                                        # neither rate nor inflight
    {"count": 1, "rate": 10, "inflight": 1},             # both
    {"inflight": 1},                                     # unbounded
    {"count": 1, "inflight": 100, "users": 10},          # more in flight than phones
    {"count": 1, "inflight": 1, "transport": "tcp", "retransmit": True},
    {"count": 1, "inflight": 1, "transport": "wss", "retransmit": True},
    {"count": 1, "inflight": 1, "transport": "udp", "tls_insecure": True},   # no TLS there
    {"count": 1, "inflight": 1, "transport": "ws", "tls_ca": "ca.pem"},
    {"count": 1, "inflight": 1, "transport": "tls", "tls_ca": "ca.pem", "tls_insecure": True},
    {"count": 1, "inflight": 1, "transport": "sctp"},
])
def test_bad_options(kw):
    with pytest.raises(OptionsError):
        LoadRun(Options(**kw))


def test_cli_json_and_plot(tmp_path, responder):
    r = responder()
    out = tmp_path / "r.json"
    args = [sys.executable, "-m", "load", "--target", r.target, "--inflight", "10", "--count", "200",
            "--users", "20", "-q", "--json", str(out), "--server-pid", str(r.pid)]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(tmp_path / "r.png")]
    except ImportError:
        pass
    env = dict(os.environ, PYTHONPATH=LOAD_ROOT)
    cp = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    r.stop()
    assert cp.returncode == 0, cp.stderr
    res = json.loads(out.read_text())
    for key in ("offered_rate", "achieved_rate", "sent", "replies", "timeouts", "retransmissions",
                "latency_ms", "generator_cpu_pct", "server_cpu_us_per_request"):
        assert key in res
    assert set(res["latency_ms"]) >= {"p50", "p90", "p99", "p999", "max"}
    if "--plot" in args:
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_remote_target():
    env = dict(os.environ, PYTHONPATH=LOAD_ROOT)
    cp = subprocess.run([sys.executable, "-m", "load", "--target", "10.1.2.3:5060", "--count", "1",
                         "--inflight", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "--allow-remote" in cp.stderr


def _without_scapy(tmp_path) -> dict:
    """An environment whose ``import scapy`` fails as on a machine without it."""
    (tmp_path / "scapy").mkdir()
    (tmp_path / "scapy" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'scapy'\", name='scapy')\n")
    return dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + LOAD_ROOT)


def test_cli_without_scapy_says_how_to_install_it(tmp_path):
    cp = subprocess.run([sys.executable, "-m", "load", "--target", "127.0.0.1:5999",
                         "--inflight", "1", "--count", "1"], env=_without_scapy(tmp_path),
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2
    assert cp.stdout == ""
    assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert "scapy is not installed" in cp.stderr and "pip install -e '.[load]'" in cp.stderr


def test_cli_against_a_silent_port_says_no_replies_and_the_real_elapsed_time(tmp_path):
    """Nothing answers: every request times out.  The run lasts until the last
    timeout (two rounds of 10 in flight at 0.5 s each, about 1 s), and so does
    its reported elapsed time; the tool says nobody answered."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))          # holds the port, never reads
    target = "127.0.0.1:%d" % silent.getsockname()[1]
    try:
        t0 = time.monotonic()
        cp = subprocess.run([sys.executable, "-m", "load", "--target", target, "--inflight", "10",
                             "--count", "20", "--users", "20", "--timeout", "0.5", "-q",
                             "--json", str(tmp_path / "r.json")],
                            env=dict(os.environ, PYTHONPATH=LOAD_ROOT), capture_output=True,
                            text=True, timeout=60)
        wall = time.monotonic() - t0
    finally:
        silent.close()
    assert cp.returncode == 1
    assert cp.stderr == f"fastsip-load: no replies: is a registrar listening on {target} (udp)?\n"
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["timeouts"] == 20 and res["replies"] == {}
    assert 1.0 <= res["elapsed_s"] < wall, (res["elapsed_s"], wall)
    # a refused TCP connection says the same, on one line
    cp = subprocess.run([sys.executable, "-m", "load", "--target", target, "--transport", "tcp",
                         "--inflight", "1", "--count", "1", "-q"],
                        env=dict(os.environ, PYTHONPATH=LOAD_ROOT), capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 2
    assert cp.stderr == (f"fastsip-load: error: TCP connection to {target} refused: "
                         f"is a registrar listening on {target}?\n")


def test_bench_e2e_says_in_one_line_why_a_load_step_failed(tmp_path):
    """bench/bench_e2e.py against the Python responder, with a load tool that
    cannot run (no scapy): one line naming the step and the tool's reason."""
    script = os.path.join(LOAD_ROOT, "bench", "bench_e2e.py")
    cp = subprocess.run([sys.executable, script, "--server-cmd",
                         "{python} -m load.responder --listen {host}:{port} --duration 60",
                         "--rates", "100", "--inflight", "", "--step-duration", "0.5",
                         "--users", "10", "--out", str(tmp_path / "out")],
                        env=_without_scapy(tmp_path), capture_output=True, text=True, timeout=120)
    assert cp.returncode == 1
    assert "Traceback" not in cp.stderr and cp.stderr.count("\n") == 1, cp.stderr
    assert cp.stderr.startswith("bench_e2e: error: load step register open 100 against port ")
    assert "failed: fastsip-load: error: scapy is not installed" in cp.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="--raw needs root")
def test_raw_socket_mode(responder):
    r = responder("--transport", "udp")
    res = run(target=r.target, raw=True, inflight=10, count=200)
    r.stop()
    assert res["transport"] == "raw-udp" and res["ok"] == 200


# ------------------------------------------------------------ TLS and WebSocket

from load._echo_c import echo_stream  # noqa: E402
from load._ws_c import _frame, _parse  # noqa: E402
from load.handshake import handshake_rate, hold_idle  # noqa: E402
from load.netutil import StreamSetupError, tls_client_context  # noqa: E402
from load.responder import ws_frame, ws_frames  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from fastsip.server.testing import make_test_pki
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    from fastsip.server.testing import make_test_pki
    return make_test_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_ws_frame_round_trip_against_the_python_framer(n):
    """The C frames (masked, FIN, text) read back by the responder's Python framer,
    which is written apart from them; the payload on the wire is masked."""
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    frame = _frame(payload, key=0xA1B2C3D4)
    assert frame[0] == 0x81 and frame[1] & 0x80                    # FIN + text, masked
    buf = bytearray(frame + b"\x81")                               # a partial next frame
    assert ws_frames(buf) == [(True, 1, True, payload)] and buf == b"\x81"
    assert _parse(frame) == (len(frame), True, 1, True, payload)
    if n >= 8:
        assert payload not in frame
    assert _parse(frame[:-1] if n else frame[:1]) == 0              # incomplete
    assert _parse(ws_frame(payload)) == (len(ws_frame(payload)), True, 1, False, payload)


def test_ws_parse_refuses_reserved_bits_and_huge_frames():
    assert _parse(b"\xc1\x00") == -1                              # RSV1 set
    assert _parse(b"\x81\x7f" + (1 << 40).to_bytes(8, "big")) == -1


def test_echo_stream_plain_and_websocket():
    req = build_sip(PHONE, "register", CFG).__bytes__()
    used, out, n, bad = echo_stream(req + req + req[:30], False)
    assert (used, n, bad) == (2 * len(req), 2, 0)
    assert out.count(b"SIP/2.0 200 OK") == 2
    frames = _frame(req) + _frame(req, key=7)
    used, out, n, bad = echo_stream(frames + _frame(req)[:5], True)
    assert (used, n, bad) == (len(frames), 2, 0)
    replies = ws_frames(bytearray(out))
    assert [r[:3] for r in replies] == [(True, 1, False)] * 2      # unmasked, as a server's
    assert all(r[3].startswith(b"SIP/2.0 200 OK") for r in replies)
    assert echo_stream(ws_frame(req), True)[3] == 1                 # an unmasked client frame


@pytest.mark.parametrize("transport", ["tls", "ws", "wss"])
def test_stream_transports_match_everything(responder, pki, transport):
    r = responder("--transport", transport, "--tls-cert", pki["cert"], "--tls-key", pki["key"])
    tls = {"tls_ca": pki["ca"]} if transport != "ws" else {}
    res = run(target=r.target, transport=transport, inflight=20, count=400, sockets=3, **tls)
    stats = r.stop()
    assert res["ok"] == 400 and res["replies"] == {"200": 400} and res["timeouts"] == 0
    assert not any(res["unmatched"].values()) and res["connections_closed"] == 0
    assert res["transport"] == transport and res["sockets"] == 3
    assert stats["received"] == 400 and stats["connections"] == 3
    ws = transport != "tls"
    assert stats["ws_upgrades"] == (3 if ws else 0) and stats["ws_frames"] == (400 if ws else 0)
    assert stats["unmasked_frames"] == 0 and stats["broken_streams"] == 0


def test_wss_against_the_c_echo_and_digest_auth_over_tls(responder, pki):
    r = responder("--transport", "wss", "--fast", "--tls-cert", pki["cert"], "--tls-key", pki["key"])
    res = run(target=r.target, transport="wss", tls_insecure=True, inflight=64, count=3000,
              sockets=4, users=200)
    stats = r.stop()
    assert res["ok"] == 3000 and stats["received"] == 3000 and stats["broken_streams"] == 0
    r = responder("--transport", "tls", "--auth", "--algorithm", "SHA-256", "--qop",
                  "--tls-cert", pki["cert"], "--tls-key", pki["key"])
    res = run(target=r.target, transport="tls", tls_ca=pki["ca"], scenario="auth", inflight=5,
              count=30, sockets=2)
    stats = r.stop()
    assert res["ok"] == 30 and res["replies"] == {"200": 30, "401": 30}
    assert stats["auth_ok"] == 30


def test_server_certificate_is_checked(responder, pki, other_pki):
    r = responder("--transport", "tls", "--tls-cert", pki["cert"], "--tls-key", pki["key"])
    with pytest.raises(StreamSetupError, match="certificate.*--tls-ca"):
        run(target=r.target, transport="tls", tls_ca=other_pki["ca"], inflight=1, count=1)
    res = run(target=r.target, transport="tls", tls_insecure=True, inflight=1, count=5, sockets=1)
    assert res["ok"] == 5


def _ws_upgrade(port, protocol):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              + (b"Sec-WebSocket-Protocol: " + protocol + b"\r\n" if protocol else b"") + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


def test_responder_refuses_what_rfc_7118_forbids(responder):
    """The responder (the tool's test peer) holds clients to RFC 6455/7118: no sip
    subprotocol, no upgrade; an unmasked frame closes the connection."""
    r = responder("--transport", "ws")
    port = int(r.target.rsplit(":", 1)[1])
    s, head = _ws_upgrade(port, None)
    assert head.startswith(b"HTTP/1.1 400")
    s.close()
    s, head = _ws_upgrade(port, b"chat, sip")
    assert head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    s.sendall(ws_frame(build_sip(PHONE, "register", CFG).__bytes__()))      # unmasked
    data = s.recv(4096)
    assert data[:1] == b"\x88"                                     # a close frame
    s.close()
    stats = r.stop()
    assert stats["ws_refused"] == 1 and stats["unmasked_frames"] == 1 and stats["received"] == 0


@pytest.mark.parametrize("transport", ["tls", "wss"])
def test_handshake_rate_and_idle_connections(responder, pki, transport):
    r = responder("--transport", transport, "--tls-cert", pki["cert"], "--tls-key", pki["key"])
    host, port = r.target.rsplit(":", 1)
    ctx = tls_client_context(pki["ca"])
    res = handshake_rate(host, int(port), transport, ctx, concurrency=4, duration=20, count=12,
                         sources=3)
    assert res["done"] == 12 and res["failed"] == {} and res["client_cpu_us"] > 0
    held, failed = hold_idle(host, int(port), 7, transport, ctx, concurrency=3, sources=2)
    assert len(held) == 7 and failed == {}
    assert {s.getsockname()[0] for s in held} == {"127.2.0.1", "127.2.0.2"}
    for s in held:
        s.close()
    stats = r.stop()
    assert stats["connections"] == 19 and stats["received"] == 12
    assert stats["ws_upgrades"] == (19 if transport == "wss" else 0)


# ------------------------------------------------------------ several targets

def _by_user(stats):
    """``{user: [responder index, ...]}`` in the order of the user's requests (CSeq)
    over several ``--log-users`` responders."""
    seen = {}
    for k, st in enumerate(stats):
        for user, cseqs in st["users"].items():
            seen.setdefault(user, []).extend((c, k) for c in cseqs)
    return {u: [k for _, k in sorted(v)] for u, v in seen.items()}


def _check_per_target(res, stats):
    """Per target, what its responder received (no priming: scenario register);
    together, the totals."""
    pt = res["per_target"]
    assert [t["target"] for t in pt] == res["targets"] == res["target"].split(",")
    assert [t["sent"] for t in pt] == [st["received"] for st in stats]
    assert sum(t["sent"] for t in pt) == res["sent"]
    assert sum(t["ok"] for t in pt) == res["ok"]
    assert sum(t["non_2xx"] for t in pt) == res["finals"] - res["ok"]
    assert sum(t["timeouts"] for t in pt) == res["timeouts"]


def test_spread_targets_is_a_stable_rendezvous_hash():
    aors = [f"sip:u{i:06d}@example.com" for i in range(900)]
    names = ["127.0.0.1:5061", "127.0.0.1:5062", "127.0.0.1:5063"]
    got = spread_targets(aors, names)
    assert all(220 <= got.count(k) <= 380 for k in range(3)), [got.count(k) for k in range(3)]
    assert spread_targets(aors, names) == got                        # the same every time
    back = spread_targets(aors, names[::-1])                         # whatever the order
    assert [names[::-1][k] for k in back] == [names[k] for k in got]
    without = spread_targets(aors, names[:2])                        # only 5063's phones move
    assert all(w == g for w, g in zip(without, got, strict=True) if g < 2)
    assert spread_targets(aors, names, "round-robin")[:5] == [0, 1, 2, 0, 1]
    assert spread_targets(aors, names[:1]) is None


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_hash_spread_keeps_every_phone_on_one_target(responder, transport):
    rs = [responder("--log-users") for _ in range(3)]
    res = run(target=[r.target for r in rs], transport=transport, inflight=12, count=300, users=60,
              **({"sockets": 4} if transport == "tcp" else {}))
    stats = [r.stop() for r in rs]
    assert res["ok"] == 300 and res["timeouts"] == 0 and res["spread"] == "hash"
    _check_per_target(res, stats)
    users = [set(st["users"]) for st in stats]
    assert all(users) and sum(map(len, users)) == len(set().union(*users)) == 60
    assert [t["phones"] for t in res["per_target"]] == [len(u) for u in users]
    expect = spread_targets([f"sip:u{i:06d}@127.0.0.1" for i in range(60)], res["targets"])
    assert users == [{f"u{i:06d}" for i in range(60) if expect[i] == k} for k in range(3)]
    if transport == "tcp":
        assert res["sockets"] == 12 and res["connections_closed"] == 0
        assert [st["connections"] for st in stats] == [4, 4, 4]


@pytest.mark.parametrize("transport,n", [("udp", 2), ("udp", 3), ("tcp", 3), ("tls", 2)])
def test_round_robin_sends_each_request_of_a_phone_to_the_next_target(responder, pki, transport, n):
    tls = ["--transport", "tls", "--tls-cert", pki["cert"], "--tls-key", pki["key"]]
    rs = [responder("--log-users", *(tls if transport == "tls" else [])) for _ in range(n)]
    res = run(target=[r.target for r in rs], spread="round-robin", transport=transport, inflight=6,
              count=240, users=12, **({"sockets": 2} if transport != "udp" else {}),
              **({"tls_ca": pki["ca"]} if transport == "tls" else {}))
    stats = [r.stop() for r in rs]
    assert res["ok"] == 240 and res["timeouts"] == 0 and res["spread"] == "round-robin"
    _check_per_target(res, stats)
    assert [t["phones"] for t in res["per_target"]] == [None] * n
    order = _by_user(stats)
    assert sorted(order) == [f"u{i:06d}" for i in range(12)]
    for i in range(12):     # phone i starts at target i mod n, then takes the next each time
        ks = order[f"u{i:06d}"]
        assert len(ks) >= 2 and ks == [(i + j) % n for j in range(len(ks))], (i, ks)


def test_per_target_counts_with_losses_and_challenges(responder):
    rs = [responder(), responder("--drop", "0.25", "--seed", "5"), responder("--auth")]
    res = run(target=[r.target for r in rs], inflight=12, count=300, users=60, timeout=0.3)
    stats = [r.stop() for r in rs]
    _check_per_target(res, stats)
    plain, lossy, auth = res["per_target"]
    assert plain["ok"] == plain["sent"] > 0 and plain["non_2xx"] == plain["timeouts"] == 0
    assert lossy["timeouts"] == stats[1]["dropped"] > 0
    assert lossy["ok"] == lossy["sent"] - lossy["timeouts"] and lossy["non_2xx"] == 0
    assert auth["non_2xx"] == auth["sent"] == res["replies"]["401"] > 0 and auth["ok"] == 0


def _acked(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_acked_lists_every_phones_last_2xx(tmp_path, responder):
    """--acked: one line per phone that got a 2xx, its last one; ``later`` counts its
    requests after it that got none (replies the responder dropped: timeouts)."""
    rs = [responder("--log-users"), responder("--log-users", "--drop", "0.3", "--seed", "11")]
    path = tmp_path / "acked.jsonl"
    res = run(target=[r.target for r in rs], scenario="refresh", no_prime=True, inflight=6,
              count=240, users=30, timeout=0.3, domain="example.com", acked=str(path))
    stats = [r.stop() for r in rs]
    lines = _acked(path)
    assert res["acked"] == {"path": str(path), "phones": len(lines),
                            "last": sum(1 for x in lines if x["later"] == 0)}
    assert res["per_target"][1]["timeouts"] > 0 and "5xx" in res["per_target"][0]
    assert [x["user"] for x in lines] == sorted(x["user"] for x in lines)     # phone order
    by_user = {x["user"]: x for x in lines}
    for i in range(30):
        user = f"u{i:06d}"
        k = next(k for k, st in enumerate(stats) if user in st["users"])
        got = stats[k]["users"][user]
        x = by_user.get(user)
        if x is None:           # every reply of this phone was dropped
            assert k == 1
            continue
        assert x["target"] == res["targets"][k] and x["aor"] == f"sip:{user}@example.com"
        assert x["contact"].startswith(f"sip:{user}@{phone_address(i)}:")
        assert x["contacts"] == [x["contact"]] and x["kind"] == "refresh" and not x["auth"]
        assert x["call_id"].endswith(f"-{i:x}@{phone_address(i)}") and x["expires"] == 3600
        assert x["cseq"] in got
        assert x["later"] == sum(1 for c in got if c > x["cseq"]), (user, x, got)
        if k == 0:
            assert x["later"] == 0 and x["cseq"] == max(got)
    assert any(x["later"] for x in lines)
    assert res["ok"] >= len(lines)


@pytest.mark.parametrize("scenario", ["auth", "register"])
def test_acked_answers_to_challenges_carry_the_challenged_requests_call_id(
        tmp_path, responder, scenario):
    r = responder("--auth", "--log-users")
    path = tmp_path / "acked.jsonl"
    res = run(target=r.target, scenario=scenario, password_pattern="secret", inflight=4,
              count=40, users=8, acked=str(path))
    got = r.stop()["users"]
    assert res["ok"] == 40 and res["timeouts"] == 0
    lines = _acked(path)
    assert len(lines) == 8 == res["acked"]["last"]
    for x in lines:
        cseqs = got[x["user"]]
        assert x["auth"] and x["later"] == 0 and x["cseq"] == max(cseqs)
        assert x["kind"] == ("refresh" if scenario == "auth" else "register")
        if scenario == "register":      # the Call-ID is the challenged request's (new each time)
            challenged = max(c for c in cseqs if c < x["cseq"])
            assert f"-{challenged:010d}@" in x["call_id"], (x, cseqs)


def test_pcap_of_several_targets(tmp_path):
    from scapy.layers.inet import UDP
    from scapy.utils import rdpcap
    targets = ["127.0.0.1:5061", "127.0.0.1:5062", "127.0.0.1:5063"]
    for spread in ("hash", "round-robin"):
        path = str(tmp_path / f"{spread}.pcap")
        run(target=targets, spread=spread, users=6, count=36, inflight=1, pcap_out=path,
            dry_run=True)
        ports = {}
        for p in rdpcap(path):
            user = re.search(rb"From: <sip:(\w+)@", bytes(p[UDP].payload)).group(1)
            ports.setdefault(user, []).append(p[UDP].dport)
        assert len(ports) == 6 and all(len(v) == 6 for v in ports.values())
        if spread == "hash":
            assert all(len(set(v)) == 1 for v in ports.values())
            assert len({v[0] for v in ports.values()}) > 1
        else:
            assert all(v == [5061 + (i + j) % 3 for j in range(6)]
                       for i, v in enumerate(ports.values()))


@pytest.mark.parametrize("kw,error", [
    ({"target": ["127.0.0.1:5061", "127.0.0.1:5061"]}, TargetError),      # twice
    ({"target": ["127.0.0.1:5061", "[::1]:5062"]}, TargetError),          # two families
    ({"target": ["127.0.0.1:5061", "192.0.2.1:5062"]}, TargetError),      # one remote
    ({"target": ["127.0.0.1:5061", "127.0.0.1:x"]}, TargetError),
    ({"target": []}, OptionsError),
    ({"target": [f"127.0.0.1:{5000 + i}" for i in range(65)]}, OptionsError),
    ({"target": ["127.0.0.1:5061", "127.0.0.1:5062"], "spread": "random"}, OptionsError),
    ({"target": ["127.0.0.1:5061", "127.0.0.1:5062"], "raw": True}, OptionsError),
])
def test_bad_targets(kw, error):
    with pytest.raises(error):
        LoadRun(Options(count=1, inflight=1, **kw))
    if kw["target"] and "192.0.2.1:5062" in kw["target"]:
        LoadRun(Options(count=1, inflight=1, allow_remote=True, **kw))       # no send


def test_cli_several_targets(tmp_path, responder):
    """Two targets, one of them silent: the summary and the JSON count them apart,
    and the tool names the one that never answered; bad targets: exit status 2."""
    r = responder()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))          # holds the port, never reads
    quiet = "127.0.0.1:%d" % silent.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=LOAD_ROOT)
    base = [sys.executable, "-m", "load", "--inflight", "5", "--count", "40", "--users", "10"]
    try:
        cp = subprocess.run([*base, "--target", r.target, "--target", quiet, "--timeout", "0.3",
                             "--spread", "round-robin", "--json", str(tmp_path / "r.json")],
                            env=env, capture_output=True, text=True, timeout=60)
    finally:
        silent.close()
    r.stop()
    assert cp.returncode == 1, cp.stderr           # timeouts
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["target"] == f"{r.target},{quiet}" and res["targets"] == [r.target, quiet]
    assert res["spread"] == "round-robin"
    live, dead = res["per_target"]
    assert live == {"target": r.target, "phones": None, "sent": 20, "ok": 20, "non_2xx": 0,
                    "5xx": 0, "timeouts": 0}
    assert dead == {"target": quiet, "phones": None, "sent": 20, "ok": 0, "non_2xx": 0,
                    "5xx": 0, "timeouts": 20}
    assert res["sent"] == 40 and res["ok"] == 20 and res["timeouts"] == 20
    assert re.search(r"(?m)^spread +round-robin over 2 targets$", cp.stdout)
    assert re.search(rf"(?m)^  {quiet} +20 sent, 0 2xx, 0 non-2xx, 20 timeouts$", cp.stdout)
    assert cp.stderr.endswith(f"fastsip-load: no replies from {quiet} (udp): "
                              "20 requests sent to it\n"), cp.stderr
    for bad, why in ((["127.0.0.1:5061", "localhost:5062"], "is not an IP address"),
                     (["127.0.0.1:5061", "10.1.2.3:5062"], "--allow-remote")):
        cp = subprocess.run([*base, "--target", bad[0], "--target", bad[1]], env=env,
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 2 and cp.stderr.startswith("fastsip-load: error: ")
        assert why in cp.stderr and cp.stderr.count("\n") == 1, cp.stderr


def test_fast_echo_processes_share_the_port():
    """``--fast --processes 2``: two echo processes on one port (SO_REUSEPORT), as
    bench_server's floor runs beside 2 workers; every REGISTER is answered, the
    counters of both are summed, and both served some of 40 senders."""
    from fastsip.server.testing import register
    env = dict(os.environ, PYTHONPATH=LOAD_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "load.responder", "--fast", "--processes", "2", "--transport", "udp",
         "--listen", "127.0.0.1:0", "--duration", "3"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(re.match(r"listening \S+:(\d+)", proc.stdout.readline()).group(1))
        for i in range(40):             # a socket (a source port) per sender
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.sendto(register(f"user{i}"), ("127.0.0.1", port))
                assert s.recv(4096).startswith(b"SIP/2.0 200 OK")
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["received"] == 40 and stats["replies"] == {"200": 40}
    assert len(stats["per_process"]) == 2 and min(stats["per_process"]) > 0, stats
