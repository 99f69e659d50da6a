"""The ``fastsip`` command line.

    fastsip parse FILE|-      pretty-print a SIP message, or the error with a caret
    fastsip serve [...]       run the registrar (see fastsip.server, docs/server.md)
    fastsip show AOR / bindings / remove AOR [CONTACT]   ask the running server
"""
import argparse
import sys

import fastsip


def _describe(msg, errors=None) -> list:
    """Lines describing a parsed message's structure (typed values first); the
    ``ParseError`` of each typed value that is malformed is appended to ``errors``."""
    out = []
    errors = [] if errors is None else errors
    if isinstance(msg, fastsip.Request):
        out.append(f"request  {msg.method} {msg.uri}")
    else:
        out.append(f"response {msg.status} {msg.reason}")

    def typed(label, fn):
        try:
            value = fn()
        except fastsip.ParseError as exc:
            out.append(f"  {label:<12} ERROR {exc}".replace("\n", "\n" + " " * 15))
            errors.append(exc)
            return
        if value not in (None, []):
            out.append(f"  {label:<12} {value}")

    def addr(a):
        parts = [a.uri]
        if a.display_name is not None:
            parts.insert(0, repr(a.display_name))
        for k, v in a.params.items():
            parts.append(f"{k}" if v is None else f"{k}={v}")
        return "  ".join(parts)

    typed("Call-ID", lambda: msg.call_id)
    typed("CSeq", lambda: msg.cseq and f"{msg.cseq.seq} {msg.cseq.method}")
    typed("From", lambda: msg.from_ and addr(msg.from_))
    typed("To", lambda: msg.to and addr(msg.to))
    typed("AOR", lambda: msg.to and fastsip.parse_uri(msg.to.uri).aor)
    typed("Via", lambda: [f"{v.transport} {v.host}{'' if v.port is None else f':{v.port}'}"
                          f" branch={v.branch}" for v in msg.via])
    typed("Expires", lambda: msg.expires)
    try:
        contacts = msg.contacts
    except fastsip.ParseError as exc:
        out.append(f"  {'Contact':<12} ERROR {exc}".replace("\n", "\n" + " " * 15))
        errors.append(exc)
        contacts = []
    for i, c in enumerate(contacts, 1):
        typed(f"Contact {i}", lambda c=c: "*" if c.is_star else addr(c))
    typed("Require", lambda: msg.require)
    typed("Supported", lambda: msg.supported)
    out.append(f"headers ({len(msg.headers)})")
    width = max((len(n) for n, _ in msg.headers.items()), default=0)
    for name, value in msg.headers.items():
        out.append(f"  {name:<{width}} : {value}")
    out.append(f"body     {len(msg.body)} bytes")
    return out


def cmd_parse(args) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    try:
        msg = fastsip.parse(data)
        if args.strict:
            msg.validate()
    except fastsip.ParseError as exc:
        print(f"{args.file}: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"(a server answers {exc.status})", file=sys.stderr)
        return 1
    errors = []
    print("\n".join(_describe(msg, errors)))
    if errors:
        # the structure is printed, but the message is not one a server would accept
        print(f"{args.file}: {len(errors)} malformed value{'s' if len(errors) != 1 else ''} "
              f"(ERROR above; a server answers {errors[0].status})", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastsip", description="fastsip: fast SIP parser and registrar")
    ap.add_argument("--version", action="version", version=f"fastsip {fastsip.__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parse", help="pretty-print a SIP message, or where it is malformed")
    p.add_argument("file", help="file holding one SIP message, or - for standard input")
    p.add_argument("--strict", action="store_true",
                   help="also build every typed value (validate()) and fail on the first error")
    p.set_defaults(func=cmd_parse)
    from fastsip.server.cli import add_subcommands
    add_subcommands(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        # header bytes that are not UTF-8 (Latin-1 in captures) print as they are
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        return args.func(args)
    except OSError as exc:
        print(f"fastsip: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
