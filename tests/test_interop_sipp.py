"""Interop with a SIP client nobody here wrote: SIPp (Debian package sip-tester).

The scenarios are in tests/sipp/.  SIPp checks every reply itself (status,
and with ``ereg check_it`` that the 200 lists the contact, or none after the
unregister) and exits non-zero on any failed call.  Skipped when sipp is not
installed, except under CI (``CI`` set), where .ci/run installs it.
"""
import hashlib
import os
import shutil
import subprocess

import pytest


pytestmark = pytest.mark.server
SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")
TRANSPORTS = {"udp": "u1", "tcp": "t1"}


@pytest.fixture
def sipp():
    path = shutil.which("sipp")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("sipp is not installed (apt-get install sip-tester)")
        pytest.skip("sipp is not installed (apt-get install sip-tester)")
    return path


@pytest.fixture
def server(start):
    """server(*flags, workers=2) -> a running ``fastsip serve`` with a state file."""
    return start


def run_sipp(sipp, tmp_path, scenario, addr, mode, calls, *extra):
    err = tmp_path / f"sipp-{mode}-errors.log"
    cmd = [sipp, "%s:%d" % addr, "-sf", os.path.join(SCENARIOS, scenario), "-t", mode,
           "-m", str(calls), "-r", "50", "-i", "127.0.0.1", "-p", "0", "-nostdin",
           "-timeout", "30", "-timeout_error", "-recv_timeout", "5000", "-max_socket", "1000",
           "-trace_err", "-error_file", str(err), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                         stdin=subprocess.DEVNULL)
    errors = err.read_text(errors="replace") if err.exists() else ""
    assert out.returncode == 0, f"sipp exit {out.returncode}\n{errors[-3000:]}\n{out.stdout[-2000:]}"
    return out


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipp_register_refresh_fetch_unregister(sipp, server, tmp_path, transport):
    srv = server()
    addr = srv.udp if transport == "udp" else srv.tcp
    run_sipp(sipp, tmp_path, "register_cycle.xml", addr, TRANSPORTS[transport], 20)
    m = srv.metrics()
    assert m['fastsip_requests_total{method="REGISTER"}'] == 80
    assert m['fastsip_replies_total{code="200"}'] == 80
    assert m["fastsip_bindings"] == 0
    assert m['fastsip_received_total{transport="%s"}' % transport] == 80


@pytest.mark.parametrize("steer", [True, False])
def test_sipp_one_socket_per_call_spreads_over_workers(sipp, server, tmp_path, steer,
                                                     skip_without_steering):
    if steer:
        skip_without_steering()
    srv = server(*([] if steer else ["--no-steer"]), workers=2)
    assert ("kernel steering by AOR on" in srv.start_line) == steer
    run_sipp(sipp, tmp_path, "register.xml", srv.udp, "un", 40)
    found = srv.api("/api/bindings")["bindings"]
    assert len(found) == 40
    for b in found:
        # the contact names the port SIPp sent from, and the server recorded that source
        assert b["contact"].startswith(b["aor"].split("@")[0] + "@127.0.0.1:%d;" % b["source"][1])
        assert b["transport"] == "udp" and b["user_agent"] == "SIPp"
    received = [w["received_udp"] for w in srv.api("/api/workers")["workers"]]
    assert sum(received) == 40 and all(received), received
    m = srv.metrics()
    if steer:       # the kernel gave every REGISTER to the owner of its AOR
        assert m["fastsip_handoffs_total"] == 0
    else:           # 40 sockets spread by the 4-tuple: some reached the other worker
        assert m["fastsip_handoffs_total"] > 0
    assert m["fastsip_aors"] == 40


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipp_digest_authentication(sipp, server, tmp_path, transport):
    users = tmp_path / "users.htdigest"
    inject = tmp_path / "users.csv"
    lines, rows = [], ["SEQUENTIAL"]
    for i in range(5):
        ha1 = hashlib.md5(f"user{i}:127.0.0.1:pw{i}".encode()).hexdigest()
        lines.append(f"user{i}:127.0.0.1:{ha1}")
        rows.append(f"user{i};[authentication username=user{i} password=pw{i}]")
    users.write_text("\n".join(lines) + "\n")
    inject.write_text("\n".join(rows) + "\n")
    # SIPp answers only MD5 and only the first challenge: offer MD5 first
    srv = server("--realm", "127.0.0.1", "--users", str(users), "--auth-algorithms", "MD5")
    addr = srv.udp if transport == "udp" else srv.tcp
    run_sipp(sipp, tmp_path, "register_auth.xml", addr, TRANSPORTS[transport], 5,
             "-inf", str(inject))
    m = srv.metrics()
    assert m['fastsip_replies_total{code="401"}'] == 5
    assert m['fastsip_replies_total{code="200"}'] == 5
    assert sorted(b["aor"] for b in srv.api("/api/bindings")["bindings"]) == \
        [f"sip:user{i}@127.0.0.1" for i in range(5)]
