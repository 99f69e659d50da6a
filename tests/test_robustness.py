"""Adversarial inputs of 64 KiB: each parses or raises ParseError, and the parser's
work stays linear (the timing side of that is in bench/bench_adversarial.py)."""
import pytest

import fastsip
from fastsip.fuzz import default_seeds, exercise, run

HEAD = b"REGISTER sip:example.com SIP/2.0\r\nTo: <sip:a@example.com>\r\n"
SIZE = 64 * 1024 - 200


def adversarial():
    yield "commas", HEAD + b"Contact: <sip:a@b>" + b"," * SIZE + b"\r\n\r\n"
    yield "contacts", HEAD + b"Contact: " + b"<sip:a@b>," * (SIZE // 10) + b"<sip:a@b>\r\n\r\n"
    yield "params", HEAD + b"Contact: <sip:a@b>" + b";p=1" * (SIZE // 4) + b"\r\n\r\n"
    yield "quotes", HEAD + b'Contact: "' + b'\\"' * (SIZE // 2) + b'" <sip:a@b>\r\n\r\n'
    yield "open-quote", HEAD + b'Contact: "' + b"a" * SIZE + b"\r\n\r\n"
    yield "folds", HEAD + b"Subject: a" + b"\r\n b" * (SIZE // 5) + b"\r\n\r\n"
    yield "headers", HEAD + b"X: y\r\n" * (SIZE // 6) + b"\r\n"
    yield "semicolons", HEAD + b"Via: SIP/2.0/UDP h" + b";" * SIZE + b"\r\n\r\n"
    yield "uri-params", b"REGISTER sip:a@b" + b";x" * 2000 + b" SIP/2.0\r\n\r\n"
    yield "lws", HEAD + b"Contact:" + b" " * SIZE + b"<sip:a@b>\r\n\r\n"
    yield "angle", HEAD + b"Contact: <" + b"a" * SIZE + b"\r\n\r\n"
    yield "percent", HEAD + b"Contact: <sip:" + b"%41" * (SIZE // 3) + b"@h>\r\n\r\n"


@pytest.mark.parametrize("name,data", list(adversarial()), ids=lambda x: x if isinstance(x, str) else "")
def test_adversarial_input_parses_or_raises_parse_error(name, data):
    assert len(data) <= 65535
    exercise(data)
    big = data + b"x" * (70000 - len(data))
    with pytest.raises(fastsip.MessageTooLarge):
        fastsip.parse(big)


def test_mutation_fuzz_short_run():
    """The bounded fuzz campaign CI runs (python -m fastsip.fuzz runs longer ones)."""
    assert run(iterations=20000, seconds=20, seed=20261126, out=None, seeds=default_seeds()) > 0
