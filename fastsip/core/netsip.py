"""The Net::SIP::Registrar object API over the compiled registrar.

Sans-I/O: :meth:`Registrar.handle` takes the datagram's bytes, where it came
from and the current time, and returns the reply bytes (or None when the
packet is not for this registrar).  It never reads a clock or a socket; the
server shell (``fastsip serve``) does that and passes ``now`` down.  The
Net::SIP forms without a time argument (``receive(packet, leg, from_)``, and
``query``/``expire`` before any request was seen) read the wall clock.

    reg = Registrar(min_expires=30, max_expires=300, domains=["example.com"])
    reply = reg.handle(data, source=("192.0.2.7", 5060), now=time.time())
    reg.query("sip:alice@example.com")      # -> ["sip:alice@192.0.2.7:5060", ...]

The decisions (the 10.3 steps, 423/420/401/403/400/503, the 200 listing) are
made in the compiled core (``fastsip.core._core``: decide.pyx, registrar.pyx); this module adds the
conveniences of the Net::SIP heritage (``receive``/``query``/``expire``,
``ReceiveChain``).  See docs/conformance.md for each rule.
"""
import re
import time

from fastsip.core._core import (
    SUPPORTED_OPTIONS,
    Binding,
    RegistrarCore,
    Request,
    Store,
    aor_key,
    parse,
    parse_uri,
    shard_of,
    stable_hash,
)
from fastsip.errors import ParseError

__all__ = ["Registrar", "ReceiveChain", "Binding", "Store", "aor_key", "aor_from_text",
           "shard_of", "stable_hash", "SUPPORTED_OPTIONS"]


class Registrar(RegistrarCore):
    """A SIP registrar (RFC 3261 10.3) with the Net::SIP::Registrar API.

    ``min_expires`` (30) refuses shorter registrations with 423 and Min-Expires;
    ``max_expires`` (300) caps longer ones; ``default_expires`` (3600, capped at
    ``max_expires``) applies when the request names none; ``max_contacts`` (16)
    bindings per AOR at most (503 beyond).  ``domains`` (or ``domain``): the
    domains served, "*.example.com" for subdomains, None for any;
    ``addresses``: the registrar's own hosts/IPs, which a Request-URI may name
    instead of a domain.  ``authorize``: an :class:`fastsip.Authorize` that
    every REGISTER must pass.  ``track_changes``: record changed AORs for
    ``store.changes()`` (persistence).  ``aor_by``: what keys the bindings,
    "user@host" (the To URI without port or parameters) or "user" (the user
    part alone, for a single-domain deployment: ``sip:alice@a`` and
    ``sip:alice@b`` are then one AOR, ``sip:alice``).  ``max_bindings``: the
    most bindings the store may hold, 0 for no limit (503 with Retry-After
    for a REGISTER that would add beyond it).  ``shared``: the store is a cache
    of a shared location (``fastsip.cluster``): a REGISTER that changes
    bindings is staged rather than answered (see ``RegistrarCore.serve_shard``).
    ``redirect``: :meth:`serve` answers other requests (INVITE, MESSAGE,
    SUBSCRIBE, ...) to an AOR of a served domain as a redirect server, 302 to
    its contacts (480 without any, 404 for another domain or a user
    ``authorize`` does not know),
    instead of 405 (docs/server.md, *Redirect server*).
    """

    def __init__(self, min_expires=30, max_expires=300, domains=None, *, domain=None,
                 default_expires=3600, max_contacts=16, addresses=(), authorize=None,
                 server=None, track_changes=False, aor_by="user@host", max_bindings=0,
                 shared=False, redirect=False):
        if domain is not None:
            if domains is not None:
                raise TypeError("give domains or domain, not both")
            domains = [domain]
        if server is None:
            from fastsip import __version__
            server = f"fastsip/{__version__}"
        super().__init__(min_expires=min_expires, max_expires=max_expires,
                         default_expires=default_expires, max_contacts=max_contacts,
                         domains=domains, addresses=addresses, authorize=authorize,
                         server=server, track_changes=track_changes, aor_by=aor_by,
                         max_bindings=max_bindings, shared=shared, redirect=redirect)

    def _now(self, now):
        if now is not None:
            return now
        return self.last_now or time.time()

    def query(self, aor, now=None):
        """The current sip/sips contact URIs of ``aor``, highest q first
        (``now``: the latest time the registrar has seen, else the clock)."""
        found = [b for b in self.lookup(aor, self._now(now))
                 if b.uri[:4].lower() == "sip:" or b.uri[:5].lower() == "sips:"]
        found.sort(key=lambda b: -(1.0 if b.q is None else b.q))
        return [b.uri for b in found]

    def lookup(self, aor, now=None):
        """The :class:`Binding` objects of ``aor`` still valid at ``now``."""
        return super().lookup(aor, self._now(now))

    def expire(self, now=None, max_work=10000):
        """Remove the bindings due at ``now``; returns how many.  At most
        ``max_work`` heap entries are examined per call (call again for more)."""
        return self.store.expire(self._now(now), max_work)

    def connection_closed(self, conn_id, now=None):
        """The stream connection ``conn_id`` closed: remove its flow bindings
        (RFC 5626 flows, ``.invalid`` WebSocket contacts); returns how many."""
        return super().connection_closed(conn_id, self._now(now))

    def bindings(self, now=None):
        """Every (aor, Binding) still valid at ``now``."""
        return self.store.bindings(self._now(now))

    def near(self, aor, limit=5):
        """AORs held here that a person asking for ``aor`` may have meant:
        the same user in another case, at another host or under the other
        scheme (for an AOR without a user: the same host).  Sorted, at most
        ``limit``; never ``aor`` itself.  Scans every AOR: for admin tools."""
        key = self.aor_of(aor)
        want = _user_host(key)
        found = sorted(name for name in self.store.aor_names()
                       if name != key and _similar(_user_host(name), want))
        return found[:limit]

    def remove(self, aor, contact=None, now=None):
        """Remove the bindings of ``aor`` (or only ``contact``); returns how many."""
        return self.store.remove_aor(self.aor_of(aor), contact)

    def load(self, aor, bindings):
        """Bulk-load bindings (from a state file) into ``aor``."""
        self.store.load(self.aor_of(aor), bindings)

    def receive(self, packet, leg, from_):
        """The Net::SIP form: handle ``packet`` (a parsed message or its bytes) that
        arrived on ``leg`` from ``from_`` ("ip:port" or (ip, port)); the reply is sent
        with ``leg.send(reply, from_)``.  Returns the status code sent, or None
        when the packet is not for this registrar."""
        data = packet if isinstance(packet, (bytes, bytearray)) else packet.raw
        source = _source(from_)
        reply = self.handle(bytes(data), source, time.time(),
                            getattr(leg, "transport", "udp") or "udp")
        if reply is None:
            return None
        leg.send(reply, from_)
        return int(reply[8:11])


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def aor_from_text(text):
    """The SIP URI a person means by ``text`` when naming an AOR: what
    ``fastsip show`` prints (``<sip:alice@example.com>``), a To header's
    value (``"Alice" <sip:alice@example.com:5060>;tag=1``) or an address
    without the scheme (``alice@example.com``; ``sip:`` is assumed).  Raises
    ValueError saying why when it is no SIP or SIPS URI."""
    t = str(text).strip()
    if "<" in t:
        inside = t[t.index("<") + 1:]
        if ">" not in inside:
            raise ValueError(f"{text!r}: '<' without '>'")
        t = inside[:inside.index(">")].strip()
    scheme = _SCHEME.match(t)
    if scheme and "@" not in scheme.group() and scheme.group().lower() not in ("sip:", "sips:") \
            and not t[scheme.end():scheme.end() + 1].isdigit():
        raise ValueError(f"{text!r} is a {scheme.group()} URI; an AOR is a sip: or sips: URI")
    if not scheme or scheme.group().lower() not in ("sip:", "sips:"):
        t = "sip:" + t          # alice@example.com, alice@example.com:5060, example.com
    try:
        parse_uri(t)
    except ParseError:
        raise ValueError(f"{text!r} is not a SIP URI (like sip:alice@example.com)") from None
    return t


def _user_host(aor):
    """(user lower-cased or None, host) of a canonical AOR."""
    rest = aor.partition(":")[2]
    user, at, host = rest.rpartition("@")
    return (user.lower(), host) if at else (None, rest)


def _similar(a, b):
    return a[0] == b[0] if b[0] is not None else a[0] is None and a[1] == b[1]


def _source(from_):
    if isinstance(from_, str):
        host, _, port = from_.rpartition(":")
        return (host.strip("[]"), int(port))
    return (from_[0], int(from_[1]))


class ReceiveChain:
    """Hands a packet to each receiver in turn until one handles it
    (Net::SIP::ReceiveChain).  ``methods``: only these request methods enter the
    chain; ``filter``: a callable(message) -> bool instead.  Receivers are
    objects with ``handle(data, source, now, ...)`` returning bytes or None —
    a :class:`Registrar`, an :class:`fastsip.Authorize` (which answers 401/403
    and otherwise passes the packet on), or another chain."""

    def __init__(self, receivers, methods=None, filter=None):
        if methods is not None and filter is not None:
            raise TypeError("give methods or filter, not both")
        self.receivers = list(receivers)
        self.methods = None if methods is None else {m.upper() for m in methods}
        self.filter = filter

    def _admits(self, data):
        if self.methods is None and self.filter is None:
            return True
        try:
            msg = parse(data)
        except ParseError:
            return False
        if self.filter is not None:
            return bool(self.filter(msg))
        return isinstance(msg, Request) and msg.method in self.methods

    def handle(self, data, source, now, transport="udp", conn_id=-1):
        if not self._admits(data):
            return None
        for receiver in self.receivers:
            reply = receiver.handle(data, source, now, transport, conn_id)
            if reply is not None:
                return reply
        return None

    def receive(self, packet, leg, from_):
        data = bytes(packet if isinstance(packet, (bytes, bytearray)) else packet.raw)
        reply = self.handle(data, _source(from_), time.time(),
                            getattr(leg, "transport", "udp") or "udp")
        if reply is None:
            return None
        leg.send(reply, from_)
        return int(reply[8:11])
