"""Digest authentication: the users and the challenges (RFC 3261 §22, RFC 7616,
RFC 8760).  The check itself is compiled (``AuthCore`` in digest.pyx).

Sans-I/O like the rest of the core: nothing here reads the clock or a socket
(the caller passes ``now``, wall-clock seconds), and only ``load_htdigest``
(or an ``Authorize`` given a file path) reads a file, once.

- ``digest_response`` computes a digest ``response`` (MD5, SHA-256 and their
  ``-sess`` variants; ``qop=auth`` or none).
- ``load_htdigest`` reads an htdigest file (plus an optional SHA-256 field).
- ``Authorize`` issues challenges with stateless signed nonces and checks a
  REGISTER's credentials; see docs/auth.md for the order of checks.  The
  check itself is compiled (``AuthCore``, its base class),
  and the registrar runs the same check on the header bytes.

Text is hashed as UTF-8; characters U+DC80..U+DCFF (what decoding the wire
bytes with ``errors="surrogateescape"`` produces) are hashed as the original
bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets

from fastsip.core._core import (
    ALGORITHMS,
    AuthCore,
    AuthResult,
    Request,
    _canonical_algorithm,
    _host,
    make_response,
    own_aor_only,
    parse,
    parse_uri,
    response_digest,
)
from fastsip.errors import ParseError

__all__ = ["ALGORITHMS", "AuthResult", "Authorize", "digest_response", "load_htdigest",
           "own_aor_only"]


# --------------------------------------------------------------------------
# Digest computation
# --------------------------------------------------------------------------

# The hash of each base algorithm; "X-sess" uses the hash of "X".
# ALGORITHMS and _canonical_algorithm come from the compiled core (digest.pyx).
_HASHES = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}
_HEX = re.compile(r"[0-9A-Fa-f]+")


def _text(value):
    """A value as the f-strings of the formulas would write it."""
    return value if type(value) is str else f"{value}"


def _base(algorithm):
    return algorithm.removesuffix("-sess")


def _bytes(text):
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "surrogatepass")


def _hex_hash(base, text):
    return _HASHES[base](_bytes(text)).hexdigest()


def digest_response(algorithm, username, realm, password=None, *, ha1=None, method, uri,
                    nonce, qop=None, nc=None, cnonce=None) -> str:
    """The hex digest ``response`` (RFC 7616 §3.4.1, RFC 2617, RFC 2069).

    ``algorithm``: MD5 (also when None), SHA-256, MD5-sess or SHA-256-sess.
    Give either ``password`` or ``ha1``, the hex H(username:realm:password)
    of the base algorithm (for ``-sess`` the session key is derived from it).
    ``qop`` is None (RFC 2069 style) or ``"auth"``, which needs ``nc`` and
    ``cnonce`` (``-sess`` needs ``cnonce`` too).
    """
    alg = _canonical_algorithm(algorithm)
    if alg is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    if (password is None) == (ha1 is None):
        raise TypeError("digest_response needs exactly one of password and ha1")
    base = _base(alg)
    if ha1 is None:
        ha1 = _hex_hash(base, f"{username}:{realm}:{password}")
    else:
        ha1 = ha1.lower()
    if alg != base and cnonce is None:
        raise ValueError(f"{alg} needs a cnonce")
    if qop is not None:
        if qop.lower() != "auth":
            raise ValueError(f"unsupported qop {qop!r} (only auth)")
        if nc is None or cnonce is None:
            raise ValueError("qop=auth needs nc and cnonce")
    # the formulas themselves are compiled, shared with Authorize's check
    return response_digest(alg, _text(ha1), _text(method), _text(uri), _text(nonce),
                           None if qop is None else _text(qop),
                           None if qop is None else _text(nc),
                           None if cnonce is None else _text(cnonce))


# --------------------------------------------------------------------------
# htdigest files
# --------------------------------------------------------------------------


def load_htdigest(path) -> dict:
    """Read an htdigest file: ``{(user, realm): MD5 HA1 hex}``.

    Lines are ``user:realm:HA1`` as Apache's htdigest writes them.  fastsip
    extension: more fields ``ALGORITHM=HA1`` may follow, e.g.
    ``alice:example.com:<md5>:SHA-256=<sha256 hex>``; they are returned under
    the key ``(user, realm, "SHA-256")``.  The MD5 field may be empty when
    another hash is given (that user then cannot use MD5).  Blank lines and
    lines starting with ``#`` are skipped; a realm may contain ``:``.
    Raises ``ValueError`` naming the line (never its hashes).
    """
    users = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{os.fspath(path)}:{lineno}"
            user, _, rest = line.partition(":")
            fields = rest.split(":")
            if not user or len(fields) < 2:
                raise ValueError(f"{where}: expected user:realm:HA1")
            extra = []
            while len(fields) > 2 and "=" in fields[-1]:
                extra.append(fields.pop().partition("="))
            realm = ":".join(fields[:-1])
            hashes = [("MD5", fields[-1])] if fields[-1] else []
            for name, _, hexdigest in extra:
                alg = _canonical_algorithm(name)
                if alg not in _HASHES or alg == "MD5":
                    raise ValueError(f"{where}: {name!r} is not an extra algorithm (SHA-256=<hex>)")
                hashes.append((alg, hexdigest))
            if not hashes:
                raise ValueError(f"{where}: no HA1")
            for alg, hexdigest in hashes:
                size = _HASHES[alg]().digest_size * 2
                if len(hexdigest) != size or not _HEX.fullmatch(hexdigest):
                    raise ValueError(f"{where}: the {alg} HA1 is not {size} hex digits")
                key = (user, realm) if alg == "MD5" else (user, realm, alg)
                if key in users:
                    raise ValueError(f"{where}: {user}:{realm} ({alg}) appears twice")
                users[key] = hexdigest.lower()
    return users


# --------------------------------------------------------------------------
# Authorize
# --------------------------------------------------------------------------


class Authorize(AuthCore):
    """Digest authentication and AOR authorization for REGISTER.

    ``realm``: the realm to challenge with; None uses the host of each
    request's AOR domain.  ``users``: a dict user -> password, a dict from
    ``load_htdigest`` ((user, realm) -> HA1), a path to an htdigest file (read
    once, here), or a callable(user, realm) -> password or None.
    ``algorithms``: offered in this order, one challenge each.  ``nonce_ttl``:
    seconds a nonce stays valid.  ``secret``: the nonce signing key (bytes);
    workers that must accept each other's nonces need the same one.
    ``qop``: ``("auth",)`` or ``()``.  ``policy``: callable(auth_user, realm,
    aor_user, aor_domain) -> bool, default ``own_aor_only``.
    ``replay_window``: with qop=auth, a nonce-count is accepted once if it is
    higher than any seen for the nonce or among the last ``replay_window``
    counts (the highest included: requests that arrive out of order); 0 or 1
    accept only increasing counts.  ``max_nonces``: the most (nonce, user)
    entries whose counts are remembered.  ``fail_limit``, ``fail_backoff``:
    the failure budget (``failures``, a ``FailureBudget``): a source, or a
    user from the sources that failed for it, is refused (403) for
    ``fail_backoff`` seconds after ``fail_limit`` wrong passwords within as
    many seconds (0 turns it off; the registrar applies it).  See docs/auth.md.
    """

    def __init__(self, realm=None, users=None, *, algorithms=("SHA-256", "MD5"), nonce_ttl=300,
                 secret=None, qop=("auth",), policy=None, replay_window=1024, max_nonces=100_000,
                 fail_limit=10, fail_backoff=60.0):
        if users is None:
            raise TypeError("Authorize needs users: a dict, an htdigest path or a callable")
        from_file = isinstance(users, (str, os.PathLike))
        if from_file:
            users = load_htdigest(users)
        self.realm = realm
        self._users = users
        if isinstance(algorithms, str):
            algorithms = (algorithms,)
        self.algorithms = tuple(_canonical_algorithm(a) or a for a in algorithms)
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be some of {ALGORITHMS}, not {unknown or 'none'}")
        if isinstance(qop, str):
            qop = (qop,)
        self.qop = tuple(qop or ())
        if any(q != "auth" for q in self.qop):
            raise ValueError("qop may only be ('auth',) or () (auth-int is not supported)")
        if not self.qop and any(a.endswith("-sess") for a in self.algorithms):
            raise ValueError("the -sess algorithms need qop=('auth',)")
        if nonce_ttl <= 0 or replay_window < 0 or max_nonces < 1:
            raise ValueError("nonce_ttl and max_nonces must be positive, replay_window >= 0")
        self.nonce_ttl = nonce_ttl
        self._secret = secrets.token_bytes(32) if secret is None else (
            secret.encode() if isinstance(secret, str) else bytes(secret))
        self.policy = policy or own_aor_only
        self.replay_window = replay_window
        self.max_nonces = max_nonces
        self.failures.configure(fail_limit, fail_backoff)
        # The nonce-counts live in AuthCore (``_counts``).
        self._dummy_password = secrets.token_hex(16)
        # A file's HA1s go into a C table the check reads (a dict given here may
        # change later, and an overridden _ha1 must be asked: those stay in Python).
        if from_file and type(self)._ha1 is Authorize._ha1:
            self._load_ha1s(users)
        self._ha1_cache = {}
        self._common = None         # (len(users), the hashes every user holds)

    def __repr__(self):
        # never the users or the secret
        return (f"Authorize(realm={self.realm!r}, algorithms={self.algorithms!r}, "
                f"nonce_ttl={self.nonce_ttl!r})")

    # -- in a ReceiveChain (the Net::SIP composition) -----------------------

    def handle(self, data, source, now, transport="udp", conn_id=-1):
        """As a link of a :class:`fastsip.ReceiveChain`: the 401/403/400 reply for a
        request that fails :meth:`check`, or None to pass it on (authenticated).
        ``Registrar(authorize=...)`` does the same check on its fast path."""
        try:
            msg = parse(data)
            if not isinstance(msg, Request):
                return None
            to = parse_uri(msg.to.uri) if msg.to is not None else None
            creds = msg.authorization
        except ParseError as exc:
            return make_response(data, exc.status, "Bad Request", (), source, now)
        if to is None:
            return make_response(data, 400, "Missing To header", (), source, now)
        result = self.check(msg.method, msg.uri, creds, to.user or "", to.host, now)
        if result.ok:
            return None
        reason = {401: "Unauthorized", 403: "Forbidden"}.get(result.status, result.reason)
        return make_response(data, result.status, reason, result.headers, source, now)

    def receive(self, packet, leg, from_):
        """The Net::SIP form of :meth:`handle`: sends the refusal on ``leg`` and
        returns its status code, or returns None to pass the packet on."""
        import time

        from fastsip.core.netsip import _source
        data = bytes(packet if isinstance(packet, (bytes, bytearray)) else packet.raw)
        reply = self.handle(data, _source(from_), time.time())
        if reply is None:
            return None
        leg.send(reply, from_)
        return int(reply[8:11])

    # -- the user list ------------------------------------------------------

    def knows(self, user: str, domain: str) -> bool:
        """Is ``user`` in the users source, in the realm a request for
        ``domain`` is checked in (``realm``, else the domain's host)?  A dict of
        passwords knows its keys whatever the realm; an htdigest dict its
        ``(user, realm)`` entries of any algorithm; a callable is asked for the
        password.  The redirect server (``Registrar(redirect=True)``) answers
        404 to a request for a user it does not know."""
        users = self._users
        realm = self.realm or _host(domain)
        if callable(users):
            return users(user, realm) is not None
        if user in users or (user, realm) in users:
            return True
        return any((user, realm, base) in users for base in _HASHES)

    # -- challenges and nonces ---------------------------------------------

    # challenge(realm, now, stale=False, user=None): the WWW-Authenticate values of
    # a 401 (AuthCore, in C, which also writes them into the registrar's 401)

    def algorithms_for(self, user: str, realm: str) -> tuple:
        """The configured algorithms that can verify for ``user`` in ``realm``:
        those whose hash the users source holds for that user.  A plain
        htdigest line holds MD5 only, a line with a ``SHA-256=`` field both;
        plain passwords (a dict of them, a callable) allow every algorithm.
        A user the source does not know gets what every user it holds can
        answer, so the challenge does not tell known users from unknown ones
        (unless the file mixes lines with and without SHA-256).  Never empty:
        when nothing configured can verify, every configured algorithm."""
        users = self._users
        if callable(users) or user in users:
            return self.algorithms
        held = {base for base in _HASHES if (user, realm, base) in users}
        if (user, realm) in users:
            held.add("MD5")
        if not held:
            held = self._common_bases()
        return tuple(a for a in self.algorithms if _base(a) in held) or self.algorithms

    def _common_bases(self):
        """The hashes every user of the (dict) source holds, remembered until
        the number of entries changes."""
        users = self._users
        if self._common is None or self._common[0] != len(users):
            per_user = {}
            for key in users:
                if isinstance(key, tuple):
                    base = "MD5" if len(key) == 2 else key[2]
                    per_user.setdefault(key[:2], set()).add(base)
                else:
                    per_user[key] = set(_HASHES)
            common = set(_HASHES)
            for bases in per_user.values():
                common &= bases
            self._common = (len(users), frozenset(common))
        return self._common[1]

    # _new_nonce(realm, now): 8 bytes issue time (ms) | 8 random bytes | 16 bytes HMAC
    # over both and the realm, base64url (AuthCore, in C); _mac(head, realm) the HMAC

    # -- checking ------------------------------------------------------------

    def _ha1(self, user, realm, base):
        """The hex HA1 of ``user`` for a base algorithm, or None if unknown.
        HA1s computed from a dict's passwords are cached (a callable is asked
        every time: its answers may change)."""
        users = self._users
        if callable(users):
            password = users(user, realm)
            return None if password is None else _hex_hash(base, f"{user}:{realm}:{password}")
        key = (user, realm, base)
        ha1 = users.get(key)
        if ha1 is None and base == "MD5":
            ha1 = users.get((user, realm))
        if ha1 is not None:
            return ha1
        ha1 = self._ha1_cache.get(key)
        if ha1 is None:
            password = users.get(user)
            if password is None:
                return None
            ha1 = _hex_hash(base, f"{user}:{realm}:{password}")
            if len(self._ha1_cache) >= 65536:
                self._ha1_cache.clear()
            self._ha1_cache[key] = ha1
        return ha1

    def _dummy_ha1(self, user, realm, base):
        """The HA1 an unknown user is checked against (a random stand-in password)."""
        return _hex_hash(base, f"{user}:{realm}:{self._dummy_password}")
