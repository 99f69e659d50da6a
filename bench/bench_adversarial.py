"""Parse time stays linear in the input size on adversarial inputs.

    python -m pytest bench/bench_adversarial.py -s

Each pattern is parsed (and every typed value built) at 16 KiB and at 64 KiB; the
ratio of the times is printed.  Linear work gives about 4; quadratic work would
give about 16.  The assertion allows 8, for noise.
"""
import time

import pytest

from fastsip.fuzz import exercise

HEAD = b"REGISTER sip:example.com SIP/2.0\r\nTo: <sip:a@example.com>\r\n"

PATTERNS = {
    "commas": lambda n: HEAD + b"Contact: <sip:a@b>" + b"," * n + b"\r\n\r\n",
    "contacts": lambda n: HEAD + b"Contact: " + b"<sip:a@b>," * (n // 10) + b"<sip:a@b>\r\n\r\n",
    "params": lambda n: HEAD + b"Contact: <sip:a@b>" + b";p=1" * (n // 4) + b"\r\n\r\n",
    "quotes": lambda n: HEAD + b'Contact: "' + b'\\"' * (n // 2) + b'" <sip:a@b>\r\n\r\n',
    "folds": lambda n: HEAD + b"Subject: a" + b"\r\n b" * (n // 5) + b"\r\n\r\n",
    "headers": lambda n: HEAD + b"X: y\r\n" * (n // 6) + b"\r\n",
    "via-params": lambda n: HEAD + b"Via: SIP/2.0/UDP h" + b";a=b" * (n // 4) + b"\r\n\r\n",
    "lws": lambda n: HEAD + b"Contact:" + b" " * n + b"<sip:a@b>\r\n\r\n",
}


def best_time(data, rounds=5):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        exercise(data)
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.parametrize("name", list(PATTERNS))
def test_linear_time(name):
    small, large = PATTERNS[name](16 * 1024 - 300), PATTERNS[name](64 * 1024 - 300)
    ratio = best_time(large) / best_time(small)
    print(f"\n{name:12} 16 KiB -> 64 KiB: x{ratio:.1f}  ({best_time(large) * 1e3:.2f} ms at 64 KiB)")
    assert ratio < 8
