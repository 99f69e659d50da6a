# The forms of canonical_aor: the comparison prefix of a URI (with the port),
# the address-of-record keyed by user@host (the default), or by user alone.
cdef enum AorForm:
    AOR_URI = 0
    AOR_HOST = 1
    AOR_USER = 2
