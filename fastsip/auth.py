"""The public face of digest authentication (RFC 3261 §22, RFC 7616, RFC 8760).

``Authorize`` (users, challenges, the check), ``parse_credentials`` and
``digest_response``.  The work is done in ``fastsip.core``: the check and the
credentials scan are compiled (``fastsip.core._core``), the users and the
challenges are Python (``fastsip.core.authorize``).
"""
from fastsip.core._core import AuthResult, Credentials, own_aor_only, parse_credentials
from fastsip.core.authorize import ALGORITHMS, Authorize, digest_response, load_htdigest
from fastsip.errors import BadCredentials

__all__ = [
    "ALGORITHMS", "AuthResult", "Authorize", "BadCredentials", "Credentials", "digest_response",
    "load_htdigest", "own_aor_only", "parse_credentials",
]
