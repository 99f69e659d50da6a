"""``fastsip serve``: one AOR per user@host whatever port a phone writes into To,
every lookup path finds it, the admin CLI reads AORs as people type them, and
state files written under the old key (with the port) load under the new one."""
import hashlib
import urllib.error
import urllib.parse

import pytest

from fastsip.server.state import StateFile, row_of
from fastsip.server.testing import contacts_of, register
from test_server import cli

pytestmark = pytest.mark.server


def show(srv, *args):
    return cli("show", *args, "--metrics", "%s:%d" % srv.metrics_addr)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_phone_with_the_port_in_to_is_found_by_user_at_host(start, phone, transport):
    srv = start()
    ua = phone(srv.udp if transport == "udp" else srv.tcp, transport)
    me = f"sip:alice@127.0.0.1:{ua.local[1]}"
    # as baresip and sipsak do when configured with "registrar 127.0.0.1:PORT"
    port = srv.udp[1]
    r = ua.ask(register("alice", f"127.0.0.1:{port}", contact=me, expires=600,
                        transport=transport.upper()))
    assert r.status == 200 and contacts_of(r) == {me: 600}
    # every lookup path, without the port: the admin API, `fastsip show` in each spelling
    found = srv.api("/api/aor?aor=sip:alice@127.0.0.1")
    assert found["aor"] == "sip:alice@127.0.0.1" and [b["contact"] for b in found["bindings"]] == [me]
    for spelling in ("sip:alice@127.0.0.1", "alice@127.0.0.1", f"<sip:alice@127.0.0.1:{port}>",
                     f"sip:alice@127.0.0.1:{port}"):
        out = show(srv, spelling)
        assert out.returncode == 0 and out.stdout.startswith("sip:alice@127.0.0.1: 1 binding"), \
            (spelling, out.stdout)
    # a fetch without the port in To lists it; so does one with another port
    r = ua.ask(register("alice", "127.0.0.1", call_id="fetch", transport=transport.upper()))
    assert list(contacts_of(r)) == [me]
    # the same user registering without the port refreshes the same binding: one AOR
    r = ua.ask(register("alice", "127.0.0.1", contact=me, expires=900, cseq=2,
                        transport=transport.upper()))
    assert contacts_of(r) == {me: 900}
    m = srv.metrics()
    assert m["fastsip_aors"] == 1 and m["fastsip_bindings"] == 1
    # remove what `show` printed, brackets and all
    line = show(srv, "alice@127.0.0.1").stdout.splitlines()[1]
    contact = line.split()[0]
    assert contact == f"<{me}>"
    out = cli("remove", f"<sip:alice@127.0.0.1:{port}>", contact, "--metrics",
              "%s:%d" % srv.metrics_addr)
    assert out.returncode == 0 and "removed 1 binding(s) of sip:alice@127.0.0.1" in out.stdout
    assert srv.api("/api/aor?aor=alice@127.0.0.1")["bindings"] == []


def test_show_suggests_near_matches_and_refuses_what_is_no_sip_uri(start, phone):
    srv = start()
    ua = phone(srv.udp)
    ua.ask(register("Alice", contact="sip:a@127.0.0.1:7000", expires=600))
    ua.ask(register("alice", "other.example", contact="sip:a@127.0.0.1:7001", call_id="c2",
                    expires=600))
    out = show(srv, "sip:alice@example.com")
    assert out.returncode == 1
    assert out.stdout.strip() == ("sip:alice@example.com: no bindings; did you mean "
                                  "sip:Alice@example.com or sip:alice@other.example?")
    out = cli("remove", "alice@example.com", "--metrics", "%s:%d" % srv.metrics_addr)
    assert out.returncode == 1 and "did you mean sip:Alice@example.com" in out.stdout
    assert srv.metrics()["fastsip_bindings"] == 2          # nothing removed by a near miss
    for text, why in (("tel:+15551234", "is a tel: URI"), ("alice smith@example.com",
                                                            "is not a SIP URI")):
        out = show(srv, text)
        assert out.returncode == 2 and why in out.stderr and out.stderr.count("\n") == 1, out
        assert "http://" not in out.stderr
    with pytest.raises(urllib.error.HTTPError) as exc:
        srv.api("/api/aor?aor=" + urllib.parse.quote("tel:+1"))
    assert exc.value.code == 400
    exc.value.close()


def test_aor_by_user_serves_one_domain_by_the_user_alone(start, phone):
    srv = start("--aor-by", "user")
    ua = phone(srv.udp)
    ua.ask(register("bob", "a.example", contact="sip:bob@127.0.0.1:7000", expires=600))
    r = ua.ask(register("bob", "b.example:5060", contact="sip:bob@127.0.0.1:7001",
                        call_id="c2", expires=600))
    assert set(contacts_of(r)) == {"sip:bob@127.0.0.1:7000", "sip:bob@127.0.0.1:7001"}
    assert {b["aor"] for b in srv.api("/api/bindings")["bindings"]} == {"sip:bob"}
    out = show(srv, "bob@anything.example")
    assert out.returncode == 0 and out.stdout.startswith("sip:bob: 2 binding(s)")


def test_a_state_file_with_ports_in_its_aors_loads_under_user_at_host(start, tmp_path, phone):
    """Rows an older fastsip wrote under sip:user@host:port merge into
    sip:user@host (a contact in both keeps the later expiry), and the file is
    rewritten so; nothing alive is lost."""
    import time

    from fastsip import Binding
    path = tmp_path / "old.sqlite3"
    now = time.time()
    old = StateFile(str(path))

    def b(port, ttl):
        return Binding(f"sip:carol@127.0.0.1:{port}", now + ttl, call_id=f"c{port}", cseq=1,
                       source=("127.0.0.1", port))
    old.write([row_of("sip:carol@example.com:5060", [b(7000, 300), b(7001, 900)]),
               row_of("sip:carol@example.com", [b(7001, 600), b(7002, 600)]),
               row_of("sip:dave@example.com:5070", [b(7003, 600)])])
    old.close()
    srv = start(workers=2, state=path)
    carol = {b["contact"]: b["expires"]
             for b in srv.api("/api/aor?aor=sip:carol@example.com")["bindings"]}
    assert set(carol) == {f"sip:carol@127.0.0.1:{p}" for p in (7000, 7001, 7002)}
    assert carol["sip:carol@127.0.0.1:7001"] > 800           # the later of the two
    ua = phone(srv.udp)
    r = ua.ask(register("dave", call_id="f"))                 # a fetch reaches it too
    assert list(contacts_of(r)) == ["sip:carol@127.0.0.1:7003"]
    assert srv.metrics()["fastsip_aors"] == 2
    assert srv.stop() == 0
    state = StateFile(str(path))
    rows = state.db.execute("SELECT aor FROM aors ORDER BY aor").fetchall()
    state.close()
    assert rows == [("sip:carol@example.com",), ("sip:dave@example.com",)]


def test_a_plain_htdigest_file_gets_md5_challenges_only(start, tmp_path, phone):
    users = tmp_path / "users.htdigest"
    ha1 = hashlib.md5(b"erin:127.0.0.1:pw").hexdigest()
    users.write_text(f"erin:127.0.0.1:{ha1}\n")
    srv = start("--realm", "127.0.0.1", "--users", str(users))
    r = phone(srv.udp).ask(register("erin", "127.0.0.1:5060", contact="sip:erin@127.0.0.1:7000"))
    assert r.status == 401
    assert [c.algorithm for c in r.www_authenticate] == ["MD5"]
    assert srv.api("/api/bindings")["bindings"] == []
