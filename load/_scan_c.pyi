"""Types of the load engine's reply reading (load._scan_c): test hooks only."""

def _scan_reply(data: bytes) -> tuple[int, int, bytes] | int: ...
def _frame_length(data: bytes) -> int: ...

# the C functions the other compiled modules cimport (capsules)
__pyx_capi__: dict[str, object]
