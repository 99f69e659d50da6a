"""fastsip: a fast SIP parser (Cython) and a high-throughput SIP registrar.

    >>> import fastsip
    >>> msg = fastsip.parse(datagram)
    >>> msg.method, msg.to.uri, [c.uri for c in msg.contacts], msg.expires
"""
from fastsip._version import __version__
from fastsip.auth import Authorize, AuthResult, Credentials, parse_credentials
from fastsip.errors import (
    BadContact,
    BadContentLength,
    BadCSeq,
    BadExpires,
    BadHeader,
    BadNameAddr,
    BadStartLine,
    BadURI,
    BadVersion,
    BadVia,
    IntervalTooBrief,
    LimitExceeded,
    MessageTooLarge,
    ParseError,
    RegistrarError,
    SipError,
    TooManyContacts,
)
from fastsip.parser import (
    PING,
    PONG,
    Address,
    Contact,
    CSeq,
    Headers,
    Parser,
    Request,
    Response,
    SipMessage,
    SipURI,
    StreamFramer,
    Via,
    parse,
    parse_uri,
)
from fastsip.registrar import (
    Binding,
    ReceiveChain,
    Registrar,
    Store,
    aor_key,
    make_response,
    shard_of,
    stable_hash,
)
from fastsip.websocket import WsConnection, WsFramer

__all__ = [
    "__version__",
    # parser
    "parse", "parse_uri", "Parser", "SipMessage", "Request", "Response", "Headers",
    "Address", "Contact", "Via", "CSeq", "SipURI", "StreamFramer", "PING", "PONG",
    # registrar
    "Registrar", "ReceiveChain", "Authorize", "AuthResult", "Credentials", "parse_credentials",
    "Binding", "Store", "aor_key", "make_response", "shard_of", "stable_hash",
    # SIP over WebSocket
    "WsConnection", "WsFramer",
    # errors
    "SipError", "ParseError", "BadStartLine", "BadVersion", "BadHeader", "BadContentLength",
    "BadURI", "BadNameAddr", "BadContact", "BadExpires", "BadCSeq", "BadVia", "LimitExceeded",
    "MessageTooLarge", "RegistrarError", "IntervalTooBrief", "TooManyContacts",
]
