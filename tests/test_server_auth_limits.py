"""fastsip serve against password guessing and binding floods (issue #14): the
digest failure budget, --nonce-ttl and --max-bindings, on the server's defaults
but for the values under test."""
import hashlib
import re
import time

from fastsip.server.testing import md5_authorization, register


def log_shows(srv, pattern, timeout=5.0):
    """Wait (bounded) until the server's log matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, srv.log()):
            return True
        time.sleep(0.05)
    return False


def users_file(tmp_path):
    path = tmp_path / "users.htdigest"
    path.write_text("".join(f"{u}:example.com:{hashlib.md5(f'{u}:example.com:{p}'.encode()).hexdigest()}\n"
                            for u, p in (("dave", "secret"), ("erin", "hunter2"))))
    return str(path)


def login(ua, user, password, cseq):
    """A REGISTER for ``user`` answered (MD5, qop=auth) with ``password``: the final reply."""
    return login_after(ua, user, password, cseq, 0.0)


def login_after(ua, user, password, cseq, pause):
    """``login``, answering the challenge ``pause`` seconds after it came."""
    contact = f"sip:{user}@127.0.0.1:{ua.local[1]}"
    call_id = f"{user}-{ua.local[0]}-{ua.local[1]}"
    r = ua.ask(register(user, contact=contact, call_id=call_id, cseq=cseq, expires=600))
    if r.status != 401:
        return r
    time.sleep(pause)
    chal = next(c for c in r.www_authenticate if c.params.get("algorithm") == "MD5")
    nonce = chal.params["nonce"]
    return ua.ask(register(user, contact=contact, call_id=call_id, cseq=cseq + 1, expires=600,
                           extra=[md5_authorization(user, password, nonce)]))


def test_password_guessing_is_throttled_and_logged_while_the_right_password_works(
        start, tmp_path, phone):
    srv = start("--realm", "example.com", "--users", users_file(tmp_path),
                "--auth-fail-limit", "3", "--auth-fail-backoff", "30", workers=1)
    attacker = phone(srv.udp, source="127.0.0.2")
    got = [login(attacker, "dave", f"guess{i}", 10 * i + 1).status for i in range(5)]
    assert got == [401, 401, 401, 403, 403]
    assert login(attacker, "dave", "secret", 100).status == 403     # refused from there
    dave = phone(srv.udp, source="127.0.0.3")
    assert login(dave, "dave", "secret", 1).status == 200           # fine from elsewhere
    erin = phone(srv.udp, source="127.0.0.4")
    assert login(erin, "erin", "hunter2", 1).status == 200
    m = srv.metrics()
    assert m['fastsip_auth_failures_total{reason="wrong"}'] == 3
    assert m['fastsip_auth_failures_total{reason="throttled"}'] == 3
    # one WARNING per throttle begun (the source, and the user from that source)
    assert log_shows(srv, r"too many wrong passwords from 127\.0\.0\.2")
    assert log_shows(srv, r"too many wrong passwords for user dave")


def test_nonce_ttl_flag(start, tmp_path, phone):
    """--nonce-ttl 1: the right answer to a 2-second-old challenge gets 401
    stale=true; an answer to a fresh one gets 200."""
    srv = start("--realm", "example.com", "--users", users_file(tmp_path), "--nonce-ttl", "1",
                workers=1)
    ua = phone(srv.udp)
    slow = login_after(ua, "dave", "secret", 1, pause=2.0)
    assert slow.status == 401 and slow.www_authenticate[0].params.get("stale") == "true"
    assert login(ua, "dave", "secret", 10).status == 200


def test_max_bindings_is_enforced_with_503_and_counted(start, phone):
    srv = start("--max-bindings", "3", workers=1)
    assert "rate limit per source off" in srv.start_line      # off, but not silently
    ua = phone(srv.udp)
    got = [ua.ask(register(f"u{i}", contact=f"sip:u{i}@127.0.0.1:{5000 + i}", call_id=f"m{i}",
                           expires=600)) for i in range(5)]
    assert [r.status for r in got] == [200, 200, 200, 503, 503]
    assert got[3].reason == "Registrar full (max_bindings)"
    assert got[3].headers["Retry-After"] == "60"
    m = srv.metrics()
    assert m["fastsip_bindings"] == 3 and m["fastsip_max_bindings_refused_total"] == 2
    # a refresh of a stored binding goes on when full
    assert ua.ask(register("u0", contact="sip:u0@127.0.0.1:5000", call_id="m0", cseq=2,
                           expires=600)).status == 200


def test_start_line_names_the_rate_limit(start):
    srv = start("--rate-limit", "20", workers=1)
    assert "rate limit per source 20/s" in srv.start_line
