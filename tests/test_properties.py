"""Property tests (hypothesis): rendering then parsing gives back what was rendered,
and any input either parses or raises ParseError."""
import string

from hypothesis import given, settings, strategies as st

import fastsip
from fastsip.fuzz import exercise

token = st.text(string.ascii_letters + string.digits + "-.!%*_+`'~", min_size=1, max_size=12)
user = st.text(string.ascii_lowercase + string.digits + "-_.", min_size=1, max_size=12)
label = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=10).map(
    lambda s: "h" + s)
host = st.lists(label, min_size=1, max_size=4).map(".".join)
pname = st.text(string.ascii_lowercase + string.digits + "-_.!~*'()", min_size=1, max_size=8)
port = st.none() | st.integers(1, 65535)
display = st.none() | st.text(string.ascii_letters + string.digits + ' ,;:<>@"\\', max_size=16)
lws = st.sampled_from(["", " ", "  ", "\t", "\r\n ", " \r\n\t"])
sws = st.sampled_from(["", " ", "\t"])      # no line break: before a header's colon


def quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def contacts(draw):
    uri = f"sip:{draw(user)}@{draw(host)}"
    p = draw(port)
    if p is not None:
        uri += f":{p}"
    if draw(st.booleans()):
        uri += f";transport={draw(st.sampled_from(['udp', 'tcp', 'TLS']))}"
    name = draw(display)
    expires = draw(st.none() | st.integers(0, 2**32 - 1))
    q = draw(st.none() | st.sampled_from(["0", "0.5", "0.123", "1", "1.0"]))
    text = (quote(name) + draw(lws) if name is not None else "") + f"<{uri}>"
    if expires is not None:
        text += f"{draw(lws)};{draw(lws)}expires{draw(lws)}={draw(lws)}{expires}"
    if q is not None:
        text += f";q={q}"
    return text, (uri, name, expires, None if q is None else float(q))


@st.composite
def registers(draw):
    cs = draw(st.lists(contacts(), max_size=6))
    lines = draw(st.lists(st.integers(1, 3), min_size=len(cs), max_size=len(cs)))
    contact_lines = []
    i = 0
    while i < len(cs):      # group contacts into header lines with comma lists
        n = min(lines[i], len(cs) - i)
        name = draw(st.sampled_from(["Contact", "m", "CONTACT", "contact"]))
        contact_lines.append(f"{name}{draw(sws)}:{draw(lws)}"
                             + f"{draw(lws)},{draw(lws)}".join(c[0] for c in cs[i:i + n]))
        i += n
    aor = f"sip:{draw(user)}@{draw(host)}"
    call_id = draw(token) + "@" + draw(host)
    seq = draw(st.integers(0, 2**32 - 1))
    expires = draw(st.none() | st.integers(0, 2**32 - 1))
    headers = [f"To: <{aor}>", f"From: <{aor}>;tag={draw(token)}", f"Call-ID: {call_id}",
                f"CSeq: {seq} REGISTER", "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK" + draw(token)]
    if expires is not None:
        headers.append(f"Expires: {expires}")
    order = draw(st.permutations(headers + contact_lines))
    pending = iter(contact_lines)      # Contact lines keep their relative order
    order = [next(pending) if h in contact_lines else h for h in order]
    data = ("REGISTER sip:example.com SIP/2.0\r\n" + "\r\n".join(order) + "\r\n\r\n").encode()
    return data, dict(aor=aor, call_id=call_id, seq=seq, expires=expires,
                      contacts=[c[1] for c in cs])


@settings(max_examples=300, deadline=None)
@given(registers())
def test_rendered_register_round_trips(case):
    data, want = case
    m = fastsip.parse(data).validate()
    assert m.to.uri == want["aor"] and m.call_id == want["call_id"]
    assert m.cseq.seq == want["seq"] and m.expires == want["expires"]
    got = [(c.uri, c.display_name, c.expires, c.q) for c in m.contacts]
    assert got == want["contacts"]


@settings(max_examples=300, deadline=None)
@given(user, host, port, st.dictionaries(pname, st.none() | pname, max_size=3))
def test_uri_round_trip(u, h, p, params):
    text = f"sip:{u}@{h}" + (f":{p}" if p else "") + "".join(
        f";{k}" if v is None else f";{k}={v}" for k, v in params.items())
    uri = fastsip.parse_uri(text)
    assert (uri.user, uri.host, uri.port, uri.params) == (u, h, p, params)
    assert uri.aor == f"sip:{u}@{h.lower()}"       # the AOR never has the port


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_parse_error(data):
    exercise(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"REGISTER sip:a SIP/2.0", b"\r\n", b"Contact:", b" <sip:a@b>",
                                 b";expires=", b"9", b",", b'"', b"\\", b"To: ", b"l: 3",
                                 b"\r\n ", b";", b"=", b"*", b"Via: SIP/2.0/UDP h", b"abc"]),
                max_size=40))
def test_sip_shaped_noise_parses_or_parse_error(parts):
    exercise(b"".join(parts))
