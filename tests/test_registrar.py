"""RFC 3261 10.3, rule by rule, through Registrar.handle with a fake clock."""
import re

import pytest

import fastsip
from fastsip import Registrar

NOW = 1_764_115_200.0          # 2025-11-26 00:00:00 UTC
SRC = ("192.0.2.7", 5060)


def request(user="alice", contacts=("<sip:alice@192.0.2.7:5060>",), expires=None, call_id="cid-1",
            cseq=1, domain="example.com", ruri=None, method="REGISTER", extra=(), to=None,
            cseq_method=None):
    lines = [f"{method} {ruri or 'sip:' + domain} SIP/2.0",
             "Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK-%s-%d;rport" % (call_id, cseq),
             "Max-Forwards: 70",
             f"From: <sip:{user}@{domain}>;tag=ftag",
             f"To: {to or f'<sip:{user}@{domain}>'}",
             f"Call-ID: {call_id}",
             f"CSeq: {cseq} {cseq_method or method}"]
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    lines += list(extra)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def handle(reg, data, now=NOW, source=SRC, **kw):
    reply = reg.handle(data, source, now, **kw)
    return None if reply is None else fastsip.parse(reply)


def contacts_of(reply):
    return {c.uri: c.expires for c in reply.contacts}


@pytest.fixture
def reg():
    return Registrar(min_expires=60, max_expires=3600, domains=["example.com"])


# -- step 8: the 200 and what it copies ------------------------------------------

def test_register_200_copies_headers_and_lists_binding(reg):
    data = request(expires=600)
    r = handle(reg, data)
    assert (r.status, r.reason) == (200, "OK")
    req = fastsip.parse(data)
    assert r.call_id == req.call_id and (r.cseq.seq, r.cseq.method) == (1, "REGISTER")
    assert r.from_.tag == "ftag" and r.to.uri == "sip:alice@example.com" and r.to.tag
    assert r.via[0].branch == req.via[0].branch
    assert r.via[0].params["received"] == "192.0.2.7" and r.via[0].params["rport"] == "5060"
    assert contacts_of(r) == {"sip:alice@192.0.2.7:5060": 600}
    assert r.headers["Date"] == "Wed, 26 Nov 2025 00:00:00 GMT"
    assert r.content_length == 0 and r.body == b""
    assert reg.query("sip:alice@example.com") == ["sip:alice@192.0.2.7:5060"]


def test_to_tag_is_stable_across_retransmissions(reg):
    data = request(expires=600)
    assert handle(reg, data).to.tag == handle(reg, data).to.tag


def test_remaining_time_counts_down(reg):
    handle(reg, request(expires=600))
    r = handle(reg, request(contacts=(), cseq=2), now=NOW + 100)
    assert contacts_of(r) == {"sip:alice@192.0.2.7:5060": 500}


def test_binding_records_source_transport_and_fields(reg):
    data = request(contacts=('<sip:alice@10.0.0.5:5062;transport=tcp>;+sip.instance='
                             '"<urn:uuid:1234>";reg-id=2;q=0.7',),
                   extra=("User-Agent: Phone/1.0", "Supported: path",
                          "Path: <sip:edge1.example.com;lr>", "Path: <sip:edge2.example.com;lr>"))
    handle(reg, data, source=("198.51.100.9", 40000), transport="tcp", conn_id=77)
    [b] = reg.lookup("sip:alice@example.com")
    assert (b.uri, b.q, b.call_id, b.cseq) == ("sip:alice@10.0.0.5:5062;transport=tcp", 0.7,
                                               "cid-1", 1)
    assert (b.source, b.transport, b.conn_id) == (("198.51.100.9", 40000), "tcp", 77)
    assert (b.instance, b.reg_id, b.user_agent) == ("<urn:uuid:1234>", 2, "Phone/1.0")
    assert b.path == ("<sip:edge1.example.com;lr>", "<sip:edge2.example.com;lr>")
    assert b.expires_at == NOW + 3600


def test_path_echoed_only_when_supported(reg):
    path = "Path: <sip:edge.example.com;lr>"
    r = handle(reg, request(extra=(path, "Supported: path")))
    assert [p.uri for p in r.path] == ["sip:edge.example.com;lr"]
    r = handle(reg, request(extra=(path,), call_id="cid-2"))
    assert r.path == []


def test_q_order_in_200_and_query(reg):
    handle(reg, request(contacts=("<sip:a@h1>;q=0.1", "<sip:b@h2>;q=0.9", "<sip:c@h3>")))
    r = handle(reg, request(contacts=(), cseq=2))
    assert [c.uri for c in r.contacts] == ["sip:c@h3", "sip:b@h2", "sip:a@h1"]
    assert [c.q for c in r.contacts] == [None, 0.9, 0.1]
    assert reg.query("sip:alice@example.com") == ["sip:c@h3", "sip:b@h2", "sip:a@h1"]


def test_query_lists_only_sip_uris(reg):
    handle(reg, request(contacts=("<sip:a@h1>", "<tel:+15551234>", "<sips:b@h2>")))
    assert reg.query("sip:alice@example.com") == ["sip:a@h1", "sips:b@h2"]
    assert len(reg.lookup("sip:alice@example.com")) == 3


# -- two phones, fetch, refresh, unregister (the Net::SIP pitfalls) -------------------

def test_second_phone_does_not_wipe_the_first(reg):
    handle(reg, request(contacts=("<sip:alice@desk>",), call_id="desk"))
    r = handle(reg, request(contacts=("<sip:alice@mobile>",), call_id="mobile"))
    assert set(contacts_of(r)) == {"sip:alice@desk", "sip:alice@mobile"}


def test_fetch_lists_and_changes_nothing(reg):
    handle(reg, request(expires=600))
    r = handle(reg, request(contacts=(), call_id="other", cseq=9))
    assert contacts_of(r) == {"sip:alice@192.0.2.7:5060": 600}
    assert len(reg.lookup("sip:alice@example.com")) == 1
    r = handle(reg, request(user="nobody", contacts=()))
    assert r.status == 200 and r.contacts == []


def test_refresh_updates_expiry(reg):
    handle(reg, request(expires=600))
    r = handle(reg, request(expires=1200, cseq=2), now=NOW + 500)
    assert contacts_of(r) == {"sip:alice@192.0.2.7:5060": 1200}


def test_unregister_one_contact_with_expires_zero(reg):
    handle(reg, request(contacts=("<sip:a@h1>", "<sip:b@h2>")))
    r = handle(reg, request(contacts=("<sip:a@h1>;expires=0",), cseq=2))
    assert set(contacts_of(r)) == {"sip:b@h2"}


def test_same_uri_by_rfc_comparison(reg):
    handle(reg, request(contacts=("<sip:alice@HOST.example.com;Transport=UDP>",)))
    r = handle(reg, request(contacts=("<sip:%61lice@host.example.com;transport=udp>;expires=0",),
                            cseq=2))
    assert r.contacts == []


def test_expires_zero_for_unknown_contact_is_fine(reg):
    r = handle(reg, request(contacts=("<sip:ghost@h>",), expires=0))
    assert r.status == 200 and r.contacts == []


# -- step 6: the wildcard ------------------------------------------------------------

def test_star_removes_all(reg):
    handle(reg, request(contacts=("<sip:a@h1>", "<sip:b@h2>")))
    handle(reg, request(contacts=("<sip:c@h3>",), call_id="other"))
    r = handle(reg, request(contacts=("*",), expires=0, cseq=2))
    assert r.status == 200 and r.contacts == []
    assert reg.lookup("sip:alice@example.com") == []


@pytest.mark.parametrize("contacts,expires", [
    (("*",), None), (("*",), 60), (("*", "<sip:a@h>"), 0), (("*, <sip:a@h>",), 0)])
def test_star_rules(reg, contacts, expires):
    handle(reg, request(contacts=("<sip:a@h1>",)))
    r = handle(reg, request(contacts=contacts, expires=expires, cseq=2))
    assert r.status == 400 and "Contact: *" in r.reason
    assert len(reg.lookup("sip:alice@example.com")) == 1


def test_star_with_old_cseq_removes_nothing(reg):
    handle(reg, request(contacts=("<sip:a@h1>",), call_id="c1", cseq=5))
    handle(reg, request(contacts=("<sip:b@h2>",), call_id="c2", cseq=1))
    r = handle(reg, request(contacts=("*",), expires=0, call_id="c1", cseq=5))
    assert r.status == 400
    assert len(reg.lookup("sip:alice@example.com")) == 2


# -- step 7: expiry rules ----------------------------------------------------------

@pytest.mark.parametrize("contact,header,expected", [
    ("<sip:a@h>;expires=120", 600, 120),       # the param wins over the header
    ("<sip:a@h>", 600, 600),                   # else the header
    ("<sip:a@h>", None, 3600),                 # else the default (capped at max_expires)
    ("<sip:a@h>;expires=99999", None, 3600),   # capped
    ("<sip:a@h>", 10**12, 3600),
    ("<sip:a@h>;expires=soon", None, 3600),    # malformed: 3600 (10.2.1.1), then capped
])
def test_expiry_choice(reg, contact, header, expected):
    r = handle(reg, request(contacts=(contact,), expires=header))
    assert contacts_of(r) == {"sip:a@h": expected}


def test_malformed_expires_header_counts_as_3600():
    reg = Registrar(min_expires=60, max_expires=7200)
    r = handle(reg, request(extra=("Expires: never",)))
    assert list(contacts_of(r).values()) == [3600]


def test_default_expires_is_capped():
    reg = Registrar(min_expires=30, max_expires=300)
    assert reg.default_expires == 300
    r = handle(reg, request())
    assert list(contacts_of(r).values()) == [300]


def test_423_with_min_expires_changes_nothing(reg):
    handle(reg, request(contacts=("<sip:a@h1>",)))
    r = handle(reg, request(contacts=("<sip:b@h2>;expires=600", "<sip:a@h1>;expires=59"),
                            cseq=2))
    assert (r.status, r.reason, r.min_expires) == (423, "Interval Too Brief", 60)
    assert [b.uri for b in reg.lookup("sip:alice@example.com")] == ["sip:a@h1"]


# -- Call-ID / CSeq ordering -------------------------------------------------------------

def test_lower_cseq_same_call_id_is_refused(reg):
    handle(reg, request(expires=600, cseq=5))
    r = handle(reg, request(expires=0, cseq=4))
    assert r.status == 400 and "CSeq" in r.reason
    assert len(reg.lookup("sip:alice@example.com")) == 1


def test_retransmission_answers_as_before_without_change(reg):
    data = request(expires=600, cseq=5)
    first = handle(reg, data)
    again = handle(reg, data, now=NOW + 2)
    assert again.status == 200 and contacts_of(again) == {"sip:alice@192.0.2.7:5060": 598}
    assert reg.lookup("sip:alice@example.com")[0].expires_at == NOW + 600
    assert first.to.tag == again.to.tag


def test_different_call_id_replaces_whatever_the_cseq(reg):
    handle(reg, request(expires=600, call_id="boot-1", cseq=100))
    r = handle(reg, request(expires=900, call_id="boot-2", cseq=1))
    assert r.status == 200 and contacts_of(r) == {"sip:alice@192.0.2.7:5060": 900}
    assert reg.lookup("sip:alice@example.com")[0].call_id == "boot-2"


# -- RFC 5626 instance / reg-id ---------------------------------------------------------

def test_same_instance_and_reg_id_replaces_the_flow(reg):
    inst = ';+sip.instance="<urn:uuid:aaaa>";reg-id=1'
    handle(reg, request(contacts=(f"<sip:alice@203.0.113.1:1111>{inst}",)))
    r = handle(reg, request(contacts=(f"<sip:alice@203.0.113.1:2222>{inst}",), cseq=2))
    assert list(contacts_of(r)) == ["sip:alice@203.0.113.1:2222"]
    r = handle(reg, request(contacts=('<sip:alice@203.0.113.1:3333>;+sip.instance='
                                      '"<urn:uuid:aaaa>";reg-id=2',), cseq=3))
    assert len(r.contacts) == 2          # another reg-id: another flow


def test_same_instance_without_reg_id_replaces_the_binding(reg):
    # linphone: +sip.instance without reg-id, the Contact port changes behind NAT
    inst = ';+sip.instance="<urn:uuid:bbbb>"'
    handle(reg, request(contacts=(f"<sip:alice@203.0.113.1:1111>{inst}",)))
    r = handle(reg, request(contacts=(f"<sip:alice@203.0.113.1:2222>{inst}",), cseq=2))
    assert list(contacts_of(r)) == ["sip:alice@203.0.113.1:2222"]
    r = handle(reg, request(contacts=(f"<sip:alice@203.0.113.1:3333>{inst};reg-id=1",), cseq=3))
    assert len(r.contacts) == 2          # with a reg-id it is an outbound flow of its own


def test_two_contacts_matching_one_binding_by_instance(reg):
    # both name the binding through its +sip.instance: one change to it, not two
    inst = ';+sip.instance="<urn:uuid:cccc>"'
    handle(reg, request(contacts=(f"<sip:alice@h1>{inst}",)))
    r = handle(reg, request(contacts=(f"<sip:alice@h2>{inst};expires=0",
                                      f"<sip:alice@h3>{inst};expires=0"), call_id="other"))
    assert r.status == 200 and r.contacts == []
    assert reg.stats()["bindings"] == 0 and reg.lookup("sip:alice@example.com") == []
    r = handle(reg, request(contacts=("<sip:alice@h4>",), call_id="third"))
    assert list(contacts_of(r)) == ["sip:alice@h4"] and reg.stats()["bindings"] == 1


def test_old_contact_removed_and_its_instance_moved_in_one_request(reg):
    inst = ';+sip.instance="<urn:uuid:dddd>"'
    handle(reg, request(contacts=(f"<sip:alice@h1>{inst}",)))
    r = handle(reg, request(contacts=("<sip:alice@h1>;expires=0", f"<sip:alice@h2>{inst}"),
                            cseq=2))
    assert list(contacts_of(r)) == ["sip:alice@h2"]
    assert [b.uri for b in reg.lookup("sip:alice@example.com")] == ["sip:alice@h2"]
    assert reg.stats()["bindings"] == 1


def test_one_instance_twice_in_a_request_gives_one_binding(reg):
    inst = ';+sip.instance="<urn:uuid:eeee>";reg-id=1'
    r = handle(reg, request(contacts=(f"<sip:alice@h1>{inst}", f"<sip:alice@h2>{inst}")))
    assert list(contacts_of(r)) == ["sip:alice@h2"]


# -- limits ------------------------------------------------------------------------------

def test_max_contacts_is_503_and_changes_nothing():
    reg = Registrar(max_contacts=2)
    handle(reg, request(contacts=("<sip:a@h1>",)))
    r = handle(reg, request(contacts=("<sip:b@h2>", "<sip:c@h3>"), cseq=2))
    assert r.status == 503 and "max_contacts=2" in r.reason
    assert len(reg.lookup("sip:alice@example.com")) == 1
    r = handle(reg, request(contacts=("<sip:a@h1>;expires=0", "<sip:b@h2>", "<sip:c@h3>"), cseq=3))
    assert r.status == 200 and len(r.contacts) == 2


@pytest.mark.parametrize("kw,reason", [
    (dict(contacts=("<sip:%s@h>" % ("a" * 600),)), "Contact URI longer than 512"),
    (dict(call_id="c" * 300), "Call-ID longer than 255"),
    (dict(user="u" * 300), "AOR longer than 255"),
    (dict(extra=tuple(f"Path: <sip:edge{i}.example.com;lr>" for i in range(40))),
     "Path longer than 1024"),      # never stored cut short while the 200 echoes it whole
])
def test_size_limits_name_themselves(reg, kw, reason):
    r = handle(reg, request(**kw))
    assert r.status == 400 and reason in r.reason
    assert reg.store.n_bindings == 0


# -- steps 1-2: domains and Require ---------------------------------------------------------

def test_foreign_domain_is_not_ours(reg):
    assert reg.handle(request(domain="evilexample.com"), SRC, NOW) is None
    assert reg.handle(request(domain="example.com.evil.net"), SRC, NOW) is None
    assert handle(reg, request(domain="EXAMPLE.com")).status == 200


def test_request_uri_may_name_our_address():
    reg = Registrar(domains=["example.com"], addresses=["192.0.2.1"])
    assert handle(reg, request(ruri="sip:192.0.2.1:5060")).status == 200
    assert reg.handle(request(ruri="sip:192.0.2.99"), SRC, NOW) is None


def test_request_uri_may_name_our_ipv6_address():
    # the URI writes an IPv6 reference in brackets; an address is configured with or without
    reg = Registrar(domains=["example.com"], addresses=["2001:db8::1", "[2001:db8::2]"])
    assert handle(reg, request(ruri="sip:[2001:db8::1]")).status == 200
    assert handle(reg, request(ruri="sip:[2001:DB8::2]:5060", cseq=2)).status == 200
    assert reg.handle(request(ruri="sip:[2001:db8::3]", cseq=3), SRC, NOW) is None


def test_wildcard_subdomains():
    reg = Registrar(domains=["*.example.com"])
    assert handle(reg, request(domain="tenant1.example.com")).status == 200
    assert reg.handle(request(domain="example.com"), SRC, NOW) is None
    assert reg.handle(request(domain="badexample.com"), SRC, NOW) is None


def test_any_domain_by_default():
    assert handle(Registrar(), request(domain="anything.test")).status == 200


def test_domain_keyword():
    reg = Registrar(domain="example.org")
    assert reg.domains == frozenset({"example.org"})


def test_require_unknown_option_is_420(reg):
    r = handle(reg, request(extra=("Require: path, foo, bar",)))
    assert (r.status, r.headers["Unsupported"]) == (420, "foo, bar")
    assert handle(reg, request(extra=("Require: path",), call_id="x")).status == 200


def test_not_register_is_not_ours(reg):
    assert reg.handle(request(method="OPTIONS"), SRC, NOW) is None
    assert reg.handle(b"SIP/2.0 200 OK\r\n\r\n", SRC, NOW) is None


# -- bad requests never raise ------------------------------------------------------------------

@pytest.mark.parametrize("mutate,status", [
    (lambda d: d.replace(b"Call-ID: cid-1\r\n", b""), 400),
    (lambda d: d.replace(b"CSeq: 1 REGISTER", b"CSeq: 1 INVITE"), 400),
    (lambda d: d.replace(b"CSeq: 1 REGISTER", b"CSeq: 99999999999 REGISTER"), 400),
    (lambda d: d.replace(b"<sip:alice@192.0.2.7:5060>", b"<sip:alice@192.0.2.7:5060>;;"), 400),
    (lambda d: d.replace(b"To: <sip:alice@example.com>", b"To: <tel:+1555>"), 400),
    (lambda d: d.replace(b"REGISTER sip:example.com", b"REGISTER tel:+1555"), 416),
    (lambda d: d.replace(b"Content-Length: 0", b"Content-Length: 10"), 400),
    (lambda d: d.replace(b"Content-Length: 0", b"Content-Length: 0\r\nCall-ID: two"), 400),
])
def test_bad_request_gets_a_status(reg, mutate, status):
    r = handle(reg, mutate(request()))
    assert r.status == status
    assert reg.store.n_bindings == 0


def test_unaddressable_garbage_is_dropped(reg):
    for junk in (b"", b"\x00\xff" * 10, b"REGISTER", b"hello world\r\n\r\n"):
        assert reg.handle(junk, SRC, NOW) is None


# -- expiry ----------------------------------------------------------------------------------

def test_expire_removes_due_bindings_and_lookups_hide_them(reg):
    handle(reg, request(contacts=("<sip:a@h1>;expires=100", "<sip:b@h2>;expires=200")))
    assert [b.uri for b in reg.lookup("sip:alice@example.com", now=NOW + 150)] == ["sip:b@h2"]
    assert reg.store.n_bindings == 2              # lookups never change the store
    assert reg.expire(NOW + 150) == 1
    assert reg.expire(NOW + 150) == 0
    assert reg.expire(NOW + 1000) == 1
    assert reg.store.n_aors == 0


def test_expired_bindings_are_not_listed_or_counted(reg):
    handle(reg, request(contacts=("<sip:a@h1>;expires=100",)))
    r = handle(reg, request(contacts=("<sip:b@h2>",), call_id="x"), now=NOW + 101)
    assert list(contacts_of(r)) == ["sip:b@h2"]


def test_aor_whose_bindings_lapsed_is_freed_by_the_next_request(reg):
    handle(reg, request(expires=60))
    r = handle(reg, request(contacts=(), cseq=2), now=NOW + 100)      # a fetch
    assert r.status == 200 and r.contacts == []
    assert reg.stats()["aors"] == 0 and reg.store.aor_names() == []
    handle(reg, request(user="bob", expires=60))
    r = handle(reg, request(user="bob", contacts=("<sip:b@h>;expires=5",), cseq=2),
               now=NOW + 100)
    assert r.status == 423 and reg.stats()["aors"] == 0


def test_expire_work_is_bounded_per_call():
    reg = Registrar(min_expires=1, max_expires=10)
    for i in range(50):
        handle(reg, request(user=f"u{i}", expires=5))
    assert reg.expire(NOW + 6, max_work=20) == 20
    assert reg.expire(NOW + 6, max_work=20) == 20
    assert reg.expire(NOW + 6, max_work=20) == 10
    assert reg.store.n_bindings == 0


def test_query_defaults_to_the_latest_now(reg):
    handle(reg, request(expires=100))
    assert reg.query("sip:alice@example.com") == ["sip:alice@192.0.2.7:5060"]
    handle(reg, request(user="bob"), now=NOW + 200)
    assert reg.query("sip:alice@example.com") == []
    assert reg.query("sip:alice@example.com", now=NOW) == ["sip:alice@192.0.2.7:5060"]


def test_query_canonicalises_the_aor(reg):
    handle(reg, request())
    assert reg.query("sip:alice@EXAMPLE.COM;transport=udp") == ["sip:alice@192.0.2.7:5060"]


def test_remove(reg):
    handle(reg, request(contacts=("<sip:a@h1>", "<sip:b@h2>")))
    assert reg.remove("sip:alice@example.com", "sip:a@H1") == 1
    assert reg.query("sip:alice@example.com") == ["sip:b@h2"]
    assert reg.remove("sip:alice@example.com") == 1


# -- the edge dispatcher --------------------------------------------------------------------

def test_serve_answers_what_the_registrar_does_not(reg):
    assert fastsip.parse(reg.serve(request(method="OPTIONS"), SRC, NOW)).status == 200
    r = fastsip.parse(reg.serve(request(method="INVITE"), SRC, NOW))
    assert (r.status, r.headers["Allow"]) == (405, "REGISTER, OPTIONS")
    r = fastsip.parse(reg.serve(request(domain="elsewhere.net"), SRC, NOW))
    assert r.status == 404
    assert reg.serve(request(method="ACK"), SRC, NOW) is None
    assert reg.serve(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\n\r\n", SRC, NOW) is None
    assert reg.serve(b"\x16\x03\x01garbage", SRC, NOW) is None
    assert fastsip.parse(reg.serve(request(), SRC, NOW)).status == 200
    stats = reg.stats()
    assert stats["requests"] == {"OPTIONS": 1, "INVITE": 1, "REGISTER": 2, "ACK": 1}
    assert stats["replies"] == {200: 2, 405: 1, 404: 1}
    assert stats["parse_errors"] == 1 and stats["bindings"] == 1 and stats["aors"] == 1


def test_request_counters_do_not_grow_with_invented_methods(reg):
    for i in range(1000):
        reg.serve(request(method=f"X{i}"), SRC, NOW)
    reg.serve(request(method="SUBSCRIBE"), SRC, NOW)
    assert reg.stats()["requests"] == {"other": 1000, "SUBSCRIBE": 1}


def test_make_response():
    data = request(method="OPTIONS")
    r = fastsip.parse(fastsip.make_response(data, 486, "Busy Here", [("Retry-After", "60")],
                                            now=NOW))
    assert (r.status, r.reason, r.headers["Retry-After"], r.call_id) == (486, "Busy Here", "60",
                                                                         "cid-1")
    assert fastsip.make_response(b"SIP/2.0 200 OK\r\n\r\n", 400, "x") is None


@pytest.mark.parametrize("now", [1e17, -1e17, float("inf"), float("nan")])
def test_time_beyond_the_calendar_gives_no_date_and_no_crash(now):
    # gmtime() has no answer for these (it returned NULL into strftime: a segfault)
    r = fastsip.parse(fastsip.make_response(request(method="OPTIONS"), 200, "OK", now=now))
    assert r.status == 200 and "Date" not in r.headers


# -- the Net::SIP forms ----------------------------------------------------------------------

class Leg:
    transport = "udp"

    def __init__(self):
        self.sent = []

    def send(self, data, addr):
        self.sent.append((data, addr))


def test_receive_net_sip_form(reg):
    leg = Leg()
    assert reg.receive(fastsip.parse(request()), leg, "192.0.2.7:5060") == 200
    assert leg.sent[0][1] == "192.0.2.7:5060" and leg.sent[0][0].startswith(b"SIP/2.0 200")
    assert reg.receive(request(method="INVITE"), leg, ("192.0.2.7", 5060)) is None
    assert len(leg.sent) == 1
    assert reg.query("sip:alice@example.com") == ["sip:alice@192.0.2.7:5060"]


def test_configure_changes_limits_for_the_next_request(reg):
    handle(reg, request(expires=600))
    reg.configure(min_expires=900, max_contacts=1)
    r = handle(reg, request(expires=600, call_id="x"))
    assert (r.status, r.min_expires) == (423, 900)
    assert reg.lookup("sip:alice@example.com")[0].expires_at == NOW + 600
    r = handle(reg, request(contacts=("<sip:second@h>",), expires=1000, call_id="y"))
    assert r.status == 503
    with pytest.raises(ValueError):
        reg.configure(min_expires=5000)          # above max_expires
    assert reg.min_expires == 900


def test_stats_count_aors_with_bindings():
    reg = Registrar(track_changes=True)
    handle(reg, request(expires=100))
    handle(reg, request(expires=0, cseq=2))
    assert reg.stats()["aors"] == 0 and reg.stats()["bindings"] == 0


def test_outbound_registration_gets_require_outbound(reg):
    r = handle(reg, request(contacts=('<sip:alice@203.0.113.1:1111;ob>;+sip.instance='
                                      '"<urn:uuid:cccc>";reg-id=1',)))
    assert r.status == 200 and r.require == ["outbound"]
    r = handle(reg, request(contacts=("<sip:alice@h>",), call_id="plain"))
    assert r.require == []


@pytest.mark.parametrize("mutate,reason", [
    (lambda d: d.replace(b"Via: SIP/2.0/UDP 192.0.2.7:5060;", b"Via: SIP;"), "Bad Via header"),
    (lambda d: d.replace(b"Call-ID: cid-1", b"Call-ID: cid\x01one"), "Bad Call-ID header"),
    (lambda d: d.replace(b"Call-ID: cid-1", "Call-ID: cïd".encode()), "Bad Call-ID header"),
    (lambda d: d.replace(b"Call-ID: cid-1", b"Call-ID: a@b@c"), "Bad Call-ID header"),
])
def test_bad_via_or_call_id_is_400(reg, mutate, reason):
    r = handle(reg, mutate(request()))
    assert (r.status, r.reason) == (400, reason)
    assert reg.store.n_bindings == 0


def test_max_contacts_is_bounded_by_what_a_200_can_list():
    with pytest.raises(ValueError, match="between 1 and 256"):
        Registrar(max_contacts=257)
    reg = Registrar(max_contacts=256, min_expires=1, max_expires=100)
    for i in range(4):
        contacts = [f"<sip:c{i}-{k}@h>" for k in range(64)]
        reply = reg.handle(request(contacts=contacts, call_id=f"c{i}"), SRC, NOW)
        assert reply.startswith(b"SIP/2.0 200 OK\r\n")
    reply = reg.handle(request(contacts=()), SRC, NOW)
    assert len(fastsip.Parser(max_headers=1000).parse(reply).contacts) == 256


def test_malformed_require_is_400(reg):
    r = handle(reg, request(extra=("Require: path,,outbound",)))
    assert (r.status, r.reason) == (400, "Bad Require header")
    r = fastsip.parse(reg.serve(request(method="OPTIONS", extra=("Require: a b",)), SRC, NOW))
    assert r.status == 400


def test_other_sip_version_is_505(reg):
    r = handle(reg, request().replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
    assert (r.status, r.reason) == (505, "Version Not Supported")


# -- the AOR: To without port or parameters (10.3 step 5), or the user alone --------

def test_the_port_in_to_is_not_part_of_the_aor(reg):
    # a phone configured with "registrar example.com:5060" writes the port into To
    r = handle(reg, request(to="<sip:alice@Example.COM:5060;transport=udp>", expires=600))
    assert r.status == 200
    assert reg.query("sip:alice@example.com") == ["sip:alice@192.0.2.7:5060"]
    assert reg.query("sip:alice@example.com:5060") == ["sip:alice@192.0.2.7:5060"]
    assert [aor for aor, _ in reg.bindings()] == ["sip:alice@example.com"]
    # the same user registering without the port adds to that AOR, not to a second one
    r = handle(reg, request(contacts=("<sip:alice@192.0.2.8:5060>",), call_id="cid-2",
                            expires=600))
    assert set(contacts_of(r)) == {"sip:alice@192.0.2.7:5060", "sip:alice@192.0.2.8:5060"}
    assert reg.store.n_live_aors == 1
    assert reg.remove("sip:alice@example.com:5061") == 2
    assert fastsip.parse_uri("sips:bob@H.example:5061;user=phone").aor == "sip:bob@h.example"


def test_a_sips_aor_is_the_sip_aor_of_the_same_user():
    """RFC 5630 3.1.3: sip: and sips: URIs that differ only by the scheme are one resource,
    so a phone registering sips:alice over TLS is found by a lookup of sip:alice, and
    the two registrations share one AOR (and its max-contacts)."""
    reg = Registrar(min_expires=60)
    r = handle(reg, request(to="<sips:alice@example.com>", expires=600,
                            contacts=("<sips:alice@192.0.2.7:5061>",)))
    assert r.status == 200
    handle(reg, request(contacts=("<sip:alice@192.0.2.8>",), call_id="cid-2", expires=600))
    assert reg.query("sip:alice@example.com") == ["sips:alice@192.0.2.7:5061",
                                                  "sip:alice@192.0.2.8"]
    assert reg.query("sips:alice@example.com") == reg.query("sip:alice@example.com")
    assert [aor for aor, _ in reg.bindings()] == ["sip:alice@example.com"] * 2


def test_aor_by_user_keys_one_domain_by_the_user_alone():
    reg = Registrar(min_expires=60, aor_by="user")
    assert reg.aor_by == "user"
    handle(reg, request(domain="a.example", expires=600))
    handle(reg, request(domain="B.example", contacts=("<sip:alice@192.0.2.8>",), call_id="c2",
                        expires=600))
    assert [aor for aor, _ in reg.bindings()] == ["sip:alice", "sip:alice"]
    assert len(reg.query("sip:alice@whatever.example")) == 2
    assert reg.aor_of("sip:%61lice@x:5060") == "sip:alice"
    assert reg.aor_of("sip:example.com:5060") == "sip:example.com"     # no user: the host stays
    assert fastsip.aor_key(request(domain="x:5060"), "user") == b"sip:alice"
    with pytest.raises(ValueError, match="aor_by"):
        Registrar(aor_by="domain")


@pytest.mark.parametrize("text, uri", [
    ("sip:alice@example.com", "sip:alice@example.com"),
    ("<sip:alice@example.com:5060>", "sip:alice@example.com:5060"),      # as `show` prints
    ('"Alice" <sips:alice@example.com>;tag=1', "sips:alice@example.com"),  # a To value
    ("alice@example.com", "sip:alice@example.com"),
    ("alice@example.com:5060", "sip:alice@example.com:5060"),
    ("example.com", "sip:example.com"),
])
def test_aor_from_text_reads_what_people_type(text, uri):
    from fastsip.registrar import aor_from_text
    assert aor_from_text(text) == uri


@pytest.mark.parametrize("text, why", [
    ("tel:+15551234", "a tel: URI"), ("mailto:alice@example.com", "a mailto: URI"),
    ("<sip:alice@example.com", "'<' without '>'"), ("", "not a SIP URI"),
    ("alice smith@example.com", "not a SIP URI"),
])
def test_aor_from_text_says_why_it_refuses(text, why):
    from fastsip.registrar import aor_from_text
    with pytest.raises(ValueError, match=re.escape(why)):
        aor_from_text(text)


def test_near_aors_suggest_what_was_meant(reg):
    for i, (user, domain) in enumerate([("Alice", "example.com"), ("alice", "example.com"),
                                        ("bob", "example.com")]):
        reg.set_domains(None)
        handle(reg, request(user=user, domain=domain, call_id=f"n{i}", expires=600))
    handle(reg, request(user="alice", domain="other.example", call_id="n9", expires=600))
    assert reg.near("sip:ALICE@example.com") == ["sip:Alice@example.com", "sip:alice@example.com",
                                                 "sip:alice@other.example"]
    assert reg.near("sip:alice@example.com") == ["sip:Alice@example.com", "sip:alice@other.example"]
    assert reg.near("sip:carol@example.com") == []


def test_max_bindings_refuses_new_bindings_with_503_but_refreshes_and_removals_go_on():
    reg = Registrar(min_expires=60, max_expires=3600, max_bindings=3)
    assert reg.max_bindings == 3
    for u in ("a", "b", "c"):
        assert handle(reg, request(user=u, contacts=(f"<sip:{u}@192.0.2.7>",))).status == 200
    r = handle(reg, request(user="d", contacts=("<sip:d@192.0.2.7>",)))
    assert (r.status, r.reason) == (503, "Registrar full (max_bindings)")
    assert r.headers["Retry-After"] == "60" and reg.store.n_bindings == 3
    assert reg.stats()["max_bindings_refused"] == 1
    # a refresh, a fetch, and a swap of one contact for another still work when full
    assert handle(reg, request(user="a", contacts=("<sip:a@192.0.2.7>",), cseq=2)).status == 200
    assert handle(reg, request(user="a", contacts=(), cseq=3)).status == 200
    r = handle(reg, request(user="b", contacts=("<sip:b@192.0.2.7>;expires=0", "<sip:b2@h>"),
                            cseq=2))
    assert r.status == 200 and list(contacts_of(r)) == ["sip:b2@h"]
    assert handle(reg, request(user="c", contacts=("*",), expires=0, cseq=2)).status == 200
    assert handle(reg, request(user="d", contacts=("<sip:d@192.0.2.7>",), cseq=2)).status == 200
    reg.configure(max_bindings=0)                   # 0: no limit
    assert handle(reg, request(user="e", contacts=("<sip:e@h>",))).status == 200
    with pytest.raises(ValueError):
        reg.configure(max_bindings=-1)
