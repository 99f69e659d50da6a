"""``fastsip serve --redirect`` end to end: phones register over UDP, then requests for
them over UDP and TCP get 302 with their contacts, from whichever worker they reach.

Every server runs on kernel-chosen ports and is killed when its test ends; every wait
is bounded.
"""
import os
import signal

import pytest

import fastsip
from fastsip.server.testing import register, request, wait_for

pytestmark = pytest.mark.server


def users_of_both_shards(n=2):
    """One user whose AOR sip:USER@example.com each of the ``n`` workers owns."""
    found = {}
    for i in range(1000):
        found.setdefault(fastsip.shard_of(f"sip:u{i}@example.com", n), f"u{i}")
        if len(found) == n:
            return [found[k] for k in range(n)]
    raise AssertionError("no user for every shard")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_invite_gets_302_with_the_contact_from_either_worker(start, phone, transport):
    srv = start("--redirect", "--domain", "example.com", workers=2)
    assert "; redirect server on" in srv.start_line
    users = users_of_both_shards()
    ua = phone(srv.udp)
    contact = {}
    for u in users:
        contact[u] = f"sip:{u}@127.0.0.1:{ua.local[1]}"
        r = ua.ask(register(u, contact=contact[u], call_id=f"reg-{u}", expires=600))
        assert r.status == 200
    caller = phone(srv.udp if transport == "udp" else srv.tcp, transport)
    before = srv.metrics().get("fastsip_handoffs_total", 0)
    for i, u in enumerate(users):
        # To as the caller wrote it, and To naming the other user (a proxy that
        # retargeted): the Request-URI decides, the owner of its AOR answers
        for to in (None, f"sip:{users[1 - i]}@example.com"):
            r = caller.ask(request("INVITE", f"sip:{u}@example.com", to=to,
                                   transport=transport.upper(), local=caller.local,
                                   call_id=f"inv-{u}-{bool(to)}"))
            assert (r.status, r.reason) == (302, "Moved Temporarily")
            assert [(c.uri, c.expires) for c in r.contacts] in (
                [(contact[u], 600)], [(contact[u], 599)])
            assert r.to.uri == (to or f"sip:{u}@example.com")
    r = caller.ask(request("MESSAGE", "sip:nobody@example.com", transport=transport.upper(),
                           local=caller.local, call_id="msg"))
    assert r.status == 480
    r = caller.ask(request("INVITE", "sip:u1@example.org", transport=transport.upper(),
                           local=caller.local, call_id="inv-foreign"))
    assert r.status == 404
    r = caller.ask(request("OPTIONS", "sip:example.com", transport=transport.upper(),
                           local=caller.local, call_id="opt"))
    assert r.status == 200
    # the ACK of a 302 gets no answer
    caller.send(request("ACK", f"sip:{users[0]}@example.com", transport=transport.upper(),
                        local=caller.local, call_id=f"inv-{users[0]}-False"))
    assert caller.recv(0.3) is None
    m = srv.metrics()
    assert m['fastsip_redirects_total{outcome="moved"}'] == 4
    assert m['fastsip_redirects_total{outcome="unavailable"}'] == 1
    assert m['fastsip_redirects_total{outcome="not_found"}'] == 1
    assert m['fastsip_replies_total{code="302"}'] == 4
    assert m['fastsip_requests_total{method="INVITE"}'] == 5       # once each, by its owner
    assert m['fastsip_requests_total{method="ACK"}'] == 1
    # with two users of different workers, whatever worker a request reached, some
    # request was another's: the To of the other user, or the TCP connection's worker
    assert m["fastsip_handoffs_total"] > before


def test_without_the_flag_other_requests_get_405(start, phone):
    srv = start("--domain", "example.com", workers=2)
    assert "; redirect server off" in srv.start_line
    ua = phone(srv.udp)
    assert ua.ask(register("alice", contact=f"sip:alice@127.0.0.1:{ua.local[1]}")).status == 200
    r = ua.ask(request("INVITE", "sip:alice@example.com", local=ua.local))
    assert r.status == 405 and r.headers["Allow"] == "REGISTER, OPTIONS"


def test_redirect_from_the_config_file_and_live_on_sighup(start, phone, tmp_path):
    conf = tmp_path / "fastsip.toml"
    conf.write_text('redirect = true\ndomain = ["example.com"]\n')
    srv = start("--config", str(conf), workers=2)
    assert "; redirect server on" in srv.start_line
    ua = phone(srv.udp)

    def invite():
        return ua.ask(request("INVITE", "sip:alice@example.com", local=ua.local,
                              call_id=os.urandom(4).hex())).status
    assert invite() == 480
    conf.write_text('redirect = false\ndomain = ["example.com"]\n')
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: "SIGHUP: logs reopened" in srv.log(), 5)
    assert invite() == 405
