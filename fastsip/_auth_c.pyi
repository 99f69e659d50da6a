"""Types of the compiled digest check (fastsip._auth_c), the base of fastsip.auth.Authorize."""
from typing import Any, Callable, Iterable, final

from typing_extensions import disjoint_base

ALGORITHMS: tuple[str, ...]

@final
class NonceCounts:
    """The nonce-counts an AuthCore remembers, least recently used first."""
    def __len__(self) -> int: ...

@disjoint_base
class AuthCore:
    """Settings, nonce key and nonce-count table of a digest check, and the check."""
    realm: str | None
    policy: Callable[[str, str, str, str], Any]
    nonce_ttl: float
    algorithms: tuple[str, ...]
    replay_window: int
    max_nonces: int
    @property
    def _counts(self) -> NonceCounts: ...
    def _mac(self, head: bytes, realm: str) -> bytes: ...
    def _check(self, method: str, request_uri: str, credentials: Iterable[Any] | None,
               aor_user: str, aor_domain: str, now: float) -> tuple[int, str, str | None]: ...

def own_aor_only(auth_user: str, realm: str, aor_user: str, aor_domain: str) -> bool: ...
def response_digest(algorithm: str, ha1: str, method: str, uri: str, nonce: str,
                    qop: str | None = None, nc: str | None = None,
                    cnonce: str | None = None) -> str: ...
