"""A bounded mutation fuzzer for the parser: ``python -m fastsip.fuzz``.

Seeds are SIP messages (the test vectors by default).  Each round mutates a
seed (bit flips, special bytes, duplicated or deleted slices, splices of two
seeds, truncation) and checks the parser's contract: the input either parses
and every typed value can be built, or :class:`fastsip.ParseError` is raised.
Any other exception is a bug: the input is written to ``--out`` and the run
fails.  Every run is bounded by ``--iterations`` and ``--seconds``.
"""
import argparse
import random
import sys
import time
import traceback
from pathlib import Path

import fastsip

SPECIAL = [b"\r\n", b"\r\n ", b"\n", b"\r", b":", b";", b",", b"<", b">", b'"', b"\\", b"@",
           b"=", b"%", b"%0", b"[", b"]", b" ", b"\t", b"\x00", b"\xff", b"*", b"sip:", b"?",
           b"9" * 12, b"-1", b"0.", b"\r\n\r\n", b"Contact: ", b"l: ", b"/", b"SIP/2.0"]

ACCESSORS = ("call_id", "cseq", "from_", "to", "via", "contacts", "expires", "min_expires",
             "max_forwards", "content_type", "require", "supported", "path", "route",
             "authorization", "www_authenticate", "date", "user_agent", "body")


def mutate(rng: random.Random, data: bytes, seeds: list) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos:pos] = rng.choice(SPECIAL)
        elif op == 2 and b:
            end = min(len(b), pos + rng.randint(1, 40))
            del b[pos:end]
        elif op == 3 and b:
            end = min(len(b), pos + rng.randint(1, 80))
            b[pos:pos] = b[pos:end] * rng.randint(1, 20)
        elif op == 4:
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            b = b[:pos] + other[cut:]
        elif op == 5:
            del b[pos:]
        else:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(b[:70000])


def exercise(data: bytes) -> None:
    """Everything a user may ask of the parser; only ParseError may escape."""
    try:
        m = fastsip.parse(data)
    except fastsip.ParseError as exc:
        str(exc)
        return
    for name in ACCESSORS:
        try:
            value = getattr(m, name)
        except fastsip.ParseError as exc:
            str(exc)
            continue
        if isinstance(value, list):
            for item in value:
                for attr in ("uri", "display_name", "params", "tag", "expires", "q", "instance",
                             "reg_id", "is_star", "host", "port", "branch", "transport"):
                    try:
                        getattr(item, attr, None)
                    except fastsip.ParseError:
                        pass
                if isinstance(getattr(item, "uri", None), str):
                    try:
                        fastsip.parse_uri(item.uri)
                    except fastsip.ParseError:
                        pass
    m.headers.items()
    bytes(m)
    try:
        m.validate()
    except fastsip.ParseError:
        pass
    framer = fastsip.StreamFramer()
    try:
        framer.feed(data[: len(data) // 2])
        framer.feed(data[len(data) // 2:])
    except fastsip.ParseError:
        pass


def default_seeds() -> list:
    root = Path(__file__).resolve().parent.parent / "tests" / "vectors"
    seeds = [p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
             and p.suffix in ("", ".dat", ".sip")]
    return seeds or [b"REGISTER sip:a SIP/2.0\r\nTo: <sip:a@b>\r\nContact: <sip:c@d>\r\n\r\n"]


def run(iterations: int, seconds: float, seed: int, out: Path | None, seeds=None) -> int:
    """Returns the number of inputs tried; raises AssertionError on a contract violation."""
    seeds = seeds or default_seeds()
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    for i in range(iterations):
        if time.monotonic() > deadline:
            return i
        data = mutate(rng, rng.choice(seeds), seeds)
        try:
            exercise(data)
        except Exception as exc:  # the contract: ParseError or nothing
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"crash-{seed}-{i}.sip").write_bytes(data)
            raise AssertionError(f"{type(exc).__name__} on input {data!r}:\n"
                                 f"{traceback.format_exc()}") from exc
    return iterations


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsip.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"), help="where failing inputs go")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        n = run(args.iterations, args.seconds, args.seed, args.out)
    except AssertionError as exc:
        print(exc, file=sys.stderr)
        return 1
    dt = time.monotonic() - t0
    print(f"fuzz: {n} inputs in {dt:.1f} s (seed {args.seed}), no contract violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
