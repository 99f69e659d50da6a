"""The public parser API: tables of (input, expected) and of (input, error, offset)."""
import pytest

import fastsip
from fastsip import (
    BadContact,
    BadContentLength,
    BadCSeq,
    BadHeader,
    BadNameAddr,
    BadStartLine,
    BadURI,
    BadVersion,
    BadVia,
    LimitExceeded,
    MessageTooLarge,
    ParseError,
)


def msg(*lines, body=b""):
    head = "\r\n".join(lines).encode() + b"\r\n\r\n"
    return head + body


BASE = [
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK776asdhds;rport",
    "Max-Forwards: 70",
    "To: Bob <sip:bob@example.com>",
    "From: Bob <sip:bob@example.com>;tag=456248",
    "Call-ID: 843817637684230@998sdasdh09",
    "CSeq: 1826 REGISTER",
    "Contact: <sip:bob@192.0.2.7:5060>",
    "Expires: 7200",
    "Content-Length: 0",
]


def with_header(name, value, drop=()):
    drop = {d.lower() for d in drop}
    return msg(*[line for line in BASE if line.split(":")[0].lower() not in drop], f"{name}: {value}")


# -- request and response lines ------------------------------------------------

def test_request_fields(softphone_register):
    m = fastsip.parse(softphone_register)
    assert isinstance(m, fastsip.Request)
    assert (m.method, m.uri) == ("REGISTER", "sip:sip.example.com")
    assert m.call_id == "843817637684230@998sdasdh09.softphone.example.org"
    assert (m.cseq.seq, m.cseq.method) == (1826, "REGISTER")
    assert m.to.uri == "sip:alice@sip.example.com" and m.to.tag is None
    assert m.to.display_name == "Alice Liddell"
    assert (m.from_.uri, m.from_.tag) == ("sip:alice@sip.example.com", "9fxced76sl3kq0bw")
    assert [c.uri for c in m.contacts] == ["sip:alice@192.168.1.23:5060;transport=udp;ob",
                                          "sip:alice@10.20.30.40:5062;transport=udp"]
    assert [c.expires for c in m.contacts] == [3600, 1800]
    assert [c.q for c in m.contacts] == [None, 0.5]
    assert m.contacts[0].instance == "<urn:uuid:00000000-0000-1000-8000-0050b6f1a2c3>"
    assert m.contacts[0].reg_id == 1 and m.contacts[1].reg_id is None
    assert m.contacts[1].display_name == "Alice (mobile)"
    assert m.expires == 3600
    assert m.max_forwards == 70
    assert m.supported == ["outbound", "path", "gruu", "replaces"]
    assert m.user_agent.startswith("ExampleSoftphone/3.14.2")
    assert m.body == b"" and m.content_length == 0
    via = m.via[0]
    assert (via.transport, via.host, via.port) == ("UDP", "192.168.1.23", 5060)
    assert via.branch == "z9hG4bKPj3a1f8c2e6d4b4e0f9a7c5e3b1d2f4a6c"
    assert via.params == {"rport": None, "branch": via.branch}
    assert bytes(m) == softphone_register


def test_response_fields():
    m = fastsip.parse(b"SIP/2.0 423 Interval Too Brief\r\nMin-Expires: 60\r\nl: 0\r\n\r\n")
    assert isinstance(m, fastsip.Response)
    assert (m.status, m.reason, m.min_expires) == (423, "Interval Too Brief", 60)


def test_absent_headers_are_none():
    m = fastsip.parse(b"OPTIONS sip:a@b SIP/2.0\r\n\r\n")
    assert (m.call_id, m.cseq, m.to, m.from_, m.expires, m.max_forwards) == (None,) * 6
    assert (m.contacts, m.via, m.require, m.path, m.authorization) == ([], [], [], [], [])
    assert m.headers.get("X-Nothing") is None and m.headers.getall("Via") == []


def test_leading_crlf_ignored_and_bare_lf_accepted():
    m = fastsip.parse(b"\r\n\r\nOPTIONS sip:a@b SIP/2.0\nCall-ID: x\n\n")
    assert (m.method, m.call_id) == ("OPTIONS", "x")


@pytest.mark.parametrize("line,err,offset", [
    (b"REGISTER  sip:a SIP/2.0", BadStartLine, 9),          # two spaces
    (b"REGISTER sip:a SIP/2.0 ", BadStartLine, 15),         # trailing space
    (b"REGISTER <sip:a SIP/2.0", BadStartLine, 15),         # unclosed <
    (b"REGISTER sip:a", BadStartLine, 14),                  # no version
    (b"REGISTER sip:a SIP/3.0", BadVersion, 15),
    (b"SIP/7.0 200 OK", BadVersion, 0),
    (b"SIP/2.0 2000 OK", BadStartLine, 8),
    (b"SIP/2.0 099 Low", BadStartLine, 8),
    (b"REG\x01STER sip:a SIP/2.0", BadStartLine, 3),
    (b"REGISTER 1sip:a SIP/2.0", BadStartLine, 9),
    (b"", BadStartLine, 4),             # nothing but CRLFs
])
def test_bad_start_line(line, err, offset):
    with pytest.raises(err) as exc:
        fastsip.parse(line + b"\r\n\r\n")
    assert exc.value.offset == offset
    assert type(exc.value) is err


def test_bracketed_request_uri_tolerated_by_parse_refused_by_validate():
    # Net::SIP over TCP sends "REGISTER <sip:host;transport=tcp> SIP/2.0"
    m = fastsip.parse(b"REGISTER <sip:127.0.0.1:5271;transport=tcp> SIP/2.0\r\n\r\n")
    assert m.uri == "sip:127.0.0.1:5271;transport=tcp"
    with pytest.raises(BadStartLine) as exc:
        m.validate()
    assert exc.value.offset == 9


def test_version_error_is_505():
    with pytest.raises(ParseError) as exc:
        fastsip.parse(b"REGISTER sip:a SIP/2.1\r\n\r\n")
    assert exc.value.status == 505


# -- header section --------------------------------------------------------------

def test_compact_forms_and_case():
    m = fastsip.parse(msg("REGISTER sip:a SIP/2.0", "v: SIP/2.0/TCP h;branch=z9hG4bK1",
                          "f: <sip:a@b>;tag=1", "t: sip:a@b", "i: cid", "CSEQ: 2 REGISTER",
                          "m: <sip:a@h>", "k: path", "l: 0", "EXPIRES: 60"))
    assert m.headers.get("Contact") == "<sip:a@h>"
    assert m.headers.get("contact") == m.headers.get("m") == m.headers["M"]
    assert "Content-Length" in m.headers and "x-foo" not in m.headers
    assert (m.call_id, m.cseq.seq, m.to.uri, m.from_.tag, m.expires) == ("cid", 2, "sip:a@b", "1", 60)
    assert m.supported == ["path"] and m.via[0].transport == "TCP"


def test_getall_one_value_per_line_in_order():
    m = fastsip.parse(msg("OPTIONS sip:a SIP/2.0", "Accept: a/b", "X-Y: 1", "accept: c/d, e/f",
                          "X-y: 2"))
    assert m.headers.getall("Accept") == ["a/b", "c/d, e/f"]
    assert m.headers.getall("x-y") == ["1", "2"]
    assert m.headers.items()[1] == ("X-Y", "1")
    assert len(m.headers) == 4


def test_folding_and_whitespace_around_colon():
    m = fastsip.parse(b"OPTIONS sip:a SIP/2.0\r\nSubject :\r\n  folded\r\n\tover lines \r\n"
                      b"To:\r\n <sip:a@b>\r\n\r\n")
    assert m.headers.get("Subject") == "folded over lines"
    assert m.to.uri == "sip:a@b"


@pytest.mark.parametrize("data,err,offset", [
    (b"OPTIONS sip:a SIP/2.0\r\n folded-first: x\r\n\r\n", BadHeader, 23),
    (b"OPTIONS sip:a SIP/2.0\r\nNo colon here\r\n\r\n", BadHeader, 26),
    (b"OPTIONS sip:a SIP/2.0\r\n: empty name\r\n\r\n", BadHeader, 23),
    (b"OPTIONS sip:a SIP/2.0\r\nX: a\rb\r\n\r\n", None, None),     # CR inside a value is data
    (b"OPTIONS sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n", BadContentLength, 39),
    (b"OPTIONS sip:a SIP/2.0\r\nl: 5\r\nl: 6\r\n\r\nabcdef", BadContentLength, 32),
    (b"OPTIONS sip:a SIP/2.0\r\nl: 9\r\n\r\nabc", BadContentLength, 26),
    (b"OPTIONS sip:a SIP/2.0\r\nl: 99999999999999999999\r\n\r\n", BadContentLength, 26),
])
def test_bad_header_section(data, err, offset):
    if err is None:
        fastsip.parse(data)
        return
    with pytest.raises(err) as exc:
        fastsip.parse(data)
    assert exc.value.offset == offset


def test_body_is_content_length_bytes_and_trailing_octets_ignored():
    m = fastsip.parse(b"MESSAGE sip:a SIP/2.0\r\nl: 3\r\n\r\nabcJUNK")
    assert m.body == b"abc" and bytes(m).endswith(b"\r\n\r\nabc")


def test_body_without_content_length_runs_to_end():
    m = fastsip.parse(b"MESSAGE sip:a SIP/2.0\r\nc: text/plain\r\n\r\nhello\r\n")
    assert m.body == b"hello\r\n" and m.content_length is None


def test_no_blank_line_headers_run_to_end():
    m = fastsip.parse(b"OPTIONS sip:a SIP/2.0\r\nCall-ID: x\r\n")
    assert m.call_id == "x" and m.body == b""


# -- typed values -------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("<sip:a@h>, <sip:b@h>;expires=5", [("sip:a@h", None), ("sip:b@h", 5)]),
    ('"x, y" <sip:a@h;lr>;q=0.7, sip:c@h;expires=0', [("sip:a@h;lr", None), ("sip:c@h", 0)]),
    ("sip:c@h;transport=tcp", [("sip:c@h", None)]),          # params of an addr-spec: header's
    ("<sip:a@[2001:db8::1]:5060>", [("sip:a@[2001:db8::1]:5060", None)]),
    ('"quote \\" comma," <sip:a@h>', [("sip:a@h", None)]),
    ("<sip:a@h>;expires=99999999999", [("sip:a@h", 4294967295)]),
    ("tel:+1555", [("tel:+1555", None)]),
])
def test_contact_values(value, expected):
    m = fastsip.parse(with_header("Contact", value, drop=["Contact"]))
    assert [(c.uri, c.expires) for c in m.contacts] == expected


def test_contacts_across_lines_and_params():
    m = fastsip.parse(msg("REGISTER sip:a SIP/2.0", "Contact: <sip:a@h>;Expires=10;FOO=\"B a\";bar",
                          "m: <sip:b@h>"))
    assert [c.uri for c in m.contacts] == ["sip:a@h", "sip:b@h"]
    assert m.contacts[0].params == {"expires": "10", "foo": "B a", "bar": None}
    assert m.contacts[0].expires == 10


def test_star_contact():
    m = fastsip.parse(with_header("Contact", "*", drop=["Contact"]))
    [c] = m.contacts
    assert c.is_star and c.uri == "*"
    m = fastsip.parse(with_header("Contact", "<sip:a@h>", drop=["Contact"]))
    assert not m.contacts[0].is_star


@pytest.mark.parametrize("value,offset_in_value", [
    ("<sip:a@h>;;", 10),              # empty parameter
    ("<sip:a@h", 8),                   # unclosed <
    ("< sip:a@h>", 1),                 # space inside <>
    ('"unterminated <sip:a@h>', 0),
    ("Bell, Alexander <sip:a@h>", 0),  # unquoted display name with a comma
    ("sip:a@h?Route=x", 7),            # addr-spec with headers needs <>
    ("<sip:a@h>,", 10),                # empty value after ','
    ("<sip:a@h> junk", 10),
    ("<noscheme>", 1),
])
def test_bad_contact(value, offset_in_value):
    data = with_header("Contact", value, drop=["Contact"])
    with pytest.raises(BadContact) as exc:
        _ = fastsip.parse(data).contacts
    assert exc.value.offset == data.index(b"Contact: " + value.encode()) + 9 + offset_in_value


def test_bad_contact_params_raise_on_access():
    m = fastsip.parse(with_header("Contact", "<sip:a@h>;expires=soon;q=2;reg-id=x", drop=["Contact"]))
    c = m.contacts[0]
    for attr in ("expires", "q", "reg_id"):
        with pytest.raises(BadContact):
            getattr(c, attr)


@pytest.mark.parametrize("q,expected", [("0", 0.0), ("1", 1.0), ("0.5", 0.5), ("0.123", 0.123),
                                        ("1.000", 1.0)])
def test_qvalues(q, expected):
    m = fastsip.parse(with_header("Contact", f"<sip:a@h>;q={q}", drop=["Contact"]))
    assert m.contacts[0].q == expected


@pytest.mark.parametrize("q", ["1.5", "0.1234", "2", ".5", "0.", "1.001"])
def test_bad_qvalues(q):
    m = fastsip.parse(with_header("Contact", f"<sip:a@h>;q={q}", drop=["Contact"]))
    if q == "0.":
        assert m.contacts[0].q == 0.0      # "0" "." 0*3DIGIT allows no digits
        return
    with pytest.raises(BadContact):
        _ = m.contacts[0].q


@pytest.mark.parametrize("name,value,attr,err", [
    ("CSeq", "99999999999 REGISTER", "cseq", BadCSeq),
    ("CSeq", "1 INVITE", "cseq", BadCSeq),
    ("CSeq", "1REGISTER", "cseq", BadCSeq),
    ("CSeq", "x REGISTER", "cseq", BadCSeq),
    ("Expires", "soon", "expires", fastsip.BadExpires),
    ("Expires", "-1", "expires", fastsip.BadExpires),
    ("Call-ID", "has space", "call_id", BadHeader),
    ("To", '"Watson, Thomas" < sip:t@example.org >', "to", BadNameAddr),
    ("To", "<sip:a@b>, <sip:c@d>", "to", BadNameAddr),
    ("Via", "SIP/2.0/UDP h;;", "via", BadVia),
    ("Via", "SIP/2.0 h", "via", BadVia),
    ("Via", "SIP/2.0/UDP h:99999", "via", BadVia),
    ("Require", "a,,b", "require", BadHeader),
    # the credentials and challenges too: validate() must catch them, not a later access
    ("Authorization", 'Digest ,,="', "authorization", BadHeader),
    ("Proxy-Authorization", 'Digest username="bob', "proxy_authorization", BadHeader),
    ("WWW-Authenticate", 'Digest realm="r" nonce="n"', "www_authenticate", BadHeader),
])
def test_bad_typed_values(name, value, attr, err):
    m = fastsip.parse(with_header(name, value, drop=[name]))
    with pytest.raises(err) as exc:
        getattr(m, attr)
    assert exc.value.offset is not None
    with pytest.raises(err):
        m.validate()


def test_single_valued_header_with_two_values_raises_on_access():
    m = fastsip.parse(with_header("Call-ID", "other"))
    with pytest.raises(BadHeader) as exc:
        _ = m.call_id
    assert "Call-ID" in str(exc.value)
    same = fastsip.parse(with_header("Call-ID", "843817637684230@998sdasdh09"))
    assert same.call_id == "843817637684230@998sdasdh09"


def test_expires_clamps_overlarge_values():
    assert fastsip.parse(with_header("Expires", "4294967296000", drop=["Expires"])).expires == 4294967295


def test_via_list_and_ipv6():
    m = fastsip.parse(with_header("Via", "SIP / 2.0 / TCP [2001:db8::9:1]:5061 ; branch=z9hG4bKa ;"
                                  " received=2001:db8::9:255, SIP/2.0/UDP h2", drop=["Via"]))
    a, b = m.via
    assert (a.protocol, a.transport, a.host, a.port, a.branch) == (
        "SIP/2.0", "TCP", "[2001:db8::9:1]", 5061, "z9hG4bKa")
    assert a.params["received"] == "2001:db8::9:255"
    assert (b.host, b.port, b.branch) == ("h2", None, None)


def test_token_lists_and_auth():
    m = fastsip.parse(msg("REGISTER sip:a SIP/2.0", "Require: path, outbound", "Require: gruu",
                          "Path: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
                          'Authorization: Digest username="bob", realm="example.com", nonce="n", '
                          'uri="sip:example.com", response="0123"'))
    assert m.require == ["path", "outbound", "gruu"]
    assert [p.uri for p in m.path] == ["sip:p1.example.com;lr", "sip:p2.example.com;lr"]
    [cred] = m.authorization
    assert cred.scheme == "Digest" and cred.params["username"] == "bob"


def test_date():
    m = fastsip.parse(with_header("Date", "Sat, 13 Nov 2010 23:29:00 GMT"))
    assert m.date.year == 2010 and m.date.tzinfo is not None
    with pytest.raises(BadHeader):
        _ = fastsip.parse(with_header("Date", "Sat, 13 Nov 2010 23:29:00 EST")).date


def test_utf8_values_and_nul_in_quoted_display_name():
    m = fastsip.parse(msg("OPTIONS sip:a SIP/2.0", 'To: "Zoë \x00" <sip:a@b>', "Subject: héllo"))
    assert m.to.display_name == "Zoë \x00" and m.headers["Subject"] == "héllo"


# -- URIs -----------------------------------------------------------------------

@pytest.mark.parametrize("text,fields", [
    ("sip:alice@Example.COM", ("sip", "alice", None, "Example.COM", None, "sip:alice@example.com")),
    ("sips:%61lice:pw@h.example.com:5061;transport=tcp?subject=x",
     ("sips", "alice", "pw", "h.example.com", 5061, "sip:alice@h.example.com")),   # the AOR: sip (RFC 5630)
    ("sip:user;par=u%40example.net@example.com",
     ("sip", "user;par=u@example.net", None, "example.com", None,
      "sip:user;par=u@example.net@example.com")),
    ("sip:[2001:db8::10]:5070", ("sip", None, None, "[2001:db8::10]", 5070, "sip:[2001:db8::10]")),
    ("sip:null-%00-null@example.com", ("sip", "null-\x00-null", None, "example.com", None,
                                        "sip:null-\x00-null@example.com")),
    ("SIP:Bob@H", ("sip", "Bob", None, "H", None, "sip:Bob@h")),
])
def test_parse_uri(text, fields):
    u = fastsip.parse_uri(text)
    assert (u.scheme, u.user, u.password, u.host, u.port, u.aor) == fields
    assert str(u) == text


def test_uri_params_and_headers():
    u = fastsip.parse_uri("sip:a@h;Transport=TCP;lr;n%61me=v%61lue?Route=%3Csip:x%3E&subject=hi")
    assert u.params == {"transport": "TCP", "lr": None, "name": "value"}
    assert u.headers == {"Route": "<sip:x>", "subject": "hi"}


@pytest.mark.parametrize("text,offset,status", [
    ("sip:2001:db8::10", 9, 400),   # IPv6 without brackets
    ("sip:a@h:99999", 8, 400),
    ("sip:a b@h", 5, 400),
    ("sip:a@h;", 8, 400),
    ("sip:a%G0@h", 5, 400),
    ("sip:a@", 6, 400),
    ("nosuch:thing", 0, 416),
    ("tel:+15551234", 0, 416),
    ("sip", 0, 400),
    ("sip:a\ud800@h", 5, 400),     # a lone surrogate: not encodable, never a URI character
])
def test_bad_uri(text, offset, status):
    with pytest.raises(BadURI) as exc:
        fastsip.parse_uri(text)
    assert (exc.value.offset, exc.value.status) == (offset, status)


# -- errors ----------------------------------------------------------------------

def test_error_message_has_offset_and_caret():
    data = with_header("Contact", "<sip:a@h>;;", drop=["Contact"])
    with pytest.raises(ParseError) as exc:
        _ = fastsip.parse(data).contacts
    text = str(exc.value)
    first, line, caret = text.split("\n")
    assert first == f"bad Contact header (byte {exc.value.offset})"
    assert line.strip() == "Contact: <sip:a@h>;;"
    assert caret.index("^") == line.index(";;") + 1
    assert isinstance(exc.value, ValueError) and exc.value.status == 400


def test_parse_rejects_non_bytes():
    with pytest.raises(TypeError):
        fastsip.parse("REGISTER sip:a SIP/2.0\r\n\r\n")
    assert fastsip.parse(bytearray(b"OPTIONS sip:a SIP/2.0\r\n\r\n")).method == "OPTIONS"
    assert fastsip.parse(memoryview(b"OPTIONS sip:a SIP/2.0\r\n\r\n")).method == "OPTIONS"


def test_bytes_subclasses_are_bytes():
    class Datagram(bytes):
        pass
    assert fastsip.parse(Datagram(b"OPTIONS sip:a SIP/2.0\r\n\r\n")).method == "OPTIONS"
    assert fastsip.parse_uri(Datagram(b"sip:a@H")).aor == "sip:a@h"


# -- limits -------------------------------------------------------------------------

def test_limits_name_themselves():
    p = fastsip.Parser(max_size=100, max_headers=3, max_line=50, max_contacts=2, max_uri=20)
    with pytest.raises(MessageTooLarge) as exc:
        p.parse(b"OPTIONS sip:a SIP/2.0\r\n" + b"X: y\r\n" * 30)
    assert "max_size (100)" in str(exc.value) and exc.value.status == 513
    with pytest.raises(LimitExceeded, match=r"max_headers \(3\)"):
        p.parse(b"OPTIONS sip:a SIP/2.0\r\n" + b"X: y\r\n" * 4)
    with pytest.raises(LimitExceeded, match=r"max_line \(50"):
        p.parse(b"OPTIONS sip:a SIP/2.0\r\nX: " + b"y" * 60 + b"\r\n")
    with pytest.raises(LimitExceeded, match=r"max_uri \(20"):
        p.parse(b"OPTIONS sip:" + b"a" * 30 + b" SIP/2.0\r\n\r\n")
    m = p.parse(b"REGISTER sip:a SIP/2.0\r\nm: <sip:a@b>,<sip:c@d>,<sip:e@f>\r\n\r\n")
    with pytest.raises(LimitExceeded, match=r"max_contacts \(2\)"):
        _ = m.contacts
    assert fastsip.Parser().limits["max_size"] == 65535


def test_many_headers_beyond_inline_storage():
    lines = ["OPTIONS sip:a SIP/2.0"] + [f"X-{i}: {i}" for i in range(200)] + ["Call-ID: last"]
    m = fastsip.parse(msg(*lines))
    assert len(m.headers) == 201 and m.headers.get("X-199") == "199" and m.call_id == "last"
