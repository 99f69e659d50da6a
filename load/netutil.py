"""Addresses and sockets of the load tool: loopback checks, phones' source
addresses, the UDP sockets, TCP connections (with their TLS and WebSocket
handshakes) and the raw socket."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import socket
import ssl
import struct
import time

__all__ = [
    "TargetError",
    "parse_target",
    "format_target",
    "check_target",
    "sockaddr",
    "phone_address",
    "open_udp_sockets",
    "open_tcp_connections",
    "tls_client_context",
    "StreamSetupError",
    "tls_handshake",
    "ws_handshake",
    "open_stream_connections",
    "open_raw_socket",
    "raise_fd_limit",
]

SOCKBUF = 4 * 1024 * 1024


class TargetError(ValueError):
    """A target the tool refuses or cannot parse."""


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``; the host must be an IP address."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise TargetError(f"target {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise TargetError(f"target host {host!r} is not an IP address") from None
    try:
        port_n = int(port)
    except ValueError:
        raise TargetError(f"target port {port!r} is not a number") from None
    if not 1 <= port_n <= 65535:
        raise TargetError(f"target port {port_n} out of range")
    return host, port_n


def check_target(host: str, allow_remote: bool) -> None:
    """Refuse a target outside 127.0.0.0/8 and ::1 unless ``allow_remote``."""
    if not ipaddress.ip_address(host).is_loopback and not allow_remote:
        raise TargetError(
            f"refusing non-loopback target {host}: a load test floods its target; "
            "give --allow-remote if you really mean it")


def format_target(host: str, port: int) -> str:
    """``HOST:PORT`` (``[V6]:PORT``), the address in its canonical form."""
    ip = ipaddress.ip_address(host)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def family_of(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def sockaddr(host: str, port: int) -> bytes:
    """The C ``struct sockaddr_in``/``sockaddr_in6`` for ``(host, port)``."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + ip.packed + bytes(8)
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + ip.packed
            + struct.pack("=I", 0))


def phone_address(i: int) -> str:
    """Source address of phone ``i``: 127.1.0.1, 127.1.0.2, ... (x.y.0 and
    x.y.255 skipped), so up to 16 million phones each have their own."""
    block, host = divmod(i, 254)
    hi, mid = divmod(block, 256)
    if hi > 253:
        raise ValueError("too many phones for 127.0.0.0/8")
    return f"127.{hi + 1}.{mid}.{host + 1}"


def raise_fd_limit(need: int) -> None:
    """Raise the soft limit on open files to ``need`` (plus slack) when allowed."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + 64
    if soft < want:
        if hard != resource.RLIM_INFINITY and want > hard:
            raise OSError(f"need {want} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _bufs(s: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        except OSError:
            pass


def open_udp_sockets(family: int, n: int, ports=None, any_address: bool = True) -> list:
    """``n`` non-blocking UDP sockets, one per source port.

    IPv4 sockets bind to 0.0.0.0 when ``any_address`` (so replies to any
    phone address in 127.0.0.0/8 arrive; the phones pick their source
    address per message with IP_PKTINFO), else to 127.0.0.1.  ``ports``:
    the ports to bind, 0 (or missing) for an ephemeral one; a port that
    cannot be bound raises ``OSError``.
    """
    raise_fd_limit(n)
    socks = []
    try:
        for i in range(n):
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            _bufs(s)
            port = ports[i] if ports and i < len(ports) else 0
            if family == socket.AF_INET6:
                s.bind(("::1", port))
            else:
                s.bind(("0.0.0.0" if any_address else "127.0.0.1", port))
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def open_tcp_connections(host: str, port: int, n: int, sources, blocking: bool = False,
                         shared: bool = False, fd_need: int = 0) -> list:
    """``n`` non-blocking (or ``blocking``) TCP connections to ``(host, port)``;
    connection ``i`` binds to source address ``sources[i]`` (``None``: any),
    or to ``sources[i]`` = ``(address, port)``.  ``shared``: with
    ``SO_REUSEADDR``, so that connections to other targets can bind the same
    source address and port (their 4-tuples differ by the target); ``fd_need``:
    the open files the caller needs in all (default ``n``)."""
    raise_fd_limit(max(n, fd_need))
    family = family_of(host)
    socks = []
    try:
        for i in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            _bufs(s)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if shared:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if isinstance(sources[i], tuple):
                s.bind(sources[i])
            elif sources[i]:
                s.bind((sources[i], 0))
            elif shared:        # a port of its own now, so that the others can take it too
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            s.settimeout(5)
            try:
                s.connect((host, port))
            except (TimeoutError, ConnectionRefusedError) as exc:
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                what = "refused" if isinstance(exc, ConnectionRefusedError) else "timed out"
                raise ConnectionRefusedError(f"TCP connection to {where} {what}: "
                                             f"is a registrar listening on {where}?") from None
            if not blocking:
                s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


class StreamSetupError(ConnectionError):
    """A TLS or WebSocket handshake that failed (the message says which and why)."""


def tls_client_context(ca: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """The client side of TLS: TLS 1.2 or newer, the server's certificate
    checked against ``ca`` (a PEM file; None: the system's CAs) and its
    address, or not checked at all with ``insecure``."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _recv_some(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        data = sock.recv(65536)
    except TimeoutError:
        raise StreamSetupError("timed out") from None
    if not data:
        raise StreamSetupError("the server closed the connection")
    return data


def tls_handshake(sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str,
                  timeout: float = 5.0) -> tuple:
    """A TLS handshake over the connected (blocking) ``sock`` through memory
    BIOs: ``(SSLObject, incoming MemoryBIO, outgoing MemoryBIO)``."""
    inbio, outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inbio, outbio, server_hostname=server_hostname)
    deadline = time.monotonic() + timeout
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outbio.pending:
                sock.sendall(outbio.read())
            inbio.write(_recv_some(sock, deadline))
        except ssl.SSLCertVerificationError as exc:
            raise StreamSetupError(f"TLS: the server's certificate: {exc.verify_message} "
                                   "(give --tls-ca PEM, or --tls-insecure)") from None
        except ssl.SSLError as exc:
            raise StreamSetupError(f"TLS handshake failed: {exc}") from None
    if outbio.pending:
        sock.sendall(outbio.read())
    return obj, inbio, outbio


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_handshake(send, recv, host: str, port: int, path: str = "/",
                 timeout: float = 5.0) -> bytes:
    """The client's opening handshake (RFC 6455 section 4.1) offering the
    ``sip`` subprotocol (RFC 7118), over ``send(bytes)`` and ``recv() ->
    bytes``; checks the 101, the accept key and that the server chose
    ``sip``.  Returns the bytes that followed the answer (normally none)."""
    key = base64.b64encode(os.urandom(16))
    h = f"[{host}]" if ":" in host else host
    send((f"GET {path} HTTP/1.1\r\nHost: {h}:{port}\r\nUpgrade: websocket\r\n"
          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
          "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n\r\n").encode())
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        if len(buf) > 16384 or time.monotonic() > deadline:
            raise StreamSetupError("WebSocket: no complete answer to the upgrade request")
        buf += recv(deadline)
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise StreamSetupError(f"WebSocket: the server answered {lines[0]!r} to the upgrade")
    hdrs = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        hdrs[name.strip().lower()] = value.strip()
    if hdrs.get("sec-websocket-accept", "").encode() != ws_accept(key):
        raise StreamSetupError("WebSocket: wrong Sec-WebSocket-Accept in the answer")
    if hdrs.get("sec-websocket-protocol", "").lower() != "sip":
        raise StreamSetupError("WebSocket: the server did not choose the sip subprotocol "
                               f"(Sec-WebSocket-Protocol: {hdrs.get('sec-websocket-protocol')!r})")
    return rest


def open_stream_connections(host: str, port: int, n: int, sources, transport: str,
                            ctx: ssl.SSLContext | None = None, timeout: float = 5.0,
                            shared: bool = False, fd_need: int = 0) -> tuple:
    """``n`` connections to ``(host, port)`` past their handshakes, non-blocking:
    TCP (``tcp``), TLS (``tls``), WebSocket (``ws``) or WebSocket over TLS
    (``wss``).  Returns ``(sockets, tls)``: ``tls`` is None without TLS, else
    one ``(SSLObject, incoming BIO, outgoing BIO, plaintext after the
    handshakes)`` per connection, as ``Engine.set_tls`` takes them.
    ``sources``, ``shared``, ``fd_need``: as :func:`open_tcp_connections`."""
    socks = open_tcp_connections(host, port, n, sources, blocking=True, shared=shared,
                                 fd_need=fd_need)
    tls = [] if transport in ("tls", "wss") else None
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        for s in socks:
            s.settimeout(timeout)
            rest = b""
            try:
                if tls is not None:
                    obj, inbio, outbio = tls_handshake(s, ctx, host, timeout)
                    if transport == "wss":
                        def send(data, obj=obj, outbio=outbio, s=s):
                            obj.write(data)
                            s.sendall(outbio.read())

                        def recv(deadline, obj=obj, inbio=inbio, s=s):
                            while True:
                                try:
                                    return obj.read(65536)
                                except ssl.SSLWantReadError:
                                    inbio.write(_recv_some(s, deadline))

                        rest = ws_handshake(send, recv, host, port, timeout=timeout)
                    tls.append((obj, inbio, outbio, rest))
                elif transport == "ws":
                    rest = ws_handshake(s.sendall, lambda d, s=s: _recv_some(s, d), host, port,
                                        timeout=timeout)
                    if rest:
                        raise StreamSetupError("WebSocket: data right after the handshake")
            except (StreamSetupError, OSError) as exc:
                raise StreamSetupError(f"{transport} connection to {where}: {exc}") from None
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, tls


def open_raw_socket() -> socket.socket:
    """A raw IPv4 socket that sends whole IP packets (IP_HDRINCL); needs root."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        raise PermissionError("--raw needs root (CAP_NET_RAW)") from None
    _bufs(s)
    s.setblocking(False)
    return s
