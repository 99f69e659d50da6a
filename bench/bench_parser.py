"""Parser speed: fastsip beside sippy and sipmessage (when installed), same message, same run.

    pip install sippy sipmessage
    python -m pytest bench/bench_parser.py --benchmark-columns=min,median,mean,ops

"extract" pulls what a registrar needs: method, Request-URI, To URI, Call-ID,
CSeq number, every Contact URI with its expires, and the Expires header.
"""
import pytest

import fastsip

try:
    from sippy.SipRequest import SipRequest
except ImportError:  # pragma: no cover
    SipRequest = None
try:
    import sipmessage
except ImportError:  # pragma: no cover
    sipmessage = None


def fastsip_extract(data):
    m = fastsip.parse(data)
    return (m.method, m.uri, m.to.uri, m.call_id, m.cseq.seq,
            [(c.uri, c.expires) for c in m.contacts], m.expires)


def sippy_extract(data):
    r = SipRequest(buf=data.decode())
    return (r.getMethod(), str(r.getRURI()), str(r.getHFBody("to").getUrl()),
            str(r.getHFBody("call-id")), r.getHFBody("cseq").getCSeq()[0],
            [(str(c.getUrl()), c.address.getParam("expires")) for c in r.getHFBodys("contact")],
            r.getHFBody("expires").getNum())


def sipmessage_extract(data):
    m = sipmessage.Message.parse(data)
    return (m.method, str(m.uri), str(m.to_address.uri), m.call_id, m.cseq.sequence,
            [(str(c.uri), c.parameters.get("expires")) for c in m.contact], m.expires)


EXTRACTORS = {"fastsip": fastsip_extract, "sippy": sippy_extract if SipRequest else None,
              "sipmessage": sipmessage_extract if sipmessage else None}
PARSERS = {"fastsip": fastsip.parse,
           "sippy": (lambda d: SipRequest(buf=d.decode())) if SipRequest else None,
           "sipmessage": sipmessage.Message.parse if sipmessage else None}


@pytest.mark.parametrize("lib", list(PARSERS))
def test_parse_register(benchmark, register_msg, lib):
    if PARSERS[lib] is None:
        pytest.skip(f"{lib} is not installed")
    benchmark.group = "parse/register"
    benchmark(PARSERS[lib], register_msg)


@pytest.mark.parametrize("lib", list(EXTRACTORS))
def test_parse_extract_register(benchmark, register_msg, lib):
    if EXTRACTORS[lib] is None:
        pytest.skip(f"{lib} is not installed")
    benchmark.group = "parse+extract/register"
    got = benchmark(EXTRACTORS[lib], register_msg)
    assert got[0] == "REGISTER" and str(got[4]) == "1826" and len(got[5]) == 2


def test_stream_framing(benchmark, register_msg):
    benchmark.group = "framing"
    stream = register_msg * 100
    benchmark(lambda: fastsip.StreamFramer().feed(stream))
