"""SIP over TLS (issue #13): `fastsip serve --listen tls:...` against Python's ssl client
and the openssl command, on a test CA (``make_test_pki``).

What a phone sees: register, refresh, fetch and unregister over TLS; the binding
records the transport and is listed over every transport; keep-alives; replies of
other workers' AORs come back on the same connection.  What an attacker sees:
plaintext on the TLS port, TLS 1.0, a stalled handshake, a client without the
certificate mutual TLS asks for: each refused, counted, and the server serves on.
A SIGHUP takes a new certificate for new connections and keeps the open ones.
"""
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings

import pytest

from fastsip.server.testing import contacts_of, make_test_pki, register, wait_for

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def tls_serve(start, pki, *args, transports=("udp", "tls"), **kw):
    return start("--tls-cert", pki["cert"], "--tls-key", pki["key"], *args,
                 transports=transports, **kw)


def closed_by_server(sock, timeout=5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def tls_register(phone_, user, *, cseq=1, expires=None, call_id=None, extra=()):
    local = phone_.local
    return phone_.ask(register(user, contact=f"sip:{user}@{local[0]}:{local[1]};transport=tls",
                               transport="TLS", local=local, cseq=cseq, expires=expires,
                               call_id=call_id or f"tls-{user}", extra=extra))


def test_register_refresh_fetch_unregister_over_tls(start, phone, pki):
    srv = tls_serve(start, pki)
    assert "tls:127.0.0.1:" in srv.start_line
    p = phone(srv.tls, "tls", ca=pki["ca"])
    assert p.sock.version() in ("TLSv1.2", "TLSv1.3")
    contact = f"sip:alice@{p.local[0]}:{p.local[1]};transport=tls"
    ok = tls_register(p, "alice")
    assert ok.status == 200 and contacts_of(ok) == {contact: 3600}
    assert ok.headers["Via"].startswith("SIP/2.0/TLS ")
    [b] = srv.api("/api/bindings")["bindings"]
    assert (b["transport"], b["contact"]) == ("tls", contact) and b["conn_id"] != -1
    again = tls_register(p, "alice", cseq=2, expires=600)
    assert contacts_of(again) == {contact: 600}
    # a fetch over UDP lists the TLS binding, and a fetch over TLS a UDP one
    u = phone(srv.udp)
    assert contacts_of(u.ask(register("alice"))) == {contact: 600}
    u.ask(register("alice", contact="sip:alice@192.0.2.9:5060", call_id="udp-a"))
    assert set(contacts_of(p.ask(register("alice", transport="TLS", local=p.local,
                                          call_id="fetch")))) == {contact,
                                                                  "sip:alice@192.0.2.9:5060"}
    gone = tls_register(p, "alice", cseq=3, expires=0)
    assert contacts_of(gone) == {"sip:alice@192.0.2.9:5060": 3600}
    m = srv.metrics()
    assert m['fastsip_received_total{transport="tls"}'] == 4
    assert m['fastsip_connections{transport="tls"}'] == 1


def test_keepalive_is_answered_on_the_tls_connection(start, phone, pki):
    srv = tls_serve(start, pki)
    p = phone(srv.tls, "tls", ca=pki["ca"])
    p.send(b"\r\n\r\n")
    assert p.recv(3) == b"\r\n"
    assert tls_register(p, "bob").status == 200


def test_replies_for_every_workers_aors_come_back_on_the_one_connection(start, phone, pki):
    srv = tls_serve(start, pki, workers=2)
    p = phone(srv.tls, "tls", ca=pki["ca"])
    users = [f"user{i}" for i in range(40)]
    for u in users:
        assert tls_register(p, u).status == 200
    stored = srv.api("/api/bindings")["bindings"]
    assert sorted(b["aor"] for b in stored) == sorted(f"sip:{u}@example.com" for u in users)
    assert {b["worker"] for b in stored} == {0, 1}       # both shards, one connection
    assert {b["transport"] for b in stored} == {"tls"}


def test_plaintext_tls10_and_a_stalled_handshake_are_refused_and_the_server_serves_on(
        start, phone, pki, connect):
    srv = tls_serve(start, pki, "--tcp-message-timeout", "1", workers=1)
    # plaintext SIP on the TLS port: the connection is closed
    plain = connect(srv.tls)
    plain.sendall(register("mallory", transport="TCP", local=plain.getsockname()))
    assert closed_by_server(plain)
    # TLS 1.0 only
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # as it should be
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1
    with socket.create_connection(srv.tls, timeout=5) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw)
    # a handshake that never comes, and one that stops half way: closed at the deadline
    stalled, half = connect(srv.tls), connect(srv.tls)
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert closed_by_server(stalled, 5) and closed_by_server(half, 5)
    # and a good client is served meanwhile and after
    assert tls_register(phone(srv.tls, "tls", ca=pki["ca"]), "alice").status == 200
    m = srv.metrics()
    assert m['fastsip_tls_handshake_failures_total{reason="not_tls"}'] == 1
    assert m['fastsip_tls_handshake_failures_total{reason="version"}'] == 1
    assert m['fastsip_tcp_closed_total{reason="handshake_timeout"}'] == 2
    assert m["fastsip_internal_errors_total"] == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_s_client_registers(start, pki):
    srv = tls_serve(start, pki)
    host, port = srv.tls
    req = register("carol", contact="sip:carol@192.0.2.1:5061;transport=tls", transport="TLS",
                   local=("192.0.2.1", 5061))
    client = subprocess.Popen(["openssl", "s_client", "-connect", f"{host}:{port}", "-CAfile",
                               pki["ca"], "-verify_return_error", "-quiet"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        client.stdin.write(req)
        client.stdin.flush()
        got = b""
        deadline = time.monotonic() + 20
        while b"\r\n\r\n" not in got and time.monotonic() < deadline:
            if select.select([client.stdout], [], [], 1)[0]:
                got += os.read(client.stdout.fileno(), 65536)
    finally:
        client.kill()
        _, err = client.communicate(timeout=10)
    assert got.startswith(b"SIP/2.0 200 OK"), err.decode()[-500:]
    assert wait_for(lambda: srv.api("/api/bindings")["bindings"])[0]["transport"] == "tls"


def test_mutual_tls_refuses_a_client_without_a_certificate(start, phone, pki):
    srv = tls_serve(start, pki, "--tls-ca", pki["ca"], "--tls-verify-client", workers=1)
    # TLS 1.3: the client's side of the handshake may end before the server's refusal
    # arrives (then the connection is closed), or the refusal may end it
    try:
        anonymous = phone(srv.tls, "tls", ca=pki["ca"])
    except (ssl.SSLError, ConnectionResetError):
        pass
    else:
        try:
            anonymous.send(register("eve", transport="TLS", local=anonymous.local))
        except (ssl.SSLError, OSError):
            pass
        assert closed_by_server(anonymous.sock)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    with ctx.wrap_socket(socket.create_connection(srv.tls, timeout=5),
                         server_hostname="127.0.0.1") as s:
        s.sendall(register("alice", contact="sip:alice@192.0.2.1;transport=tls",
                           transport="TLS", local=s.getsockname()))
        assert s.recv(65536).startswith(b"SIP/2.0 200 OK")
    assert srv.metrics()['fastsip_tls_handshake_failures_total{reason="certificate"}'] == 1


def test_sighup_takes_a_new_certificate_and_keeps_the_open_connections(start, phone, pki,
                                                                        tmp_path):
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    srv = start("--tls-cert", str(cert), "--tls-key", str(key), transports=("udp", "tls"))
    before = phone(srv.tls, "tls", ca=pki["ca"])
    assert tls_register(before, "alice").status == 200
    os.makedirs(tmp_path / "other")
    other = make_test_pki(tmp_path / "other")
    shutil.copy(other["cert"], cert)
    shutil.copy(other["key"], key)
    srv.signal(signal.SIGHUP)

    def new_cert_served():
        try:
            phone(srv.tls, "tls", ca=other["ca"]).close()
            return True
        except ssl.SSLError:
            return False
    assert wait_for(new_cert_served)
    with pytest.raises(ssl.SSLError):
        phone(srv.tls, "tls", ca=pki["ca"])               # the old CA no longer vouches
    assert tls_register(before, "alice", cseq=2).status == 200   # the old connection lives
    # a broken key file is refused at the SIGHUP and the certificate in force stays
    key.write_text("not a key\n")
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: "keeping the old TLS certificate" in srv.log())
    phone(srv.tls, "tls", ca=other["ca"]).close()


def test_a_certificate_that_will_not_do_is_said_at_start(tmp_path, pki):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    out = subprocess.run(
        ["python3", "-m", "fastsip.cli", "serve", "--no-state", "--metrics", "127.0.0.1:0",
         "--listen", "tls:127.0.0.1:0", "--tls-cert", str(bad), "--tls-key", pki["key"]],
        capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 2
    assert f"--tls-cert {bad}" in out.stderr and "error" in out.stderr
    out = subprocess.run(
        ["python3", "-m", "fastsip.cli", "serve", "--no-state", "--listen", "wss:127.0.0.1:0"],
        capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 2 and "needs --tls-cert and --tls-key" in out.stderr
