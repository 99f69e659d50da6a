"""Configuration of ``fastsip serve``: flags, the TOML file, defaults, validation.

One table (``OPTIONS``) defines every setting once: its flag, its type, its
default and its help.  The TOML file given with ``--config`` takes the same
keys as the long flags (``min-expires`` or ``min_expires``); flags given on
the command line win over the file, the file over the defaults.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there, see pyproject.toml)
    import tomli as tomllib

from fastsip.cluster.url import parse_url
from fastsip.errors import ConfigError as ConfigError  # the server's modules import it here


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    text = str(text).strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected [IPV6]:PORT")
        port = rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"{what} {text!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    if not host:
        raise ConfigError(f"{what} {text!r}: the host is missing")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {text!r}: the port must be a number within 0..65535")
    return host, int(port)


#: What --listen accepts: the datagram transport and the stream ones (docs/transports.md).
TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")
#: Stream transports that need --tls-cert and --tls-key.
SECURE = ("tls", "wss")


def parse_listen(text: str) -> tuple[str, str, int]:
    """``PROTO:HOST:PORT`` (PROTO one of ``TRANSPORTS``) -> (transport, host, port)."""
    transport, sep, rest = str(text).partition(":")
    transport = transport.lower()
    if not sep or transport not in TRANSPORTS:
        raise ConfigError(f"--listen {text!r}: expected PROTO:HOST:PORT, PROTO one of "
                          f"{', '.join(TRANSPORTS)}")
    host, port = parse_hostport(rest, f"--listen {text!r}:")
    return transport, host, port


def _positive_int(name):
    def conv(v):
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} {v!r}: expected a whole number") from None
        if n < 1:
            raise ConfigError(f"--{name} {v!r}: must be at least 1")
        return n
    return conv


def _nonneg_int(name):
    def conv(v):
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} {v!r}: expected a whole number") from None
        if n < 0:
            raise ConfigError(f"--{name} {v!r}: must not be negative")
        return n
    return conv


def _nonneg_float(name):
    def conv(v):
        try:
            n = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} {v!r}: expected a number") from None
        if not n >= 0 or n == float("inf"):
            raise ConfigError(f"--{name} {v!r}: must be a finite number >= 0")
        return n
    return conv


def _choice(name, choices):
    def conv(v):
        v = str(v).lower()
        if v not in choices:
            raise ConfigError(f"--{name} {v!r}: expected one of {', '.join(choices)}")
        return v
    return conv


def _string(name):
    def conv(v):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"--{name}: expected a non-empty string")
        return v
    return conv


def _positive_float(name):
    def conv(v):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} {v!r}: expected a number") from None
        if not x > 0 or x == float("inf"):
            raise ConfigError(f"--{name} {v!r}: must be above 0")
        return x
    return conv


#: bytes a binding costs: the store's ~270 (docs/architecture.md) plus the state file's
#: rows and cache
BINDING_BYTES = 400


def auto_max_bindings() -> int:
    """--max-bindings auto: a quarter of the physical memory at BINDING_BYTES each."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 << 30
    return max(10_000, memory // 4 // BINDING_BYTES)


def _bindings_cap(v):
    if str(v).strip().lower() == "auto":
        return auto_max_bindings()
    return _nonneg_int("max-bindings")(v)


def _algorithms(v):
    from fastsip.auth import ALGORITHMS
    names = [a.strip() for a in (v if isinstance(v, list) else str(v).split(",")) if a.strip()]
    known = {a.upper(): a for a in ALGORITHMS}
    out = []
    for a in names:
        if a.upper() not in known:
            raise ConfigError(f"--auth-algorithms {v!r}: {a!r} is not one of {', '.join(ALGORITHMS)}")
        out.append(known[a.upper()])
    if not out:
        raise ConfigError("--auth-algorithms: at least one algorithm is needed")
    return tuple(out)


# name, converter, default, list?, live (SIGHUP may change it), metavar, help
OPTIONS = [
    ("listen", parse_listen, ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"], True, False, "PROTO:HOST:PORT",
     "where to listen: udp, tcp, tls, ws or wss, then HOST:PORT (IPv6: udp:[::1]:5060); "
     "repeat for several; tls and wss need --tls-cert and --tls-key "
     "(default: udp and tcp on 0.0.0.0:5060)"),
    # TLS and WebSocket (issue #13, docs/transports.md)
    ("tls-cert", _string("tls-cert"), None, False, False, "PEM",
     "the server's certificate for tls: and wss: listeners, a PEM file (with its chain "
     "after it); re-read on SIGHUP"),
    ("tls-key", _string("tls-key"), None, False, False, "PEM",
     "the private key of --tls-cert, a PEM file (it may be the same file); re-read on SIGHUP"),
    ("tls-ca", _string("tls-ca"), None, False, False, "PEM",
     "CA certificates that client certificates are checked against (with --tls-verify-client)"),
    ("tls-verify-client", bool, False, False, False, None,
     "mutual TLS: a tls: or wss: client must present a certificate signed by --tls-ca"),
    ("ws-origin", _string("ws-origin"), [], True, True, "ORIGIN",
     "a browser Origin allowed on ws: and wss: listeners, e.g. https://phone.example.com; "
     "repeat for several (default: any; a handshake from another Origin gets 403)"),
    ("workers", _positive_int("workers"), os.cpu_count() or 1, False, False, "N",
     "worker processes (default: the number of CPUs, here %(cpus)d)"),
    ("domain", _string("domain"), [], True, True, "D",
     "a domain this registrar serves ('*.example.com' allowed); repeat for several "
     "(default: any domain); REGISTER for others gets 404"),
    ("min-expires", _nonneg_int("min-expires"), 60, False, True, "S",
     "shortest registration accepted, seconds; shorter ones get 423 (default: 60)"),
    ("max-expires", _positive_int("max-expires"), 3600, False, True, "S",
     "longest registration granted, seconds (default: 3600)"),
    ("default-expires", _positive_int("default-expires"), 3600, False, True, "S",
     "registration time when the REGISTER asks none, seconds (default: 3600)"),
    ("max-contacts", _positive_int("max-contacts"), 16, False, True, "N",
     "most bindings one AOR may hold (default: 16)"),
    ("aor-by", _choice("aor-by", ("user@host", "user")), "user@host", False, False, "KEY",
     "what an AOR is: user@host, the To URI without port or parameters (default), or user, "
     "the user part alone, for one domain (like Kamailio's use_domain=0): alice@a and alice@b "
     "are then one AOR, sip:alice"),
    ("redirect", bool, False, False, True, None,
     "also be the location service's redirect server: answer requests other than REGISTER, "
     "ACK and OPTIONS (INVITE, MESSAGE, SUBSCRIBE, ...) for an AOR of a served domain with "
     "302 to its contacts, 480 when it has none, 404 for another domain or a user not in "
     "--users; without it they get 405 (see docs/server.md, Redirect server)"),
    ("realm", _string("realm"), None, False, False, "R",
     "require digest authentication in realm R (with --users)"),
    ("users", _string("users"), None, False, True, "FILE",
     "htdigest file of user:realm:HA1 lines (see docs/auth.md); re-read on SIGHUP"),
    ("auth-algorithms", lambda v: _algorithms(v), "SHA-256,MD5", False, False, "LIST",
     "digest algorithms that may be offered, in order, one challenge each (SHA-256, MD5, "
     "SHA-256-sess, MD5-sess); a 401 offers only those the users file holds a hash for, for "
     "the user in To (a plain htdigest line: MD5) (default: SHA-256,MD5)"),
    ("nonce-ttl", _positive_float("nonce-ttl"), 300.0, False, True, "S",
     "seconds a digest nonce stays valid; an older one gets 401 stale=true (default: 300)"),
    ("auth-fail-limit", _nonneg_int("auth-fail-limit"), 10, False, True, "N",
     "wrong passwords allowed per source address, and per user from the addresses that got "
     "it wrong, within --auth-fail-backoff seconds; beyond them 403 for that long; 0 turns "
     "it off (default: 10)"),
    ("auth-fail-backoff", _positive_float("auth-fail-backoff"), 60.0, False, True, "S",
     "the window and the refusal time of --auth-fail-limit, seconds (default: 60)"),
    ("max-bindings", _bindings_cap, "auto", False, True, "N",
     "most bindings all workers hold together; a REGISTER that would add beyond gets 503 "
     "with Retry-After; 0 for no limit; auto: a quarter of this machine's memory at 400 "
     "bytes per binding (default: auto, here %(max_bindings)d)"),
    ("state", _string("state"), "./fastsip-state.sqlite3", False, False, "PATH",
     "SQLite state file for the bindings (default: ./fastsip-state.sqlite3)"),
    ("no-state", bool, False, False, False, None,
     "keep bindings in memory only: a restart loses them"),
    ("flush-interval", _nonneg_float("flush-interval"), 1.0, False, True, "S",
     "seconds between writes of binding changes to the state file; the most a crash loses "
     "(default: 1)"),
    ("fold-interval", _nonneg_float("fold-interval"), 10.0, False, True, "S",
     "seconds between folds of the workers' change logs into the SQLite file: how far "
     "behind a reader of the file may be (default: 10)"),
    # the shared location (issue #12, docs/cluster.md)
    ("cluster", parse_url, None, False, False, "URL",
     "keep the bindings in a Redis Cluster shared with other nodes instead of the state file: "
     "redis://HOST:PORT[,HOST:PORT...] (seed nodes; one standalone Redis works too), "
     "rediss:// for TLS (?ca=FILE for a private CA), a password as redis://:PASSWORD@... or "
     "with --cluster-password-file"),
    ("cluster-password-file", _string("cluster-password-file"), None, False, False, "FILE",
     "the Redis password (its first line), kept off the command line"),
    ("cluster-wait", _positive_float("cluster-wait"), 5.0, False, True, "S",
     "how long a REGISTER may wait for the shared location (a primary failing over) before "
     "500 with Retry-After, seconds (default: 5)"),
    ("cluster-grace", _nonneg_float("cluster-grace"), 10.0, False, False, "S",
     "how long an AOR's key outlives its latest binding in Redis, seconds: room for the "
     "clocks of nodes and Redis to differ (default: 10)"),
    ("node-id", _string("node-id"), None, False, False, "NAME",
     "this node's name in logs and on the start line (default: the host name)"),
    ("metrics", lambda v: parse_hostport(v, "--metrics"), "127.0.0.1:9060", False, False, "HOST:PORT",
     "HTTP endpoint for Prometheus /metrics and the admin API of show/bindings/remove "
     "(default: 127.0.0.1:9060)"),
    ("admin-token-file", _string("admin-token-file"), None, False, False, "FILE",
     "a file holding a token (one word, 16 characters at least) that every admin API request "
     "must bring (Authorization: Bearer TOKEN); without it the admin API answers on a loopback "
     "--metrics address only; re-read on SIGHUP"),
    ("max-message-size", _positive_int("max-message-size"), 16384, False, False, "BYTES",
     "largest SIP message accepted; larger datagrams are dropped and counted, larger TCP "
     "messages close the connection (default: 16384)"),
    ("rate-limit", _nonneg_float("rate-limit"), 0.0, False, True, "N",
     "requests per second allowed from one source address per worker, token bucket; "
     "0 turns it off (default: 0)"),
    ("rate-burst", _nonneg_float("rate-burst"), 0.0, False, True, "N",
     "token bucket size for --rate-limit (default: twice the rate)"),
    ("tcp-idle-timeout", _nonneg_float("tcp-idle-timeout"), 300.0, False, True, "S",
     "close a TCP connection silent for this long, seconds; 0 never (default: 300)"),
    ("max-connections", _positive_int("max-connections"), 10000, False, False, "N",
     "most TCP connections per worker; more are closed at once (default: 10000)"),
    # TCP hardening (issue #14): a deadline per message, a cap per source
    ("tcp-message-timeout", _nonneg_float("tcp-message-timeout"), 10.0, False, True, "S",
     "close a TCP connection whose message (headers and body) is not complete this many "
     "seconds after its first byte, against slowloris; CRLF keep-alives do not start the "
     "clock; 0 never (default: 10)"),
    ("max-connections-per-source", _positive_int("max-connections-per-source"), 1000, False,
     True, "N",
     "most TCP connections one source (an IPv4 address, an IPv6 /64) may hold per worker; "
     "more are refused; raise it behind an edge proxy (default: 1000)"),
    ("no-steer", bool, False, False, False, None,
     "do not load the eBPF program that makes the kernel deliver each UDP REGISTER to the "
     "worker owning its AOR (without it, most REGISTERs are handed between workers)"),
    ("batch-wait", _nonneg_float("batch-wait"), 200.0, False, True, "US",
     "under steady load (woken again within two such waits), wait this many microseconds "
     "after a wake-up before reading, so that one system call reads more datagrams: less "
     "CPU per request for at most that much latency; slower traffic is read at once; 0 "
     "never waits (default: 200)"),
    ("batch", _positive_int("batch"), 64, False, False, "N",
     "datagrams received or sent per system call (default: 64)"),
    ("log-level", _choice("log-level", ("debug", "info", "warning", "error")), "info", False, True,
     "LEVEL", "debug, info, warning or error (default: info)"),
    ("log-format", _choice("log-format", ("text", "json")), "text", False, True, "FORMAT",
     "text, or json (one object per line, for log shippers) (default: text)"),
    ("log-file", _string("log-file"), None, False, False, "PATH",
     "append logs to PATH instead of standard error; SIGHUP reopens it (for logrotate)"),
]
_BY_NAME = {o[0]: o for o in OPTIONS}
LIVE = tuple(o[0].replace("-", "_") for o in OPTIONS if o[4])


class ServerConfig:
    """The resolved settings of ``fastsip serve``: one attribute per entry of
    ``OPTIONS`` (dashes as underscores) and ``config`` (the TOML file or None).
    Made by :func:`resolve`; the defaults live in ``OPTIONS`` only."""

    FIELDS = ("config",) + tuple(o[0].replace("-", "_") for o in OPTIONS)

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)

    def __repr__(self):
        return "ServerConfig(" + ", ".join(
            f"{k}={getattr(self, k, None)!r}" for k in self.FIELDS) + ")"

    def live_values(self) -> dict:
        """The settings a SIGHUP may change, as plain values (sent to the workers)."""
        return {k: getattr(self, k) for k in LIVE}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Add every ``fastsip serve`` flag to ``p`` (defaults are None: see ``resolve``)."""
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with the same keys as these flags (flags given here win); "
                        "SIGHUP re-reads the settings marked 'live' in docs/server.md")
    for name, _conv, _default, many, _live, metavar, help_ in OPTIONS:
        help_ = help_.replace("%(cpus)d", str(os.cpu_count() or 1))
        help_ = help_.replace("%(max_bindings)d", str(auto_max_bindings()))
        if _conv is bool:
            p.add_argument(f"--{name}", action="store_true", default=None, help=help_)
        else:
            p.add_argument(f"--{name}", action="append" if many else "store", default=None,
                           metavar=metavar, help=help_)


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    out = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name not in _BY_NAME:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        if _BY_NAME[name][3] and not isinstance(value, list):
            value = [value]
        out[name] = value
    return out


def resolve(args: argparse.Namespace | None = None, config_path: str | None = None) -> ServerConfig:
    """Defaults, then the TOML file, then the flags given: a checked ``ServerConfig``."""
    given = {}
    if args is not None:
        config_path = config_path or args.config
        for name, *_ in OPTIONS:
            v = getattr(args, name.replace("-", "_"), None)
            if v is not None:
                given[name] = v
    from_file = _read_toml(config_path) if config_path else {}
    cfg = ServerConfig(config=config_path)
    for name, conv, default, many, _live, _m, _h in OPTIONS:
        raw = given.get(name, from_file.get(name, default))
        if conv is bool:
            value = bool(raw)
        elif raw is None:
            value = None
        elif many:
            value = [conv(v) for v in raw]
        else:
            value = conv(raw)
        setattr(cfg, name.replace("-", "_"), value)
    if cfg.no_state or cfg.cluster is not None:
        cfg.state = None                # the shared location replaces the state file
    if cfg.cluster is not None:
        cfg.cluster = cfg.cluster.with_password_file(cfg.cluster_password_file)
    elif cfg.cluster_password_file:
        raise ConfigError("--cluster-password-file needs --cluster")
    if cfg.node_id is None:
        cfg.node_id = socket.gethostname()
    if not cfg.listen:
        raise ConfigError("--listen: at least one address is needed")
    if len(set(cfg.listen)) != len(cfg.listen):
        raise ConfigError("--listen: an address is given twice")
    secure = sorted({t for t, _h, _p in cfg.listen if t in SECURE})
    if secure and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError(f"--listen {secure[0]}:... needs --tls-cert and --tls-key")
    for flag, path in (("tls-cert", cfg.tls_cert), ("tls-key", cfg.tls_key), ("tls-ca", cfg.tls_ca)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{flag} {path}: no such file")
    if cfg.tls_verify_client and not cfg.tls_ca:
        raise ConfigError("--tls-verify-client needs --tls-ca (the CA that signs client certificates)")
    if (cfg.realm is None) != (cfg.users is None):
        raise ConfigError("--realm and --users go together (digest authentication needs both)")
    if cfg.users is not None and not os.path.isfile(cfg.users):
        raise ConfigError(f"--users {cfg.users}: no such file")
    if cfg.min_expires > cfg.max_expires:
        raise ConfigError(f"--min-expires {cfg.min_expires} is above --max-expires {cfg.max_expires}")
    if cfg.workers > 256:
        raise ConfigError(f"--workers {cfg.workers}: at most 256")
    if cfg.batch > 1024:
        raise ConfigError(f"--batch {cfg.batch}: at most 1024")
    if cfg.max_message_size > 65535:
        raise ConfigError(f"--max-message-size {cfg.max_message_size}: at most 65535")
    if cfg.rate_limit and not cfg.rate_burst:
        cfg.rate_burst = 2 * cfg.rate_limit
    if cfg.state is not None:
        d = os.path.dirname(os.path.abspath(cfg.state))
        if not os.path.isdir(d):
            raise ConfigError(f"--state {cfg.state}: directory {d} does not exist")
    return cfg
