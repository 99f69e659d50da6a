"""StreamFramer: a TCP byte stream split into messages by Content-Length."""
import time

import pytest

import fastsip
from fastsip import PING, StreamFramer

REG = (b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n"
       b"Call-ID: a\r\nContent-Length: 4\r\n\r\nbody")


def test_messages_split_across_any_boundary():
    stream = REG + b"\r\n\r\n" + REG + REG
    for cut in range(1, len(stream)):
        f = StreamFramer()
        got = f.feed(stream[:cut]) + f.feed(stream[cut:])
        assert got == [REG, PING, REG, REG], cut
        assert f.buffered == 0


def test_byte_by_byte():
    f = StreamFramer()
    got = []
    for i in range(len(REG) * 2):
        got += f.feed((REG * 2)[i:i + 1])
    assert got == [REG, REG]


def test_single_crlf_keepalive_is_skipped():
    f = StreamFramer()
    assert f.feed(b"\r\n" + REG) == [REG]


def test_incomplete_body_waits():
    f = StreamFramer()
    assert f.feed(REG[:-2]) == [] and f.buffered == len(REG) - 2
    assert f.feed(REG[-2:]) == [REG]


def test_missing_content_length_is_an_error():
    with pytest.raises(fastsip.BadContentLength, match="required on stream"):
        StreamFramer().feed(b"REGISTER sip:a SIP/2.0\r\nCall-ID: a\r\n\r\n")


@pytest.mark.parametrize("data,err", [
    (b"REGISTER sip:a SIP/2.0\r\nContent-Length: -5\r\n\r\n", fastsip.BadContentLength),
    (b"REGISTER sip:a SIP/2.0\r\nl: 1\r\nl: 2\r\n\r\nab", fastsip.BadContentLength),
    (b"GARBAGE\r\n\r\n", fastsip.BadStartLine),
    (b"REGISTER sip:a SIP/2.0\r\nl: 70000\r\n\r\n", fastsip.MessageTooLarge),
])
def test_unframeable_stream_raises(data, err):
    with pytest.raises(err):
        StreamFramer().feed(data)


def test_endless_header_section_is_bounded():
    f = StreamFramer(max_size=1000)
    f.feed(b"REGISTER sip:a SIP/2.0\r\n")
    with pytest.raises(fastsip.MessageTooLarge):
        for _ in range(100):
            f.feed(b"X-Junk: 0123456789\r\n")


def test_trickled_stream_is_linear_time():
    # a peer sending one byte per segment must not make every feed rescan the buffer
    head = b"REGISTER sip:a SIP/2.0\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"a" * 150) for i in range(250)) + b"Content-Length: 100000\r\n\r\n"
    msg = head + b"b" * 100000
    f = StreamFramer(max_size=200_000)
    got = []
    start = time.perf_counter()
    for i in range(len(msg)):
        got += f.feed(msg[i:i + 1])
    # linear: well under 0.5 s; rescanning on every byte: 10 s and more
    assert time.perf_counter() - start < 3.0
    assert got == [msg] and f.buffered == 0

def test_framed_messages_parse():
    f = StreamFramer()
    [raw] = f.feed(REG)
    assert fastsip.parse(raw).body == b"body"
