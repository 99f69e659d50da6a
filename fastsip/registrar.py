"""The public face of the registrar (RFC 3261 §10.3 behind the Net::SIP::Registrar
object API): ``Registrar``, ``ReceiveChain``, ``make_response`` and the keys
the server shards on.  The decisions are compiled (``fastsip.core._core``);
the Net::SIP conveniences are ``fastsip.core.netsip``."""
from fastsip.core._core import (
    SUPPORTED_OPTIONS,
    Binding,
    Store,
    aor_key,
    decode_record,
    encode_record,
    make_response,
    shard_of,
    stable_hash,
)
from fastsip.core.netsip import ReceiveChain, Registrar, aor_from_text

__all__ = ["Registrar", "ReceiveChain", "Binding", "Store", "aor_key", "aor_from_text",
           "shard_of", "stable_hash", "make_response", "SUPPORTED_OPTIONS",
           "encode_record", "decode_record"]
