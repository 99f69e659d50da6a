"""Addresses and sockets of the load tool: loopback checks, phones' source
addresses, the UDP sockets, TCP connections and the raw socket."""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = [
    "TargetError",
    "parse_target",
    "check_target",
    "sockaddr",
    "phone_address",
    "open_udp_sockets",
    "open_tcp_connections",
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


def open_tcp_connections(host: str, port: int, n: int, sources) -> list:
    """``n`` non-blocking TCP connections to ``(host, port)``; connection
    ``i`` binds to source address ``sources[i]`` (``None``: any)."""
    raise_fd_limit(n)
    family = family_of(host)
    socks = []
    try:
        for i in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            _bufs(s)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sources[i]:
                s.bind((sources[i], 0))
            s.settimeout(5)
            try:
                s.connect((host, port))
            except (TimeoutError, ConnectionRefusedError) as exc:
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                what = "refused" if isinstance(exc, ConnectionRefusedError) else "timed out"
                raise ConnectionRefusedError(f"TCP connection to {where} {what}: "
                                             f"is a registrar listening on {where}?") from None
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def open_raw_socket() -> socket.socket:
    """A raw IPv4 socket that sends whole IP packets (IP_HDRINCL); needs root."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        raise PermissionError("--raw needs root (CAP_NET_RAW)") from None
    _bufs(s)
    s.setblocking(False)
    return s
