"""The public face of the parser (the work is done in ``fastsip.core._core``)."""
from fastsip.core._core import (
    PING,
    PONG,
    Address,
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

#: A Contact value is an :class:`Address` with the Contact-specific fields
#: (``expires``, ``q``, ``is_star``, ``instance``, ``reg_id``).
Contact = Address

__all__ = [
    "Address", "Contact", "CSeq", "Headers", "Parser", "Request", "Response", "SipMessage",
    "SipURI", "StreamFramer", "Via", "PING", "PONG", "parse", "parse_uri",
]
