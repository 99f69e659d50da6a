"""The load engine's window of outstanding requests (load._window_c): C-level only
(cimported from _window_c.pxd), nothing for Python."""

# the C functions the other compiled modules cimport (capsules)
__pyx_capi__: dict[str, object]
