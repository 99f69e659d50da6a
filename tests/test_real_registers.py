"""REGISTERs captured from real SIP user agents, and Kamailio's replies to them
(tests/vectors/real, see its README for the quirks of each client)."""
import csv

import pytest

import fastsip
from conftest import REAL

INDEX = list(csv.DictReader((REAL / "index.tsv").read_text().splitlines(), delimiter="\t"))


@pytest.mark.parametrize("row", INDEX, ids=lambda r: r["file"])
def test_real_message(row):
    data = (REAL / row["file"]).read_bytes()
    m = fastsip.parse(data)
    seq, method = row["cseq"].split()
    assert (m.cseq.seq, m.cseq.method) == (int(seq), method)
    assert m.call_id and m.from_.tag and m.via[0].branch.startswith("z9hG4bK")
    aor = fastsip.parse_uri(m.to.uri).aor
    assert aor.startswith("sip:") and "127.0.0.1" in aor
    if row["direction"] == "request":
        assert m.method == "REGISTER"
        assert fastsip.parse_uri(m.uri).host == "127.0.0.1"
        expires = int(row["info"].split("=")[1])
        # the expiry is in the Expires header or in the Contact's expires param
        got = m.expires if m.expires is not None else m.contacts[0].expires
        assert got == expires
        assert all(c.uri.startswith("sip:") for c in m.contacts)
        if row["auth"] == "auth" and m.authorization:
            assert m.authorization[0].params["username"] == fastsip.parse_uri(m.to.uri).user
    else:
        assert f"{m.status} {m.reason}" == row["info"]
        assert m.to.tag


def test_client_quirks():
    netsip = fastsip.parse((REAL / "netsip-tcp-auth-2-register.sip").read_bytes())
    assert netsip.uri == "sip:127.0.0.1:5271;transport=tcp"        # sent inside <>
    assert netsip.headers.get("Call-ID") == netsip.call_id            # "Call-id"
    assert netsip.contacts[0].uri.endswith("@127.0.0.1:34847")         # addr-spec: transport is
    assert netsip.contacts[0].params == {"transport": "tcp"}          # a header param
    linphone = fastsip.parse((REAL / "linphone-udp-noauth-1-register.sip").read_bytes())
    assert linphone.content_length is None and linphone.body == b""
    assert linphone.contacts[0].instance.startswith("<urn:uuid:")
    assert len(linphone.headers.getall("Accept")) == 3
    baresip = fastsip.parse((REAL / "baresip-udp-noauth-1-register.sip").read_bytes())
    assert baresip.expires is None and baresip.contacts[0].expires == 10
    assert baresip.to.uri.endswith("@127.0.0.1:5270")                 # the port in To: not in the AOR
    assert fastsip.parse_uri(baresip.to.uri).aor.endswith("@127.0.0.1")
