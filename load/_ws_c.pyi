"""Types of the WebSocket framing (load._ws_c): test hooks only."""

def _frame(payload: bytes, opcode: int = 1, mask: bool = True, key: int = 0x11223344) -> bytes: ...
def _parse(data: bytes) -> tuple[int, bool, int, bool, bytes] | int: ...

# the C functions the other compiled modules cimport (capsules)
__pyx_capi__: dict[str, object]
