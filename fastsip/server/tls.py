"""TLS for the tls: and wss: listeners: the server's context, and what a failed handshake means.

One ``ssl.SSLContext`` per worker, made by :func:`make_context` from
``--tls-cert``/``--tls-key`` (a chain file: the certificate first, then its
intermediates), ``--tls-ca`` and ``--tls-verify-client``.  TLS 1.2 is the
oldest version accepted; the ciphers are OpenSSL's defaults (Python's
``PROTOCOL_TLS_SERVER`` context); compression and TLS 1.2 renegotiation are
off.  A SIGHUP makes a new context: new connections use it, the open ones
keep theirs.

An idle TLS connection costs the worker about 16 KB, nearly all of it
OpenSSL's (the connection's own state is ~1 KB, as on TCP): measured with
`bench/bench_tls.py`.  OpenSSL's SSL_MODE_RELEASE_BUFFERS, session cache off
and no session tickets were each tried and changed nothing measurable here
(OpenSSL 3.0), so the context keeps the defaults.
"""
from __future__ import annotations

import ssl

from fastsip.server.config import ConfigError

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
