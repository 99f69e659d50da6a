"""Tests for fastsip.auth: credentials parsing, digest computation, htdigest
files and the Authorize check, with a fake clock (plain floats)."""

import hashlib
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from fastsip.auth import (
    Authorize,
    AuthResult,
    BadCredentials,
    Credentials,
    digest_response,
    load_htdigest,
    own_aor_only,
    parse_credentials,
)

NOW = 1_700_000_000.0
REALM = "127.0.0.1"

# ---------------------------------------------------------------------------
# Real clients: Authorization lines copied verbatim from
# tests/vectors/real/<name>-register.sip (Kamailio's nonces, MD5,
# no qop, password "secret", realm 127.0.0.1).  Columns: file name,
# Request-URI, the Authorization header line, the params it must parse to.
# ---------------------------------------------------------------------------
REAL = [
    ("sipsak-udp-auth-2", "sip:127.0.0.1:5271",
     'Authorization: Digest username="sipsak179566466027399", uri="sip:127.0.0.1:5271", algorithm=MD5, realm="127.0.0.1", nonce="awesQGsHqxRJMKWZzVS/baJzgVuVnSOD", response="d9e14dd8b4ccba607e5d52418e6a04fd"',  # noqa: E501 (verbatim header)
     {"username": "sipsak179566466027399", "uri": "sip:127.0.0.1:5271", "algorithm": "MD5",
      "realm": "127.0.0.1", "nonce": "awesQGsHqxRJMKWZzVS/baJzgVuVnSOD",
      "response": "d9e14dd8b4ccba607e5d52418e6a04fd"}),
    ("netsip-udp-auth-2", "sip:127.0.0.1:5271",
     'Authorization: Digest username="netsip179566466127603",realm="127.0.0.1",nonce="awesQWsHqxXrsryVaiq+tJB9ofcz8yQT",uri="sip:127.0.0.1:5271",response="83d8410ea44c956505773fdec0511f6f"',  # noqa: E501 (verbatim header)
     {"username": "netsip179566466127603", "realm": "127.0.0.1",
      "nonce": "awesQWsHqxXrsryVaiq+tJB9ofcz8yQT", "uri": "sip:127.0.0.1:5271",
      "response": "83d8410ea44c956505773fdec0511f6f"}),
    ("netsip-tcp-auth-2", "<sip:127.0.0.1:5271;transport=tcp>",
     'Authorization: Digest username="netsip179566473929619",realm="127.0.0.1",nonce="awesj2sHq2OxeFEcTm+UKubB4QAkPvns",uri="<sip:127.0.0.1:5271;transport=tcp>",response="3e0f4c9fdb572b1a18f8befcbee5d5f2"',  # noqa: E501 (verbatim header)
     {"username": "netsip179566473929619", "realm": "127.0.0.1",
      "nonce": "awesj2sHq2OxeFEcTm+UKubB4QAkPvns", "uri": "<sip:127.0.0.1:5271;transport=tcp>",
      "response": "3e0f4c9fdb572b1a18f8befcbee5d5f2"}),
    ("baresip-tcp-auth-2", "sip:127.0.0.1:5271;transport=tcp",
     'Authorization: Digest username="baresip179566474129818", realm="127.0.0.1", nonce="aweskWsHq2XV0zOGJx7MRAktKnbtcst1", uri="sip:127.0.0.1:5271;transport=tcp", response="483a0fe1bac67072ef5d4363ea08ed31"',  # noqa: E501 (verbatim header)
     {"username": "baresip179566474129818", "realm": "127.0.0.1",
      "nonce": "aweskWsHq2XV0zOGJx7MRAktKnbtcst1", "uri": "sip:127.0.0.1:5271;transport=tcp",
      "response": "483a0fe1bac67072ef5d4363ea08ed31"}),
    ("linphone-udp-auth-2", "sip:127.0.0.1",
     'Authorization:  Digest realm="127.0.0.1", nonce="awesUWsHqyWsHdVs1wGoFpzDXdyV0Sl9", username="linphone179566467628054",  uri="sip:127.0.0.1", response="30e4ed03f30b83d2cad6406b63d3b78c"',  # noqa: E501 (verbatim header)
     {"realm": "127.0.0.1", "nonce": "awesUWsHqyWsHdVs1wGoFpzDXdyV0Sl9",
      "username": "linphone179566467628054", "uri": "sip:127.0.0.1",
      "response": "30e4ed03f30b83d2cad6406b63d3b78c"}),
    ("pjsua-tcp-auth-2", "sip:127.0.0.1:5271;transport=tcp",
     'Authorization: Digest username="pjsua179566476930243", realm="127.0.0.1", nonce="awesrWsHq4GOCx9aKOUifPSIDjrfgI7F", uri="sip:127.0.0.1:5271;transport=tcp", response="de58b7af4c5a23a55f813a8fbb954aaa"',  # noqa: E501 (verbatim header)
     {"username": "pjsua179566476930243", "realm": "127.0.0.1",
      "nonce": "awesrWsHq4GOCx9aKOUifPSIDjrfgI7F", "uri": "sip:127.0.0.1:5271;transport=tcp",
      "response": "de58b7af4c5a23a55f813a8fbb954aaa"}),
    ("sipp-udp-auth-2", "sip:127.0.0.1:5271",
     'Authorization: Digest username="sippreg179566469728295",realm="127.0.0.1",uri="sip:127.0.0.1:5271",nonce="awesZmsHqzoRzo+MTm1j/N0BjUgp4HSs",response="b7404f94c304e8163f339843a237815f",algorithm=MD5',  # noqa: E501 (verbatim header)
     {"username": "sippreg179566469728295", "realm": "127.0.0.1", "uri": "sip:127.0.0.1:5271",
      "nonce": "awesZmsHqzoRzo+MTm1j/N0BjUgp4HSs", "response": "b7404f94c304e8163f339843a237815f",
      "algorithm": "MD5"}),
]
REAL_IDS = [r[0] for r in REAL]


def header_value(line):
    """The value of a header line as a parser hands it over (after the colon)."""
    return line.split(":", 1)[1]


REAL_REGISTERS = Path(__file__).resolve().parent / "vectors" / "real"


# ---------------------------------------------------------------------------
# A minimal independent digest client (straight from RFC 7616 §3.4.1), so
# that Authorize is not only checked against fastsip's own digest_response.
# ---------------------------------------------------------------------------

def client_response(alg, user, realm, password, method, uri, nonce, qop=None, nc=None, cnonce=None):
    hash_ = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}[alg.removesuffix("-sess")]

    def H(text):
        return hash_(text.encode()).hexdigest()

    ha1 = H(f"{user}:{realm}:{password}")
    if alg.endswith("-sess"):
        ha1 = H(f"{ha1}:{nonce}:{cnonce}")
    ha2 = H(f"{method}:{uri}")
    if qop:
        return H(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return H(f"{ha1}:{nonce}:{ha2}")


def answer(challenge, user="alice", password="secret", uri="sip:127.0.0.1:5060", *,
           use_qop=True, nc=1, cnonce="0a4f113b", method="REGISTER"):
    """Credentials answering one WWW-Authenticate value, as a phone builds them."""
    ch = parse_credentials(challenge)
    alg = ch.algorithm or "MD5"
    qop = "auth" if use_qop and ch.qop else None
    ncs = f"{nc:08x}"
    resp = client_response(alg, user, ch.realm, password, method, uri, ch.nonce, qop, ncs, cnonce)
    value = (f'Digest username="{user}", realm="{ch.realm}", nonce="{ch.nonce}", uri="{uri}", '
             f'response="{resp}", algorithm={alg}')
    if qop:
        value += f', qop={qop}, nc={ncs}, cnonce="{cnonce}"'
    return parse_credentials(value)


def make_auth(**kw):
    kw.setdefault("users", {"alice": "secret", "bob": "hunter2"})
    return Authorize(REALM, **kw)


def check(auth, creds, *, uri="sip:127.0.0.1:5060", aor_user="alice", aor_domain=REALM, now=NOW):
    if isinstance(creds, Credentials):
        creds = [creds]
    return auth.check("REGISTER", uri, creds, aor_user, aor_domain, now)


def is_stale(result):
    return any("stale=true" in v for _, v in result.headers)


def assert_challenge(result, *, stale):
    assert result.status == 401 and not result.ok and result.user is None
    assert result.headers and all(name == "WWW-Authenticate" for name, _ in result.headers)
    assert is_stale(result) is stale


# ===========================================================================
# parse_credentials
# ===========================================================================

@pytest.mark.parametrize("name, ruri, line, expected", REAL, ids=REAL_IDS)
def test_parse_real_clients(name, ruri, line, expected):
    creds = parse_credentials(header_value(line))
    assert creds.scheme == "Digest"
    assert creds.params == expected
    assert creds.username == expected["username"] and creds.nonce == expected["nonce"]
    assert creds.algorithm == expected.get("algorithm")
    assert creds.qop is None and creds.nc is None and creds.cnonce is None and creds.opaque is None


def test_parse_every_real_authorization_in_the_corpus():
    """Every Authorization in the captures (tests/vectors/real) parses, and its
    response verifies for password "secret" (also guards the verbatim copies above)."""
    files = sorted(REAL_REGISTERS.glob("*-auth-*-register.sip"))
    assert len(files) >= 6, f"the real REGISTERs are missing from {REAL_REGISTERS}"
    seen = 0
    for path in files:
        lines = path.read_bytes().decode().split("\r\n")
        method = lines[0].split(" ", 1)[0]
        for line in lines:
            if line.lower().startswith("authorization:"):
                c = parse_credentials(header_value(line))
                assert digest_response(c.algorithm, c.username, c.realm, "secret", method=method,
                                       uri=c.uri, nonce=c.nonce) == c.response, path.name
                seen += 1
    assert seen >= 6
    copied = {r[2] for r in REAL}
    corpus = {line for p in files for line in p.read_bytes().decode().split("\r\n")}
    assert copied <= corpus


@pytest.mark.parametrize("value, scheme, params", [
    # quoted commas and '=' stay in the value
    ('Digest realm="a,b=c", nonce=x', "Digest", {"realm": "a,b=c", "nonce": "x"}),
    # backslash escapes
    (r'Digest username="a\"b\\c\d"', "Digest", {"username": 'a"b\\cd'}),
    # LWS around '=' and ','
    ('Digest  username \t=\t "bob" \t,  realm= "r" ,nc =00000001', "Digest",
     {"username": "bob", "realm": "r", "nc": "00000001"}),
    # folded lines between parameters and inside a quoted-string
    ('Digest username="bob",\r\n realm="r",\r\n\tnonce="n1\r\n n2"', "Digest",
     {"username": "bob", "realm": "r", "nonce": "n1 n2"}),
    # names are case-insensitive and stored lower-case; the scheme stays as written
    ('dIgEsT USERNAME="bob", Realm=r', "dIgEsT", {"username": "bob", "realm": "r"}),
    # empty list elements are skipped (RFC 7230 §7)
    ('Digest , username="bob",, realm=r ,', "Digest", {"username": "bob", "realm": "r"}),
    # a quoted empty value
    ('Digest opaque=""', "Digest", {"opaque": ""}),
    # non-ASCII inside quotes (UTF-8 user names)
    ('Digest username="Jäsøn Doe"', "Digest", {"username": "Jäsøn Doe"}),
    # scheme only
    ("Digest", "Digest", {}),
    # RFC 4475 regaut01: an unknown scheme is well formed
    ("NoOneKnowsThisScheme opaque-data=here", "NoOneKnowsThisScheme", {"opaque-data": "here"}),
    # a challenge (WWW-Authenticate) parses with the same grammar
    ('Digest realm="r", nonce="n", algorithm=SHA-256, qop="auth", stale=TRUE', "Digest",
     {"realm": "r", "nonce": "n", "algorithm": "SHA-256", "qop": "auth", "stale": "TRUE"}),
])
def test_parse_grammar(value, scheme, params):
    creds = parse_credentials(value)
    assert (creds.scheme, creds.params, creds.token68) == (scheme, params, None)


@pytest.mark.parametrize("value, blob", [
    ("Basic dXNlcjpwYXNz==", "dXNlcjpwYXNz=="),
    # a lone name (with or without '=') is a token68 by RFC 7235's grammar
    ("Digest username", "username"),
    ("Digest username= ", "username="),
])
def test_parse_token68(value, blob):
    creds = parse_credentials(value)
    assert (creds.params, creds.token68) == ({}, blob)


@pytest.mark.parametrize("value, offset, reason", [
    ("", 0, "empty"),
    ("   ", 3, "empty"),
    ('Digest username="bob', 16, "quoted-string"),       # unterminated quote
    ('Digest username="b\\"', 16, "quoted-string"),      # the closing quote is escaped
    ('Digest username "bob"', 16, "'='"),                # missing '='
    ("Digest a=b, username", 20, "'='"),
    ("Digest a=b, username=", 21, "after '='"),          # missing value
    ("Digest username=,realm=r", 16, "after '='"),
    ('Digest a=b c=d', 11, "','"),                       # missing comma
    ('Digest a=b, a=c', 12, "duplicate"),
    ('Digest a=b, A=c', 12, "duplicate"),                # names are case-insensitive
    ("Digest,a=b", 6, "whitespace"),
    ('"Digest" a=b', 0, "auth-scheme"),
    ('Digest a="x\r\ny"', 9, "quoted-string"),          # a line break that is no fold
    ("Digest a=b\r\n", 10, "','"),
    ('Digest a="x\x01y"', 9, "quoted-string"),          # control character
    ("Digest =b", 7, "parameter name"),
    ('Digest a="é"b', 13, "','"),                       # offsets count UTF-8 bytes
])
def test_parse_malformed(value, offset, reason):
    with pytest.raises(BadCredentials) as info:
        parse_credentials(value)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.status == 400
    assert err.offset == offset
    assert reason in err.reason


def test_bad_credentials_says_where():
    with pytest.raises(BadCredentials) as info:
        parse_credentials('Digest username="bob')
    assert str(info.value) == ('unterminated or invalid quoted-string (byte 16)\n'
                               '  Digest username="bob\n'
                               '                  ^')


# Text biased towards the grammar's delimiters, so that generated inputs reach
# deep into the parser rather than failing on the first character.
_grammar_text = st.text(alphabet=st.sampled_from(list(' \t\r\n",=\\;<>:aZ09-_/+é\x00\ud800')),
                        max_size=60)


@given(st.one_of(st.text(), _grammar_text, st.builds(lambda s: "Digest " + s, _grammar_text)))
def test_parse_any_text_parses_or_raises_bad_credentials(text):
    try:
        creds = parse_credentials(text)
    except BadCredentials as err:
        str(err)  # the message itself must not fail either
    else:
        assert isinstance(creds, Credentials)
        assert all(name == name.lower() for name in creds.params)


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9\-_]{0,10}", fullmatch=True)
_values = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)


@given(st.dictionaries(_names.map(str.lower), _values, min_size=1, max_size=8))
def test_parse_round_trips_quoted_values(params):
    def quote(v):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    value = "Digest " + ", ".join(f"{k}={quote(v)}" for k, v in params.items())
    assert parse_credentials(value).params == params


@pytest.mark.parametrize("value", [
    "Digest " + ",".join(f'a{i}="v{i}"' for i in range(50_000)),  # many parameters
    'Digest a="' + '\\"' * 200_000,                               # unterminated, all escapes
    "Digest " + "\r\n " * 200_000 + "a=b",                         # many folds
    "Digest " + ", " * 200_000,                                     # many empty elements
    "Basic " + "a" * 400_000 + "=" * 1000 + " x",                  # almost a token68
    "Digest a=" + "b" * 400_000 + " c",
])
def test_parse_is_linear_time(value):
    start = time.perf_counter()
    try:
        parse_credentials(value)
    except BadCredentials:
        pass
    # linear: well under 0.5 s here; quadratic on ~4e5 characters: minutes
    assert time.perf_counter() - start < 3.0


# ===========================================================================
# digest_response
# ===========================================================================

@pytest.mark.parametrize("name, ruri, line, expected", REAL, ids=REAL_IDS)
def test_digest_response_reproduces_real_clients(name, ruri, line, expected):
    got = digest_response(expected.get("algorithm"), expected["username"], REALM, "secret",
                          method="REGISTER", uri=expected["uri"], nonce=expected["nonce"])
    assert got == expected["response"]


RFC7616 = dict(username="Mufasa", realm="http-auth@example.org", password="Circle of Life",
               method="GET", uri="/dir/index.html", nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
               qop="auth", nc="00000001", cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")


@pytest.mark.parametrize("algorithm, expected", [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ("sha-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_digest_response_rfc7616_examples(algorithm, expected):
    """RFC 7616 §3.9.1 (qop=auth)."""
    assert digest_response(algorithm, **RFC7616) == expected


def test_digest_response_from_ha1_equals_from_password():
    params = dict(RFC7616)
    ha1 = hashlib.sha256(b"Mufasa:http-auth@example.org:Circle of Life").hexdigest()
    del params["password"]
    assert digest_response("SHA-256", **params, ha1=ha1.upper()) == \
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


@pytest.mark.parametrize("algorithm", ["MD5-sess", "SHA-256-sess"])
def test_digest_response_sess(algorithm):
    p = RFC7616
    expected = client_response(algorithm, p["username"], p["realm"], p["password"], p["method"],
                               p["uri"], p["nonce"], p["qop"], p["nc"], p["cnonce"])
    assert digest_response(algorithm, **p) == expected
    assert expected != digest_response(algorithm.removesuffix("-sess"), **p)


@pytest.mark.parametrize("kwargs, error", [
    (dict(algorithm="SHA-512-256"), ValueError),
    (dict(algorithm="MD5", password=None), TypeError),           # neither password nor ha1
    (dict(algorithm="MD5", ha1="0" * 32), TypeError),            # both
    (dict(algorithm="MD5", qop="auth-int"), ValueError),
    (dict(algorithm="MD5", nc=None), ValueError),
    (dict(algorithm="MD5-sess", qop=None, cnonce=None), ValueError),
])
def test_digest_response_rejects(kwargs, error):
    params = {**RFC7616, **kwargs}
    with pytest.raises(error) as info:
        digest_response(params.pop("algorithm"), params.pop("username"), params.pop("realm"),
                        params.pop("password"), **params)
    assert "Circle of Life" not in str(info.value)


# ===========================================================================
# load_htdigest
# ===========================================================================

def md5_ha1(user, realm, password):
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()


def sha256_ha1(user, realm, password):
    return hashlib.sha256(f"{user}:{realm}:{password}".encode()).hexdigest()


def test_load_htdigest_plain_and_extended(tmp_path):
    path = tmp_path / "users.htdigest"
    path.write_text(
        "# operators\n"
        f"alice:{REALM}:{md5_ha1('alice', REALM, 'secret')}\n"
        "\n"
        f"bob:{REALM}:{md5_ha1('bob', REALM, 'pw').upper()}:SHA-256={sha256_ha1('bob', REALM, 'pw')}\r\n"
        f"carol:[2001:db8::1]::SHA-256={sha256_ha1('carol', '[2001:db8::1]', 'pw')}\n")
    assert load_htdigest(path) == {
        ("alice", REALM): md5_ha1("alice", REALM, "secret"),
        ("bob", REALM): md5_ha1("bob", REALM, "pw"),
        ("bob", REALM, "SHA-256"): sha256_ha1("bob", REALM, "pw"),
        ("carol", "[2001:db8::1]", "SHA-256"): sha256_ha1("carol", "[2001:db8::1]", "pw"),
    }


@pytest.mark.parametrize("line, reason", [
    ("alice", "expected user:realm:HA1"),
    (":r:" + "0" * 32, "expected user:realm:HA1"),
    ("alice:r:" + "0" * 31, "not 32 hex digits"),
    ("alice:r:" + "g" * 32, "not 32 hex digits"),
    ("alice:r:" + "0" * 32 + ":SHA-256=" + "0" * 32, "not 64 hex digits"),
    ("alice:r:" + "0" * 32 + ":SHA-1=" + "0" * 40, "not an extra algorithm"),
    ("alice:r:", "no HA1"),
])
def test_load_htdigest_rejects(tmp_path, line, reason):
    path = tmp_path / "users"
    path.write_text("# first line\n" + line + "\n")
    with pytest.raises(ValueError) as info:
        load_htdigest(path)
    assert f"{path}:2: " in str(info.value) and reason in str(info.value)
    assert "0" * 31 not in str(info.value)  # never the hash


def test_load_htdigest_rejects_duplicates(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"a:r:{'0' * 32}\na:r:{'1' * 32}\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_htdigest(path)


# ===========================================================================
# Authorize: challenges
# ===========================================================================

def test_challenge_one_per_algorithm_sha256_first():
    values = make_auth().challenge(REALM, NOW)
    assert len(values) == 2
    for value, alg in zip(values, ["SHA-256", "MD5"], strict=True):
        assert re.fullmatch(r'Digest realm="127\.0\.0\.1", nonce="[A-Za-z0-9_-]+", '
                            rf'algorithm={alg}, qop="auth"', value)
    assert "stale" not in values[0]


def test_challenge_options():
    auth = make_auth(algorithms=("MD5",), qop=())
    (value,) = auth.challenge('a "quoted" \\ realm', NOW, stale=True)
    ch = parse_credentials(value)
    assert ch.realm == 'a "quoted" \\ realm' and ch.algorithm == "MD5"
    assert ch.qop is None and ch.params["stale"] == "true"


def test_challenges_get_fresh_nonces():
    auth = make_auth()
    nonces = {parse_credentials(auth.challenge(REALM, NOW)[0]).nonce for _ in range(50)}
    assert len(nonces) == 50
    # past several refills of the random pool (512 nonces each), all verify
    more = [auth._new_nonce(REALM, NOW) for _ in range(1500)]
    assert len(set(more) | nonces) == 1550
    md5 = 'Digest realm="127.0.0.1", nonce="{}", algorithm=MD5, qop="auth"'
    assert all(check(auth, answer(md5.format(n))).ok for n in more[::97])


def test_forked_workers_draw_other_nonces():
    """A worker forked with the random pool half used draws its own bytes."""
    auth = make_auth()
    auth._new_nonce(REALM, NOW)                 # the pool is filled in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the child: its next nonce, then exit
        try:
            os.write(write, auth._new_nonce(REALM, NOW).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode()
    mine = auth._new_nonce(REALM, NOW)
    assert len(child) == len(mine) == 43 and child != mine


@pytest.mark.parametrize("kwargs", [
    dict(algorithms=("SHA-1",)), dict(algorithms=()), dict(qop=("auth-int",)),
    dict(algorithms=("MD5-sess",), qop=()), dict(nonce_ttl=0), dict(max_nonces=0),
])
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        make_auth(**kwargs)


def test_users_are_required():
    with pytest.raises(TypeError):
        Authorize(REALM)


# ===========================================================================
# Authorize: check
# ===========================================================================

@pytest.mark.parametrize("index, algorithm", [(0, "SHA-256"), (1, "MD5")])
@pytest.mark.parametrize("use_qop", [True, False])
def test_answer_to_either_challenge_is_accepted(index, algorithm, use_qop):
    auth = make_auth()
    result = check(auth, [])
    assert_challenge(result, stale=False)
    challenge = result.headers[index][1]
    assert f"algorithm={algorithm}," in challenge
    ok = check(auth, answer(challenge, use_qop=use_qop), now=NOW + 2)
    assert ok == AuthResult(True, 0, "authenticated", "alice", [])


@pytest.mark.parametrize("algorithm", ["MD5-sess", "SHA-256-sess"])
def test_sess_algorithms(algorithm):
    auth = make_auth(algorithms=(algorithm,))
    (challenge,) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge)).ok
    assert check(auth, answer(challenge, use_qop=False)).status == 400


@pytest.mark.parametrize("name, ruri, line, expected", REAL, ids=REAL_IDS)
def test_real_client_formats_are_accepted(name, ruri, line, expected):
    """Each client's own header layout (spacing, order, algorithm or none,
    Net::SIP's angle brackets, linphone's port-less URI), with our nonce and
    the response for it; the AOR is the To of that capture."""
    user = expected["username"]
    auth = Authorize(None, {user: "secret"})
    to_domain = {"sipsak": "127.0.0.1:5271", "baresip": "127.0.0.1:5271"}.get(name.split("-")[0], REALM)
    first = auth.check("REGISTER", ruri, [], user, to_domain, NOW)
    assert_challenge(first, stale=False)
    nonce = parse_credentials(first.headers[1][1]).nonce   # the MD5 challenge
    response = client_response("MD5", user, REALM, "secret", "REGISTER", expected["uri"], nonce)
    mine = header_value(line).replace(expected["nonce"], nonce).replace(expected["response"], response)
    result = auth.check("REGISTER", ruri, [parse_credentials(mine)], user, to_domain, NOW + 1)
    assert (result.ok, result.user) == (True, user)


def test_no_credentials_or_foreign_schemes_get_a_challenge():
    auth = make_auth()
    for creds in ([], None, [parse_credentials("NoOneKnowsThisScheme opaque-data=here")],
                  [parse_credentials("Basic YWxpY2U6c2VjcmV0")], [parse_credentials("Digest")]):
        result = check(auth, creds)
        assert_challenge(result, stale=False)
        assert [parse_credentials(v).algorithm for _, v in result.headers] == ["SHA-256", "MD5"]


def test_wrong_password_and_unknown_user_look_the_same():
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    wrong = check(auth, answer(challenge, password="guess"))
    unknown = check(auth, answer(challenge, user="mallory", password="secret"), aor_user="mallory")
    for result in (wrong, unknown):
        assert_challenge(result, stale=False)
    assert wrong.reason == unknown.reason
    assert [h[0] for h in wrong.headers] == [h[0] for h in unknown.headers]


def test_unknown_user_never_authenticates():
    """Unknown users are checked against a random stand-in password; even a
    client that knew it gets nowhere."""
    auth = make_auth()
    auth._dummy_password = "guessed"
    (challenge, _) = auth.challenge(REALM, NOW)
    result = check(auth, answer(challenge, "mallory", "guessed"), aor_user="mallory")
    assert_challenge(result, stale=False)


def test_wrong_response_with_expired_nonce_is_not_stale():
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    result = check(auth, answer(challenge, password="guess"), now=NOW + 301)
    assert_challenge(result, stale=False)


def test_expired_nonce_with_right_digest_is_stale():
    auth = make_auth(nonce_ttl=300)
    (challenge, _) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge), now=NOW + 300).ok
    result = check(auth, answer(challenge, nc=2), now=NOW + 300.01)
    assert_challenge(result, stale=True)
    # the fresh nonce of the stale challenge works
    assert check(auth, answer(result.headers[0][1]), now=NOW + 301).ok


def test_nonce_from_the_future_is_stale():
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW + 1000)
    assert_challenge(check(auth, answer(challenge), now=NOW), stale=True)


@pytest.mark.parametrize("forge", [
    lambda nonce: "awesQGsHqxRJMKWZzVS/baJzgVuVnSOD",           # Kamailio's, not ours
    lambda nonce: ("B" if nonce[0] == "A" else "A") + nonce[1:],  # issue time changed
    lambda nonce: nonce[:-2] + ("AA" if nonce[-2:] != "AA" else "BB"),  # MAC changed
    lambda nonce: nonce + "A",
    lambda nonce: "",
])
def test_forged_nonce_gets_a_fresh_challenge(forge):
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    ch = parse_credentials(challenge)
    forged = challenge.replace(ch.nonce, forge(ch.nonce))
    result = check(auth, answer(forged))
    assert_challenge(result, stale=False)


def test_nonce_is_bound_to_the_realm():
    auth = Authorize(None, {"alice": "secret"})
    (challenge, _) = auth.challenge("other.example", NOW)
    moved = challenge.replace("other.example", REALM)
    assert_challenge(check(auth, answer(moved)), stale=False)


def test_workers_sharing_the_secret_accept_each_others_nonces():
    worker_a, worker_b = make_auth(secret=b"k" * 32), make_auth(secret=b"k" * 32)
    stranger = make_auth()
    (challenge, _) = worker_a.challenge(REALM, NOW)
    assert check(worker_b, answer(challenge)).ok
    assert_challenge(check(stranger, answer(challenge)), stale=False)


def test_replayed_nonce_count_is_refused():
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge, nc=1)).ok
    assert_challenge(check(auth, answer(challenge, nc=1), now=NOW + 1), stale=True)
    assert check(auth, answer(challenge, nc=2), now=NOW + 2).ok
    assert check(auth, answer(challenge, nc=7), now=NOW + 3).ok


def test_nonce_count_window():
    auth = make_auth(replay_window=4)
    (challenge, _) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge, nc=10)).ok
    assert check(auth, answer(challenge, nc=8)).ok          # late, within the window
    assert check(auth, answer(challenge, nc=8)).status == 401   # but only once
    assert check(auth, answer(challenge, nc=6)).status == 401   # older than the window
    assert check(auth, answer(challenge, nc=10)).status == 401
    assert check(auth, answer(challenge, nc=0xFFFFFFFF)).ok  # a huge jump is fine too
    assert check(auth, answer(challenge, nc=0xFFFFFFFE)).ok


def test_strictly_increasing_counts_without_window():
    auth = make_auth(replay_window=0)
    (challenge, _) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge, nc=5)).ok
    assert check(auth, answer(challenge, nc=4)).status == 401
    assert check(auth, answer(challenge, nc=6)).ok


def test_counts_are_per_user():
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge, nc=5)).ok
    assert check(auth, answer(challenge, "bob", "hunter2", nc=1), aor_user="bob").ok


def test_qopless_answer_may_be_reused_until_the_nonce_expires():
    """linphone sends the same credentials for its refresh and unregister."""
    auth = make_auth(qop=())
    (challenge, _) = auth.challenge(REALM, NOW)
    creds = answer(challenge, use_qop=False)
    for t in (0, 9, 18, 299):
        assert check(auth, creds, now=NOW + t).ok
    assert_challenge(check(auth, creds, now=NOW + 301), stale=True)


def test_evicted_nonces_are_not_reopened_for_replay():
    auth = make_auth(max_nonces=2)
    challenges = [auth.challenge(REALM, NOW + i)[0] for i in range(3)]
    for i, ch in enumerate(challenges):
        assert check(auth, answer(ch, nc=1), now=NOW + 10 + i).ok
    assert len(auth._counts) == 2  # the memory bound
    # the first nonce was evicted: its counts are unknown, so it is refused
    # (stale: the phone just takes the new nonce), never accepted again
    assert_challenge(check(auth, answer(challenges[0], nc=1), now=NOW + 20), stale=True)
    assert_challenge(check(auth, answer(challenges[0], nc=2), now=NOW + 20), stale=True)
    assert check(auth, answer(challenges[2], nc=2), now=NOW + 20).ok


def test_expired_counts_are_dropped():
    auth = make_auth(nonce_ttl=60)
    for i in range(5):
        assert check(auth, answer(auth.challenge(REALM, NOW + 100 * i)[0]), now=NOW + 100 * i).ok
    assert len(auth._counts) == 1


@pytest.mark.parametrize("ruri, digest_uri, status", [
    ("sip:127.0.0.1:5060", "sip:127.0.0.1:5061", 400),
    ("sip:127.0.0.1:5060", "sip:127.0.0.1", 400),
    ("sip:127.0.0.1:5060", "sips:127.0.0.1:5060", 400),
    ("sip:127.0.0.1:5060;transport=tcp", "sip:127.0.0.1:5060", 400),
    ("sip:Example.COM", "sip:example.com", 0),
    ("SIP:example.com", "sip:example.com", 0),
    ("<sip:127.0.0.1:5271;transport=tcp>", "sip:127.0.0.1:5271;transport=TCP", 0),
    ("sip:127.0.0.1:5271;transport=tcp", "<sip:127.0.0.1:5271;transport=tcp>", 0),
    ("sip:h;lr;transport=udp", "sip:h;transport=udp;lr", 0),
])
def test_digest_uri_must_match_the_request_uri(ruri, digest_uri, status):
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    result = check(auth, answer(challenge, uri=digest_uri), uri=ruri)
    assert result.status == status
    if status:
        assert not result.ok and result.headers == [] and "uri" in result.reason


def test_third_party_registration_is_forbidden_by_default():
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    result = check(auth, answer(challenge), aor_user="bob")
    assert (result.ok, result.status, result.user, result.headers) == (False, 403, "alice", [])
    other_domain = check(auth, answer(challenge, nc=2), aor_domain="example.com")
    assert other_domain.status == 403


def test_policy_may_allow_third_party_registration():
    calls = []

    def policy(auth_user, realm, aor_user, aor_domain):
        calls.append((auth_user, realm, aor_user, aor_domain))
        return auth_user == "alice" or own_aor_only(auth_user, realm, aor_user, aor_domain)

    auth = make_auth(policy=policy)
    (challenge, _) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge), aor_user="bob", aor_domain="127.0.0.1:5060").ok
    assert calls == [("alice", REALM, "bob", "127.0.0.1:5060")]
    refused = check(auth, answer(challenge, "bob", "hunter2"), aor_user="alice")
    assert refused.status == 403


def test_realm_defaults_to_the_aor_domain():
    auth = Authorize(users={("alice", "example.com"): md5_ha1("alice", "example.com", "secret")})
    result = check(auth, [], aor_domain="Example.COM:5060")
    (challenge,) = [v for _, v in result.headers]     # alice's line holds MD5 only
    assert parse_credentials(challenge).realm == "example.com"
    assert check(auth, answer(challenge), aor_domain="example.com").ok


def test_credentials_for_another_realm_are_ignored():
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    ours = answer(challenge)
    theirs = parse_credentials('Digest username="alice", realm="proxy.example", nonce="x", '
                               'uri="sip:127.0.0.1:5060", response="00"')
    assert_challenge(check(auth, [theirs]), stale=False)
    assert check(auth, [theirs, ours]).ok


def test_unconfigured_algorithm_gets_a_challenge():
    auth = make_auth(algorithms=("SHA-256",))
    (challenge,) = auth.challenge(REALM, NOW)
    md5 = answer(challenge.replace("algorithm=SHA-256", "algorithm=MD5"))
    result = check(auth, md5)
    assert_challenge(result, stale=False)
    assert "algorithm=SHA-256" in result.headers[0][1]


@pytest.mark.parametrize("drop, add, reason", [
    ("response", "", "response"),
    ("username", "", "username"),
    ("nc", "", "nc"),
    ("cnonce", "", "cnonce"),
    ("nc", "nc=1", "hex"),
    ("qop", "qop=auth-int", "qop"),
])
def test_incomplete_credentials_are_a_bad_request(drop, add, reason):
    auth = make_auth()
    (challenge, _) = auth.challenge(REALM, NOW)
    params = dict(answer(challenge).params)
    del params[drop]
    value = ", ".join(f'{k}="{v}"' for k, v in params.items()) + (", " + add if add else "")
    result = check(auth, parse_credentials("Digest " + value))
    assert (result.ok, result.status, result.headers) == (False, 400, [])
    assert reason in result.reason


def test_htdigest_users(tmp_path):
    path = tmp_path / "users.htdigest"
    path.write_text(f"alice:{REALM}:{md5_ha1('alice', REALM, 'secret')}\n"
                    f"bob:{REALM}::SHA-256={sha256_ha1('bob', REALM, 'hunter2')}\n")
    for users in (path, str(path), load_htdigest(path)):
        auth = make_auth(users=users)
        # a file's HA1s are checked from the C table; a dict's are asked of _ha1
        assert (len(auth._ha1_table) if auth._ha1_table is not None else None) == (
            None if isinstance(users, dict) else 2)
        sha, md5 = auth.challenge(REALM, NOW)
        assert check(auth, answer(md5)).ok
        # a plain htdigest line has no SHA-256 HA1: alice can only use MD5,
        # and her MD5 HA1 is no SHA-256 key either
        assert_challenge(check(auth, answer(sha)), stale=False)
        ch = parse_credentials(sha)
        md5_key = digest_response("SHA-256", "alice", REALM, ha1=md5_ha1("alice", REALM, "secret"),
                                  method="REGISTER", uri="sip:127.0.0.1:5060", nonce=ch.nonce)
        forged = Credentials("Digest", {"username": "alice", "realm": REALM, "nonce": ch.nonce,
                                        "uri": "sip:127.0.0.1:5060", "response": md5_key,
                                        "algorithm": "SHA-256"})
        assert_challenge(check(auth, forged), stale=False)
        assert check(auth, answer(sha, "bob", "hunter2"), aor_user="bob").ok
        assert_challenge(check(auth, answer(md5, "bob", "hunter2", nc=2), aor_user="bob"), stale=False)


def test_htdigest_table_keys_are_exact_and_overrides_are_asked(tmp_path):
    """The C table of a users file matches user and realm exactly (UTF-8,
    case kept), as the dict did; an Authorize subclass with its own _ha1, or a
    dict given directly (which may change later), is asked in Python."""
    path = tmp_path / "users.htdigest"
    path.write_text(f"jörg:{REALM}:{md5_ha1('jörg', REALM, 'straße')}\n"
                    f"Alice:{REALM}:{md5_ha1('Alice', REALM, 'secret')}\n")
    auth = make_auth(users=path)
    assert len(auth._ha1_table) == 2
    (challenge,) = auth.challenge(REALM, NOW, user="jörg")
    assert check(auth, answer(challenge, "jörg", "straße"), aor_user="jörg").ok
    assert not check(auth, answer(challenge, "alice", "secret", nc=2), aor_user="alice").ok
    assert check(auth, answer(challenge, "Alice", "secret", nc=3), aor_user="Alice").ok

    class Own(Authorize):
        def _ha1(self, user, realm, base):
            return md5_ha1(user, realm, "other")
    own = Own(REALM, path, secret=b"k" * 32, algorithms=("MD5",))
    assert own._ha1_table is None
    (challenge,) = own.challenge(REALM, NOW)
    assert check(own, answer(challenge, "Alice", "other"), aor_user="Alice").ok

    users = load_htdigest(path)
    auth = make_auth(users=users)
    (challenge,) = auth.challenge(REALM, NOW, user="Alice")
    users[("Alice", REALM)] = md5_ha1("Alice", REALM, "new")
    assert check(auth, answer(challenge, "Alice", "new"), aor_user="Alice").ok


def test_callable_users():
    calls = []

    def users(user, realm):
        calls.append((user, realm))
        return {"alice": "secret"}.get(user)

    auth = make_auth(users=users)
    (challenge, _) = auth.challenge(REALM, NOW)
    assert check(auth, answer(challenge)).ok
    assert_challenge(check(auth, answer(challenge, "carol", "secret"), aor_user="carol"), stale=False)
    assert calls == [("alice", REALM), ("carol", REALM)]


def test_secrets_never_show():
    password, secret = "p4ssw0rd-never-shown", b"S" * 32
    ha1 = md5_ha1("alice", REALM, password)
    auth = Authorize(REALM, {"alice": password}, secret=secret)
    seen = [repr(auth)]
    (sha, md5) = auth.challenge(REALM, NOW)
    for creds in ([], answer(sha, password="wrong"), answer(sha, password=password),
                  answer(md5, password=password, nc=2, uri="sip:elsewhere")):
        result = check(auth, creds, aor_user="bob")
        seen += [repr(result), result.reason]
    text = "\n".join(seen)
    assert password not in text and ha1 not in text and secret.decode() not in text
    assert "alice" not in repr(auth)


@given(st.dictionaries(
    st.sampled_from(["username", "realm", "nonce", "uri", "response", "algorithm", "qop", "nc",
                     "cnonce", "opaque"]),
    st.one_of(st.text(max_size=50), st.sampled_from([REALM, "auth", "MD5", "SHA-256-sess",
                                                      "00000001", "sip:127.0.0.1:5060"]))))
def test_check_never_fails_on_odd_credentials(params):
    auth = make_auth()
    result = check(auth, Credentials("Digest", params))
    assert result.status in (400, 401) and not result.ok
