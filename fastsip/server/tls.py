"""TLS for the tls: and wss: listeners: the server's context, and what a failed handshake means.

One ``ssl.SSLContext`` per worker, made by :func:`make_context` from
``--tls-cert``/``--tls-key`` (a chain file: the certificate first, then its
intermediates), ``--tls-ca`` and ``--tls-verify-client``.  TLS 1.2 is the
oldest version accepted; the ciphers are OpenSSL's defaults (Python's
``PROTOCOL_TLS_SERVER`` context); compression and TLS 1.2 renegotiation are
off.  A SIGHUP makes a new context: new connections use it, the open ones
keep theirs.

Idle connections are the common case at an edge (a phone holds its TLS
connection for hours and speaks every few minutes), so the context sets
OpenSSL's ``SSL_MODE_RELEASE_BUFFERS``: an idle connection then holds no read
or write buffer (about 34 KiB less each).  Python has no API for it; it is set
through ``SSL_CTX_ctrl`` of the ``libssl`` Python's ``_ssl`` module links
(see :func:`_release_buffers`); where that cannot be done, connections just
keep their buffers.
"""
from __future__ import annotations

import ctypes
import ssl

from fastsip.server.config import ConfigError

_SSL_CTRL_MODE = 33
_SSL_MODE_RELEASE_BUFFERS = 0x10

#: Reasons of a failed handshake, for ``fastsip_tls_handshake_failures_total``.
FAILURES = ("certificate", "not_tls", "version", "other")


def make_context(cfg) -> ssl.SSLContext:
    """The server context of ``cfg`` (a ServerConfig); ConfigError naming the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}: "
                          f"{_why(exc)}") from None
    if cfg.tls_ca:
        try:
            ctx.load_verify_locations(cafile=cfg.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--tls-ca {cfg.tls_ca}: {_why(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.tls_verify_client else ssl.CERT_OPTIONAL
    _release_buffers(ctx)
    return ctx


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


def failure_reason(exc: Exception) -> str:
    """One of ``FAILURES`` for the exception a server handshake raised."""
    reason = (getattr(exc, "reason", None) or "").upper()
    if "CERTIFICATE" in reason:
        return "certificate"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
                  "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH"):
        return "not_tls"
    if "PROTOCOL" in reason or "VERSION" in reason:
        return "version"
    return "other"


def _release_buffers(ctx: ssl.SSLContext) -> bool:
    """Set SSL_MODE_RELEASE_BUFFERS on ``ctx``'s SSL_CTX; True when done.

    CPython's context object starts with its ``SSL_CTX *`` right after the
    object header (``PySSLContext`` in Modules/_ssl.c, the same from 3.7 to
    3.13); the call is made with the symbols of the libssl already loaded by
    ``_ssl``.  Modes set on the context are inherited by its connections.
    """
    try:
        lib = ctypes.CDLL(getattr(ssl._ssl, "__file__", None))    # None: built in
        ctrl = lib.SSL_CTX_ctrl
        ctrl.restype = ctypes.c_long
        ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
        get_mode = lib.SSL_CTX_get_options   # a cheap check that the pointer is an SSL_CTX
        get_mode.restype = ctypes.c_uint64
        get_mode.argtypes = (ctypes.c_void_p,)
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or get_mode(ptr) != ctx.options:
            return False
        mode = ctrl(ptr, _SSL_CTRL_MODE, _SSL_MODE_RELEASE_BUFFERS, None)
    except (OSError, AttributeError, ValueError):
        return False
    return bool(mode & _SSL_MODE_RELEASE_BUFFERS)
