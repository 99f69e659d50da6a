"""Types of the compiled registrar engine (fastsip._registrar_c)."""
from typing import Iterable

from typing_extensions import disjoint_base

from fastsip._store_c import Binding, Store

SUPPORTED_OPTIONS: tuple[str, ...]
METHODS: frozenset[str]

@disjoint_base
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    def __init__(self, status: int, reason: str, headers: list | None = None) -> None: ...

@disjoint_base
class RegistrarCore:
    store: Store
    min_expires: int
    max_expires: int
    default_expires: int
    max_contacts: int
    domains: frozenset[str] | None
    authorize: object
    last_now: float
    parse_errors: int
    def __init__(self, *, min_expires: int = 30, max_expires: int = 300,
                 default_expires: int = 3600, max_contacts: int = 16,
                 domains: Iterable[str] | str | None = None, addresses: Iterable[str] = (),
                 authorize: object = None, server: str | None = "fastsip",
                 track_changes: bool = False, aor_by: str = "user@host") -> None: ...
    def configure(self, *, min_expires: int | None = None, max_expires: int | None = None,
                  default_expires: int | None = None, max_contacts: int | None = None) -> None: ...
    def set_domains(self, domains: Iterable[str] | str | None) -> None: ...
    def handle(self, data: bytes, source: tuple[str, int], now: float, transport: str = "udp",
               conn_id: int = -1) -> bytes | None: ...
    def serve(self, data: bytes, source: tuple[str, int], now: float, transport: str = "udp",
              conn_id: int = -1) -> bytes | None: ...
    def serve_shard(self, data: bytes, src_host: bytes, src_port: int, now: float, transport: str,
                    conn_id: int, shard: int, nshards: int) -> bytes | int | None: ...
    def respond(self, data: bytes, source: tuple[str, int], now: float, status: int, reason: str,
                headers: Iterable[tuple[str, str]] | None = None) -> bytes | None: ...
    aor_by: str
    def aor_of(self, aor: str | bytes) -> str: ...
    def lookup(self, aor: str, now: float | None = None) -> list[Binding]: ...
    def stats(self) -> dict: ...

def aor_key(data: bytes, by: str = "user@host") -> bytes | None: ...
