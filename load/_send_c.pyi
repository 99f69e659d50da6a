"""The load engine's send path (load._send_c): C-level only (cimported from
_send_c.pxd), nothing for Python."""

# the C functions the other compiled modules cimport (capsules)
__pyx_capi__: dict[str, object]
