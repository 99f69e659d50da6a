"""SIP over WebSocket (RFC 7118), the server's side of a connection, sans-I/O.

Bytes read from the stream (plaintext: TLS is the server's) go in; the bytes to
write, the SIP messages received and whether to close come out.  No socket,
clock or thread is touched, so a server plugs it into any loop::

    ws = WsConnection(max_message=16384, origins=None)
    out, messages, closing = ws.receive(data)
    # write out; handle each message; close when closing, once out is written
    sock.send(ws.frame(reply))            # a SIP message to the peer
    sock.send(ws.close_frame(1001))       # going away (shutdown, idle)

The opening handshake (RFC 6455 section 4.2) is read here; the frames are the
compiled :class:`WsFramer`'s.  The port also answers plain HTTP: ``GET /`` and
``GET /health`` get 200 with a line of text, other paths 404, anything that is
no WebSocket handshake an HTTP error; each such answer closes the connection.
"""
import base64
import binascii
import hashlib
from urllib.parse import urlsplit

from fastsip.core._core import WsFramer

#: RFC 6455 section 1.3: appended to Sec-WebSocket-Key before hashing
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: the largest handshake (request line and headers) read; a longer one gets 431
MAX_HEAD = 8192
#: the subprotocol of RFC 7118
SUBPROTOCOL = "sip"
#: the paths a plain GET is answered 200 on (load balancers, monitoring)
HEALTH_PATHS = ("/", "/health")
HEALTH_TEXT = b"fastsip: SIP over WebSocket (RFC 7118) here\n"

# a tchar of RFC 7230 (method and header names)
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

_PHRASES = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 426: "Upgrade Required",
            431: "Request Header Fields Too Large"}


def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (str; RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")


def _origin_key(origin):
    """An Origin as compared: scheme and host are case-insensitive (RFC 6454); a
    trailing slash written in a configuration is forgiven."""
    return origin.strip().rstrip("/").lower()


def origin_set(origins):
    """``origins`` (a collection of Origin values, or None for any) as the frozenset
    WsConnection keeps: made once, it is shared by every connection given it."""
    if origins is None:
        return None
    return frozenset(_origin_key(o) for o in origins)


def _tokens(values):
    """The comma-separated tokens of header values, lower case."""
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


class _Answer(Exception):
    """The request is answered in HTTP and the connection closed: a refused
    handshake, or a plain GET."""

    def __init__(self, status, reason, text, headers=()):
        super().__init__(text)
        self.status, self.reason, self.text, self.headers = status, reason, text, headers


class WsConnection:
    """One WebSocket connection (RFC 6455) carrying SIP (RFC 7118), server side.

    ``max_message`` bounds a message (a frame above it is refused with close 1009
    before its payload is read), ``max_frame`` a single frame (default: the
    same).  ``origins``: None accepts any Origin, else a collection of the Origin
    values allowed (exact, scheme and host case-insensitive; a frozenset of
    lower-case values is shared, not copied); a handshake without Origin (not a
    browser) is accepted either way.

    ``receive(data)`` returns ``(out, messages, closing)``: bytes to write now
    (the handshake's answer, pongs, a close), the SIP messages completed (one
    per WebSocket data message, text or binary) and whether to close the
    connection once ``out`` is written.  Then ``reason`` says why, and input
    is ignored from there on.
    """

    # one per connection, tens of thousands held idle: no __dict__
    __slots__ = ("_origins", "_framer", "_head", "_searched", "_method_seen", "_reason",
                 "_ended", "open")

    def __init__(self, max_message=16384, origins=None, *, max_frame=None):
        if isinstance(origins, (str, bytes)):
            raise TypeError("origins is a collection of Origin values, not one string")
        if origins is not None:
            keys = frozenset(_origin_key(o) for o in origins)
            # a frozenset already in lower case is kept: connections share it
            origins = origins if isinstance(origins, frozenset) and keys == origins else keys
        self._origins = origins
        self._framer = WsFramer(max_message=max_message, max_frame=max_frame or 0)
        self._head = bytearray()
        self._searched = 0      # bytes of _head known to hold no blank line (but the last 3)
        self._method_seen = False
        self._reason = None     # why the handshake ended the connection
        self._ended = False
        #: True once the handshake is done (the 101 answer given)
        self.open = False

    @property
    def reason(self):
        """None, or why the connection ends: "handshake" (malformed, 400/431),
        "subprotocol" (no sip offered), "version", "origin", "http" (plain HTTP
        answered), "unmasked", "too_big", "protocol", "utf8", "closed" (the peer's
        close)."""
        return self._reason if self._reason is not None else self._framer.reason

    @property
    def buffered(self):
        """Bytes held of an incomplete handshake, frame or fragmented message."""
        if self._ended:
            return 0
        return self._framer.buffered if self.open else len(self._head)

    def receive(self, data):
        """``(out, messages, closing)`` for ``data`` read from the stream."""
        if self._ended:
            return b"", [], True
        if self.open:
            return self._framer_result(b"", self._framer.feed(data))
        self._head += data
        try:
            got = self._read_head()
            if got is None:
                return b"", [], False
            request, rest = got
            out = self._handshake(request)
        except _Answer as a:
            return self._answer(a), [], True
        self.open = True
        return self._framer_result(out, self._framer.feed(rest) if rest else [])

    def frame(self, message):
        """One frame holding ``message`` (a SIP message), server to client: text,
        or binary when ``message`` is not UTF-8 (a text frame must be)."""
        return self._framer.frame(message)

    def ping(self):
        """An empty ping frame, to learn whether a silent peer is still there (a
        browser's WebSocket answers it whatever its page does); b"" before the
        handshake is done or once a close was sent."""
        if not self.open or self._ended:
            return b""
        return self._framer.ping_frame()

    def close_frame(self, code=1001):
        """A close frame (1001: going away), for the server's own close; b"" before
        the handshake is done or when a close was sent already."""
        if not self.open or self._ended:
            return b""
        return self._framer.close_frame(code)

    # -- inside ----------------------------------------------------------------

    def _framer_result(self, out, messages):
        out += self._framer.data_to_send()
        closing = self._framer.closing
        if closing:
            self._ended = True
        return out, messages, closing

    def _read_head(self):
        """(request head, the bytes after its blank line), or None while incomplete."""
        head = self._head
        if not self._method_seen:
            self._check_method(head)
        start = max(0, self._searched - 3)
        end = head.find(b"\r\n\r\n", start)
        lf = head.find(b"\n\n", start, end if end >= 0 else len(head))
        if lf >= 0 and (end < 0 or lf < end):
            end, past = lf, lf + 2
        else:
            past = end + 4
        if (len(head) if end < 0 else past) > MAX_HEAD:
            raise _Answer(431, "handshake", "the request head exceeds %d bytes\n" % MAX_HEAD)
        if end < 0:
            self._searched = len(head)
            return None
        request, rest = bytes(head[:end]), bytes(head[past:])
        self._head = None
        return request, rest

    def _check_method(self, head):
        """Refuses at once what cannot start an HTTP request (a TLS hello, SIP on
        this port) rather than wait for a blank line that may never come."""
        sp = head.find(b" ")
        method = head if sp < 0 else head[:sp]
        if sp == 0 or len(method) > 32 or not all(c in _TCHAR for c in method):
            raise _Answer(400, "handshake", "this port speaks HTTP and SIP over WebSocket\n")
        self._method_seen = sp > 0

    def _handshake(self, request):
        """The 101 answer to ``request`` (the head), or raises _Answer."""
        lines = request.decode("latin-1").split("\n")
        parts = lines[0].rstrip("\r").split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
            raise _Answer(400, "handshake", "malformed request line\n")
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            line = line.rstrip("\r")
            name, colon, value = line.partition(":")
            if not colon or not name or not all(ord(c) in _TCHAR for c in name):
                raise _Answer(400, "handshake", "malformed header line\n")
            headers.setdefault(name.lower(), []).append(value.strip(" \t"))
        if method != "GET":
            raise _Answer(405, "http", "only GET is served here\n", ("Allow: GET",))
        if "websocket" not in _tokens(headers.get("upgrade", ())):
            path = urlsplit(target).path if "://" in target else target.partition("?")[0]
            if path in HEALTH_PATHS:
                raise _Answer(200, "http", HEALTH_TEXT.decode())
            raise _Answer(404, "http", "not found: SIP over WebSocket is served here\n")
        if version == "HTTP/1.0":
            raise _Answer(400, "handshake", "a WebSocket handshake needs HTTP/1.1\n")
        if "host" not in headers:
            raise _Answer(400, "handshake", "the handshake has no Host header\n")
        if "upgrade" not in _tokens(headers.get("connection", ())):
            raise _Answer(400, "handshake", "the handshake's Connection header lacks upgrade\n")
        if [v.strip() for v in headers.get("sec-websocket-version", ())] != ["13"]:
            raise _Answer(426, "version", "WebSocket version 13 is spoken here\n",
                           ("Upgrade: websocket", "Sec-WebSocket-Version: 13"))
        keys = headers.get("sec-websocket-key", ())
        if len(keys) != 1 or not _key_ok(keys[0]):
            raise _Answer(400, "handshake", "Sec-WebSocket-Key is not base64 of 16 bytes\n")
        origin = headers.get("origin")
        if self._origins is not None and origin is not None:
            if len(origin) != 1 or _origin_key(origin[0]) not in self._origins:
                raise _Answer(403, "origin", "this Origin is not allowed\n")
        if SUBPROTOCOL not in _tokens(headers.get("sec-websocket-protocol", ())):
            raise _Answer(400, "subprotocol",
                           "SIP over WebSocket needs the subprotocol sip "
                           "(Sec-WebSocket-Protocol: sip, RFC 7118)\n")
        return ("HTTP/1.1 101 Switching Protocols\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                "Sec-WebSocket-Accept: %s\r\n"
                "Sec-WebSocket-Protocol: %s\r\n"
                "\r\n" % (accept_key(keys[0]), SUBPROTOCOL)).encode("ascii")

    def _answer(self, r):
        """The HTTP answer that ends the connection."""
        self._reason = r.reason
        self._ended = True
        self._head = None
        body = r.text.encode("utf-8")
        head = ["HTTP/1.1 %d %s" % (r.status, _PHRASES[r.status]),
                "Content-Type: text/plain; charset=utf-8",
                "Content-Length: %d" % len(body),
                "Connection: close", *r.headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _key_ok(key):
    """Is ``key`` base64 of 16 bytes (RFC 6455 section 4.1), in its one spelling?"""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 16 and base64.b64encode(raw).decode("ascii") == key


__all__ = ["WsConnection", "WsFramer", "accept_key", "WS_GUID", "MAX_HEAD", "SUBPROTOCOL",
           "HEALTH_PATHS", "HEALTH_TEXT"]
