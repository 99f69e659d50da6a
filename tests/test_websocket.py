"""SIP over WebSocket, sans-I/O: what a peer sees of WsConnection and WsFramer
(RFC 6455 handshake and frames, RFC 7118's subprotocol).

Client frames are built here by hand (``cframe``) and server frames read back by
hand (``sframes``), and once more by an implementation nobody here wrote: the
sans-I/O client of the ``websockets`` package.
"""
import base64
import hashlib
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

import fastsip
from conftest import require_client
from fastsip import WsConnection, WsFramer

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/WSS df7jal23ls0d.invalid;branch=z9hG4bKasudf;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=65bnmj.34asd\r\n"
    b"Call-ID: aiuy7k9njasd\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: <sip:alice@df7jal23ls0d.invalid;transport=ws>;expires=300\r\n"
    b"Content-Length: 0\r\n\r\n"
)
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="          # RFC 6455 section 1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK = b"\x37\xfa\x21\x3d"


def request(*, method="GET", target="/", version="HTTP/1.1", drop=(), **headers):
    """A client's opening handshake; keyword headers (underscores for dashes)
    replace the defaults, None removes one, ``drop`` removes by name."""
    fields = {"Host": "sip.example.com", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": RFC_KEY, "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Protocol": "sip"}
    for name, value in headers.items():
        fields[name.replace("_", "-")] = value
    lines = ["%s %s %s" % (method, target, version)]
    lines += ["%s: %s" % (k, v) for k, v in fields.items() if v is not None and k not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def cframe(payload, opcode=0x1, *, fin=True, mask=MASK, rsv=0, length=None):
    """A client frame: masked with ``mask`` (None: unmasked), ``length`` to lie."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def sframes(data):
    """Server frames -> [(fin, opcode, payload)]; every one must be unmasked."""
    frames, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80 == 0, "a server frame is masked"
        assert b0 & 0x70 == 0
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            (n,), pos = struct.unpack("!H", data[pos:pos + 2]), pos + 2
        elif n == 127:
            (n,), pos = struct.unpack("!Q", data[pos:pos + 8]), pos + 8
        frames.append((bool(b0 & 0x80), b0 & 0x0F, data[pos:pos + n]))
        assert len(frames[-1][2]) == n, "a server frame is cut short"
        pos += n
    return frames


def close_code(data):
    """The status code of the one close frame in ``data`` (None: a close without code)."""
    [(fin, op, body)] = sframes(data)
    assert fin and op == 0x8
    return struct.unpack("!H", body[:2])[0] if body else None


def http(data):
    """(status, {lower-case name: value}, body) of an HTTP answer, checking its framing."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, "no blank line after the head"
    lines = head.decode("ascii").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    fields = {k.lower(): v for k, v in fields.items()}
    return int(status), fields, body


def opened(**kw):
    ws = WsConnection(**kw)
    out, msgs, closing = ws.receive(request())
    assert http(out)[0] == 101 and not closing
    return ws


# -- the opening handshake -------------------------------------------------------


def test_handshake_answers_101_with_the_rfc_accept_value():
    ws = WsConnection()
    assert not ws.open
    out, msgs, closing = ws.receive(request(Origin="http://example.com"))
    status, fields, body = http(out)
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert fields["sec-websocket-accept"] == RFC_ACCEPT
    assert fields["upgrade"].lower() == "websocket" and fields["connection"].lower() == "upgrade"
    assert fields["sec-websocket-protocol"] == "sip"
    assert "content-length" not in fields and body == b""
    assert (msgs, closing, ws.open, ws.reason, ws.buffered) == ([], False, True, None, 0)


def test_accept_value_is_sha1_of_key_and_guid():
    key = base64.b64encode(os.urandom(16)).decode()
    want = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                            .digest()).decode()
    out, _, _ = WsConnection().receive(request(Sec_WebSocket_Key=key))
    assert http(out)[1]["sec-websocket-accept"] == want


@pytest.mark.parametrize("offer", ["sip", "SIP", "chat, sip", "chat,Sip ,x", "sip.other, sip"])
def test_sip_among_the_offered_subprotocols(offer):
    out, _, closing = WsConnection().receive(request(Sec_WebSocket_Protocol=offer))
    status, fields, _ = http(out)
    assert (status, fields["sec-websocket-protocol"], closing) == (101, "sip", False)


def test_subprotocol_offered_in_two_header_lines():
    data = request().replace(b"Sec-WebSocket-Protocol: sip\r\n",
                             b"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: sip\r\n")
    assert http(WsConnection().receive(data)[0])[0] == 101


@pytest.mark.parametrize("changes,status,reason", [
    ({"Sec_WebSocket_Protocol": None}, 400, "subprotocol"),
    ({"Sec_WebSocket_Protocol": "chat, sips"}, 400, "subprotocol"),
    ({"Sec_WebSocket_Version": "8"}, 426, "version"),
    ({"Sec_WebSocket_Version": None}, 426, "version"),
    ({"Sec_WebSocket_Key": None}, 400, "handshake"),
    ({"Sec_WebSocket_Key": "not base64!"}, 400, "handshake"),
    ({"Sec_WebSocket_Key": base64.b64encode(b"x" * 15).decode()}, 400, "handshake"),
    ({"Sec_WebSocket_Key": base64.b64encode(b"x" * 17).decode()}, 400, "handshake"),
    ({"Host": None}, 400, "handshake"),
    ({"Connection": "keep-alive"}, 400, "handshake"),
    ({"version": "HTTP/1.0"}, 400, "handshake"),
    ({"version": "HTTP/2.0"}, 400, "handshake"),
    ({"method": "POST"}, 405, "http"),
    ({"method": "OPTIONS"}, 405, "http"),
])
def test_handshake_refusals(changes, status, reason):
    ws = WsConnection()
    out, msgs, closing = ws.receive(request(**changes))
    got, fields, body = http(out)
    assert (got, closing, msgs, ws.reason, ws.open) == (status, True, [], reason, False)
    assert fields["connection"] == "close" and int(fields["content-length"]) == len(body) > 0
    if status == 426:
        assert fields["sec-websocket-version"] == "13"
    if status == 405:
        assert fields["allow"] == "GET"
    if reason == "subprotocol":
        assert b"sip" in body
    # the connection is over: what follows is ignored
    assert ws.receive(cframe(REGISTER)) == (b"", [], True)


def test_origin_allow_list():
    origins = ["https://phone.example.com", "http://localhost:8080"]
    for origin, status in [("https://phone.example.com", 101), ("HTTPS://Phone.Example.COM", 101),
                           ("http://localhost:8080", 101), ("https://evil.example.net", 403),
                           ("http://phone.example.com", 403), ("http://localhost:8081", 403),
                           ("null", 403), (None, 101)]:
        ws = WsConnection(origins=origins)
        out, _, closing = ws.receive(request(Origin=origin))
        assert http(out)[0] == status, origin
        assert closing == (status != 101) and ws.reason == (None if status == 101 else "origin")
    # no allow-list: any Origin
    assert http(WsConnection().receive(request(Origin="https://evil.example.net"))[0])[0] == 101


def test_origins_must_be_a_collection():
    with pytest.raises(TypeError):
        WsConnection(origins="https://phone.example.com")


@pytest.mark.parametrize("target,status", [("/", 200), ("/health", 200), ("/health?probe=1", 200),
                                           ("/other", 404), ("/healthz", 404)])
def test_plain_get_is_answered_and_closed(target, status):
    ws = WsConnection()
    out, msgs, closing = ws.receive(b"GET %s HTTP/1.1\r\nHost: sip.example.com\r\n\r\n"
                                    % target.encode())
    got, fields, body = http(out)
    assert (got, closing, ws.reason) == (status, True, "http")
    assert fields["content-type"].startswith("text/plain") and fields["connection"] == "close"
    assert int(fields["content-length"]) == len(body)
    if status == 200:
        assert body == b"fastsip: SIP over WebSocket (RFC 7118) here\n"


def test_plain_get_http10_and_bare_lf():
    out, _, closing = WsConnection().receive(b"GET / HTTP/1.0\n\n")
    assert http(out)[0] == 200 and closing


def test_handshake_split_byte_by_byte():
    ws, data = WsConnection(), request()
    for i in range(len(data) - 1):
        assert ws.receive(data[i:i + 1]) == (b"", [], False)
        assert ws.buffered == i + 1
    out, _, closing = ws.receive(data[-1:])
    assert http(out)[0] == 101 and not closing and ws.buffered == 0


def test_frames_in_the_handshakes_read_are_processed():
    ws = WsConnection()
    out, msgs, closing = ws.receive(request() + cframe(REGISTER) + cframe(b"p", 0x9) + cframe(b"x")[:3])
    assert out.startswith(b"HTTP/1.1 101 ") and out.endswith(b"\r\n\r\n\x8a\x01p")
    assert msgs == [REGISTER] and not closing and ws.buffered == 3


def test_head_larger_than_8k_gets_431():
    ws = WsConnection()
    big = request().replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * 8200 + b"\r\n\r\n")
    out, _, closing = ws.receive(big)
    assert http(out)[0] == 431 and closing and ws.reason == "handshake"
    # and without ever sending the blank line
    ws = WsConnection()
    assert ws.receive(b"GET / HTTP/1.1\r\n") == (b"", [], False)
    for _ in range(8):
        out, _, closing = ws.receive(b"X-Pad: " + b"a" * 1100 + b"\r\n")
        if closing:
            break
    assert http(out)[0] == 431 and ws.buffered == 0


@pytest.mark.parametrize("data", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",   # a TLS hello
                                  b"REGISTER\r\n", b" GET / HTTP/1.1"])
def test_what_is_no_http_is_refused_at_once(data):
    ws = WsConnection()
    out, _, closing = ws.receive(data)
    assert http(out)[0] == 400 and closing and ws.reason == "handshake"


def test_malformed_header_line():
    bad = request().replace(b"Host:", b"Host :")
    assert http(WsConnection().receive(bad)[0])[0] == 400
    folded = request().replace(b"Upgrade: websocket\r\n", b"Upgrade:\r\n websocket\r\n")
    assert http(WsConnection().receive(folded)[0])[0] == 400


# -- data frames ------------------------------------------------------------------------


def test_one_text_and_one_binary_message():
    ws = opened()
    assert ws.receive(cframe(REGISTER)) == (b"", [REGISTER], False)
    assert ws.receive(cframe(REGISTER, 0x2)) == (b"", [REGISTER], False)
    assert ws.buffered == 0


def test_several_frames_in_one_read():
    ws = opened()
    msgs = [REGISTER, REGISTER.replace(b"CSeq: 1", b"CSeq: 2"), b"\xff binary"]
    data = cframe(msgs[0]) + cframe(msgs[1], mask=b"\0\0\0\0") + cframe(msgs[2], 0x2)
    assert ws.receive(data) == (b"", msgs, False)


@pytest.mark.parametrize("n", list(range(0, 20)) + [125, 126, 127, 65535, 65536, 70000])
def test_every_payload_length_and_length_form(n):
    # 0-19: the 8-byte unmasking loop and its tail; 126/65536: the 16- and 64-bit lengths
    payload = bytes((i * 7 + 3) % 128 for i in range(n))
    ws = opened(max_message=100_000)
    assert ws.receive(cframe(payload, mask=os.urandom(4))) == (b"", [payload], False)


def test_fragments_are_joined_with_control_frames_between():
    ws = opened()
    data = (cframe(REGISTER[:10], fin=False) + cframe(b"are you there", 0x9)
            + cframe(REGISTER[10:200], 0x0, fin=False, mask=b"\1\2\3\4") + cframe(b"", 0xA)
            + cframe(b"", 0x0, fin=False) + cframe(REGISTER[200:], 0x0))
    out, msgs, closing = ws.receive(data)
    assert msgs == [REGISTER] and not closing
    assert sframes(out) == [(True, 0xA, b"are you there")]


def test_split_at_every_byte_and_at_every_point():
    stream = (cframe(REGISTER) + cframe(REGISTER[:50], 0x2, fin=False) + cframe(b"hi", 0x9)
              + cframe(REGISTER[50:], 0x0) + cframe(b"x" * 300, mask=b"\xff\xfe\xfd\xfc"))
    want = [REGISTER, REGISTER, b"x" * 300]
    ws, got, out = opened(), [], b""
    for i in range(len(stream)):
        o, m, closing = ws.receive(stream[i:i + 1])
        got, out = got + m, out + o
        assert not closing
    assert got == want and sframes(out) == [(True, 0xA, b"hi")] and ws.buffered == 0
    for cut in range(1, len(stream), 7):
        ws = opened()
        a, b = ws.receive(stream[:cut]), ws.receive(stream[cut:])
        assert a[1] + b[1] == want, cut


def test_buffered_counts_a_partial_frame_and_earlier_fragments():
    ws = opened()
    frame = cframe(REGISTER)
    ws.receive(frame[:100])
    assert ws.buffered == 100
    ws.receive(frame[100:] + cframe(b"abc", fin=False))
    assert ws.buffered == 3
    assert ws.receive(cframe(b"def", 0x0))[1] == [b"abcdef"] and ws.buffered == 0


def test_pong_is_ignored():
    ws = opened()
    assert ws.receive(cframe(b"unsolicited", 0xA)) == (b"", [], False)


def test_ping_gets_a_pong_with_the_same_payload():
    ws = opened()
    payload = bytes(range(125))
    out, msgs, closing = ws.receive(cframe(payload, 0x9) + cframe(b"", 0x9))
    assert sframes(out) == [(True, 0xA, payload), (True, 0xA, b"")] and not closing


# -- what closes the connection -------------------------------------------------------------


def assert_closed(ws, result, code, reason):
    out, msgs, closing = result
    assert close_code(out) == code and closing and ws.reason == reason and ws.buffered == 0
    assert ws.receive(cframe(REGISTER)) == (b"", [], True)
    return msgs


def test_unmasked_frame_closes_1002_without_waiting_for_its_payload():
    ws = opened()
    frame = cframe(REGISTER, mask=None)
    assert_closed(ws, ws.receive(frame[:2]), 1002, "unmasked")


@pytest.mark.parametrize("frame", [
    cframe(b"x", rsv=4), cframe(b"x", rsv=1),                          # RSV1, RSV3 without extension
    cframe(b"x", 0x3), cframe(b"x", 0x7), cframe(b"x", 0xB), cframe(b"x", 0xF),   # reserved opcodes
    cframe(b"p" * 126, 0x9), cframe(b"p" * 126, 0x8),                # control frame > 125
    cframe(b"p", 0x9, fin=False),                                     # fragmented control frame
    cframe(b"x", 0x0),                                                # continuation of nothing
    cframe(b"x", fin=False) + cframe(b"y"),                            # new message inside one
    cframe(b"x", fin=False) + cframe(b"y", 0x2),
    bytes([0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 5]) + MASK + b"x" * 5,   # 64-bit length, top bit set
    cframe(b"\x03", 0x8),                                             # close with a 1-byte body
])
def test_protocol_errors_close_1002(frame):
    ws = opened(max_message=1 << 20)
    assert_closed(ws, ws.receive(frame), 1002, "protocol")


def test_64_bit_length_with_top_bit_needs_no_payload():
    ws = opened()
    assert_closed(ws, ws.receive(bytes([0x82, 0xFF, 0xFF]) + b"\0" * 7), 1002, "protocol")


def test_frame_above_max_frame_closes_1009_from_its_header():
    ws = opened(max_message=4096, max_frame=1000)
    assert ws.receive(cframe(b"a" * 1000))[1] == [b"a" * 1000]
    head = cframe(b"a" * 1001)[:4]          # 0x81, 0xFE, 16-bit length: no mask key, no payload yet
    assert_closed(ws, ws.receive(head), 1009, "too_big")


def test_message_above_max_message_closes_1009():
    ws = opened(max_message=1000)
    assert ws.receive(cframe(b"a" * 1000))[1] == [b"a" * 1000]          # exactly the limit
    assert_closed(ws, ws.receive(cframe(b"a" * 1001)), 1009, "too_big")
    # reassembled: the fragment that would pass the limit is refused
    ws = opened(max_message=1000)
    assert ws.receive(cframe(b"a" * 600, fin=False))[1:] == ([], False)
    assert_closed(ws, ws.receive(cframe(b"a" * 401, 0x0)[:4]), 1009, "too_big")
    # a 64-bit length far beyond it
    ws = opened()
    assert_closed(ws, ws.receive(bytes([0x82, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0])), 1009, "too_big")


def test_messages_before_an_error_in_the_same_read_are_returned():
    ws = opened()
    msgs = assert_closed(ws, ws.receive(cframe(REGISTER) + cframe(b"x", mask=None)), 1002, "unmasked")
    assert msgs == [REGISTER]


@pytest.mark.parametrize("text", ["é", "€ 100", "𝄞 clef", "a" * 20 + "ü" + "b" * 20, "\U0010ffff", ""])
def test_valid_utf8_text(text):
    ws = opened()
    assert ws.receive(cframe(text.encode()))[1] == [text.encode()]


@pytest.mark.parametrize("payload", [
    b"\xc0\x80",             # overlong NUL
    b"\xe0\x80\xaf",         # overlong '/'
    b"\xf0\x80\x80\xaf",     # overlong, 4 bytes
    b"\xed\xa0\x80",         # U+D800, a surrogate
    b"\xf4\x90\x80\x80",     # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\x80", b"\xbf",        # continuation byte alone
    b"\xff", b"\xfe",
    b"abc\xe2\x82",          # cut off at the end of the message
    b"abcdefghijklmn\xc3(",  # after an 8-byte ASCII run
])
def test_invalid_utf8_text_closes_1007(payload):
    ws = opened()
    assert_closed(ws, ws.receive(cframe(payload)), 1007, "utf8")
    assert opened().receive(cframe(payload, 0x2))[1] == [payload]     # binary: any bytes


def test_utf8_sequence_cut_between_fragments():
    ws = opened()
    euro = "€".encode()
    data = cframe(b"x" + euro[:1], fin=False) + cframe(euro[1:2], 0x0, fin=False) + cframe(euro[2:], 0x0)
    assert ws.receive(data)[1] == [b"x" + euro]
    # a bad one is refused at the fragment that shows it, before the message ends
    ws = opened()
    assert ws.receive(cframe(b"x" + euro[:1], fin=False))[1:] == ([], False)
    assert_closed(ws, ws.receive(cframe(b"(", 0x0, fin=False)), 1007, "utf8")
    # and one cut off by the last fragment
    ws = opened()
    assert_closed(ws, ws.receive(cframe(euro[:2], fin=False) + cframe(b"", 0x0)), 1007, "utf8")


def utf8_ok(b):
    try:
        b.decode("utf-8")            # Python's codec is RFC 3629's: no overlong, no surrogate
        return True
    except UnicodeDecodeError:
        return False


def test_utf8_check_agrees_with_python_on_every_short_sequence():
    # frame() sends text only for valid UTF-8: the same check as the receiving side's
    f = WsFramer()
    for lead in range(256):
        for second in range(256):
            for seq in (bytes([lead, second]), bytes([lead, second, 0x80]),
                        bytes([lead, second, 0x80, 0x80]), b"abcdefgh" + bytes([lead, second])):
                assert (f.frame(seq)[0] == 0x81) == utf8_ok(seq), seq


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=12) | st.text(max_size=6).map(str.encode), min_size=1, max_size=8),
       st.data())
def test_utf8_of_fragmented_text_agrees_with_python(pieces, data):
    # any split of a message into fragments (and of the stream into reads)
    message = b"".join(pieces)
    stream = b"".join(cframe(p, 0x1 if i == 0 else 0x0, fin=i == len(pieces) - 1)
                      for i, p in enumerate(pieces))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    ws, got, closing = opened(), [], False
    for a, b in zip([0] + cuts, cuts + [len(stream)], strict=True):
        out, msgs, closing = ws.receive(stream[a:b])
        got += msgs
    if utf8_ok(message):
        assert got == [message] and not closing
    else:
        assert got == [] and closing and ws.reason == "utf8"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=40) | st.sampled_from([cframe(REGISTER[:30]), cframe(b"p", 0x9),
                                                          cframe(b"x", fin=False), b"\x88\x80" + MASK]),
                max_size=12))
def test_any_input_is_read_or_closed_never_raised(chunks):
    # the oracle of the parser's fuzzing, for frames: no exception, and a connection
    # that ends says why and leaves one close frame last in what it writes
    ws, out = opened(max_message=64), b""
    for chunk in chunks:
        o, msgs, closing = ws.receive(chunk)
        out += o
        assert all(isinstance(m, bytes) and len(m) <= 64 for m in msgs)
        if closing:
            assert ws.reason in ("unmasked", "too_big", "protocol", "utf8", "closed")
            assert sframes(out)[-1][1] == 0x8 and ws.buffered == 0
            break
    assert all(op in (0x8, 0xA) for _, op, _ in sframes(out))


# -- the close handshake ----------------------------------------------------------------------


def test_peer_close_is_echoed_with_its_code():
    ws = opened()
    out, msgs, closing = ws.receive(cframe(struct.pack("!H", 1000) + b"bye", 0x8))
    assert close_code(out) == 1000 and closing and ws.reason == "closed"
    assert ws.receive(cframe(REGISTER)) == (b"", [], True)
    ws = opened()
    assert close_code(ws.receive(cframe(struct.pack("!H", 4321), 0x8))[0]) == 4321


def test_close_without_code_is_echoed_without_one():
    ws = opened()
    out, _, closing = ws.receive(cframe(b"", 0x8))
    assert out == b"\x88\x00" and closing and ws.reason == "closed"


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2000, 2999, 5000, 65535])
def test_close_with_an_invalid_code_gets_1002(code):
    ws = opened()
    assert_closed(ws, ws.receive(cframe(struct.pack("!H", code), 0x8)), 1002, "protocol")


def test_close_reason_must_be_utf8():
    ws = opened()
    assert_closed(ws, ws.receive(cframe(struct.pack("!H", 1000) + b"\xff", 0x8)), 1007, "utf8")


def test_server_close_then_peer_close():
    ws = opened()
    assert ws.close_frame() == b"\x88\x02\x03\xe9"           # 1001, going away
    assert ws.close_frame() == b""                            # once
    # data that crossed our close is dropped; the peer's close ends it, without an echo
    assert ws.receive(cframe(REGISTER)) == (b"", [], False)
    assert ws.receive(cframe(struct.pack("!H", 1001), 0x8)) == (b"", [], True)
    assert ws.reason == "closed"


def test_ping_is_an_empty_ping_frame_and_its_pong_is_taken_quietly():
    ws = opened()
    assert ws.ping() == b"\x89\x00"
    out, messages, closing = ws.receive(cframe(b"", 0xA))
    assert (out, messages, closing) == (b"", [], False)
    ws.close_frame()
    assert ws.ping() == b""
    assert WsConnection().ping() == b""


def test_close_frame_before_the_handshake_is_empty():
    assert WsConnection().close_frame() == b""
    with pytest.raises(ValueError):
        opened().close_frame(1005)


# -- server frames ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536])
def test_server_frame_is_one_unmasked_text_frame(n):
    payload = b"S" * n
    assert sframes(opened().frame(payload)) == [(True, 0x1, payload)]


def test_server_frame_of_non_utf8_is_binary():
    ws = opened()
    assert sframes(ws.frame(b"SIP/2.0 200 OK\r\nUser-Agent: \xff\r\n\r\n"))[0][1] == 0x2
    assert sframes(ws.frame(bytearray(b"ok")))[0][1] == 0x1


def test_framer_directly():
    f = WsFramer(max_message=100)
    assert (f.max_message, f.max_frame) == (100, 100)
    assert f.feed(cframe(b"a") + cframe(b"p", 0x9)) == [b"a"] and f.data_to_send() == b"\x8a\x01p"
    assert f.data_to_send() == b"" and f.close_code is None
    assert sframes(f.frame(b"abc", binary=True)) == [(True, 0x2, b"abc")]
    with pytest.raises(TypeError):
        f.feed("text")
    with pytest.raises(ValueError):
        WsFramer(max_message=0)
    f.feed(cframe(b"x", mask=None))
    assert (f.closing, f.reason, f.close_code) == (True, "unmasked", 1002)


def test_public_names():
    assert fastsip.WsConnection is WsConnection and fastsip.WsFramer is WsFramer


# -- an independent client: the websockets package's sans-I/O protocol ----------------------------


def ws_client(subprotocols=("sip",)):
    # missing: skipped on a developer machine, a failure under CI (the test extra has it)
    require_client("python:websockets", "websockets")
    from websockets.client import ClientProtocol
    from websockets.typing import Subprotocol
    from websockets.uri import parse_uri
    return ClientProtocol(parse_uri("ws://sip.example.com/"),
                          subprotocols=[Subprotocol(s) for s in subprotocols] or None)


def pump(client, ws):
    """What the client queued, through the server; the server's answer back to it
    (and the end of the stream when the server closes)."""
    out, msgs, closing = ws.receive(b"".join(client.data_to_send()))
    client.receive_data(out)
    if closing:
        client.receive_eof()
    return msgs, closing


def test_websockets_client_registers_through_the_connection():
    from websockets.frames import Opcode
    from websockets.protocol import State
    client, ws = ws_client(), WsConnection()
    client.send_request(client.connect())
    assert pump(client, ws) == ([], False)
    [response] = client.events_received()
    assert response.status_code == 101 and client.state is State.OPEN
    assert client.subprotocol == "sip" and client.handshake_exc is None
    # one message per frame, text and binary; a fragmented one; a ping
    client.send_text(REGISTER)
    client.send_binary(REGISTER)
    client.send_text(REGISTER[:100], fin=False)
    client.send_continuation(REGISTER[100:], fin=True)
    client.send_ping(b"keepalive")
    assert pump(client, ws) == ([REGISTER] * 3, False)
    [pong] = client.events_received()
    assert (pong.opcode, pong.data) == (Opcode.PONG, b"keepalive")
    # the server's reply, as the client reads it
    reply = b"SIP/2.0 200 OK\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
    client.receive_data(ws.frame(reply))
    [frame] = client.events_received()
    assert (frame.opcode, frame.data, frame.fin) == (Opcode.TEXT, reply, True)
    # the close handshake
    client.send_close(1000, "done")
    assert pump(client, ws) == ([], True)
    assert client.close_code == 1000 and ws.reason == "closed"


def test_websockets_client_without_sip_is_refused():
    client = ws_client(subprotocols=())
    request = client.connect()
    assert "Sec-WebSocket-Protocol" not in request.headers
    client.send_request(request)
    ws = WsConnection()
    _, closing = pump(client, ws)
    assert closing and ws.reason == "subprotocol"
    [response] = client.events_received()
    assert response.status_code == 400 and b"sip" in response.body
    assert client.handshake_exc is not None


def test_websockets_client_sees_the_close_of_a_too_big_message():
    client, ws = ws_client(), WsConnection(max_message=200)
    client.send_request(client.connect())
    pump(client, ws)
    client.events_received()
    client.send_text(REGISTER)          # ~400 bytes
    assert pump(client, ws) == ([], True)
    assert ws.reason == "too_big" and client.close_code == 1009
