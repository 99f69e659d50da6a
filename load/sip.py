"""A small SIP layer for scapy, the REGISTER builders, and digest answers.

scapy 2.8 has no SIP layer.  :class:`SIP` is the smallest one that is
useful here: a start line, an ordered list of ``(name, value)`` headers and
a body.  It is bound to UDP port 5060 (both directions), so captures that
the load tool writes dissect as SIP in scapy (and Wireshark dissects them on
its own); :func:`bind_sip_port` binds another port.

Everything the load tool sends is a :class:`SIP` packet built here.  The
builders leave :data:`SEQ_MARKER` (ten bytes) wherever a per-request value
goes (the CSeq number, the Via branch, and for new registrations the
Call-ID and the From tag); :func:`templatize` finds those places and the
hot loop patches a ten-digit request number into them before every send.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from scapy.fields import Field
from scapy.layers.inet import UDP
from scapy.packet import Packet, bind_layers

__all__ = [
    "SIP",
    "SEQ_MARKER",
    "SEQ_WIDTH",
    "SEQ_BASE",
    "COMPACT",
    "Template",
    "templatize",
    "normalize_foreign",
    "bind_sip_port",
    "parse_challenge",
    "digest_authorization",
]

#: Placeholder for the ten-digit request number (never sent as such).
SEQ_MARKER = b"#SEQ######"
#: Width of the request number patched into every request.
SEQ_WIDTH = len(SEQ_MARKER)
#: First request number: ten digits without leading zeros, and far below 2**31
#: (the CSeq limit of RFC 3261), so a run may send 1.1 billion requests.
SEQ_BASE = 1_000_000_000

#: RFC 3261 compact header forms.
COMPACT = {
    b"i": b"call-id", b"m": b"contact", b"e": b"content-encoding",
    b"l": b"content-length", b"c": b"content-type", b"f": b"from",
    b"s": b"subject", b"k": b"supported", b"t": b"to", b"v": b"via",
}


def _canon(name: bytes) -> bytes:
    """Lower-case long form of a header name (compact forms expanded)."""
    name = name.strip().lower()
    return COMPACT.get(name, name)


class _LineField(Field):
    """The start line: bytes up to the first CRLF (or LF)."""

    def __init__(self, name, default):
        super().__init__(name, default, fmt="H")

    def getfield(self, pkt, s):
        end = s.find(b"\n")
        if end < 0:
            return b"", s
        return s[end + 1:], s[:end].rstrip(b"\r")

    def addfield(self, pkt, s, val):
        return s + bytes(val) + b"\r\n"

    def i2m(self, pkt, x):
        return bytes(x)

    def any2i(self, pkt, x):
        return x.encode() if isinstance(x, str) else x

    def i2repr(self, pkt, x):
        return repr(x)


class _HeadersField(Field):
    """Header lines up to the blank line, as a list of ``(name, value)``.

    Continuation lines (RFC 3261 line folding) are joined to the header
    they continue.  A message without the blank line (truncated) keeps
    every line as a header and has no body.
    """

    islist = 1

    def __init__(self, name, default):
        super().__init__(name, default, fmt="H")

    def getfield(self, pkt, s):
        headers = []
        pos = 0
        while pos < len(s):
            end = s.find(b"\n", pos)
            if end < 0:
                end = len(s)
            line = s[pos:end].rstrip(b"\r")
            pos = end + 1
            if not line:
                return s[pos:], headers
            if line[:1] in (b" ", b"\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + b" " + line.strip())
                continue
            name, sep, value = line.partition(b":")
            headers.append((name.strip(), value.strip()) if sep else (line, b""))
        return b"", headers

    def addfield(self, pkt, s, val):
        return s + b"".join(n + b": " + v + b"\r\n" for n, v in val) + b"\r\n"

    def any2i(self, pkt, x):
        return [(_b(n), _b(v)) for n, v in (x or [])]

    def i2repr(self, pkt, x):
        return repr([(n.decode("latin-1"), v.decode("latin-1")) for n, v in x])


class _BodyField(Field):
    """The body: everything after the blank line."""

    def __init__(self, name, default):
        super().__init__(name, default, fmt="H")

    def getfield(self, pkt, s):
        return b"", s

    def addfield(self, pkt, s, val):
        return s + bytes(val)

    def any2i(self, pkt, x):
        return _b(x)


def _b(x) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)


class SIP(Packet):
    """A SIP message (RFC 3261 section 7): start line, headers, body.

    >>> p = SIP(start_line="REGISTER sip:example.com SIP/2.0",
    ...         headers=[("Call-ID", "a@b"), ("CSeq", "1 REGISTER")])
    >>> SIP(bytes(p)).header("i")
    b'a@b'
    """

    name = "SIP"
    fields_desc = [
        _LineField("start_line", b"REGISTER sip:127.0.0.1 SIP/2.0"),
        _HeadersField("headers", []),
        _BodyField("body", b""),
    ]

    def header(self, name, default=None):
        """The value of the first header called ``name`` (any case, compact forms too)."""
        want = _canon(_b(name))
        for n, v in self.headers:
            if _canon(n) == want:
                return v
        return default

    def header_all(self, name):
        """Every value of the headers called ``name``, in order."""
        want = _canon(_b(name))
        return [v for n, v in self.headers if _canon(n) == want]

    @property
    def is_response(self) -> bool:
        return self.start_line.startswith(b"SIP/2.0 ")

    @property
    def status(self) -> int | None:
        """The status code of a response, ``None`` for a request."""
        if not self.is_response:
            return None
        try:
            return int(self.start_line[8:11])
        except ValueError:
            return None

    @property
    def method(self) -> bytes | None:
        """The method of a request, ``None`` for a response."""
        return None if self.is_response else self.start_line.split(b" ", 1)[0]

    def mysummary(self):
        return "SIP " + self.start_line.decode("utf-8", "replace")


def bind_sip_port(port: int) -> None:
    """Make scapy dissect UDP traffic to or from ``port`` as :class:`SIP`."""
    bind_layers(UDP, SIP, dport=port)
    bind_layers(UDP, SIP, sport=port)


bind_sip_port(5060)


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """A pre-built request and where its request number goes.

    ``data`` holds :data:`SEQ_MARKER` at every offset in ``sites`` (at most
    four); ``callid`` is the ``(offset, length)`` of the Call-ID value, so a
    reply can be checked against the request it answers.
    """

    data: bytes
    sites: tuple
    callid: tuple

    def render(self, seq: int) -> bytes:
        """The request as sent with request number ``seq``."""
        digits = b"%010d" % seq
        out = bytearray(self.data)
        for s in self.sites:
            out[s:s + SEQ_WIDTH] = digits
        return bytes(out)


_CALLID_RE = re.compile(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$")


def templatize(data: bytes, offset: int = 0) -> Template:
    """Find the request-number sites and the Call-ID in a built request.

    ``offset`` is where the SIP message starts inside ``data`` (28 for a
    whole IPv4/UDP packet).  Raises ``ValueError`` when the message has no
    marker in its CSeq, no Call-ID, or more than four markers.
    """
    sites = []
    pos = data.find(SEQ_MARKER)
    while pos >= 0:
        sites.append(pos)
        pos = data.find(SEQ_MARKER, pos + SEQ_WIDTH)
    if not sites or len(sites) > 4:
        raise ValueError(f"a template needs 1 to 4 request-number sites, found {len(sites)}")
    m = _CALLID_RE.search(data, offset)
    if m is None:
        raise ValueError("a template needs a Call-ID header")
    if not re.search(rb"(?im)^cseq[ \t]*:[ \t]*" + re.escape(SEQ_MARKER), data[offset:]):
        raise ValueError("the CSeq number of a template must be the request-number marker")
    return Template(data, tuple(sites), (m.start(1), m.end(1) - m.start(1)))


_CSEQ_NUM_RE = re.compile(rb"(?im)^(cseq[ \t]*:[ \t]*)(\d+)")
_VIA_RE = re.compile(rb"(?im)^((?:via|v)[ \t]*:[^\r\n]*)")
_BRANCH_RE = re.compile(rb"(?i)(;[ \t]*branch[ \t]*=[ \t]*)([^;,\s]+)")


def normalize_foreign(payload: bytes) -> bytes:
    """Turn a captured REGISTER (from any UA) into a template source.

    The CSeq number becomes :data:`SEQ_MARKER` and the branch of the top Via
    becomes ``z9hG4bK`` followed by the marker (added when the Via has no
    branch), so every replayed request is a new transaction that the hot
    loop can tell apart.  Everything else stays byte for byte.
    """
    payload, n = _CSEQ_NUM_RE.subn(lambda m: m.group(1) + SEQ_MARKER, payload, count=1)
    if n != 1:
        raise ValueError("the message has no CSeq number")
    via = _VIA_RE.search(payload)
    if via is None:
        raise ValueError("the message has no Via header")
    line = via.group(1)
    if _BRANCH_RE.search(line):
        new = _BRANCH_RE.sub(lambda m: m.group(1) + b"z9hG4bK" + SEQ_MARKER, line, count=1)
    else:
        new = line.rstrip() + b";branch=z9hG4bK" + SEQ_MARKER
    return payload[:via.start(1)] + new + payload[via.end(1):]


# ------------------------------------------------------------------- digest

_PARAM_RE = re.compile(r'([A-Za-z0-9_-]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')

_HASHES = {
    "MD5": hashlib.md5,
    "MD5-SESS": hashlib.md5,
    "SHA-256": hashlib.sha256,
    "SHA-256-SESS": hashlib.sha256,
}


def parse_challenge(value: bytes | str) -> dict:
    """Parse a ``WWW-Authenticate``/``Proxy-Authenticate`` Digest value.

    Returns the parameters with lower-case names (``realm``, ``nonce``,
    ``qop``, ``algorithm``, ``opaque``, ...).  Raises ``ValueError`` for a
    scheme other than Digest.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise ValueError(f"not a Digest challenge: {scheme!r}")
    params = {}
    for m in _PARAM_RE.finditer(rest):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    if "nonce" not in params or "realm" not in params:
        raise ValueError("a Digest challenge needs realm and nonce")
    return params


def digest_authorization(challenge: dict, method: str, uri: str, username: str,
                         password: str, cnonce: str = "0a4f113b", nc: int = 1) -> str:
    """The ``Authorization`` value answering ``challenge`` (RFC 2617 / RFC 8760).

    Supports the algorithms MD5, MD5-sess, SHA-256 and SHA-256-sess, and
    ``qop=auth`` (or no qop).  ``qop=auth-int`` alone is refused with
    ``ValueError``.
    """
    algorithm = challenge.get("algorithm", "MD5")
    try:
        hfun = _HASHES[algorithm.upper()]
    except KeyError:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}") from None

    def h(text: str) -> str:
        return hfun(text.encode()).hexdigest()

    realm, nonce = challenge["realm"], challenge["nonce"]
    ha1 = h(f"{username}:{realm}:{password}")
    if algorithm.upper().endswith("-SESS"):
        ha1 = h(f"{ha1}:{nonce}:{cnonce}")
    ha2 = h(f"{method}:{uri}")
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    parts = [f'Digest username="{username}"', f'realm="{realm}"', f'nonce="{nonce}"',
             f'uri="{uri}"']
    if qops:
        if "auth" not in qops:
            raise ValueError(f"unsupported qop {challenge['qop']!r}")
        ncs = f"{nc:08x}"
        response = h(f"{ha1}:{nonce}:{ncs}:{cnonce}:auth:{ha2}")
        parts += [f'response="{response}"', "qop=auth", f"nc={ncs}", f'cnonce="{cnonce}"']
    else:
        parts.append(f'response="{h(f"{ha1}:{nonce}:{ha2}")}"')
    parts.append(f"algorithm={algorithm}")
    if "opaque" in challenge:
        parts.append(f'opaque="{challenge["opaque"]}"')
    return ", ".join(parts)
