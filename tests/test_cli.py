"""The fastsip command line, run as a user runs it."""
import os
import subprocess
import sys

from conftest import TORTURE, VECTORS


def fastsip(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "fastsip.cli", *args], input=stdin,
                          capture_output=True, timeout=60)


def test_parse_pretty_prints_structure():
    r = fastsip("parse", str(VECTORS / "valid" / "softphone-register.sip"))
    out = r.stdout.decode()
    assert r.returncode == 0
    assert "request  REGISTER sip:sip.example.com" in out
    assert "AOR          sip:alice@sip.example.com" in out
    assert "Contact 2    'Alice (mobile)'  sip:alice@10.20.30.40:5062;transport=udp  expires=1800" in out


def test_parse_error_shows_caret_and_status():
    r = fastsip("parse", "--strict", str(TORTURE / "rfc4475" / "badinv01.dat"))
    err = r.stderr.decode().splitlines()
    assert r.returncode == 1
    assert err[0].endswith("BadVia: bad Via header (byte 217)")
    assert err[1].strip() == "Via: SIP/2.0/UDP 192.0.2.15;;,;,,"
    assert err[2].index("^") == err[1].index(";;") + 1
    assert err[3] == "(a server answers 400)"


def test_parse_from_stdin_and_missing_file():
    r = fastsip("parse", "-", stdin=b"SIP/2.0 200 OK\r\nl: 0\r\n\r\n")
    assert r.returncode == 0 and r.stdout.startswith(b"response 200 OK")
    r = fastsip("parse", "/nonexistent/file.sip")
    assert r.returncode == 2 and b"No such file" in r.stderr


def test_parse_prints_bytes_that_are_not_utf8():
    # a Latin-1 Subject from a capture, on a terminal whose stdout is strict UTF-8
    # (PYTHONIOENCODING=utf-8 is what a en_US.UTF-8 locale gives): no traceback
    r = subprocess.run([sys.executable, "-m", "fastsip.cli", "parse", "-"],
                       input=b"OPTIONS sip:a SIP/2.0\r\nSubject: caf\xe9\r\n\r\n",
                       capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert b"Subject : caf\xe9" in r.stdout


def test_parse_exits_1_when_a_typed_value_is_malformed():
    """The start line and headers scan, but Expires is not a number: the
    structure is still printed, with ERROR at the bad value, and the exit
    status says the message is bad (a script checking $? must not pass it)."""
    msg = (b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
           b"To: <sip:a@example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: x\r\n"
           b"CSeq: 1 REGISTER\r\nExpires: soon\r\nContact: <sip:a@192.0.2.4>\r\n"
           b"Content-Length: 0\r\n\r\n")
    r = fastsip("parse", "-", stdin=msg)
    out = r.stdout.decode()
    assert r.returncode == 1
    assert "Expires      ERROR bad Expires value" in out
    assert "Contact 1    sip:a@192.0.2.4" in out          # the rest is still shown
    assert r.stderr.decode() == "-: 1 malformed value (ERROR above; a server answers 400)\n"
    r = fastsip("parse", "-", stdin=msg.replace(b"soon", b"60"))
    assert r.returncode == 0 and r.stderr == b""


def test_show_bindings_remove_say_why_a_token_file_or_config_is_unusable(tmp_path):
    """Before asking any server: one line on standard error, exit status 2."""
    short = tmp_path / "short"
    short.write_text("abc\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("no-such-key = 1\n")
    for args, why in [
        (("show", "alice@example.com", "--admin-token-file", str(tmp_path / "none")),
         f"fastsip: --admin-token-file {tmp_path / 'none'}: No such file or directory\n"),
        (("bindings", "--admin-token-file", str(short)),
         f"fastsip: --admin-token-file {short}: the token is shorter than 16 characters\n"),
        (("remove", "alice@example.com", "--config", str(bad)),
         f"fastsip: --config {bad}: unknown key 'no-such-key'\n"),
    ]:
        r = fastsip(*args)
        assert r.returncode == 2 and r.stderr.decode() == why, r.stderr
