"""The registrar: RFC 3261 section 10.3 behind the Net::SIP::Registrar object API.

Sans-I/O: :meth:`Registrar.handle` takes the datagram's bytes, where it came
from and the current time, and returns the reply bytes (or None when the
packet is not for this registrar).  It never reads a clock or a socket; the
server shell (``fastsip serve``) does that and passes ``now`` down.

    reg = Registrar(min_expires=30, max_expires=300, domains=["example.com"])
    reply = reg.handle(data, source=("192.0.2.7", 5060), now=time.time())
    reg.query("sip:alice@example.com")      # -> ["sip:alice@192.0.2.7:5060", ...]

The decisions (the 10.3 steps, 423/420/401/403/400/503, the 200 listing) are
made in the compiled ``fastsip._registrar_c``; this module adds the
conveniences of the Net::SIP heritage (``receive``/``query``/``expire``,
``ReceiveChain``).  See docs/conformance.md for each rule.
"""
import time

from fastsip._registrar_c import RegistrarCore, SUPPORTED_OPTIONS, _aor_key, aor_key
from fastsip._store_c import Binding, Store
from fastsip._parser_c import shard_of, stable_hash

__all__ = ["Registrar", "ReceiveChain", "Binding", "Store", "aor_key", "shard_of",
           "stable_hash", "make_response", "SUPPORTED_OPTIONS"]


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
    ``store.changes()`` (persistence).
    """

    def __init__(self, min_expires=30, max_expires=300, domains=None, *, domain=None,
                 default_expires=3600, max_contacts=16, addresses=(), authorize=None,
                 server=None, track_changes=False):
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
                         server=server, track_changes=track_changes)

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

    def bindings(self, now=None):
        """Every (aor, Binding) still valid at ``now``."""
        return self.store.bindings(self._now(now))

    def remove(self, aor, contact=None, now=None):
        """Remove the bindings of ``aor`` (or only ``contact``); returns how many."""
        return self.store.remove_aor(_aor_key(aor), contact)

    def load(self, aor, bindings):
        """Bulk-load bindings (from a state file) into ``aor``."""
        self.store.load(_aor_key(aor), bindings)

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
        import fastsip
        try:
            msg = fastsip.parse(data)
        except fastsip.ParseError:
            return False
        if self.filter is not None:
            return bool(self.filter(msg))
        return isinstance(msg, fastsip.Request) and msg.method in self.methods

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


_responder = RegistrarCore(server=None)


def make_response(request, status, reason, headers=(), source=("0.0.0.0", 0), now=None):
    """A response to ``request`` (bytes): Via, From, To (with a tag), Call-ID and
    CSeq copied (RFC 3261 8.2.6), ``headers`` added, a Date, no body.  None when
    ``request`` is not a request."""
    return _responder.respond(bytes(request), tuple(source), time.time() if now is None else now,
                              status, reason, list(headers))
