"""The registrar's digest check on header bytes against Authorize.check on
parsed Credentials, and the compiled pieces of the digest check (fastsip.core._core) against their
definitions (HMAC, the response formula, the nonce-count window).

``Registrar(authorize=Authorize(...))`` scans the Authorization values into
spans (``scan_digest in fastsip.core._core``) and runs ``AuthCore.verify`` on them;
an Authorize whose ``check`` is overridden makes the registrar parse the
values with ``parse_credentials`` and call ``check`` instead, which ends in
the same ``verify``.  Every case below goes through both and must get the
same reply."""
import base64
import hashlib
import hmac
import itertools
import re
from collections import OrderedDict

import pytest
from hypothesis import given, settings, strategies as st

import fastsip
from fastsip import Authorize, Registrar
from fastsip.auth import digest_response, parse_credentials
from fastsip.core import _core
from fastsip.core.authorize import _bytes
from test_registrar import NOW, SRC, request

SECRET = b"s" * 32
DOMAIN = "example.com"
USERS = {"alice": "wonderland", "bob": "builder", "jörg": "straße"}


class Parsed(Authorize):
    """check overridden: the registrar takes the parse_credentials path."""

    def check(self, *args):
        return super().check(*args)


@pytest.fixture
def parsed_calls(monkeypatch):
    """How often the registrar called parse_credentials (the test's own
    reading of the replies' challenges, in ``summary``, is not counted)."""
    calls = []
    real = _core.parse_credentials

    def spy(value):
        if not READING_REPLY:
            calls.append(value)
        return real(value)

    monkeypatch.setattr(_core, "parse_credentials", spy)
    return calls


def registrars(**kw):
    # fail_limit=0: the cases fail on purpose, from one source (the budget is tested
    # in test_registrar_auth.py)
    kw = {"users": USERS, "secret": SECRET, "fail_limit": 0, **kw}
    return [Registrar(min_expires=60, max_expires=3600, domains=[DOMAIN], authorize=cls(**kw))
            for cls in (Authorize, Parsed)]


def nonce_at(auth, t, realm=DOMAIN):
    return parse_credentials(auth.challenge(realm, t)[0]).nonce


def value(nonce, user="alice", password=None, realm=DOMAIN, algorithm="SHA-256", qop="auth",
          nc="00000001", cnonce="c0ffee", uri="sip:example.com", response=None, edit=None):
    """An Authorization value answering ``nonce``; ``edit`` rewrites the list
    of (name, value, quoted) before it is joined."""
    password = USERS.get(user, "x") if password is None else password
    if response is None:
        response = digest_response(algorithm or "MD5", user, realm, password, method="REGISTER",
                                   uri=uri, nonce=nonce, qop=qop, nc=nc if qop else None,
                                   cnonce=cnonce if qop else None)
    params = [("username", user, True), ("realm", realm, True), ("nonce", nonce, True),
              ("uri", uri, True), ("response", response, True)]
    if algorithm:
        params.append(("algorithm", algorithm, False))
    if qop:
        params += [("qop", qop, False), ("nc", nc, False), ("cnonce", cnonce, True)]
    if edit:
        params = edit(params)
    return "Digest " + ", ".join(f'{k}="{v}"' if q else f"{k}={v}" for k, v, q in params)


def with_auth(*values, **kw):
    return request(extra=tuple(f"Authorization: {v}" for v in values), **kw)


READING_REPLY = []      # non-empty while summary() parses a reply's challenges


def summary(reply):
    r = fastsip.parse(reply)
    READING_REPLY.append(True)
    try:
        challenges = r.www_authenticate
    finally:
        READING_REPLY.pop()
    return (r.status, r.reason,
            [(c.realm, c.algorithm, c.params.get("qop"), c.params.get("stale"))
             for c in challenges],
            sorted(c.uri for c in r.contacts))


def both(regs, data, now=NOW):
    """The replies of both registrars, which must agree; the fast one's summary."""
    fast, slow = (summary(reg.handle(data, SRC, now)) for reg in regs)
    assert fast == slow
    return fast


def drop(*names):
    return lambda params: [p for p in params if p[0] not in names]


def replace(name, new, quoted=None):
    return lambda params: [(k, new, q if quoted is None else quoted) if k == name else (k, v, q)
                           for k, v, q in params]


def add(*extra):
    return lambda params: params + list(extra)


# Each case: a name, the request (from the nonce and a fresh CSeq), the
# expected status and stale flag, and whether the fast registrar may stay on
# spans.  Cases run in order against one pair of registrars (counts carry on).
CASES = [
    ("sha256 qop", lambda n, s: with_auth(value(n), cseq=s), 200, None, True),
    ("same nc again: replay", lambda n, s: with_auth(value(n), cseq=s), 401, "true", True),
    ("higher nc", lambda n, s: with_auth(value(n, nc="00000003"), cseq=s), 200, None, True),
    ("late nc inside the window", lambda n, s: with_auth(value(n, nc="00000002"), cseq=s), 200,
     None, True),
    ("late nc again", lambda n, s: with_auth(value(n, nc="00000002"), cseq=s), 401, "true", True),
    ("md5 qop", lambda n, s: with_auth(value(n, algorithm="MD5", nc="00000004"), cseq=s), 200,
     None, True),
    ("md5 without qop or algorithm (linphone)",
     lambda n, s: with_auth(value(n, algorithm=None, qop=None), cseq=s), 200, None, True),
    ("the same qop-less answer again",
     lambda n, s: with_auth(value(n, algorithm=None, qop=None), cseq=s), 200, None, True),
    ("sha256 without qop", lambda n, s: with_auth(value(n, qop=None), cseq=s), 200, None, True),
    ("wrong password", lambda n, s: with_auth(value(n, password="nope", nc="00000010"), cseq=s),
     401, None, True),
    ("unknown user", lambda n, s: with_auth(value(n, user="mallory"), user="mallory", cseq=s), 401,
     None, True),
    ("kamailio's nonce",
     lambda n, s: with_auth(value("awesQGsHqxRJMKWZzVS/baJzgVuVnSOD"), cseq=s), 401, None, True),
    ("nonce with a changed time", lambda n, s: with_auth(value(("B" if n[0] == "A" else "A") + n[1:]),
                                                         cseq=s), 401, None, True),
    ("nonce with a changed mac", lambda n, s: with_auth(
        value(n[:-2] + ("AA" if n[-2:] != "AA" else "BB")), cseq=s), 401, None, True),
    ("nonce one digit longer", lambda n, s: with_auth(value(n + "A"), cseq=s), 401, None, True),
    ("nonce one digit shorter", lambda n, s: with_auth(value(n[:-1]), cseq=s), 401, None, True),
    ("empty nonce", lambda n, s: with_auth(value(""), cseq=s), 401, None, True),
    ("nonce with a byte outside base64url", lambda n, s: with_auth(value(n[:-1] + "+"), cseq=s),
     401, None, True),
    ("nonce's unused low bits changed (decodes the same)",
     lambda n, s: with_auth(value(n[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[
         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(n[-1]) ^ 1]),
         cseq=s), 200, None, True),
    ("digest uri elsewhere", lambda n, s: with_auth(value(n, uri="sip:elsewhere.example.com",
                                                           nc="00000011"), cseq=s), 400, None, True),
    ("digest uri equal as a URI", lambda n, s: with_auth(
        value(n, uri="<sip:Example.COM>", nc="00000012"), cseq=s), 200, None, True),
    ("request-uri in upper case", lambda n, s: with_auth(
        value(n, nc="00000013"), ruri="SIP:EXAMPLE.COM", cseq=s), 200, None, True),
    ("no response", lambda n, s: with_auth(value(n, edit=drop("response")), cseq=s), 400, None,
     True),
    ("no username and uri", lambda n, s: with_auth(value(n, edit=drop("username", "uri")), cseq=s),
     400, None, True),
    ("qop=auth-int", lambda n, s: with_auth(value(n, edit=replace("qop", "auth-int")), cseq=s), 400,
     None, True),
    ("nc not 8 digits", lambda n, s: with_auth(value(n, nc="1"), cseq=s), 400, None, True),
    ("nc not hex", lambda n, s: with_auth(value(n, nc="0000000g"), cseq=s), 400, None, True),
    ("no cnonce", lambda n, s: with_auth(value(n, edit=drop("cnonce")), cseq=s), 400, None, True),
    ("another realm only", lambda n, s: with_auth(value(n, realm="proxy.example"), cseq=s), 401,
     None, True),
    ("another realm, then ours", lambda n, s: with_auth(
        value(n, realm="proxy.example"), value(n, nc="00000020"), cseq=s), 200, None, True),
    ("Basic", lambda n, s: with_auth("Basic YWxpY2U6c2VjcmV0", cseq=s), 401, None, True),
    ("an unknown scheme, then ours", lambda n, s: with_auth(
        "NoOneKnowsThisScheme opaque-data=here", value(n, nc="00000021"), cseq=s), 200, None, True),
    ("Digest with a token68", lambda n, s: with_auth("Digest dXNlcjpwYXNz", cseq=s), 401, None,
     True),
    ("Digest without parameters", lambda n, s: with_auth("Digest", cseq=s), 401, None, True),
    ("unterminated quoted-string", lambda n, s: with_auth('Digest username="alice, realm=',
                                                           cseq=s), 400, None, True),
    ("a good value and a malformed one", lambda n, s: with_auth(
        value(n, nc="00000022"), "Digest ,=", cseq=s), 400, None, True),
    ("username twice", lambda n, s: with_auth(value(n, edit=add(("USERNAME", "bob", True))),
                                              cseq=s), 400, None, True),
    ("an unknown parameter twice", lambda n, s: with_auth(
        value(n, edit=add(("opaque", "a", True), ("Opaque", "b", True))), cseq=s), 400, None, True),
    ("unknown parameters", lambda n, s: with_auth(value(n, nc="00000023", edit=add(
        ("opaque", "x", True), ("userhash", "false", False), (",foo", "bar", False))), cseq=s),
     200, None, True),
    ("many unknown parameters", lambda n, s: with_auth(value(n, nc="00000024", edit=add(
        *[(f"p{i}", "v", False) for i in range(20)])), cseq=s), 200, None, False),
    ("names, scheme and tokens in other cases", lambda n, s: with_auth(
        value(n, nc="00000025", algorithm="sha-256", qop="AUTH", edit=lambda ps: [
            (k.upper(), v.upper() if k == "response" else v, q) for k, v, q in ps]
              ).replace("Digest", "DIGEST"), cseq=s), 200, None, True),
    ("response of another length", lambda n, s: with_auth(value(n, response="0" * 32), cseq=s),
     401, None, True),
    ("folded value", lambda n, s: with_auth(value(n, nc="00000026").replace(", ", ",\r\n  "),
                                            cseq=s), 200, None, True),
    ("quoted-pair in the username", lambda n, s: with_auth(
        value(n, nc="00000027").replace('"alice"', '"al\\ice"'), cseq=s), 200, None, False),
    ("fold inside a quoted-string (unfolded: 'c0 ffee')", lambda n, s: with_auth(
        value(n, nc="00000028", cnonce="c0 ffee", edit=replace("cnonce", "c0\r\n ffee")), cseq=s),
     200, None, False),
    ("a user name that is not ASCII", lambda n, s: with_auth(
        value(n, user="jörg"), user="j%C3%B6rg", cseq=s), 200, None, False),
    ("a cnonce that is not ASCII", lambda n, s: with_auth(
        value(n, nc="00000029", cnonce="café"), cseq=s), 200, None, False),
    ("another user's AOR", lambda n, s: with_auth(
        value(n, user="bob"), cseq=s), 403, None, True),
    # the AOR's user, %HH escapes resolved, is compared with the user name in C
    ("the AOR's user with escapes", lambda n, s: with_auth(
        value(n, nc="0000002b"), user="al%69%63e", cseq=s), 200, None, True),
    ("an escaped AOR user that is another's", lambda n, s: with_auth(
        value(n, nc="0000002c"), user="b%6Fb", cseq=s), 403, None, True),
    ("an AOR user that is not ASCII against an ASCII name", lambda n, s: with_auth(
        value(n, nc="0000002d"), user="al%C3%AFce", cseq=s), 403, None, True),
    ("an AOR user with a lone escaped byte", lambda n, s: with_auth(
        value(n, nc="0000002e"), user="alice%FF", cseq=s), 403, None, True),
    ("the AOR's domain in upper case", lambda n, s: with_auth(
        value(n, nc="0000002f"), to="<sip:alice@EXAMPLE.com>", cseq=s), 200, None, True),
    ("and a new count after all that", lambda n, s: with_auth(value(n, nc="0000002a"), cseq=s),
     200, None, True),
]


def test_fast_and_parsed_paths_agree(parsed_calls):
    regs = registrars()
    nonce = nonce_at(regs[0].authorize, NOW)
    for cseq, (name, make, status, stale, spans_only) in enumerate(CASES, 2):
        before = len(parsed_calls)
        data = make(nonce, cseq)
        got = both(regs, data)
        assert (got[0], [c[3] for c in got[2]][:1] or [None]) == (status, [stale]), name
        # the fast registrar parsed nothing unless the case needs it; the
        # other one parsed every value
        fast_parsed = len(parsed_calls) - before - data.count(b"Authorization:")
        assert fast_parsed == (0 if spans_only else data.count(b"Authorization:")), name
    assert len(regs[0].authorize._counts) == len(regs[1].authorize._counts)


@pytest.mark.parametrize("t, stale", [(NOW + 301, "true"), (NOW - 301, "true"), (NOW + 299, None)])
def test_nonce_age_agrees(t, stale):
    regs = registrars()
    nonce = nonce_at(regs[0].authorize, NOW)
    status = 200 if stale is None else 401
    got = both(regs, with_auth(value(nonce)), now=t)
    assert got[0] == status and (got[2][0][3] if got[2] else None) == stale
    # a wrong password with an old nonce is not stale
    got = both(regs, with_auth(value(nonce, password="nope", nc="00000002")), now=NOW + 301)
    assert got[0] == 401 and got[2][0][3] is None


@pytest.mark.parametrize("algorithm", ["SHA-256-sess", "MD5-sess"])
def test_sess_algorithms_agree(algorithm):
    regs = registrars(algorithms=(algorithm, "MD5"))
    nonce = nonce_at(regs[0].authorize, NOW)
    assert both(regs, with_auth(value(nonce, algorithm=algorithm)))[0] == 200
    got = both(regs, with_auth(value(nonce, algorithm=algorithm, qop=None, response="0" * 64)))
    assert got[:2] == (400, f"{algorithm} credentials lack qop=auth")
    # an algorithm not offered: challenged
    assert both(regs, with_auth(value(nonce, algorithm="SHA-256", nc="00000002")))[0] == 401


@pytest.mark.parametrize("kw, user, to_user, status", [
    (dict(realm="ACME PBX"), "alice", "alice", 403),       # realm is not the domain
    (dict(realm="ACME PBX", policy=lambda u, r, au, ad: (u, r, au, ad) == (
        "alice", "ACME PBX", "bob", DOMAIN)), "alice", "bob", 200),
    (dict(users=lambda user, realm: {"alice": "wonderland"}.get(user)), "alice", "alice", 200),
    (dict(users=lambda user, realm: None), "alice", "alice", 401),
    (dict(users={("alice", DOMAIN, "SHA-256"): hashlib.sha256(
        b"alice:example.com:wonderland").hexdigest().upper()}), "alice", "alice", 200),
    (dict(replay_window=0), "alice", "alice", 200),
])
def test_configurations_agree(kw, user, to_user, status):
    regs = registrars(**kw)
    realm = kw.get("realm", DOMAIN)
    nonce = nonce_at(regs[0].authorize, NOW, realm)
    got = both(regs, with_auth(value(nonce, user=user, realm=realm), user=to_user))
    assert got[0] == status
    # once more with the same count: replayed if it was accepted
    got = both(regs, with_auth(value(nonce, user=user, realm=realm), user=to_user, cseq=2))
    # (a 403 comes after the count was taken, step 8)
    assert got[0] == (401 if status in (200, 403) else status)


@pytest.mark.parametrize("to_user, name", [("a" * 300, "a" * 300), ("%61" * 300, "a" * 300),
                                           ("%61" * 80 + "a" * 100, "a" * 180)])
def test_long_aor_users_agree(to_user, name):
    """A To user whose escapes resolve to more than the registrar's stack buffer
    (256 bytes) goes through str; shorter ones stay bytes: the same answers.  (An
    AOR over 255 bytes is refused after authentication: 400 means it passed.)"""
    users = {"a" * 300: "pw", "a" * 180: "pw"}
    regs = registrars(users=users)
    nonce = nonce_at(regs[0].authorize, NOW)
    got = both(regs, with_auth(value(nonce, user=name, password="pw"), user=to_user))
    assert got[:2] == ((200, "OK") if len(name) < 255 else (400, "AOR longer than 255 bytes"))
    other = next(u for u in users if u != name)
    assert both(regs, with_auth(value(nonce, user=other, password="pw"), user=to_user,
                                cseq=2))[0] == 403


def test_the_realm_check_follows_the_domain():
    """own_aor_only remembers the last domain it weighed against the realm: a
    domain that is not the realm is refused, whatever came before or after."""
    regs = [Registrar(min_expires=60, max_expires=3600, domains=[DOMAIN, "other.example"],
                      authorize=cls(users=USERS, secret=SECRET, fail_limit=0, realm=DOMAIN))
            for cls in (Authorize, Parsed)]
    nonce = nonce_at(regs[0].authorize, NOW)
    for nc, domain, status in [(1, DOMAIN, 200), (2, "other.example", 403), (3, DOMAIN, 200),
                               (4, "Other.Example", 403), (5, "EXAMPLE.COM", 200)]:
        data = with_auth(value(nonce, nc=f"{nc:08x}"), to=f"<sip:alice@{domain}>", cseq=nc)
        assert both(regs, data)[0] == status, domain


def test_the_realm_per_domain_when_not_set():
    """Without a realm each AOR domain is its own realm (its host, lower case):
    the challenges and the checks follow the domain from one request to the next."""
    regs = [Registrar(min_expires=60, max_expires=3600, domains=[DOMAIN, "other.example"],
                      authorize=cls(users=USERS, secret=SECRET, fail_limit=0))
            for cls in (Authorize, Parsed)]
    for cseq, domain in enumerate([DOMAIN, "Other.Example", DOMAIN, "other.example"], 1):
        first = request(to=f"<sip:alice@{domain}>", cseq=2 * cseq)
        got = both(regs, first)
        assert got[0] == 401 and {c[0] for c in got[2]} == {domain.lower()}
        realm = domain.lower()
        nonce = nonce_at(regs[0].authorize, NOW, realm)
        data = with_auth(value(nonce, realm=realm), to=f"<sip:alice@{domain}>", cseq=2 * cseq + 1)
        assert both(regs, data)[0] == 200
        # a nonce of the other domain's realm is not this one's
        other = nonce_at(regs[0].authorize, NOW, "other.example" if realm == DOMAIN else DOMAIN)
        data = with_auth(value(other, realm=realm), to=f"<sip:alice@{domain}>", cseq=2 * cseq + 1)
        assert both(regs, data)[0] == 401


def test_a_policy_gets_the_aor_as_str():
    seen = []

    def policy(user, realm, aor_user, aor_domain):
        seen.append((user, realm, aor_user, aor_domain))
        return True

    regs = registrars(policy=policy)
    nonce = nonce_at(regs[0].authorize, NOW)
    assert both(regs, with_auth(value(nonce), user="b%6Fb%C3%B6", domain="Example.COM"))[0] == 200
    assert seen == [("alice", DOMAIN, "bobö", "Example.COM")] * 2
    assert all(type(x) is str for x in seen[0])


def test_realm_is_the_aor_host_when_not_set():
    regs = registrars()
    data = with_auth(value(nonce_at(regs[0].authorize, NOW)), to="<sip:alice@Example.COM:5060>")
    assert both(regs, data)[0] == 200


# ---------------------------------------------------------------------------
# The 401: written in C, or through an overridden challenge
# ---------------------------------------------------------------------------

NONCE = re.compile(rb'nonce="[A-Za-z0-9_-]{43}"')


def masked(reply):
    """A reply with its nonces (fresh each time) replaced: how many there were, and the rest."""
    return NONCE.subn(b'nonce="N"', reply)[::-1]


HTDIGEST = {("alice", DOMAIN): "0" * 32,
            ("bob", DOMAIN): "1" * 32, ("bob", DOMAIN, "SHA-256"): "2" * 64}


@pytest.mark.parametrize("kw", [
    {},
    dict(algorithms=("MD5",)),
    dict(algorithms=("MD5", "SHA-256-sess")),
    dict(qop=()),
    dict(realm="ACME PBX réalm"),
    dict(users=HTDIGEST),
])
@pytest.mark.parametrize("to_user", ["alice", "bob", "mallory"])
def test_the_401_written_in_c_is_the_one_challenge_gives(kw, to_user):
    """The registrar writes a 401 itself (no AuthResult, no header list), byte for
    byte what the path through check and challenge writes, nonce aside: a first
    request, a wrong password, an expired nonce (stale=true)."""
    regs = registrars(**kw)
    realm = kw.get("realm", DOMAIN)
    nonce = nonce_at(regs[0].authorize, NOW, realm)
    alg = regs[0].authorize.algorithms[0]
    answer = value(nonce, user=to_user, realm=realm, algorithm=alg,
                   qop="auth" if regs[0].authorize.qop else None)
    for data, now, stale in [(request(user=to_user), NOW, False),
                             (with_auth(value(nonce, user=to_user, realm=realm, algorithm=alg,
                                              password="nope"), user=to_user, cseq=2), NOW, False),
                             (with_auth(answer, user=to_user, cseq=3), NOW + 301, True)]:
        if stale and kw.get("users") is HTDIGEST:
            continue        # (no password behind these HA1s: no right answer to go stale)
        fast, slow = (reg.handle(data, SRC, now) for reg in regs)
        count, rest = masked(fast)
        assert fast.startswith(b"SIP/2.0 401 Unauthorized\r\n")
        assert count == len(fastsip.parse(fast).www_authenticate) >= 1
        assert (b"stale=true" in fast) == (stale and to_user != "mallory")    # (unknown: wrong)
        assert masked(slow) == (count, rest)
        # and the nonce is a fresh one, signed for the realm
        fresh = re.search(rb'nonce="([^"]+)"', fast).group(1).decode()
        raw = base64.urlsafe_b64decode(fresh + "=")
        assert fresh != nonce and regs[0].authorize._mac(raw[:16], realm) == raw[16:]


class OwnChallenge(Authorize):
    """challenge overridden: the registrar's 401 must come from it."""

    def challenge(self, realm, now, stale=False, user=None):
        return [v + ', opaque="mine"' for v in super().challenge(realm, now, stale, user)]


def test_an_overridden_challenge_writes_the_401():
    own, plain = (Registrar(min_expires=60, max_expires=3600, domains=[DOMAIN],
                            authorize=cls(users=USERS, secret=SECRET))
                  for cls in (OwnChallenge, Authorize))
    for reg, opaque in ((own, ["mine", "mine"]), (plain, [None, None])):
        reply = fastsip.parse(reg.handle(request(), SRC, NOW))
        assert reply.status == 401
        assert [c.params.get("opaque") for c in reply.www_authenticate] == opaque
    # the check itself still runs on spans: a right answer is taken
    nonce = nonce_at(own.authorize, NOW)
    assert fastsip.parse(own.handle(with_auth(value(nonce), cseq=2), SRC, NOW)).status == 200


def test_changing_the_settings_changes_the_challenge():
    reg = registrars()[0]
    assert [c.algorithm for c in fastsip.parse(reg.handle(request(), SRC, NOW)).www_authenticate] \
        == ["SHA-256", "MD5"]
    reg.authorize.algorithms = ("MD5",)
    reg.authorize.qop = ()
    got = fastsip.parse(reg.handle(request(cseq=2), SRC, NOW)).www_authenticate
    assert [(c.algorithm, c.params.get("qop")) for c in got] == [("MD5", None)]
    reg.authorize.algorithms = ("SHA-256", "MD5")       # two again: asks algorithms_for
    reg.authorize.realm = "ACME PBX"                    # a realm set later is used ...
    got = fastsip.parse(reg.handle(request(cseq=3), SRC, NOW)).www_authenticate
    assert [(c.realm, c.algorithm) for c in got] == [("ACME PBX", "SHA-256"), ("ACME PBX", "MD5")]
    reg.authorize.realm = ""                            # ... and an empty one is none
    got = fastsip.parse(reg.handle(request(cseq=4), SRC, NOW)).www_authenticate
    assert {c.realm for c in got} == {DOMAIN}


# ---------------------------------------------------------------------------
# The compiled pieces against their definitions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("secret", [b"", b"k", b"k" * 32, b"k" * 64, b"k" * 65, bytes(range(200))])
@pytest.mark.parametrize("realm", ["example.com", "", "ACME PBX", "réalm", "\udcff\udc80", "\ud800"])
def test_nonce_mac_is_hmac_sha256(secret, realm):
    auth = Authorize(users={}, secret=secret)
    head = bytes(range(16))
    assert auth._mac(head, realm) == hmac.digest(secret, head + _bytes(realm), "sha256")[:16]


def _old_hex_hash(base, text):
    return {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}[base](_bytes(text)).hexdigest()


def _old_response(alg, ha1, method, uri, nonce, qop, nc, cnonce):
    """The formula as fastsip.auth wrote it in Python (f-strings, _bytes)."""
    base = alg.removesuffix("-sess")
    if alg != base:
        ha1 = _old_hex_hash(base, f"{ha1}:{nonce}:{cnonce}")
    ha2 = _old_hex_hash(base, f"{method}:{uri}")
    if qop is None:
        return _old_hex_hash(base, f"{ha1}:{nonce}:{ha2}")
    return _old_hex_hash(base, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


TEXT = (st.text(alphabet=st.characters(codec=None, categories=None, exclude_categories=()), max_size=12)
        | st.sampled_from(["\udcff", "\ud800", "a\udc80b", "é", ""]))


@settings(max_examples=300, deadline=None)
@given(alg=st.sampled_from(["SHA-256", "SHA-256-sess", "MD5", "MD5-sess"]),
       ha1=TEXT, method=TEXT, uri=TEXT, nonce=TEXT, qop=st.sampled_from([None, "auth", "AUTH"]),
       nc=TEXT, cnonce=TEXT)
def test_response_formula_matches_the_python_one(alg, ha1, method, uri, nonce, qop, nc, cnonce):
    """Surrogates included: text is hashed as _bytes hashes the whole text."""
    expected = _old_response(alg, ha1.lower(), method, uri, nonce, qop, nc, cnonce)
    got = digest_response(alg, "u", "r", ha1=ha1, method=method, uri=uri, nonce=nonce, qop=qop,
                          nc=nc if qop else None, cnonce=cnonce)
    assert got == expected


@pytest.mark.parametrize("alg", ["SHA-256", "SHA-256-sess", "MD5", "MD5-sess"])
@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 119, 511, 512, 513, 5000])
def test_long_and_block_edge_texts_hash_as_hashlib_does(alg, size):
    """The compiled hashes (joined on the stack up to 512 bytes, else on the
    heap) at the lengths where MD5 and SHA-256 padding changes."""
    cnonce = ("c" * size)[:size]
    expected = _old_response(alg, "ab" * 16, "REGISTER", "sip:x", "n", "auth", "00000001", cnonce)
    assert digest_response(alg, "u", "r", ha1="ab" * 16, method="REGISTER", uri="sip:x",
                           nonce="n", qop="auth", nc="00000001", cnonce=cnonce) == expected


def test_ha2_memo_keeps_algorithms_and_texts_apart():
    for uri in ["sip:a", "sip:b", "sip:a" + "x" * 300]:
        for alg in ("MD5", "SHA-256"):
            for _ in range(2):
                assert digest_response(alg, "u", "r", "p", method="REGISTER", uri=uri,
                                       nonce="n") == _old_response(
                    alg, _old_hex_hash(alg, "u:r:p"), "REGISTER", uri, "n", None, None, None)


class CountModel:
    """Authorize._count_is_new as it was written in Python (OrderedDict + int bitmap)."""

    def __init__(self, window, max_nonces, ttl):
        self.replay_window, self.max_nonces, self.nonce_ttl = window, max_nonces, ttl
        self._counts = OrderedDict()
        self._evicted_upto = float("-inf")

    def is_new(self, nonce, user, nc, issued, now):
        counts = self._counts
        key = (nonce, user)
        entry = counts.pop(key, None)
        if entry is None:
            if issued <= self._evicted_upto:
                return False
            highest, seen = nc, 1
        else:
            highest, seen, _ = entry
            if nc > highest:
                shift = nc - highest
                if shift < self.replay_window:
                    seen = (seen << shift | 1) & ((1 << self.replay_window) - 1)
                else:
                    seen = 1
                highest = nc
            else:
                age = highest - nc
                if age >= self.replay_window or seen >> age & 1:
                    counts[key] = entry
                    return False
                seen |= 1 << age
        counts[key] = (highest, seen, issued)
        while counts:
            oldest_key, (_, _, oldest_issued) = next(iter(counts.items()))
            if now - oldest_issued > self.nonce_ttl:
                del counts[oldest_key]
            elif len(counts) > self.max_nonces:
                del counts[oldest_key]
                self._evicted_upto = max(self._evicted_upto, oldest_issued)
            else:
                break
        return True


NC = st.one_of(st.integers(1, 40), st.integers(1, 300), st.sampled_from([0, 63, 64, 65, 128, 129,
                                                                           0xFFFFFFFE, 0xFFFFFFFF]))


@settings(max_examples=150, deadline=None)
@given(window=st.sampled_from([0, 1, 2, 5, 63, 64, 65, 100, 128, 130, 1024, 1 << 20]),
       max_nonces=st.integers(1, 4),
       steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), NC, st.integers(0, 25)),
                      max_size=40))
def test_nonce_counts_match_the_python_model(window, max_nonces, steps):
    ttl = 60
    auth = Authorize(users={"alice": "a", "bob": "b"}, secret=SECRET, replay_window=window,
                     max_nonces=max_nonces, nonce_ttl=ttl)
    model = CountModel(window, max_nonces, ttl)
    issued = [NOW + 7 * i for i in range(4)]
    nonces = [nonce_at(auth, t) for t in issued]
    now = NOW + 21
    for which, who, nc, dt in steps:
        now += dt
        user = ("alice", "bob")[who]
        creds = parse_credentials(value(nonces[which], user=user, password=user[0],
                                        nc=f"{nc:08x}"))
        result = auth.check("REGISTER", "sip:example.com", [creds], user, DOMAIN, now)
        if abs(now - issued[which]) > ttl:
            assert result.reason == "nonce expired"
            continue
        new = model.is_new(nonces[which], user, nc, issued[which], now)
        assert result.ok == new, (which, user, nc, now)
        assert len(auth._counts) == len(model._counts)


@settings(max_examples=300, deadline=None)
@given(window=st.sampled_from([3, 64, 65, 100, 128, 129, 200]),
       counts=st.lists(st.integers(1, 260), min_size=2, max_size=60))
def test_one_nonce_counts_match_the_python_model(window, counts):
    """Counts that fall late across the 64-bit words of the window bitmap."""
    auth = Authorize(users={"alice": "a"}, secret=SECRET, replay_window=window)
    model = CountModel(window, 10, 300)
    nonce = nonce_at(auth, NOW)
    for nc in counts:
        creds = [parse_credentials(value(nonce, password="a", nc=f"{nc:08x}"))]
        ok = auth.check("REGISTER", "sip:example.com", creds, "alice", DOMAIN, NOW).ok
        assert ok == model.is_new(nonce, "alice", nc, NOW, NOW), nc


def test_a_late_count_is_remembered_across_words():
    auth = Authorize(users={"alice": "a"}, secret=SECRET, replay_window=130)
    nonce = nonce_at(auth, NOW)

    def ok(nc):
        creds = [parse_credentials(value(nonce, password="a", nc=f"{nc:08x}"))]
        return auth.check("REGISTER", "sip:example.com", creds, "alice", DOMAIN, NOW).ok

    assert ok(100) and ok(40)        # 40 is 60 behind: bit 60 of the first word
    assert ok(110)                   # shifts it to bit 70, in the second word
    assert not ok(40) and not ok(100) and ok(39) and not ok(39)
    assert ok(229) and not ok(100) and ok(101)   # 128 behind: still inside
    assert not ok(99)                             # 130 behind: outside


def test_nonce_counts_memory_stays_small():
    """Consecutive counts fill the window bitmap, which never outgrows it."""
    import tracemalloc
    auth = Authorize(users={"alice": "a"}, secret=SECRET, replay_window=128)
    nonce = nonce_at(auth, NOW)
    check = auth.check
    tracemalloc.start()
    try:
        for nc in itertools.chain(range(1, 600), range(700, 100_000, 997)):
            creds = [parse_credentials(value(nonce, password="a", nc=f"{nc:08x}"))]
            assert check("REGISTER", "sip:example.com", creds, "alice", DOMAIN, NOW).ok
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(auth._counts) == 1 and size < 20_000


class UpperHa1(Authorize):
    """An _ha1 that answers a str subclass in upper case: the check lower-cases a
    copy of it (kept alive while it is hashed)."""

    class Hex(str):
        pass

    def _ha1(self, user, realm, base):
        ha1 = super()._ha1(user, realm, base)
        return None if ha1 is None else self.Hex(ha1.upper())


def test_an_ha1_of_another_kind_is_lowered_and_kept():
    reg = Registrar(min_expires=60, max_expires=3600, domains=[DOMAIN],
                    authorize=UpperHa1(users=USERS, secret=SECRET, fail_limit=0))
    nonce = nonce_at(reg.authorize, NOW)
    for nc in range(1, 20):
        data = with_auth(value(nonce, nc=f"{nc:08x}"), cseq=nc)
        assert summary(reg.handle(data, SRC, NOW))[0] == 200
    data = with_auth(value(nonce, nc="00000100", password="nope"), cseq=100)
    assert summary(reg.handle(data, SRC, NOW))[0] == 401
