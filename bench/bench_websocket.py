"""SIP over WebSocket framing beside TCP framing: the same ~500-byte REGISTER (a
browser's, JsSIP-like), one message per call, same run.

    python3 -m pytest bench/bench_websocket.py -s --benchmark-columns=min,median,ops

ws-framer      WsFramer.feed of one masked text frame (unmask, ASCII check, the message's bytes)
ws-connection  WsConnection.receive of the same frame (WsFramer plus the Python wrapper)
tcp-framer     StreamFramer.feed of the REGISTER as a TCP stream carries it (Content-Length)

With -s the last test prints ns per message (minimum over rounds) and the ratios.
"""
import base64
import os

import pytest

from fastsip import StreamFramer, WsConnection, WsFramer

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/WSS 7q2m8k4d1f0x.invalid;branch=z9hG4bK7182736\r\n"
    b"Max-Forwards: 69\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=ko8h1ju6ps\r\n"
    b"Call-ID: 3ofc9u5hbpbu1nrkmk6sgg\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"Contact: <sip:q8d1h2bd@7q2m8k4d1f0x.invalid;transport=ws>;+sip.ice;reg-id=1"
    b";+sip.instance=\"<urn:uuid:7a4e3b7c-1b9e-4b6a-9f1e-2d0c3a5b8e61>\";expires=600\r\n"
    b"Expires: 600\r\n"
    b"Allow: INVITE,ACK,CANCEL,BYE,OPTIONS\r\n"
    b"Supported: path,gruu,outbound\r\n"
    b"User-Agent: JsSIP 3.10.1\r\n"
    b"Content-Length: 0\r\n\r\n"
)
KEY = b"\x5a\x13\xc7\x0e"
FRAME = (bytes([0x81, 0x80 | 126]) + len(REGISTER).to_bytes(2, "big") + KEY
         + bytes(b ^ KEY[i % 4] for i, b in enumerate(REGISTER)))
HANDSHAKE = (b"GET / HTTP/1.1\r\nHost: sip.example.com\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: " + base64.b64encode(os.urandom(16))
             + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n\r\n")

MIN_NS = {}     # benchmark name -> minimum ns per message, for the summary


def keep(benchmark, name):
    if benchmark.stats is not None:
        MIN_NS[name] = benchmark.stats.stats.min * 1e9


def test_size():
    assert 480 <= len(REGISTER) <= 560 and len(FRAME) == len(REGISTER) + 8


def test_ws_framer_feed(benchmark):
    benchmark.group = "framing: one ~500-byte REGISTER"
    f = WsFramer()
    assert benchmark(f.feed, FRAME) == [REGISTER]
    keep(benchmark, "ws-framer")


def test_ws_connection_receive(benchmark):
    benchmark.group = "framing: one ~500-byte REGISTER"
    ws = WsConnection()
    assert ws.receive(HANDSHAKE)[0].startswith(b"HTTP/1.1 101 ")
    assert benchmark(ws.receive, FRAME) == (b"", [REGISTER], False)
    keep(benchmark, "ws-connection")


def test_tcp_stream_framer_feed(benchmark):
    benchmark.group = "framing: one ~500-byte REGISTER"
    f = StreamFramer()
    assert benchmark(f.feed, REGISTER) == [REGISTER]
    keep(benchmark, "tcp-framer")


def test_summary():
    if len(MIN_NS) < 3:
        pytest.skip("run the three benchmarks above first (not with --benchmark-disable)")
    tcp = MIN_NS["tcp-framer"]
    for name, ns in MIN_NS.items():
        print(f"\n{name:14s} {ns:7.0f} ns/message  ({ns / tcp:.2f} x tcp-framer)", end="")
    print()
