"""Digest authentication in front of the registrar: Registrar(authorize=...) and
the Net::SIP-style ReceiveChain([Authorize, Registrar])."""
import pytest

import fastsip
from fastsip import Authorize, ReceiveChain, Registrar
from fastsip.auth import digest_response
from test_registrar import NOW, SRC, request

USERS = {"alice": "wonderland", "bob": "builder"}


def answer(challenge_reply, data, user="alice", password="wonderland", algorithm="SHA-256",
           nc="00000001", uri="sip:example.com", qop=True):
    """The REGISTER ``data`` again with an Authorization answering the challenge."""
    chal = next(c for c in fastsip.parse(challenge_reply).www_authenticate
                if (c.algorithm or "MD5") == algorithm)
    resp = digest_response(algorithm, user, chal.realm, password, method="REGISTER", uri=uri,
                           nonce=chal.nonce, qop="auth" if qop else None,
                           nc=nc if qop else None, cnonce="c0ffee" if qop else None)
    value = (f'Digest username="{user}", realm="{chal.realm}", nonce="{chal.nonce}", '
             f'uri="{uri}", response="{resp}", algorithm={algorithm}')
    if qop:
        value += f', qop=auth, nc={nc}, cnonce="c0ffee"'
    return data.replace(b"Content-Length: 0", f"Authorization: {value}\r\nContent-Length: 0".encode())


@pytest.fixture
def reg():
    return Registrar(min_expires=60, max_expires=3600, domains=["example.com"],
                     authorize=Authorize(users=USERS))


def status(reg, data, now=NOW):
    return fastsip.parse(reg.handle(data, SRC, now))


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
@pytest.mark.parametrize("qop", [True, False])
def test_challenge_then_register(reg, algorithm, qop):
    if not qop:
        reg.authorize = Authorize(users=USERS, qop=())
    data = request()
    first = reg.handle(data, SRC, NOW)
    r = fastsip.parse(first)
    assert r.status == 401 and r.reason == "Unauthorized"
    algs = [c.algorithm for c in r.www_authenticate]
    assert algs == ["SHA-256", "MD5"]
    assert all(c.realm == "example.com" for c in r.www_authenticate)
    assert reg.store.n_bindings == 0
    r = status(reg, answer(first, data, algorithm=algorithm, qop=qop))
    assert r.status == 200 and len(r.contacts) == 1


def test_wrong_password_and_unknown_user_get_a_fresh_401(reg):
    first = reg.handle(request(), SRC, NOW)
    r = status(reg, answer(first, request(), password="nope"))
    assert r.status == 401 and "stale" not in r.www_authenticate[0].params
    r = status(reg, answer(first, request(user="mallory"), user="mallory"))
    assert r.status == 401
    assert reg.store.n_bindings == 0


def test_stale_nonce_only_for_a_correct_digest(reg):
    first = reg.handle(request(), SRC, NOW)
    late = NOW + 301
    r = status(reg, answer(first, request()), now=late)
    assert r.status == 401 and r.www_authenticate[0].params.get("stale") == "true"
    r = status(reg, answer(first, request(), password="nope"), now=late)
    assert r.status == 401 and "stale" not in r.www_authenticate[0].params


def test_replayed_nonce_count_is_refused(reg):
    first = reg.handle(request(), SRC, NOW)
    assert status(reg, answer(first, request())).status == 200
    r = status(reg, answer(first, request(cseq=2)))
    assert r.status == 401
    assert status(reg, answer(first, request(cseq=3), nc="00000002")).status == 200


def test_user_may_only_register_its_own_aor(reg):
    first = reg.handle(request(user="bob"), SRC, NOW)
    r = status(reg, answer(first, request(user="bob"), user="alice"))
    assert (r.status, r.reason) == (403, "Forbidden")
    assert reg.store.n_bindings == 0


def test_third_party_registration_by_policy():
    auth = Authorize(users=USERS, policy=lambda user, realm, aor_user, dom: user == "alice")
    reg = Registrar(domains=["example.com"], authorize=auth)
    first = reg.handle(request(user="bob"), SRC, NOW)
    assert status(reg, answer(first, request(user="bob"), user="alice")).status == 200


def test_digest_uri_must_match_request_uri(reg):
    first = reg.handle(request(), SRC, NOW)
    r = status(reg, answer(first, request(), uri="sip:elsewhere.example.com"))
    assert r.status == 400


def test_unknown_scheme_is_challenged(reg):
    data = request(extra=("Authorization: NoOneKnowsThisScheme opaque-data=here",))
    assert status(reg, data).status == 401


def test_malformed_authorization_is_400(reg):
    data = request(extra=('Authorization: Digest username="alice, realm=',))
    assert status(reg, data).status == 400


def test_receive_chain_authorize_then_registrar():
    auth = Authorize(users=USERS)
    reg = Registrar(domains=["example.com"])
    chain = ReceiveChain([auth, reg], methods=["REGISTER"])
    first = chain.handle(request(), SRC, NOW)
    assert fastsip.parse(first).status == 401
    assert chain.handle(request(method="OPTIONS"), SRC, NOW) is None
    r = fastsip.parse(chain.handle(answer(first, request()), SRC, NOW))
    assert r.status == 200 and reg.query("sip:alice@example.com", now=NOW)
    first = chain.handle(request(user="bob"), SRC, NOW)
    r = fastsip.parse(chain.handle(answer(first, request(user="bob"), user="alice"), SRC, NOW))
    assert r.status == 403


def test_receive_chain_filter_and_receive_form():
    reg = Registrar()
    chain = ReceiveChain([reg], filter=lambda msg: msg.to.uri.startswith("sip:alice"))
    assert chain.handle(request(user="bob"), SRC, NOW) is None

    class Leg:
        sent = []

        def send(self, data, addr):
            self.sent.append(data)

    assert chain.receive(request(), Leg(), "192.0.2.7:5060") == 200
    with pytest.raises(TypeError):
        ReceiveChain([reg], methods=["REGISTER"], filter=bool)


# -- never a challenge that cannot verify (what old clients answer) -------------------

def _ha1(hash_, user, password, realm="example.com"):
    return hash_(f"{user}:{realm}:{password}".encode()).hexdigest()


@pytest.fixture
def htdigest(tmp_path):
    """A users file: alice on a plain htdigest line (MD5 only), bob with the SHA-256 field."""
    import hashlib
    path = tmp_path / "users.htdigest"
    path.write_text(f"alice:example.com:{_ha1(hashlib.md5, 'alice', 'wonderland')}\n"
                    f"bob:example.com:{_ha1(hashlib.md5, 'bob', 'builder')}:"
                    f"SHA-256={_ha1(hashlib.sha256, 'bob', 'builder')}\n")
    return path


def offered(reply):
    return [c.algorithm for c in fastsip.parse(reply).www_authenticate]


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_401_offers_only_what_the_users_file_holds_for_the_user(htdigest, fast_path):
    auth = Authorize(users=str(htdigest))
    reg = Registrar(domains=["example.com"], authorize=auth)
    if fast_path:
        handle = reg.handle
    else:       # the Net::SIP composition: Authorize in a ReceiveChain before the registrar
        handle = ReceiveChain([auth, Registrar(domains=["example.com"])]).handle
    first = handle(request(), SRC, NOW)
    # a plain htdigest line: MD5 alone, so a client reading only the first challenge
    # (sipsak, SIPp) or refusing any non-MD5 one (baresip 1.0) can answer
    assert offered(first) == ["MD5"]
    assert status_of(handle(answer(first, request(cseq=2), algorithm="MD5"), SRC, NOW)) == 200
    # bob's line holds SHA-256 too: both, SHA-256 first (RFC 8760)
    bob = handle(request(user="bob", call_id="b"), SRC, NOW)
    assert offered(bob) == ["SHA-256", "MD5"]
    for cseq, alg in ((2, "SHA-256"), (3, "MD5")):
        data = answer(bob, request(user="bob", call_id="b", cseq=cseq), "bob", "builder", alg,
                      nc=f"{cseq:08x}")
        assert status_of(handle(data, SRC, NOW)) == 200
    # an unknown user gets what every user of the file can answer: nothing tells them apart
    assert offered(handle(request(user="mallory", call_id="m"), SRC, NOW)) == ["MD5"]


def test_plain_passwords_offer_every_configured_algorithm():
    for users in (USERS, lambda user, realm: USERS.get(user)):
        reg = Registrar(domains=["example.com"], authorize=Authorize(users=users))
        assert offered(reg.handle(request(), SRC, NOW)) == ["SHA-256", "MD5"]
    auth = Authorize(users=USERS, algorithms=("MD5", "SHA-256-sess"))
    assert auth.algorithms_for("alice", "example.com") == ("MD5", "SHA-256-sess")


def test_algorithms_for_follows_the_configured_order_and_is_never_empty(htdigest):
    auth = Authorize(users=str(htdigest), algorithms=("MD5", "SHA-256"))
    assert auth.algorithms_for("bob", "example.com") == ("MD5", "SHA-256")
    assert auth.algorithms_for("alice", "example.com") == ("MD5",)
    assert auth.algorithms_for("bob", "other.realm") == ("MD5",)       # as an unknown user
    # nothing configured can verify alice: say so with every configured one, not with none
    only_sha = Authorize(users=str(htdigest), algorithms=("SHA-256",))
    assert only_sha.algorithms_for("alice", "example.com") == ("SHA-256",)


def status_of(reply):
    return fastsip.parse(reply).status


# -- the failure budget (password guessing) ---------------------------------------

def guess(reg, src, password, cseq, user="alice", now=NOW):
    """One REGISTER for ``user`` from ``src`` answering a fresh challenge with ``password``."""
    data = request(user=user, cseq=cseq, call_id=f"guess-{src[0]}-{cseq}")
    first = reg.handle(data, src, now)
    if fastsip.parse(first).status != 401:
        return fastsip.parse(first)
    return fastsip.parse(reg.handle(answer(first, data, user=user, password=password), src, now))


def test_password_guessing_is_throttled_per_source_and_user_while_the_right_password_works():
    reg = Registrar(min_expires=60, max_expires=3600, domains=["example.com"],
                    authorize=Authorize(users=USERS, fail_limit=5, fail_backoff=60))
    attacker, phone = ("198.51.100.9", 5060), ("192.0.2.44", 5060)
    got = [guess(reg, attacker, f"guess{i}", i + 1).status for i in range(8)]
    assert got == [401] * 5 + [403] * 3            # the 6th try is refused outright
    r = guess(reg, attacker, "wonderland", 20)     # even the right password, from there
    assert (r.status, r.reason) == (403, "Too many failed attempts")
    assert reg.store.n_bindings == 0
    r = guess(reg, phone, "wonderland", 21)        # the user's phone elsewhere is fine
    assert r.status == 200 and reg.store.n_bindings == 1
    # a user attacked from many addresses: each gets its tries until the user's
    # budget is spent, then those addresses are refused for that user only
    for i in range(5):
        assert guess(reg, (f"203.0.113.{i}", 5060), "nope", 30 + i, user="bob").status == 401
    assert guess(reg, ("203.0.113.0", 5060), "builder", 40, user="bob").status == 403
    assert guess(reg, ("203.0.113.99", 5060), "builder", 41, user="bob").status == 200
    assert guess(reg, ("203.0.113.1", 5060), "wonderland", 42).status == 200   # alice from there
    st = reg.stats()["auth_failures"]
    assert st["wrong"] == 5 + 5 and st["throttled"] == 3 + 1 + 1
    kinds = sorted(k for k, _key, _until in reg.authorize.failures.events_since())
    assert kinds == ["source", "user", "user"]
    assert reg.authorize.failures.events_since() == []
    # after the backoff the attacker's address may try again
    assert guess(reg, attacker, "wonderland", 50, now=NOW + 61).status == 200


def test_failure_budget_zero_is_off_and_first_challenges_are_no_failures():
    reg = Registrar(min_expires=60, max_expires=3600, domains=["example.com"],
                    authorize=Authorize(users=USERS, fail_limit=0))
    assert [guess(reg, ("198.51.100.9", 5060), "x", i + 1).status for i in range(20)] == [401] * 20
    reg = Registrar(min_expires=60, max_expires=3600, domains=["example.com"],
                    authorize=Authorize(users=USERS, fail_limit=2))
    for i in range(5):                              # unanswered challenges spend nothing
        assert status(reg, request(cseq=i + 1)).status == 401
    assert "wrong" not in reg.stats()["auth_failures"] and len(reg.authorize.failures) == 0


def test_a_refusal_lasts_while_another_has_ended():
    """The registrar weighs the budget only while some refusal lasts (the latest
    end of one): an earlier refusal's end does not end a later one's, a new one
    after all ended is weighed again, and failures under the limit refuse nothing."""
    reg = Registrar(min_expires=60, max_expires=3600, domains=["example.com"],
                    authorize=Authorize(users=USERS, fail_limit=2, fail_backoff=60))
    attacker, other = ("198.51.100.9", 5060), ("198.51.100.10", 5060)
    assert guess(reg, attacker, "nope", 1).status == 401
    assert guess(reg, attacker, "wonderland", 2).status == 200      # one failure: no refusal
    assert guess(reg, attacker, "nope", 3).status == 401            # the source's 2nd: refused
    assert guess(reg, attacker, "wonderland", 4, now=NOW + 59).status == 403
    # bob's budget spent from two addresses at NOW + 50: refused to them until NOW + 110
    for i, src in enumerate((other, ("198.51.100.11", 5060))):
        assert guess(reg, src, "nope", 10 + i, user="bob", now=NOW + 50).status == 401
    assert guess(reg, attacker, "wonderland", 20, now=NOW + 61).status == 200   # source's over
    assert guess(reg, other, "builder", 21, user="bob", now=NOW + 100).status == 403
    assert guess(reg, other, "wonderland", 22, now=NOW + 100).status == 200     # alice: fine
    assert guess(reg, other, "builder", 23, user="bob", now=NOW + 111).status == 200
    # all over; a new refusal is weighed again
    assert guess(reg, attacker, "nope", 30, now=NOW + 200).status == 401
    assert guess(reg, attacker, "nope", 31, now=NOW + 200).status == 401
    assert guess(reg, attacker, "wonderland", 32, now=NOW + 201).status == 403
