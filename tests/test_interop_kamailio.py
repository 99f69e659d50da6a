"""Interop with a real proxy: Kamailio follows fastsip's redirect.

``fastsip serve --redirect`` is the location service of a Kamailio proxy
(tests/kamailio/redirect.cfg, the example of docs/server.md): the proxy sends every new
request to fastsip, and follows a 302 with the uac_redirect module (``get_redirects``,
``t_relay``) to the contacts. A SIPp callee registers its contact with fastsip; a SIPp
caller calls the callee's AOR through the proxy; the callee checks that the INVITE
reached it at its registered contact, and the call is answered, acknowledged and hung
up along the proxy's Record-Route. A call to a user without a binding gets fastsip's
480 through the proxy. Skipped when kamailio or sipp is not installed, except under CI
(``CI`` set), where it fails.
"""
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require_client
from fastsip.server.testing import Phone, register, request, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "kamailio", "redirect.cfg")
SCENARIOS = os.path.join(HERE, "sipp")
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"     # as the config's mpath


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sipp_cmd(sipp, tmp_path, name, scenario, *args):
    return [sipp, "-sf", os.path.join(SCENARIOS, scenario), "-t", "u1", "-i", "127.0.0.1",
            "-m", "1", "-nostdin", "-timeout", "30", "-timeout_error", "-recv_timeout", "10000",
            "-trace_err", "-error_file", str(tmp_path / f"sipp-{name}-errors.log"), *args]


def sipp_errors(tmp_path, name):
    path = tmp_path / f"sipp-{name}-errors.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def kamailio(tmp_path):
    """kamailio(fastsip_addr) -> the proxy's (host, port), once it answers; killed at the end."""
    binary = require_client("kamailio", "kamailio")
    if not os.path.exists(os.path.join(MODULES, "uac_redirect.so")):
        pytest.skip(f"no uac_redirect module in {MODULES}")
    procs = []

    def _start(fastsip_addr):
        port = free_udp_port()
        rundir = tmp_path / "kamailio"
        rundir.mkdir(exist_ok=True)
        with open(tmp_path / "kamailio.log", "wb") as log:
            procs.append(subprocess.Popen(
                [binary, "-DD", "-E", "-f", CONFIG, "-l", f"udp:127.0.0.1:{port}",
                 "-A", f'FASTSIP="sip:{fastsip_addr[0]}:{fastsip_addr[1]}"', "-n", "1",
                 "-m", "64", "-M", "8", "-x", "tlsf", "-Y", str(rundir), "-w", str(rundir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True))
        probe = Phone(("127.0.0.1", port))
        try:
            def answers():
                if procs[-1].poll() is not None:
                    raise AssertionError("kamailio exited:\n" + (
                        tmp_path / "kamailio.log").read_text(errors="replace")[-3000:])
                try:        # relayed to fastsip, which answers OPTIONS itself
                    return probe.ask(request("OPTIONS", f"sip:127.0.0.1:{port}",
                                             local=probe.local), timeout=0.5, tries=1)
                except TimeoutError:
                    return None
            assert wait_for(answers, 20), "kamailio does not answer"
        finally:
            probe.close()
        return ("127.0.0.1", port)
    try:
        yield _start
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            p.wait(10)


@pytest.mark.server
def test_kamailio_follows_the_302_to_the_registered_callee(start, kamailio, phone, tmp_path):
    sipp = require_client("sipp", "sip-tester")
    srv = start("--redirect", workers=2)
    proxy = kamailio(srv.udp)
    callee_port = free_udp_port()
    callee = subprocess.Popen(
        sipp_cmd(sipp, tmp_path, "callee", "callee.xml", "-p", str(callee_port)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=str(tmp_path), start_new_session=True)
    try:
        # the callee's registration, as a phone makes it (To: the AOR at the host alone)
        ua = phone(srv.udp)
        r = ua.ask(register("bob", "127.0.0.1", contact=f"sip:bob@127.0.0.1:{callee_port}",
                            expires=600))
        assert r.status == 200
        time.sleep(0.2)         # the callee's SIPp is listening by now
        caller = subprocess.run(
            sipp_cmd(sipp, tmp_path, "caller", "call_via_proxy.xml", "-s", "bob", "-p", "0",
                     "%s:%d" % proxy),
            capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
            stdin=subprocess.DEVNULL)
        assert caller.returncode == 0, (f"caller: sipp exit {caller.returncode}\n"
                                        f"{sipp_errors(tmp_path, 'caller')}\n{caller.stdout[-2000:]}")
        out, _ = callee.communicate(timeout=30)
        assert callee.returncode == 0, (f"callee: sipp exit {callee.returncode}\n"
                                        f"{sipp_errors(tmp_path, 'callee')}\n"
                                        f"{out.decode(errors='replace')[-2000:]}")
    finally:
        if callee.poll() is None:
            os.killpg(callee.pid, 9)
            callee.wait(10)
    # a user without a binding: fastsip's 480 reaches the caller through the proxy
    other = phone(proxy)
    r = other.ask(request("INVITE", f"sip:nobody@127.0.0.1:{proxy[1]}", local=other.local,
                          call_id="nobody-1"))
    assert (r.status, r.reason) == (480, "Temporarily Unavailable")
    m = srv.metrics()
    assert m['fastsip_redirects_total{outcome="moved"}'] == 1
    assert m['fastsip_redirects_total{outcome="unavailable"}'] == 1
    # the proxy acknowledged each final response itself (hop by hop)
    assert wait_for(lambda: srv.metrics().get('fastsip_requests_total{method="ACK"}') == 2, 5)


def test_the_docs_show_the_tested_routing():
    """docs/server.md (*Redirect server*) shows the routing of the config run above."""
    config = Path(CONFIG).read_text()
    routing = config[config.index("request_route {"):].rstrip()
    docs = (Path(HERE).parent / "docs" / "server.md").read_text()
    assert "```\n" + routing + "\n```" in docs
