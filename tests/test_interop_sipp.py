"""Interop with a SIP client nobody here wrote: SIPp (Debian package sip-tester).

The scenarios are in tests/sipp/; they write To as a phone does, the user at
the registrar's host:port.  SIPp checks every reply itself (status, and with
``ereg check_it`` that the 200 lists the contact, or none after the
unregister) and exits non-zero on any failed call.  The matrix test runs the
server on its defaults (only ``--realm``/``--users`` for digest; SIPp answers
only MD5 and only the first challenge it reads) and asks the admin API for each
user at 127.0.0.1, without the port.  Skipped when sipp is not installed,
except under CI (``CI`` set), where .ci/run installs it.
"""
import os
import subprocess

import pytest

from conftest import require_client
from fastsip.server.testing import wait_for
from interop import USERS, assert_gone, fetch_one, serve

pytestmark = pytest.mark.server
SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")
TRANSPORTS = {"udp": "u1", "tcp": "t1"}


@pytest.fixture
def sipp():
    return require_client("sipp", "sip-tester")


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


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipp_register_fetch_refresh_unregister_matrix(sipp, start, tmp_path, transport, auth):
    """Two users, each step one SIPp run (a new Call-ID, the same Contact):
    register, fetch by user@host, refresh with a shorter Expires, unregister."""
    srv = serve(start, tmp_path, auth)
    addr = srv.udp if transport == "udp" else srv.tcp
    inject = tmp_path / "users.csv"
    inject.write_text("\n".join(["SEQUENTIAL"] + [
        f"{u};[authentication username={u} password={p}]" for u, p in USERS.items()]) + "\n")
    scenario = "phone_auth.xml" if auth else "phone.xml"

    def step(expires):
        run_sipp(sipp, tmp_path, scenario, addr, TRANSPORTS[transport], len(USERS),
                 "-inf", str(inject), "-key", "expires", str(expires))

    step(3600)
    first = {u: fetch_one(srv, u) for u in USERS}
    for u, b in first.items():
        assert b["contact"] == f"sip:{u}@127.0.0.1:5999;transport={transport.upper()}"
        assert b["transport"] == transport and b["user_agent"] == "SIPp"
        assert 3590 <= b["expires"] <= 3600
    step(1800)
    for u in USERS:
        b = fetch_one(srv, u)
        assert b["contact"] == first[u]["contact"] and b["call_id"] != first[u]["call_id"]
        assert 1790 <= b["expires"] <= 1800
    step(0)
    for u in USERS:
        assert_gone(srv, u)
    m = srv.metrics()
    assert m['fastsip_replies_total{code="200"}'] == 3 * len(USERS)
    assert m.get('fastsip_replies_total{code="401"}', 0) == (3 * len(USERS) if auth else 0)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipp_invite_is_redirected_to_the_registered_contact(sipp, start, tmp_path, transport):
    """``--redirect``, two workers: SIPp registers two users (phone.xml), then calls each
    (redirect.xml): a 302 with the registered contact (SIPp checks it), and SIPp's ACK."""
    srv = start("--redirect", workers=2)
    addr = srv.udp if transport == "udp" else srv.tcp
    inject = tmp_path / "users.csv"
    inject.write_text("\n".join(["SEQUENTIAL"] + list(USERS)) + "\n")
    run_sipp(sipp, tmp_path, "phone.xml", addr, TRANSPORTS[transport], len(USERS),
             "-inf", str(inject), "-key", "expires", "600")
    run_sipp(sipp, tmp_path, "redirect.xml", addr, TRANSPORTS[transport], len(USERS),
             "-inf", str(inject))
    m = wait_for(lambda: (lambda m: m if m.get('fastsip_requests_total{method="ACK"}') == len(USERS)
                          else None)(srv.metrics()), 5) or srv.metrics()
    assert m['fastsip_requests_total{method="ACK"}'] == len(USERS)
    assert m['fastsip_requests_total{method="INVITE"}'] == len(USERS)
    assert m['fastsip_redirects_total{outcome="moved"}'] == len(USERS)
    assert m['fastsip_replies_total{code="302"}'] == len(USERS)
