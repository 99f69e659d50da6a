"""The load engine's stream connections (load._tcp_c): C-level only (cimported from
_tcp_c.pxd), nothing for Python."""

# the C functions the other compiled modules cimport (capsules)
__pyx_capi__: dict[str, object]
