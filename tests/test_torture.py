"""RFC 4475 and RFC 5118 torture messages (tests/vectors/torture, with its manifest).

Syntax-layer "accept" messages parse and validate; syntax-layer "reject" messages
raise ParseError (from parse() or from validate(), which builds every typed
value).  Transaction- and application-layer messages parse, except the two whose defect
the parser itself detects (PARSER_REJECTS); the registrar tests judge the
semantics of the rest.
"""
import pytest

import fastsip
from conftest import torture_bytes, torture_entries

ENTRIES = torture_entries()

# RFC 5118 archive defect (see tests/vectors/torture/README.md): the archived
# body is shorter than the declared Content-Length, so the file as stored is
# rejected by the framing rule; with the Content-Length the RFC meant, it parses.
SHORT_BODY_IN_ARCHIVE = {"rfc5118/ipv6-in-sdp"}


def parse_all(data):
    return fastsip.parse(data).validate()


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["layer"] == "syntax"],
                         ids=lambda e: e["file"])
def test_syntax_verdict(entry):
    data = torture_bytes(entry)
    if entry["file"] in SHORT_BODY_IN_ARCHIVE:
        with pytest.raises(fastsip.BadContentLength):
            fastsip.parse(data)
        head, _, body = data.partition(b"\r\n\r\n")
        head = head.replace(b"Content-Length: 268", b"Content-Length: %d" % len(body))
        parse_all(head + b"\r\n\r\n" + body)
        return
    if entry["expect"] == "accept":
        parse_all(data)
    else:
        with pytest.raises(fastsip.ParseError) as exc:
            parse_all(data)
        assert 0 <= exc.value.offset <= len(data)
        assert exc.value.status in (400, 505, 513)


# Transaction- and application-layer messages: the manifest's `expect` is the
# outcome at that layer (the registrar's answer, judged in test_registrar_vectors.py),
# and its note says the parser must not break.  Most are well formed and must parse;
# these two carry a defect the parser itself detects, and it refuses them with the
# 400 the RFC asks for.  Every other non-syntax message must parse and validate.
PARSER_REJECTS = {
    # several Call-ID, To, From, Max-Forwards and CSeq values: the first conflict found
    "rfc4475/multi01.dat": (fastsip.BadHeader, "conflicting Call-ID headers"),
    # two conflicting Content-Length values: a framing error
    "rfc4475/mcl01.dat": (fastsip.BadContentLength, "conflicting Content-Length headers"),
}
OTHER_LAYERS = [e for e in ENTRIES if e["layer"] != "syntax"]


def test_parser_rejects_are_manifest_rejects():
    by_file = {e["file"]: e for e in OTHER_LAYERS}
    for name in PARSER_REJECTS:
        assert by_file[name]["expect"] == "reject", name


@pytest.mark.parametrize("entry", OTHER_LAYERS, ids=lambda e: e["file"])
def test_other_layers_parser_verdict(entry):
    data = torture_bytes(entry)
    if entry["file"] in PARSER_REJECTS:
        error, message = PARSER_REJECTS[entry["file"]]
        with pytest.raises(error, match=message) as exc:
            parse_all(data)
        assert exc.value.status == 400 and 0 <= exc.value.offset <= len(data)
    else:
        m = parse_all(data)
        start = data.split(b" ", 1)[0].decode()
        if start == "SIP/2.0":
            assert isinstance(m, fastsip.Response)
        else:
            assert isinstance(m, fastsip.Request) and m.method == start


def by_name(name):
    return next(torture_bytes(e) for e in ENTRIES if e["file"] == name)


def test_wsinv_values():
    m = parse_all(by_name("rfc4475/wsinv.dat"))
    assert m.to.uri == "sip:vivekg@chair-dnrc.example.com" and m.to.tag == "1918181833n"
    assert m.from_.display_name == 'J Rosenberg \\"' and m.from_.tag == "98asjd8"
    assert m.max_forwards == 68 and (m.cseq.seq, m.cseq.method) == (9, "INVITE")
    assert [v.branch for v in m.via] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert [v.transport for v in m.via] == ["UDP", "TCP", "UDP"]
    [c] = m.contacts
    assert c.display_name == 'Quoted string ""' and c.q == 0.33
    assert c.params["newparam"] == "newvalue" and "secondparam" in c.params
    assert m.headers["NewFangledHeader"] == "newfangled value continued newfangled value"
    assert m.headers["UnknownHeaderWithUnusualValue"] == ";;,,;;,;"
    assert m.headers["s"] == "" and len(m.body) == 150


def test_esc02_has_two_contacts_and_unknown_method():
    m = parse_all(by_name("rfc4475/esc02.dat"))
    assert m.method == "RE%47IST%45R"
    assert [c.uri for c in m.contacts] == ["sip:alias1@host1.example.com",
                                          "sip:alias3@host3.example.com"]


def test_escapes_unescape_in_aor_only():
    m = parse_all(by_name("rfc4475/escnull.dat"))
    assert fastsip.parse_uri(m.to.uri).aor == "sip:null-\x00-null@example.com"
    assert [c.uri for c in m.contacts] == ["sip:%00@host5.example.com", "sip:%00%00@host5.example.com"]
    m = parse_all(by_name("rfc4475/esc01.dat"))
    assert fastsip.parse_uri(m.to.uri).aor == "sip:user@example.com"


def test_cparam_contact_params_vs_uri_params():
    m1 = parse_all(by_name("rfc4475/cparam01.dat"))
    assert m1.contacts[0].uri == "sip:+19725552222@gw1.example.net"
    assert "unknownparam" in m1.contacts[0].params
    m2 = parse_all(by_name("rfc4475/cparam02.dat"))
    assert m2.contacts[0].uri == "sip:+19725552222@gw1.example.net;unknownparam"


def test_dblreq_ignores_trailing_octets():
    data = by_name("rfc4475/dblreq.dat")
    m = parse_all(data)
    assert m.method == "REGISTER" and m.body == b"" and b"INVITE" not in bytes(m)


def test_mpart01_binary_body_framed_by_content_length():
    m = parse_all(by_name("rfc4475/mpart01.dat"))
    assert len(m.body) == m.content_length and b"\x00" in m.body


def test_response_reasons():
    assert parse_all(by_name("rfc4475/unreason.dat")).reason.startswith("= 2**3 * 5**2 но сто")
    assert parse_all(by_name("rfc4475/noreason.dat")).reason == ""


def test_ipv6_uris():
    m = parse_all(by_name("rfc5118/port-unambiguous"))
    u = fastsip.parse_uri(m.uri)
    assert (u.host, u.port) == ("[2001:db8::10]", 5070)
    u = fastsip.parse_uri(parse_all(by_name("rfc5118/port-ambiguous")).uri)
    assert (u.host, u.port) == ("[2001:db8::10:5070]", None)
