"""The redirect server (RFC 3261 8.3): Registrar(redirect=True) answers requests other
than REGISTER, ACK and OPTIONS for an AOR of its domains with 302 to the contacts,
480 without any, 404 for a foreign domain or an unknown user; with a fake clock."""
import pytest

import fastsip
from fastsip import Authorize, Registrar
from fastsip.core._core import shard_of
from test_registrar import NOW, SRC, request

REDIRECT_LIMIT = 65507          # the largest UDP payload: a 302 never exceeds it


def invite(ruri="sip:alice@example.com", to=None, method="INVITE", call_id="inv-1", extra=()):
    """A request as a proxy forwards it: From the caller, To the callee (``to``,
    default the Request-URI without its parameters)."""
    lines = [f"{method} {ruri} SIP/2.0",
             "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK-proxy-1",
             "Via: SIP/2.0/UDP 192.0.2.9:5070;branch=z9hG4bK-caller-1;received=192.0.2.9",
             "Max-Forwards: 69",
             "From: \"Carol\" <sip:carol@example.net>;tag=c1",
             f"To: {to or '<' + ruri.split(';')[0] + '>'}",
             f"Call-ID: {call_id}",
             f"CSeq: 7 {method}",
             "Contact: <sip:carol@192.0.2.9:5070>",
             *extra,
             "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def serve(reg, data, now=NOW):
    reply = reg.serve(data, SRC, now)
    return None if reply is None else fastsip.parse(reply)


def contacts(reply):
    """[(uri, expires, q)] of a 302, in order."""
    return [(c.uri, c.expires, c.q) for c in reply.contacts]


def register(reg, contacts, user="alice", expires=600, now=NOW, call_id="reg-1", **kw):
    raw = reg.serve(request(user=user, contacts=contacts, expires=expires, call_id=call_id,
                            **kw), SRC, now)
    assert raw.startswith(b"SIP/2.0 200 "), raw[:200]
    return raw


@pytest.fixture
def reg():
    return Registrar(min_expires=60, max_expires=3600, domains=["example.com"], redirect=True)


# -- 302 -------------------------------------------------------------------------------------

def test_302_lists_the_contacts_highest_q_first_ties_in_registration_order(reg):
    register(reg, ("<sip:alice@10.0.0.1:5060>;q=0.5", "<sip:alice@10.0.0.2>",
                   "<sip:alice@10.0.0.3;transport=tcp>;q=0.9", "<sip:alice@10.0.0.4>;q=0.5",
                   "<sip:alice@10.0.0.5>;q=1"))
    r = serve(reg, invite())
    assert (r.status, r.reason) == (302, "Moved Temporarily")
    assert contacts(r) == [("sip:alice@10.0.0.2", 600, None), ("sip:alice@10.0.0.5", 600, 1.0),
                           ("sip:alice@10.0.0.3;transport=tcp", 600, 0.9),
                           ("sip:alice@10.0.0.1:5060", 600, 0.5), ("sip:alice@10.0.0.4", 600, 0.5)]
    req = fastsip.parse(invite())
    # a response of the INVITE's transaction: Via (received added), From, To with a tag,
    # Call-ID and CSeq copied; no body
    assert [v.branch for v in r.via] == [v.branch for v in req.via]
    assert r.via[0].params["received"] == SRC[0]
    assert r.from_.tag == "c1" and r.to.uri == "sip:alice@example.com" and r.to.tag
    assert r.call_id == "inv-1" and (r.cseq.seq, r.cseq.method) == (7, "INVITE")
    assert r.headers["Date"] == "Wed, 26 Nov 2025 00:00:00 GMT" and r.body == b""
    assert reg.stats()["redirects"] == {"moved": 1}
    assert reg.stats()["replies"][302] == 1


def test_expires_counts_down_and_a_lapsed_binding_is_gone(reg):
    register(reg, ("<sip:alice@10.0.0.1>",), expires=600)
    register(reg, ("<sip:alice@10.0.0.2>",), expires=100, call_id="reg-2", now=NOW + 50)
    r = serve(reg, invite(), now=NOW + 100)
    assert contacts(r) == [("sip:alice@10.0.0.1", 500, None), ("sip:alice@10.0.0.2", 50, None)]
    r = serve(reg, invite(), now=NOW + 149.8)      # 0.2 s left: still listed, as 1 s
    assert contacts(r)[1] == ("sip:alice@10.0.0.2", 1, None)
    r = serve(reg, invite(), now=NOW + 150)
    assert contacts(r) == [("sip:alice@10.0.0.1", 450, None)]
    assert reg.store.n_bindings == 1                # the lookup dropped the lapsed one
    r = serve(reg, invite(), now=NOW + 600)
    assert (r.status, r.reason) == (480, "Temporarily Unavailable") and r.contacts == []
    assert reg.store.n_bindings == 0


@pytest.mark.parametrize("method", ["INVITE", "MESSAGE", "SUBSCRIBE", "NOTIFY", "REFER", "INFO",
                                    "PUBLISH", "BYE", "UPDATE", "PRACK", "FOO"])
def test_every_method_but_register_ack_options_and_cancel_is_redirected(reg, method):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite(method=method))
    assert r.status == 302 and contacts(r) == [("sip:alice@10.0.0.1", 600, None)]
    assert r.cseq.method == method


def test_neither_instance_reg_id_nor_path_is_listed(reg):
    register(reg, ('<sip:alice@10.0.0.1;transport=tcp>;+sip.instance="<urn:uuid:1>";reg-id=1',),
             extra=("Supported: path, outbound", "Path: <sip:edge.example.com;lr>"))
    raw = reg.serve(invite(), SRC, NOW)
    r = fastsip.parse(raw)
    assert r.status == 302 and contacts(r) == [("sip:alice@10.0.0.1;transport=tcp", 600, None)]
    assert b"instance" not in raw and b"reg-id" not in raw and b"Path" not in raw
    assert b"Require" not in raw


@pytest.mark.parametrize("ruri", [
    "sips:alice@example.com", "sip:alice@EXAMPLE.com:5070", "sip:alice@example.com;transport=tcp",
    "sip:%61lice@example.com", "sips:alice@example.com:5061;transport=tls;user=phone",
])
def test_request_uri_variants_find_the_aor(reg, ruri):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite(ruri))
    assert r.status == 302 and contacts(r) == [("sip:alice@10.0.0.1", 600, None)]


def test_an_aor_registered_under_sips_and_a_port_is_found_by_sip(reg):
    register(reg, ("<sips:alice@10.0.0.1>",), to="<sips:alice@example.com:5061>")
    r = serve(reg, invite("sip:alice@example.com"))
    assert r.status == 302 and contacts(r) == [("sips:alice@10.0.0.1", 600, None)]


def test_the_user_is_case_sensitive(reg):
    register(reg, ("<sip:alice@10.0.0.1>",))
    assert serve(reg, invite("sip:Alice@example.com")).status == 480


def test_the_request_uri_not_the_to_names_the_aor(reg):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite("sip:alice@example.com", to="<sip:someone-else@example.com>"))
    assert r.status == 302 and r.to.uri == "sip:someone-else@example.com"
    assert serve(reg, invite("sip:bob@example.com", to="<sip:alice@example.com>")).status == 480


# -- 480, 404 ---------------------------------------------------------------------------------

def test_480_without_binding_and_after_an_unregister(reg):
    r = serve(reg, invite("sip:nobody@example.com"))
    assert (r.status, r.reason) == (480, "Temporarily Unavailable")
    register(reg, ("<sip:alice@10.0.0.1>",))
    register(reg, ("<sip:alice@10.0.0.1>",), expires=0, call_id="reg-2")
    assert serve(reg, invite()).status == 480
    assert reg.stats()["redirects"] == {"unavailable": 2}


@pytest.mark.parametrize("ruri", ["sip:alice@example.org", "sip:alice@sub.example.com",
                                  "sip:alice@192.0.2.1", "sip:example.net"])
def test_404_for_a_domain_not_served(reg, ruri):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite(ruri))
    assert (r.status, r.reason) == (404, "Not Found (domain not served here)")
    assert reg.stats()["redirects"] == {"not_found": 1}


def test_subdomains_and_any_domain():
    reg = Registrar(domains=["*.example.com"], redirect=True)
    assert serve(reg, invite("sip:alice@a.example.com")).status == 480
    assert serve(reg, invite("sip:alice@example.com")).status == 404
    anyone = Registrar(redirect=True)
    assert serve(anyone, invite("sip:alice@anywhere.example")).status == 480


def test_an_aor_too_long_to_register_is_not_found(reg):
    assert serve(reg, invite("sip:" + "a" * 300 + "@example.com")).status == 404


def test_aor_by_user_accepts_the_servers_own_address():
    reg = Registrar(domains=["example.com"], addresses=["192.0.2.1"], aor_by="user",
                    redirect=True)
    register(reg, ("<sip:alice@10.0.0.1>",))
    assert serve(reg, invite("sip:alice@192.0.2.1")).status == 302
    assert serve(reg, invite("sip:alice@192.0.2.2")).status == 404
    host = Registrar(domains=["example.com"], addresses=["192.0.2.1"], redirect=True)
    assert serve(host, invite("sip:alice@192.0.2.1")).status == 404


@pytest.mark.parametrize("users", [
    {"alice": "wonderland", "bob": "builder"},                       # passwords
    {("alice", "example.com"): "0" * 32, ("bob", "example.com", "SHA-256"): "1" * 64},
    lambda user, realm: {"alice": "w", "bob": "b"}.get(user) if realm == "example.com" else None,
], ids=["passwords", "htdigest", "callable"])
def test_with_a_user_list_an_unknown_user_is_404_a_known_one_480(users):
    reg = Registrar(domains=["example.com"], authorize=Authorize(users=users), redirect=True)
    r = serve(reg, invite("sip:mallory@example.com"))
    assert (r.status, r.reason) == (404, "Not Found")
    assert serve(reg, invite("sip:bob@example.com")).status == 480
    assert serve(reg, invite("sip:example.com")).status == 404          # no user at all
    assert reg.stats()["redirects"] == {"unknown_user": 2, "unavailable": 1}


def test_the_user_list_is_of_the_configured_realm():
    auth = Authorize(realm="voip", users={("alice", "voip"): "0" * 32})
    reg = Registrar(domains=["example.com"], authorize=auth, redirect=True)
    assert serve(reg, invite("sip:alice@example.com")).status == 480
    assert auth.knows("alice", "example.com") and not auth.knows("bob", "example.com")
    assert not Authorize(users={("alice", "voip"): "0" * 32}).knows("alice", "example.com")


def test_an_authorize_without_a_user_list_is_no_user_list():
    class Check:                    # any object with Authorize's check, but no knows
        def check(self, *args):
            raise AssertionError("a redirect is not authenticated")
    reg = Registrar(domains=["example.com"], authorize=Check(), redirect=True)
    assert serve(reg, invite("sip:mallory@example.com")).status == 480


def test_a_request_for_the_contact_itself_is_not_redirected_to_it(reg):
    """RFC 3261 8.3: never a redirect to the Request-URI (a loop): 404 when the
    only contact is the Request-URI, else the others."""
    register(reg, ("<sip:alice@example.com>",))
    r = serve(reg, invite("sip:alice@example.com"))
    assert (r.status, r.reason) == (404, "Not Found") and r.contacts == []
    register(reg, ("<sip:alice@10.0.0.1>",), call_id="reg-2")
    assert contacts(serve(reg, invite("sip:alice@EXAMPLE.COM"))) == [
        ("sip:alice@10.0.0.1", 600, None)]
    assert reg.stats()["redirects"] == {"loop": 1, "moved": 1}


# -- what is not redirected -------------------------------------------------------------------

def test_options_and_ack_are_unchanged(reg):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite(method="OPTIONS"))
    assert r.status == 200 and r.headers["Allow"] == "REGISTER, OPTIONS" and r.contacts == []
    assert serve(reg, invite(method="ACK")) is None
    assert "redirects" not in reg.stats() or reg.stats()["redirects"] == {}


def test_cancel_gets_481_and_is_never_redirected(reg):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite(method="CANCEL"))
    assert (r.status, r.reason) == (481, "Call/Transaction Does Not Exist") and r.contacts == []
    assert serve(reg, invite("sip:alice@example.org", method="CANCEL")).status == 481


def test_a_request_within_a_dialog_gets_481(reg):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite(method="BYE", to="<sip:alice@example.com>;tag=a1"))
    assert (r.status, r.reason) == (481, "Call/Transaction Does Not Exist")
    assert reg.stats()["redirects"] == {"in_dialog": 1}


def test_unknown_require_gets_420(reg):
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite(extra=("Require: 100rel, path",)))
    assert (r.status, r.headers["Unsupported"]) == (420, "100rel")
    assert serve(reg, invite(extra=("Require: path",))).status == 302
    assert serve(reg, invite(extra=("Require: ,,",))).status == 400


def test_redirect_off_is_405_as_before():
    reg = Registrar(min_expires=60, max_expires=3600, domains=["example.com"])
    assert reg.redirect is False
    register(reg, ("<sip:alice@10.0.0.1>",))
    r = serve(reg, invite())
    assert (r.status, r.headers["Allow"]) == (405, "REGISTER, OPTIONS")
    assert serve(reg, invite(method="CANCEL")).status == 405
    reg.configure(redirect=True)
    assert reg.redirect and serve(reg, invite()).status == 302
    reg.configure(min_expires=30)               # None keeps it
    assert reg.redirect
    reg.configure(redirect=False)
    assert serve(reg, invite()).status == 405
    assert reg.stats()["redirects"] == {"moved": 1}


def test_handle_still_answers_register_only(reg):
    register(reg, ("<sip:alice@10.0.0.1>",))
    assert reg.handle(invite(), SRC, NOW) is None


MALFORMED = [
    b"INVITE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From: <sip:c@x>;tag=1\r\nTo: <sip:alice@example.com>\r\nCSeq: 1 INVITE\r\n\r\n",   # no Call-ID
    b"INVITE sip:alice@example.com SIP/2.0\r\nFrom: <sip:c@x>;tag=1\r\n"
    b"To: <sip:alice@example.com>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n",              # no Via
    b"INVITE tel:+15551234 SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From: <sip:c@x>;tag=1\r\nTo: <tel:+15551234>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n",  # 416
    b"INVITE sip:alice@example.com SIP/3.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From: <sip:c@x>;tag=1\r\nTo: <sip:alice@example.com>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n",
    b"INVITE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From: <sip:c@x>;tag=1\r\nTo: <sip:alice@example.com>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n"
    b"Content-Length: 40\r\n\r\nshort",
    b"INVITE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b" bad fold\r\n\r\n",
    b"INVITE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From: <sip:c@x>;tag=1\r\nTo: <sip:alice@example.com>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n"
    b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_requests_get_the_same_answers_as_without_redirect(data):
    off = Registrar(domains=["example.com"], server=None)
    on = Registrar(domains=["example.com"], server=None, redirect=True)
    for r in (off, on):
        register(r, ("<sip:alice@10.0.0.1>",))
    a, b = off.serve(data, SRC, NOW), on.serve(data, SRC, NOW)
    assert a == b
    assert a is None or a.startswith((b"SIP/2.0 400", b"SIP/2.0 416", b"SIP/2.0 505"))
    assert off.stats()["parse_errors"] == on.stats()["parse_errors"]


def test_a_request_uri_that_is_no_valid_sip_uri_is_400(reg):
    r = serve(reg, invite("sip:alice@example.com:65536"))
    assert (r.status, r.reason) == (400, "Bad Request-URI")


def test_a_bad_to_is_400(reg):
    r = serve(reg, invite(to="<sip:alice@example.com"))
    assert (r.status, r.reason) == (400, "Bad To header")


# -- the size limit ---------------------------------------------------------------------------

def test_a_huge_binding_list_is_cut_to_fit_a_datagram_highest_q_first():
    reg = Registrar(min_expires=60, max_expires=3600, domains=["example.com"], max_contacts=256,
                    redirect=True)
    pad = "x" * 440
    uris = [f"sip:alice-{i:03d}-{pad}@10.0.{i // 250}.{i % 250 + 1}:5060" for i in range(256)]
    # q 0.001 .. 0.256, registered in ascending q: the 302 lists them in reverse
    for k in range(0, 256, 64):
        register(reg, [f"<{u}>;q=0.{i + 1:03d}" for i, u in list(enumerate(uris))[k:k + 64]],
                 call_id=f"reg-{k}")
    assert reg.store.n_bindings == 256
    raw = reg.serve(invite(), SRC, NOW)
    assert len(raw) <= REDIRECT_LIMIT
    r = fastsip.parse(raw)
    listed = contacts(r)
    assert r.status == 302 and 100 < len(listed) < 256
    assert [u for u, _e, _q in listed] == uris[::-1][:len(listed)]
    assert [q for _u, _e, q in listed] == sorted((q for _u, _e, q in listed), reverse=True)
    # one more would not have fitted
    assert len(raw) + len(uris[0]) + 40 > REDIRECT_LIMIT
    assert reg.stats()["redirects_truncated"] == 1 and reg.stats()["redirects"] == {"moved": 1}
    # the 200 to a fetch still lists every binding (as before: above 64 KiB, TCP only)
    assert reg.serve(request(contacts=()), SRC, NOW).count(b"\r\nContact: <") == 256


def test_a_full_binding_list_that_fits_is_not_cut():
    reg = Registrar(domains=["example.com"], max_contacts=256, min_expires=60, max_expires=3600,
                    redirect=True)
    for k in range(0, 256, 64):
        register(reg, [f"<sip:a{i}@10.0.0.1:{5000 + i}>" for i in range(k, k + 64)],
                 call_id=f"reg-{k}")
    raw = reg.serve(invite(), SRC, NOW)        # 256 Contact lines: more than parse()'s max_headers
    assert raw.startswith(b"SIP/2.0 302 ") and raw.count(b"\r\nContact: <sip:a") == 256
    assert reg.stats()["redirects_truncated"] == 0


# -- shards ----------------------------------------------------------------------------------

def _user_of_shard(shard, n=2, prefix="u"):
    return next(f"{prefix}{i}" for i in range(1000)
                if shard_of(f"sip:{prefix}{i}@example.com", n) == shard)


def test_the_request_uri_aor_decides_the_shard_not_the_to():
    ours, theirs = _user_of_shard(0), _user_of_shard(1)
    shards = [Registrar(domains=["example.com"], max_expires=3600, redirect=True)
              for _ in range(2)]
    register(shards[1], (f"<sip:{theirs}@10.0.0.1>",), user=theirs)
    # To names an AOR of shard 0, the Request-URI one of shard 1: handed to 1
    data = invite(f"sip:{theirs}@example.com", to=f"<sip:{ours}@example.com>")
    assert shards[0].serve_shard(data, b"192.0.2.7", 5060, NOW, "udp", -1, 0, 2) == 1
    assert "INVITE" not in shards[0].stats()["requests"]       # counted by the owner only
    # the owner serves what it is handed (0, 1), and what reaches it directly
    for shard, nshards in ((0, 1), (1, 2)):
        r = fastsip.parse(shards[1].serve_shard(data, b"192.0.2.7", 5060, NOW, "udp", -1,
                                                shard, nshards))
        assert r.status == 302 and contacts(r) == [(f"sip:{theirs}@10.0.0.1", 600, None)]
    assert shards[1].stats()["requests"]["INVITE"] == 2
    # a shard-0 Request-URI with a shard-1 To is served at 0 (480: nothing there)
    data = invite(f"sip:{ours}@example.com", to=f"<sip:{theirs}@example.com>")
    r = fastsip.parse(shards[0].serve_shard(data, b"192.0.2.7", 5060, NOW, "udp", -1, 0, 2))
    assert r.status == 480


def test_what_is_not_redirected_is_answered_where_it_arrives():
    theirs = _user_of_shard(1)
    reg = Registrar(domains=["example.com"], redirect=True)
    for method, status in (("OPTIONS", 200), ("CANCEL", 481)):
        r = reg.serve_shard(invite(f"sip:{theirs}@example.com", method=method), b"192.0.2.7",
                            5060, NOW, "udp", -1, 0, 2)
        assert fastsip.parse(r).status == status
    assert reg.serve_shard(invite(f"sip:{theirs}@example.com", method="ACK"), b"192.0.2.7",
                           5060, NOW, "udp", -1, 0, 2) is None
    # malformed: answered here, not handed over
    r = reg.serve_shard(MALFORMED[0].replace(b"alice", theirs.encode()), b"192.0.2.7", 5060, NOW,
                        "udp", -1, 0, 2)
    assert fastsip.parse(r).status == 400
    # without redirect nothing but REGISTER is handed over
    off = Registrar(domains=["example.com"])
    r = off.serve_shard(invite(f"sip:{theirs}@example.com"), b"192.0.2.7", 5060, NOW, "udp", -1,
                        0, 2)
    assert fastsip.parse(r).status == 405


def test_aor_by_user_shards_by_the_user():
    reg = Registrar(domains=["example.com"], aor_by="user", redirect=True)
    user = next(f"u{i}" for i in range(1000) if shard_of(f"sip:u{i}", 2) == 1)
    assert reg.serve_shard(invite(f"sip:{user}@example.com"), b"192.0.2.7", 5060, NOW, "udp", -1,
                           0, 2) == 1
