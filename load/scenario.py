"""Scenarios: the simulated phones and the REGISTERs they send.

Every phone is a user (``--user-pattern``) with its own source address in
127.0.0.0/8 and a source port (its socket's).  For each phone and each
*kind* of request the scenario needs, scapy builds one :class:`~load.sip.SIP`
packet; :func:`build_templates` turns them into the templates the hot loop
sends.  A scenario is a list of kinds and a pattern that says which kind
each new request is.

Kinds:

``register``     a new registration: new Call-ID and From tag every request
``refresh``      the phone's registration dialog: same Call-ID, CSeq grows
``unregister``   as refresh, with ``Expires: 0``
``fetch``        as refresh, without Contact (asks for the bindings)
``multi``        as refresh, with ``--contacts`` Contact headers
``bad-*``        malformed variants of refresh (see :data:`MALFORMED`)
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass, field

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import PcapWriter, rdpcap

from .sip import (
    SEQ_BASE,
    SEQ_MARKER,
    SIP,
    Template,
    bind_sip_port,
    digest_authorization,
    normalize_foreign,
    parse_challenge,
    templatize,
)

__all__ = [
    "Phone",
    "ScenarioSpec",
    "SCENARIOS",
    "MALFORMED",
    "parse_mix",
    "mix_pattern",
    "build_sip",
    "build_templates",
    "answer_challenge",
    "write_pcap",
    "read_replay",
    "spread_targets",
    "reply_cseq",
    "request_fields",
    "SPREADS",
    "STREAMS",
]

AGENT = "fastsip-load/0.1"
#: The stream transports (one connection carries many phones' requests).
STREAMS = ("tcp", "tls", "ws", "wss")
#: How requests are spread over several targets (``--spread``).
SPREADS = ("hash", "round-robin")


@dataclass
class Phone:
    """One simulated phone."""

    index: int
    user: str
    password: str
    addr: str
    port: int
    sock: int


@dataclass
class ScenarioSpec:
    """``kinds`` to build, default ``weights`` of the new requests, and whether
    the phones must be registered before the measured phase (``prime``)."""

    kinds: tuple
    weights: dict
    prime: bool
    description: str


SCENARIOS = {
    "register": ScenarioSpec(("register",), {"register": 1}, False,
                             "initial REGISTERs: a new Call-ID for every request"),
    "refresh": ScenarioSpec(("refresh",), {"refresh": 1}, True,
                            "refreshes of registered phones (same Call-ID, CSeq + 1)"),
    "unregister": ScenarioSpec(("unregister",), {"unregister": 1}, True,
                               "Expires: 0 for the phone's contact"),
    "fetch": ScenarioSpec(("fetch",), {"fetch": 1}, True,
                          "REGISTER without Contact: list the bindings"),
    "mixed": ScenarioSpec(("register", "refresh", "fetch", "unregister"),
                          {"register": 10, "refresh": 70, "fetch": 15, "unregister": 5}, True,
                          "a weighted mix (--mix)"),
    "auth": ScenarioSpec(("refresh",), {"refresh": 1}, False,
                         "REGISTER, answer the 401/407 with a digest, REGISTER again"),
    "multi-contact": ScenarioSpec(("multi",), {"multi": 1}, False,
                                  "REGISTERs with --contacts Contact headers"),
}

#: Malformed variants: each keeps Via, Call-ID and CSeq intact, so that a
#: registrar's 400 can still be matched; ``tcp`` says whether the variant is
#: safe on a stream (a wrong Content-Length would break the framing).
MALFORMED = {
    "bad-expires": True,
    "bad-contact": True,
    "no-to": True,
    "cseq-method": True,
    "bad-length": False,
}


def parse_mix(text: str) -> dict:
    """``"refresh=70,register=10"`` -> ``{"refresh": 70, "register": 10}``."""
    weights = {}
    for part in text.split(","):
        name, sep, w = part.partition("=")
        name = name.strip()
        if not sep or name not in ("register", "refresh", "fetch", "unregister"):
            raise ValueError(f"bad --mix entry {part!r} (kinds: register, refresh, fetch, unregister)")
        weights[name] = int(w)
        if weights[name] < 0:
            raise ValueError("--mix weights must be >= 0")
    if sum(weights.values()) <= 0:
        raise ValueError("--mix needs a positive weight")
    return weights


def mix_pattern(weights: dict, kinds: tuple) -> list:
    """A cycle of kind indices in proportion to ``weights``, spread evenly
    (smooth weighted round robin), reduced by the weights' common divisor."""
    from functools import reduce
    from math import gcd
    items = [(kinds.index(k), w) for k, w in weights.items() if w > 0]
    g = reduce(gcd, [w for _, w in items])
    items = [(k, w // g) for k, w in items]
    total = sum(w for _, w in items)
    current = {k: 0 for k, _ in items}
    out = []
    for _ in range(total):
        for k, w in items:
            current[k] += w
        best = max(current, key=lambda k: current[k])
        current[best] -= total
        out.append(best)
    return out


@dataclass
class BuildConfig:
    """What the builders need besides the phone."""

    target_host: str
    target_port: int
    domain: str
    transport: str = "udp"
    expires: int = 3600
    contacts: int = 3
    run_id: str = field(default_factory=lambda: os.urandom(4).hex())


def spread_targets(aors, targets, spread: str = "hash") -> list | None:
    """The target (an index into ``targets``) of every phone's first request.

    ``hash``: rendezvous hashing; phone ``i`` goes to the target whose
    keyed BLAKE2b of the phone's AOR (``aors[i]``, key: the target's
    canonical ``HOST:PORT``) is highest, always (a phone behind DNS SRV).
    The choice does not change from run to run nor with the targets'
    order, and a target taken away moves only its own phones.
    ``round-robin``: phone ``i`` starts at target ``i mod len(targets)``
    and each of its requests goes to the next (the engine rotates).
    ``None`` for one target."""
    n = len(targets)
    if n == 1:
        return None
    if spread == "round-robin":
        return [i % n for i in range(len(aors))]
    keys = [t.encode() for t in targets]
    out = []
    for aor in aors:
        a = aor.encode()
        digests = [hashlib.blake2b(a, digest_size=8, key=k).digest() for k in keys]
        out.append(digests.index(max(digests)))
    return out


def build_sip(phone: Phone, kind: str, cfg: BuildConfig) -> SIP:
    """The scapy SIP packet of ``kind`` for ``phone`` (with request-number markers)."""
    m = SEQ_MARKER.decode()
    dom = cfg.domain
    tp = cfg.transport.upper() if cfg.transport != "raw" else "UDP"
    hostport = f"[{phone.addr}]:{phone.port}" if ":" in phone.addr else f"{phone.addr}:{phone.port}"
    if cfg.transport in ("ws", "wss"):
        # RFC 7118 section 5.2: a WebSocket client has no SIP address of its own; its
        # Via and Contact name a made-up host under .invalid, reachable through the
        # connection only (as JsSIP and SIP.js write them)
        hostport = f"{cfg.run_id}{phone.index:x}.invalid"
    tparam = f";transport={cfg.transport}" if cfg.transport in STREAMS else ""
    contact_uri = f"sip:{phone.user}@{hostport}{tparam}"
    if kind == "register":
        call_id = f"{cfg.run_id}-{phone.index:x}-{m}@{phone.addr}"
        tag = f"r{m}"
    else:
        call_id = f"{cfg.run_id}-{phone.index:x}@{phone.addr}"
        tag = f"{cfg.run_id}{phone.index:x}"
    aor = f"sip:{phone.user}@{dom}"
    to = aor
    cseq_method = "REGISTER"
    contacts = [f"<{contact_uri}>"]
    expires = str(cfg.expires)
    extra = []
    if kind == "unregister":
        contacts = [f"<{contact_uri}>;expires=0"]
        expires = "0"
    elif kind == "fetch":
        contacts = []
        expires = None
    elif kind == "multi":
        contacts = [f"<sip:{phone.user}-{k}@{hostport}{tparam}>" for k in range(cfg.contacts)]
    elif kind == "bad-expires":
        expires = "soon"
    elif kind == "bad-contact":
        contacts = ["<sip:@;;>;q=x"]
    elif kind == "no-to":
        to = None
    elif kind == "cseq-method":
        cseq_method = "INVITE"
    elif kind == "bad-length":
        extra.append(("Content-Length", "1000"))
    elif kind not in ("register", "refresh"):
        raise ValueError(f"unknown request kind {kind!r}")
    headers = [
        ("Via", f"SIP/2.0/{tp} {hostport};rport;branch=z9hG4bK-{m}"),
        ("Max-Forwards", "70"),
        ("From", f"<{aor}>;tag={tag}"),
    ]
    if to is not None:
        headers.append(("To", f"<{to}>"))
    headers += [("Call-ID", call_id), ("CSeq", f"{m} {cseq_method}")]
    headers += [("Contact", c) for c in contacts]
    if expires is not None:
        headers.append(("Expires", expires))
    headers.append(("User-Agent", AGENT))
    headers += extra or [("Content-Length", "0")]
    return SIP(start_line=f"REGISTER sip:{dom} SIP/2.0", headers=headers)


def ip_udp(phone: Phone, cfg: BuildConfig, sip: SIP, raw: bool = False, dst=None):
    """``sip`` wrapped in scapy IP (or IPv6) and UDP headers, phone to target
    (``dst`` = ``(host, port)``; default: the configuration's).

    For the raw socket the UDP checksum is 0 ("none", allowed over IPv4),
    since the hot loop patches the payload after the build.
    """
    host, port = dst or (cfg.target_host, cfg.target_port)
    ipl = IPv6 if ":" in host else IP
    udp = UDP(sport=phone.port, dport=port)
    if raw:
        udp.chksum = 0
    return ipl(src=phone.addr, dst=host) / udp / sip


def _tpl_tuple(t: Template) -> tuple:
    return (t.data, t.sites, t.callid)


def build_templates(phones: list, kinds: tuple, cfg: BuildConfig, raw: bool = False,
                    progress=None) -> tuple:
    """Build every phone's requests of every kind.

    Returns ``(engine_templates, templates)``: the flat list the engine takes
    (``phone * len(kinds) + kind``) and the same as :class:`Template` objects.
    With ``raw``, each template is a whole IPv4 packet.
    """
    flat = []
    tpls = []
    for n, phone in enumerate(phones):
        for kind in kinds:
            sip = build_sip(phone, kind, cfg)
            if raw:
                t = templatize(bytes(ip_udp(phone, cfg, sip, raw=True)), offset=28)
            else:
                t = templatize(bytes(sip))
            tpls.append(t)
            flat.append(_tpl_tuple(t))
        if progress and n % 1000 == 999:
            progress(n + 1)
    return flat, tpls


_AUTH_LINE_RE = re.compile(rb"(?im)^(?:www|proxy)-authenticate[ \t]*:[ \t]*([^\r\n]*)")
_REQ_URI_RE = re.compile(rb"^[A-Z]+ (\S+) SIP/2\.0")


def answer_challenge(reply: bytes, base: Template, phone: Phone, raw: bool = False) -> tuple:
    """The template of the request that answers the challenge in ``reply``.

    ``base`` is the template of the challenged request.  The answer is that
    request as sent (same Call-ID and From tag), with a new CSeq number and
    branch (markers) and the ``Authorization`` (401) or
    ``Proxy-Authorization`` (407) header.  Raises ``ValueError`` when the
    challenge cannot be answered.
    """
    status = int(reply[8:11])
    m = _AUTH_LINE_RE.search(reply)
    if m is None:
        raise ValueError(f"{status} without a Digest challenge")
    challenge = parse_challenge(m.group(1))
    cseq = re.search(rb"(?im)^cseq[ \t]*:[ \t]*(\d+)", reply)
    if cseq is None:
        raise ValueError("challenge without CSeq")
    off = 28 if raw else 0
    sent = base.render(int(cseq.group(1)))
    head, msg = sent[:off], sent[off:]
    uri = _REQ_URI_RE.match(msg).group(1).decode()
    value = digest_authorization(challenge, "REGISTER", uri, phone.user, phone.password)
    name = b"Proxy-Authorization" if status == 407 else b"Authorization"
    msg = normalize_foreign(msg)
    end = msg.find(b"\r\n\r\n")
    msg = msg[:end] + b"\r\n" + name + b": " + value.encode() + msg[end:]
    if raw:
        head = bytearray(head)
        struct.pack_into("!H", head, 2, len(head) + len(msg))     # IP total length
        struct.pack_into("!H", head, 10, 0)                        # IP checksum: kernel fills it
        struct.pack_into("!HH", head, 24, 8 + len(msg), 0)         # UDP length, no checksum
        head = bytes(head)
    return _tpl_tuple(templatize(head + msg, offset=off))


_CSEQ_RE = re.compile(rb"(?im)^cseq[ \t]*:[ \t]*(\d+)")
_HEADER_RE = re.compile(rb"(?im)^(contact|m|to|t|expires)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$")


def reply_cseq(reply: bytes) -> int:
    """The CSeq number of a reply (0 without one)."""
    m = _CSEQ_RE.search(reply)
    return int(m.group(1)) if m else 0


def _uri(value: bytes) -> str:
    """The URI of a name-addr or addr-spec (``<uri>;params``, ``uri;params``)."""
    lt = value.find(b"<")
    if lt >= 0:
        gt = value.find(b">", lt)
        return value[lt + 1:gt if gt > 0 else len(value)].decode("utf-8", "replace")
    return value.split(b";", 1)[0].strip().decode("utf-8", "replace")


def request_fields(data: bytes, callid: tuple, offset: int = 0) -> dict:
    """What ``--acked`` reports of a request as sent (``data``; the SIP message from
    ``offset`` on; ``callid``: its Call-ID's offset and length): ``aor`` (the To
    URI), ``user`` (its user part), ``contacts`` (every Contact's URI, in order;
    ``*`` for a star), ``call_id`` and ``expires`` (the Expires header, None
    without one)."""
    aor, contacts, expires = "", [], None
    end = data.find(b"\r\n\r\n", offset)
    head = data[offset:end + 2 if end >= 0 else len(data)]
    for m in _HEADER_RE.finditer(head):
        name, value = m.group(1).lower(), m.group(2)
        if name in (b"contact", b"m"):
            # one header may list several contacts: split at commas outside <...>
            depth, start = 0, 0
            for i, c in enumerate(value + b","):
                if c == 60:
                    depth += 1
                elif c == 62:
                    depth -= 1
                elif c == 44 and depth <= 0:
                    part = value[start:i].strip()
                    if part:
                        contacts.append("*" if part == b"*" else _uri(part))
                    start = i + 1
        elif name in (b"to", b"t") and not aor:
            aor = _uri(value)
        elif name == b"expires" and expires is None:
            try:
                expires = int(value)
            except ValueError:
                expires = None
    user = aor.split(":", 1)[-1].split("@", 1)[0] if "@" in aor else ""
    off, n = callid
    return {"aor": aor, "user": user, "contacts": contacts,
            "call_id": data[off:off + n].decode("utf-8", "replace"), "expires": expires}


def scenario_requests(count: int, users: int, pattern: list, malformed_kinds: list,
                      malformed_ratio: float):
    """``(seq, phone, kind)`` of the first ``count`` requests, in the order the
    hot loop sends them when no phone is busy (the same hash picks the
    malformed ones)."""
    thresh = int(malformed_ratio * 2**32) if malformed_kinds else 0
    n_new = 0
    for k in range(count):
        seq = SEQ_BASE + k
        if ((seq * 2654435761) & 0xFFFFFFFF) < thresh:
            kind = malformed_kinds[seq % len(malformed_kinds)]
        else:
            kind = pattern[n_new % len(pattern)]
        n_new += 1
        yield seq, k % users, kind


def write_pcap(path: str, phones: list, tpls: list, nkinds: int, requests, cfg: BuildConfig,
               rate: float, raw: bool = False, target_of=None) -> int:
    """Write the scenario's requests as IP/UDP/SIP packets, ``1/rate`` apart.

    ``requests``: ``(seq, phone, kind)`` as from :func:`scenario_requests`;
    ``target_of(n, phone)``: the ``(host, port)`` request ``n`` goes to
    (default: the configuration's target).  Returns the number of packets written.
    """
    bind_sip_port(cfg.target_port)
    gap = 1.0 / rate if rate > 0 else 1e-5
    n = 0
    with PcapWriter(path, sync=False) as w:
        for seq, p, kind in requests:
            data = tpls[p * nkinds + kind].render(seq)
            if raw:
                pkt = IP(data)
            else:
                pkt = ip_udp(phones[p], cfg, SIP(data),
                             dst=target_of(n, p) if target_of else None)
            pkt.time = 1_700_000_000 + n * gap
            w.write(pkt)
            n += 1
    return n


@dataclass
class ReplayRequest:
    """One request taken from a capture."""

    src: str
    sport: int
    template: Template


def read_replay(path: str) -> list:
    """The SIP requests over UDP in the capture at ``path``, as templates.

    Each becomes a phone that repeats it; its CSeq number and top Via branch
    become request-number sites (:func:`~load.sip.normalize_foreign`).
    """
    out = []
    for pkt in rdpcap(path):
        if UDP not in pkt:
            continue
        payload = bytes(pkt[UDP].payload)
        if not payload or payload.startswith(b"SIP/2.0 ") or b" SIP/2.0\r\n" not in payload[:512]:
            continue
        src = pkt[IP].src if IP in pkt else pkt[IPv6].src
        out.append(ReplayRequest(src, pkt[UDP].sport, templatize(normalize_foreign(payload))))
    if not out:
        raise ValueError(f"{path}: no SIP requests over UDP")
    return out
