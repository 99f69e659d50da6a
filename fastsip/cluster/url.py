"""``--cluster`` URLs: where the shared location is, and how to log in.

``redis://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`` names seed nodes of a Redis
Cluster (or one standalone Redis); ``rediss://`` speaks TLS to every node, with the
system's CAs or ``?ca=FILE``.  A password comes from the URL or from a file
(``--cluster-password-file``, first line), so that it need not be on a command line;
``ClusterURL.redacted()`` is what logs and the start line show.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

from fastsip.errors import ConfigError

DEFAULT_PORT = 6379


@dataclass(frozen=True)
class ClusterURL:
    seeds: tuple                    # ((host, port), ...)
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None

    def redacted(self) -> str:
        """The URL as logs may show it: the password replaced by ``***``."""
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':***' if self.password else ''}@"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.seeds)
        return f"{'rediss' if self.tls else 'redis'}://{auth}{hosts}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def with_password_file(self, path: str | None) -> ClusterURL:
        """This URL with the password read from ``path`` (its first line)."""
        if not path:
            return self
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"--cluster-password-file: {e.strerror}: {path}") from None
        if not password:
            raise ConfigError(f"--cluster-password-file: {path} is empty")
        return ClusterURL(self.seeds, self.tls, self.username, password, self.ca)


def parse_url(text: str) -> ClusterURL:
    """A ``--cluster`` URL, checked; ConfigError names what is wrong."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        raise ConfigError(f"--cluster: {_hide(text)!r} is not redis://HOST:PORT[,HOST:PORT...] "
                          "(or rediss:// for TLS)")
    rest, _, query = rest.partition("?")
    rest = rest.rstrip("/")
    username = password = None
    if "@" in rest:
        auth, _, rest = rest.rpartition("@")
        user, colon, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:                  # redis://PASSWORD@host is how many tools write it
            username, password = None, unquote(user)
    seeds = []
    for part in rest.split(","):
        seeds.append(_host_port(part.strip(), text))
    params = parse_qs(query)
    unknown = set(params) - {"ca"}
    if unknown:
        raise ConfigError(f"--cluster: unknown parameter {sorted(unknown)[0]!r} (known: ca)")
    ca = params.get("ca", [None])[0]
    return ClusterURL(tuple(seeds), scheme == "rediss", username, password, ca)


def _host_port(part: str, text: str) -> tuple:
    if not part:
        raise ConfigError(f"--cluster: {_hide(text)!r} names no host")
    if part.startswith("["):
        host, _, port = part[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise ConfigError(f"--cluster: {part!r} is not HOST:PORT")
    return host, number


def _hide(text: str) -> str:
    """``text`` with what may be a password hidden (for error messages)."""
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return text
