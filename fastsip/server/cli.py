"""The ``serve``, ``show``, ``bindings`` and ``remove`` subcommands of ``fastsip``.

``show``, ``bindings`` and ``remove`` ask a running server over its HTTP
endpoint (the one that serves ``/metrics``; ``--metrics HOST:PORT``, or the
server's own ``--config`` file), with the server's admin token when it has one
(``--admin-token-file``); ``remove`` is a POST of ``application/json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ENDPOINT = "127.0.0.1:9060"


def _endpoint_url(endpoint: str, path: str, **query) -> str:
    from fastsip.server.config import parse_hostport
    host, port = parse_hostport(endpoint, "--metrics")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)     # a wildcard: this machine
    if ":" in host:
        host = f"[{host}]"
    q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    return f"http://{host}:{port}{path}" + (f"?{q}" if q else "")


def _endpoint(args) -> tuple[str, str | None]:
    """(HOST:PORT of the server's endpoint, its admin token or None): the flags,
    else the keys ``metrics`` and ``admin-token-file`` of ``--config``, else the defaults."""
    from fastsip.server.admin import read_token
    from fastsip.server.config import ConfigError, _read_toml
    try:
        conf = _read_toml(args.config) if args.config else {}
        endpoint = args.metrics or conf.get("metrics") or DEFAULT_ENDPOINT
        token_file = args.admin_token_file or conf.get("admin-token-file")
        return str(endpoint), read_token(token_file) if token_file else None
    except ConfigError as exc:
        raise SystemExit(_fail(str(exc))) from None


def _call(args, path, method="GET", **params):
    """The server's JSON answer; a GET sends ``params`` in the query, a POST as a JSON body."""
    from fastsip.server.config import ConfigError
    endpoint, token = _endpoint(args)
    try:
        url = _endpoint_url(endpoint, path, **(params if method == "GET" else {}))
    except ConfigError as exc:
        raise SystemExit(_fail(str(exc))) from None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if method == "POST":
        headers["Content-Type"] = "application/json"
        data = json.dumps({k: v for k, v in params.items() if v is not None}).encode()
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        # a refused argument (400) is the user's to fix: just say why
        raise SystemExit(_fail(detail if exc.code == 400 else f"{url}: {detail}")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(_fail(f"no fastsip server answers at {endpoint} ({reason}); "
                               "is it running? (--metrics HOST:PORT)")) from None


def _fail(msg) -> int:
    print(f"fastsip: {msg}", file=sys.stderr)
    return 2


def _line(b) -> str:
    src = b["source"]
    host = f"[{src[0]}]" if ":" in src[0] else src[0]
    parts = [f"<{b['contact']}>", f"expires={b['expires']}"]
    if b.get("q") is not None:
        parts.append(f"q={b['q']:g}")
    parts.append(f"{b['transport']} from {host}:{src[1]}")
    if b.get("transport") != "udp" and b.get("conn_id", -1) != -1:
        parts.append(f"conn {b['conn_id']}")
    if b.get("instance"):
        parts.append(f"instance {b['instance']}")
    if b.get("reg_id") is not None:
        parts.append(f"reg-id {b['reg_id']}")
    if b.get("path"):
        parts.append("path " + ",".join(b["path"]))
    parts.append(f"call-id {b['call_id']} cseq {b['cseq']}")
    if b.get("user_agent"):
        parts.append(f"ua {b['user_agent']!r}")
    return "  ".join(parts)


def _near(data) -> str:
    near = data.get("near") or ()
    return f"; did you mean {' or '.join(near)}?" if near else ""


def _cluster(args, op, **params) -> dict:
    """What the admin API would answer, read from the shared location itself
    (``--cluster``: no node need be running)."""
    from fastsip.cluster import location
    from fastsip.cluster.sync import SyncCluster
    from fastsip.cluster.url import parse_url
    from fastsip.errors import ClusterError, ConfigError
    from fastsip.server.commands import binding_dict
    try:
        url = parse_url(args.cluster).with_password_file(args.cluster_password_file)
        sync = SyncCluster(url)
    except (ConfigError, ClusterError) as exc:
        raise SystemExit(_fail(str(exc))) from None
    try:
        now = time.time()
        if op == "bindings":
            found, truncated = location.bindings(sync, params["limit"], now)
            return {"bindings": [binding_dict(a, b, now) for a, b in found],
                    "truncated": truncated}
        aor = _canonical(params["aor"], args)
        if op == "lookup":
            return {"aor": aor, "bindings": [binding_dict(aor, b, now)
                                             for b in location.lookup(sync, aor, now)]}
        return {"aor": aor, "removed": location.remove(sync, aor, params.get("contact"), now)}
    except ClusterError as exc:
        raise SystemExit(_fail(str(exc))) from None
    finally:
        sync.close()


def _canonical(text: str, args) -> str:
    """The AOR key of ``text`` as a node would make it (``--aor-by`` of --config)."""
    import fastsip
    from fastsip.registrar import aor_from_text
    try:
        uri = aor_from_text(text)
    except ValueError as exc:
        raise SystemExit(_fail(str(exc))) from None
    by = "user@host"
    if getattr(args, "config", None):
        from fastsip.server.config import resolve
        by = resolve(None, args.config).aor_by
    return fastsip.Registrar(aor_by=by).aor_of(uri)


def cmd_show(args) -> int:
    if args.cluster:
        data = _cluster(args, "lookup", aor=args.aor)
    else:
        data = _call(args, "/api/aor", aor=args.aor)
    if args.json:
        print(json.dumps(data["bindings"], indent=1))
        return 0
    aor = data.get("aor", args.aor)
    if not data["bindings"]:
        print(f"{aor}: no bindings{_near(data)}")
        return 1
    print(f"{aor}: {len(data['bindings'])} binding(s)")
    for b in sorted(data["bindings"], key=lambda b: (-(b["q"] or 0), b["contact"])):
        print("  " + _line(b))
    return 0


def cmd_bindings(args) -> int:
    if args.cluster:
        data = _cluster(args, "bindings", limit=args.limit)
    else:
        data = _call(args, "/api/bindings", limit=args.limit)
    if args.json:
        print(json.dumps(data["bindings"], indent=1))
        return 0
    last = None
    for b in data["bindings"]:
        if b["aor"] != last:
            print(b["aor"])
            last = b["aor"]
        print("  " + _line(b))
    aors = len({b["aor"] for b in data["bindings"]})
    print(f"{len(data['bindings'])} binding(s) of {aors} AOR(s)"
          + (f" (first {args.limit} shown)" if data.get("truncated") else ""))
    return 0


def cmd_remove(args) -> int:
    if args.cluster:
        data = _cluster(args, "remove", aor=args.aor, contact=args.contact)
    else:
        data = _call(args, "/api/remove", method="POST", aor=args.aor, contact=args.contact)
    aor = data.get("aor", args.aor)
    what = f"{aor} {args.contact}" if args.contact else aor
    print(f"removed {data['removed']} binding(s) of {what}" + ("" if data["removed"] else _near(data)))
    return 0 if data["removed"] else 1


def cmd_serve(args) -> int:
    from fastsip.server.supervisor import serve
    return serve(args)


def _one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Bad flags: one line on standard error and exit status 2 (no usage block)."""
    def error(message):
        print(f"{p.prog}: error: {message} (see {p.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse_known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras
    p.error = error
    p.parse_known_args = parse_known_args
    return p


def add_subcommands(sub) -> None:
    """Register serve/show/bindings/remove on the ``fastsip`` sub-parser collection."""
    from fastsip.server.config import add_serve_arguments
    p = sub.add_parser(
        "serve", help="run the registrar (UDP+TCP, one worker process per CPU)",
        description="Run the multi-process SIP registrar. Every setting can also come from a "
                    "TOML file (--config) with the same keys; flags win. Signals: SIGTERM/SIGINT "
                    "stop after writing the state, SIGHUP reopens the log file and reloads the "
                    "live settings. See docs/server.md.")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    _one_line_errors(p)

    def endpoint(p):
        p.add_argument("--metrics", metavar="HOST:PORT",
                       help="the running server's HTTP endpoint (default: the metrics key of "
                            f"--config, else {DEFAULT_ENDPOINT})")
        p.add_argument("--admin-token-file", metavar="FILE",
                       help="the server's --admin-token-file: its token goes with the request "
                            "(default: the admin-token-file key of --config)")
        p.add_argument("--config", metavar="FILE",
                       help="the server's TOML file: where its endpoint is and its token file")
        p.add_argument("--cluster", metavar="URL",
                       help="read the shared location (a Redis Cluster, as serve --cluster) "
                            "directly instead of asking a running server")
        p.add_argument("--cluster-password-file", metavar="FILE",
                       help="the Redis password, as for serve")

    p = sub.add_parser("show", help="the bindings of one AOR, from the running server")
    p.add_argument("aor", metavar="AOR", help="address of record: sip:alice@example.com, "
                   "alice@example.com or <sip:alice@example.com:5060> (the port is not part of it)")
    p.add_argument("--json", action="store_true", help="print JSON")
    endpoint(p)
    p.set_defaults(func=cmd_show)
    _one_line_errors(p)

    p = sub.add_parser("bindings", help="every binding of the running server")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, default=100000, help="at most this many (default: 100000)")
    endpoint(p)
    p.set_defaults(func=cmd_bindings)
    _one_line_errors(p)

    p = sub.add_parser("remove", help="remove the bindings of an AOR (or one contact of it)")
    p.add_argument("aor", metavar="AOR", help="address of record, as for show")
    p.add_argument("contact", metavar="CONTACT", nargs="?",
                   help="only this contact URI (as show prints it, <...> allowed)")
    endpoint(p)
    p.set_defaults(func=cmd_remove)
    _one_line_errors(p)
