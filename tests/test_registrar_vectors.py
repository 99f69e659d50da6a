"""The registrar's answers to the torture messages (RFC 4475 application layer) and to
the REGISTER sequences of real clients (tests/vectors/real)."""
import csv
import re

import pytest

import fastsip
from conftest import REAL, torture_bytes, torture_entries
from fastsip import Authorize, Registrar
from fastsip.auth import digest_response

NOW = 1_764_115_200.0
SRC = ("192.0.2.7", 5060)
ENTRIES = {e["file"]: e for e in torture_entries()}


def answer(reg, name):
    data = torture_bytes(ENTRIES[name])
    reply = reg.serve(data, SRC, NOW)
    return None if reply is None else fastsip.parse(reply)


@pytest.mark.parametrize("name,status", [
    ("rfc4475/unksm2.dat", 400),      # To must be a SIP URI
    ("rfc4475/bext01.dat", 420),      # OPTIONS with Require: unknown extensions
    ("rfc4475/regaut01.dat", 200),    # unknown Authorization scheme, no auth configured
    ("rfc4475/cparam01.dat", 200),
    ("rfc4475/cparam02.dat", 200),
    ("rfc4475/regescrt.dat", 200),
    ("rfc4475/escnull.dat", 200),
    ("rfc4475/dblreq.dat", 200),
    ("rfc4475/insuf.dat", 400),       # no Call-ID, From or To
    ("rfc4475/zeromf.dat", 200),      # OPTIONS with Max-Forwards 0: an endpoint answers
    ("rfc4475/unkscm.dat", 416),      # unknown Request-URI scheme
    ("rfc4475/novelsc.dat", 416),
    ("rfc4475/invut.dat", 405),       # an INVITE: legal, but this server only registers
    ("rfc4475/badvers.dat", 505),     # SIP/7.0
])
def test_torture_answers(name, status):
    assert answer(Registrar(), name).status == status


def test_escnull_binds_two_contacts_to_the_unescaped_aor():
    reg = Registrar()
    answer(reg, "rfc4475/escnull.dat")
    assert len(reg.lookup("sip:null-%00-null@example.com", now=NOW)) == 2
    assert reg.store.aor_names() == ["sip:null-\x00-null@example.com"]


def test_cparam_binding_uri_params():
    reg = Registrar()
    r = answer(reg, "rfc4475/cparam01.dat")
    assert [c.uri for c in r.contacts] == ["sip:+19725552222@gw1.example.net"]
    reg = Registrar()
    r = answer(reg, "rfc4475/cparam02.dat")
    assert [c.uri for c in r.contacts] == ["sip:+19725552222@gw1.example.net;unknownparam"]


def test_regescrt_keeps_the_escaped_route_in_the_contact():
    reg = Registrar()
    answer(reg, "rfc4475/regescrt.dat")
    assert reg.query("sip:user@example.com", now=NOW) == [
        "sip:user@example.com?Route=%3Csip:sip.example.com%3E"]


def test_regaut01_is_challenged_when_auth_is_on():
    reg = Registrar(authorize=Authorize(users={"user": "pw"}))
    assert answer(reg, "rfc4475/regaut01.dat").status == 401


def test_bext01_require_on_register_is_420():
    data = torture_bytes(ENTRIES["rfc4475/bext01.dat"])
    reg_data = re.sub(rb"^OPTIONS", b"REGISTER", data).replace(b" OPTIONS\r\n", b" REGISTER\r\n")
    r = fastsip.parse(Registrar().serve(reg_data, SRC, NOW))
    assert r.status == 420 and r.headers["Unsupported"]


@pytest.mark.parametrize("entry", list(ENTRIES.values()), ids=lambda e: e["file"])
def test_every_torture_message_gets_an_answer_or_nothing(entry):
    data = torture_bytes(entry)
    reply = Registrar().serve(data, SRC, NOW)
    if reply is None:
        return
    r = fastsip.parse(reply)
    assert 200 <= r.status < 700
    if entry["expect"] == "reject" and entry["layer"] == "syntax" and data.startswith(b"REGISTER "):
        assert r.status >= 400


# -- real clients ---------------------------------------------------------------------------

INDEX = list(csv.DictReader((REAL / "index.tsv").read_text().splitlines(), delimiter="\t"))
RUNS = sorted({(r["client"], r["transport"]) for r in INDEX if r["auth"] == "noauth"})


@pytest.mark.parametrize("client,transport", RUNS, ids=lambda x: x)
def test_real_client_register_refresh_unregister(client, transport):
    """Each client's own REGISTER sequence gets 200s, a binding while registered, none after."""
    reg = Registrar(min_expires=0, max_expires=3600)
    rows = [r for r in INDEX if (r["client"], r["transport"], r["auth"], r["direction"]) ==
            (client, transport, "noauth", "request")]
    now = NOW
    for row in rows:
        data = (REAL / row["file"]).read_bytes()
        msg = fastsip.parse(data)
        r = fastsip.parse(reg.handle(data, (msg.via[0].host, msg.via[0].port or 5060), now,
                                     transport))
        assert r.status == 200, (row["file"], r.reason)
        aor = fastsip.parse_uri(msg.to.uri).aor
        expires = int(row["info"].split("=")[1])
        if expires:
            [binding] = reg.lookup(aor, now=now)
            assert binding.uri == msg.contacts[0].uri
            assert binding.expires_at == now + expires
            assert [c.expires for c in r.contacts] == [expires]
        else:
            assert reg.lookup(aor, now=now) == [] and r.contacts == []
        now += 5


def test_real_client_digest_answers_verify_with_their_password():
    """The captured Authorization values are what fastsip's digest check computes."""
    for path in sorted(REAL.glob("*-auth-*-register.sip")):
        msg = fastsip.parse(path.read_bytes())
        for cred in msg.authorization:
            p = cred.params
            uri = p["uri"].strip("<>")
            expected = digest_response(p.get("algorithm"), p["username"], p["realm"], "secret",
                                       method="REGISTER", uri=p["uri"], nonce=p["nonce"],
                                       qop=p.get("qop"), nc=p.get("nc"), cnonce=p.get("cnonce"))
            assert expected == p["response"].lower(), path.name
            assert uri
