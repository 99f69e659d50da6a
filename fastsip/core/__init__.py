"""fastsip's pure layer: the parser, the store, the registrar's decisions and
the digest check (compiled as ``fastsip.core._core``), plus the Python parts
of the digest users and of the Net::SIP object API.  Nothing here touches a
socket, a file (but an htdigest file named to ``Authorize``) or a clock (but
``Registrar.receive``, the Net::SIP form, which has no ``now`` argument)."""
