"""Every exception fastsip raises (the compiled core raises these classes too).

Each error knows where it happened (``offset``, a byte index into the
input, where there is one) and which SIP response a server should answer
with (``status``).
"""

__all__ = [
    "SipError",
    "ParseError",
    "BadStartLine",
    "BadVersion",
    "BadHeader",
    "BadContentLength",
    "BadCredentials",
    "BadURI",
    "BadContact",
    "BadExpires",
    "BadCSeq",
    "BadVia",
    "BadNameAddr",
    "LimitExceeded",
    "MessageTooLarge",
    "RegistrarError",
    "IntervalTooBrief",
    "TooManyContacts",
    "ConfigError",
    "ClusterError",
]


class SipError(Exception):
    """Base of every fastsip error.  ``status``: the SIP response to send."""

    status = 500


class ParseError(SipError, ValueError):
    """The input is not a well-formed SIP message (or value).

    ``offset`` is the byte index of the offending byte in the input that was
    parsed (``None`` when no position is known), ``reason`` the short text,
    ``status`` the response a server should answer with.  ``str()`` gives the
    reason, the offset and, where the input is known, the offending line with
    a caret under the byte.
    """

    status = 400

    def __init__(self, reason, offset=None, data=None, status=None):
        super().__init__(reason)
        self.reason = reason
        self.offset = offset
        self.data = data
        if status is not None:
            self.status = status

    def __str__(self):
        text = self.reason if self.offset is None else f"{self.reason} (byte {self.offset})"
        if self.data is None or self.offset is None:
            return text
        return text + "\n" + caret_excerpt(self.data, self.offset)

    def __reduce__(self):
        return (_rebuild, (type(self), self.reason, self.offset, self.data, self.status))


def _rebuild(cls, reason, offset, data, status):
    return cls(reason, offset, data, status)


def caret_excerpt(data, offset, width=76):
    """The line of ``data`` that holds byte ``offset``, and a caret under it."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    offset = max(0, min(offset, len(data)))
    start = data.rfind(b"\n", 0, offset) + 1
    end = data.find(b"\n", offset)
    if end < 0:
        end = len(data)
    line = data[start:end].rstrip(b"\r")
    col = offset - start
    if col > width - 10:  # keep the caret on screen for long lines
        cut = col - (width - 20)
        line = b"..." + line[cut:]
        col = col - cut + 3
    line = line[:width]
    shown = line.decode("ascii", "backslashreplace")
    # backslash escapes widen the text before the caret
    col = len(line[:col].decode("ascii", "backslashreplace"))
    return "  " + shown + "\n  " + " " * col + "^"


class BadStartLine(ParseError):
    """The request line or status line is malformed."""


class BadVersion(BadStartLine):
    """The SIP version is not SIP/2.0 (505 Version Not Supported)."""

    status = 505


class BadHeader(ParseError):
    """A header line or a header value is malformed."""


class BadContentLength(BadHeader):
    """Content-Length is malformed, conflicting, or larger than the body."""


class BadCredentials(BadHeader):
    """A credentials or challenge value is malformed (400 Bad Request):
    ``reason`` is the short text, ``offset`` the byte index in the UTF-8 form
    of the value (``fastsip.parse_credentials``)."""


class BadURI(ParseError):
    """A SIP/SIPS URI is malformed."""


class BadNameAddr(BadHeader):
    """A From/To/Contact-style name-addr or addr-spec is malformed."""


class BadContact(BadNameAddr):
    """A Contact header value is malformed."""


class BadExpires(BadHeader):
    """An Expires header value is malformed."""


class BadCSeq(BadHeader):
    """A CSeq header value is malformed or disagrees with the request method."""


class BadVia(BadHeader):
    """A Via header value is malformed."""


class LimitExceeded(ParseError):
    """The input exceeds one of the parser's limits (the message names it)."""


class MessageTooLarge(LimitExceeded):
    """The message is larger than the size limit (513 Message Too Large)."""

    status = 513


class RegistrarError(SipError):
    """A well-formed REGISTER the registrar refuses."""

    status = 400

    def __init__(self, reason, status=None):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class IntervalTooBrief(RegistrarError):
    """Expiry below the registrar's minimum; ``min_expires`` goes into Min-Expires."""

    status = 423

    def __init__(self, min_expires):
        super().__init__(f"expires below the minimum of {min_expires} s")
        self.min_expires = min_expires


class TooManyContacts(RegistrarError):
    """The AOR would hold more bindings than the limit allows."""

    status = 503


class ConfigError(Exception):
    """A setting is unusable: the command line prints it on one line and exits 2."""


class ClusterError(Exception):
    """The shared location (``--cluster``, a Redis Cluster) cannot be used: no
    seed node answers, a node refuses the login or the function library, or a
    reply makes no sense."""
