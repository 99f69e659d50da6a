"""The core in shared mode (``Registrar(shared=True)``): a REGISTER that changes
bindings is staged, not answered; its AOR is busy until the write is done; the
cache takes what the shared location holds.  No Redis here: the cluster tests
(test_cluster.py) run the same against real ones."""
import socket

import pytest

import fastsip
from fastsip.cluster._resp_c import key_slot, pack_cas
from fastsip.cluster.url import parse_url
from fastsip.core._core import STAGED, WAIT
from fastsip.errors import ConfigError
from fastsip.registrar import decode_record, encode_record
from fastsip.server.testing import contacts_of, register
from test_registrar_auth import USERS, answer

AOR = "sip:alice@example.com"
SRC = (b"127.0.0.1", 5062)


def serve(reg, data, now, again=False):
    if again:
        return reg.serve_again(data, *SRC, now, "udp", -1)
    return reg.serve_shard(data, *SRC, now, "udp", -1, 0, 1)


@pytest.fixture
def reg():
    return fastsip.Registrar(shared=True, max_expires=3600)


def test_a_change_is_staged_with_the_next_version_and_the_aor_is_busy(reg):
    assert serve(reg, register("alice", contact="sip:a@h", expires=600), 1000.0) == STAGED
    aor, expected, version, record, latest, reply = reg.staged
    assert (aor, expected, version, latest) == (AOR.encode(), 0, 1_000_000_000, 1600.0)
    assert decode_record(record)[0] == version
    assert [b.uri for b in decode_record(record)[1]] == ["sip:a@h"]
    assert contacts_of(fastsip.parse(reply)) == {"sip:a@h": 600}
    # the record is written from the copy when asked for (the compiled loop writes it
    # into the FCALL): the same every time, until the next request
    assert reg.staged == reg.staged
    assert record == encode_record(decode_record(record)[1], version)
    assert reg.store.cache_busy(AOR)
    # another request for the AOR waits for the write, whatever it is
    assert serve(reg, register("alice", contact="sip:b@h", call_id="c2"), 1000.0) == WAIT
    assert reg.waiting_aor == AOR.encode()
    # ... and one for another AOR does not
    assert serve(reg, register("bob", contact="sip:b@h"), 1000.0) == STAGED


def test_done_makes_the_copy_the_stored_one(reg):
    data = register("alice", contact="sip:a@h", expires=600)
    serve(reg, data, 1000.0)
    reg.store.cache_done(AOR)
    assert not reg.store.cache_busy(AOR)
    assert reg.store.cache_version(AOR) == 1_000_000_000
    # a retransmission changes nothing: answered at once, from the copy
    reply = serve(reg, data, 1000.5)
    assert isinstance(reply, bytes) and b" 200 " in reply
    # a refresh is decided against the version stored
    assert serve(reg, register("alice", contact="sip:a@h", cseq=2, expires=600), 1001.0) == STAGED
    assert reg.staged[1] == 1_000_000_000 and reg.staged[2] == 1_001_000_000


def test_versions_never_go_back_even_with_a_clock_behind(reg):
    reg.store.cache_put(AOR, encode_record([fastsip.Binding("sip:x@h", 5000.0)], 7_000_000_000),
                        1000.0)
    serve(reg, register("alice", contact="sip:a@h", expires=600), 1000.0)
    assert reg.staged[1:3] == (7_000_000_000, 7_000_000_001)


def test_a_conflict_loads_the_stored_record_and_decides_again(reg):
    data = register("alice", contact="sip:a@h", expires=600)
    serve(reg, data, 1000.0)
    # another node stored sip:other@h meanwhile: the cache takes it, the request is
    # decided again (no second authentication) and keeps both
    stored = encode_record([fastsip.Binding("sip:other@h", 1500.0, call_id="x", cseq=1)], 999)
    reg.store.cache_put(AOR, stored, 1000.0)
    assert not reg.store.cache_busy(AOR)
    assert serve(reg, data, 1000.0, again=True) == STAGED
    assert reg.staged[1] == 999
    assert sorted(b.uri for b in decode_record(reg.staged[3])[1]) == ["sip:a@h", "sip:other@h"]


def test_an_absent_key_is_expected_as_version_zero_and_a_removal_deletes(reg):
    data = register("alice", contact="*", expires=0)
    assert serve(reg, data, 1000.0) == STAGED
    assert reg.staged[1] == 0 and reg.staged[3] is None      # delete (nothing stored)


def test_a_stored_record_with_only_lapsed_bindings_keeps_its_version(reg):
    stored = encode_record([fastsip.Binding("sip:x@h", 900.0)], 42)
    reg.store.cache_put(AOR, stored, 1000.0)
    assert reg.lookup(AOR, 1000.0) == []
    assert reg.store.cache_version(AOR) == 42           # pinned: the next write expects it
    serve(reg, register("alice", contact="sip:a@h", expires=600), 1000.0)
    assert reg.staged[1] == 42
    reg.store.cache_drop(AOR)                           # an invalidation forgets it all
    assert reg.store.cache_version(AOR) == 0 and not reg.store.cache_busy(AOR)


def test_a_failed_write_drops_the_copy(reg):
    serve(reg, register("alice", contact="sip:a@h", expires=600), 1000.0)
    reg.store.cache_drop(AOR)
    assert reg.lookup(AOR, 1000.0) == [] and reg.store.cache_version(AOR) == 0
    assert len(reg.store) == 0


def test_cache_clear_keeps_the_aors_being_written(reg):
    serve(reg, register("alice", contact="sip:a@h", expires=600), 1000.0)
    serve(reg, register("bob", contact="sip:b@h", expires=600), 1000.0)
    reg.store.cache_done("sip:bob@example.com")
    assert reg.store.cache_clear() == 1
    assert reg.store.cache_busy(AOR) and reg.lookup("sip:bob@example.com", 1000.0) == []


def test_digest_is_checked_once_not_again_when_decided_again():
    reg = fastsip.Registrar(shared=True, authorize=fastsip.Authorize(users=USERS))
    challenge = serve(reg, register("alice", contact="sip:a@h"), 1000.0)
    assert fastsip.parse(challenge).status == 401
    data = answer(challenge, register("alice", contact="sip:a@h", cseq=2))
    assert serve(reg, data, 1000.0) == STAGED
    reg.store.cache_put(AOR, None, 1000.0)          # a conflict: decided again
    assert serve(reg, data, 1000.0, again=True) == STAGED   # not a replayed nonce count
    reg.store.cache_put(AOR, None, 1000.0)
    assert fastsip.parse(serve(reg, data, 1000.0)).status in (401, 403)    # the replay, as itself


def test_key_slot_is_redis_clusters():
    # values from the Redis Cluster specification and CLUSTER KEYSLOT
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == \
        key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")
    assert key_slot(b"{}foo") != key_slot(b"foo")        # an empty tag: the whole key
    assert key_slot(b"fs:r:{sip:alice@example.com}") == key_slot(b"sip:alice@example.com")


@pytest.mark.parametrize("url, seeds, tls, password", [
    ("redis://127.0.0.1:7000", (("127.0.0.1", 7000),), False, None),
    ("redis://a:7000,b:7001,[::1]:7002", (("a", 7000), ("b", 7001), ("::1", 7002)), False, None),
    ("rediss://:s%40cret@h:6380", (("h", 6380),), True, "s@cret"),
    ("redis://pw@h", (("h", 6379),), False, "pw"),
])
def test_cluster_urls(url, seeds, tls, password):
    u = parse_url(url)
    assert (u.seeds, u.tls, u.password) == (seeds, tls, password)
    assert "cret" not in u.redacted() and "cret" not in repr(u)


@pytest.mark.parametrize("url", ["http://h:1", "redis://", "redis://h:x", "redis://h:99999",
                                 "redis://h:1?foo=1"])
def test_bad_cluster_urls_say_why(url):
    with pytest.raises(ConfigError, match="--cluster"):
        parse_url(url)


def test_the_password_file(tmp_path):
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    assert parse_url("redis://h:1").with_password_file(str(f)).password == "s3cret"
    with pytest.raises(ConfigError, match="no such|No such"):
        parse_url("redis://h:1").with_password_file(str(tmp_path / "none"))


def test_a_removal_of_every_binding_expects_the_version_it_was_decided_on(reg):
    stored = encode_record([fastsip.Binding("sip:x@h", 5000.0, call_id="x", cseq=1)], 77)
    reg.store.cache_put(AOR, stored, 1000.0)
    assert serve(reg, register("alice", contact="*", call_id="x", cseq=2, expires=0),
                 1000.0) == STAGED
    assert reg.staged[1] == 77 and reg.staged[3] is None
    assert reg.store.cache_busy(AOR)            # kept (empty) while the removal is written


def test_a_retransmission_answered_from_a_read_copy_is_written_again(reg):
    # the copy came from the shared location: the write of this very request may
    # be there without a replica having it (its node answered 500); a 200 now
    # must wait for a write of its own
    data = register("alice", contact="sip:a@h", call_id="c1", cseq=4, expires=600)
    stored = encode_record([fastsip.Binding("sip:a@h", 1600.0, call_id="c1", cseq=4)], 555)
    reg.store.cache_put(AOR, stored, 1000.0)
    assert serve(reg, data, 1000.0) == STAGED
    assert reg.staged[1] == 555 and [b.uri for b in decode_record(reg.staged[3])[1]] == ["sip:a@h"]
    reg.store.cache_done(AOR)
    # once written (and acknowledged) here, a retransmission is answered at once
    assert isinstance(serve(reg, data, 1000.5), bytes)


def test_a_write_its_primary_cannot_take_leaves_its_aor_free_for_the_retry(reg):
    # The worker's room with a slot map whose only primary refuses connections (a
    # primary failing over): a staged write that cannot be sent is forgotten with its
    # copy, so the retry decides it again instead of waiting behind itself for ever.
    from fastsip.cluster.client import Dialer
    from fastsip.cluster.sync import SLOTS, SlotMap
    from fastsip.server.metrics import WorkerCounters
    from fastsip.server.shared import SharedLocation

    class Loop:                         # the Dialer's pipe; no connection is ever made
        watched = []

        def add(self, fd, handler, mask):
            assert not self.watched, "no primary should answer"
            self.watched.append(fd)

        def remove(self, fd):
            pass

    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.bind(("127.0.0.1", 0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    room = SharedLocation(reg, parse_url("redis://127.0.0.1:1"), Loop(), [listener], None,
                          WorkerCounters(), 5.0, 10.0)
    room.slots = SlotMap([(0, SLOTS - 1, ("127.0.0.1", 1), 1)])
    room.dialer = Dialer(Loop(), room._dialed)      # (start() makes it)
    src = (b"127.0.0.1", phone.getsockname()[1])
    data = register("alice", contact="sip:a@h", call_id="c1", cseq=1, expires=600)
    try:
        assert room.serve_shard(data, *src, 1000.0, "udp", -1, 0, 1) is None
        room.after_batch()              # the write goes nowhere
        assert not reg.store.cache_busy(AOR) and len(room.retry) == 1
        room.refresh_due = 0.0          # as if the slot map were read again: retry
        room.tick(1000.5)
        assert room.c.cluster_parked == 0 and room.parked == {}
        assert not reg.store.cache_busy(AOR) and len(room.retry) == 1
        room.tick(1006.0)               # --cluster-wait (5 s) is over: a 500
        assert room.c.cluster_failures_unavailable == 1 and not room.retry
        phone.settimeout(5)
        assert phone.recv(65536).startswith(b"SIP/2.0 500 ")
    finally:
        room.dialer.close()
        phone.close()
        listener.close()


def test_pack_cas_is_the_fcall_redis_reads():
    import hiredis
    slot, command = pack_cas(b"sip:alice@example.com", 0x0102030405060708, b"REC", 1700000000123)
    assert slot == key_slot(b"sip:alice@example.com")
    assert command == hiredis.pack_command((
        b"FCALL", b"fastsip_cas", b"1", b"fs:r:{sip:alice@example.com}",
        (0x0102030405060708).to_bytes(8, "little"), b"REC", b"1700000000123"))
    slot, command = pack_cas(b"sip:bob@h", 0, None, 0)      # no key expected; delete
    assert command == hiredis.pack_command((b"FCALL", b"fastsip_cas", b"1", b"fs:r:{sip:bob@h}",
                                            b"", b"", b"0"))
    long = b"sip:" + b"x" * 5000 + b"@h"
    assert pack_cas(long, 1, b"r" * 70000, 1)[1] == hiredis.pack_command((
        b"FCALL", b"fastsip_cas", b"1", b"fs:r:{" + long + b"}", (1).to_bytes(8, "little"),
        b"r" * 70000, b"1"))


def test_recent_keeps_each_aors_last_acknowledged_record_and_prunes_the_old():
    from fastsip.server._io_c import Recent
    recent = Recent()
    assert recent.get(b"x") is None and recent.aors(0.0) == [] and recent.prune(1e9) == 0
    for i in range(1000):                               # grows past its first table
        recent.put(b"old%d" % i, 1, b"r%d" % i, 7, 100.0 + i)
    for i in range(1000):
        recent.put(b"new%d" % i, 2, None, 0, 200.0)     # a deleted key
    recent.put(b"old999", 3, b"later", 9, 1199.0)       # the last one replaces the first
    recent.put(b"", 4, b"", 0, 300.0)                   # (empty names and records hold too)
    assert len(recent) == 2001
    assert recent.get(b"old5") == (1, b"r5", 7, 105.0)
    assert recent.get(b"new5") == (2, None, 0, 200.0)
    assert recent.get(b"old999") == (3, b"later", 9, 1199.0)
    assert recent.get(b"") == (4, b"", 0, 300.0)
    assert sorted(recent.aors(1000.0)) == sorted([b"old%d" % i for i in range(900, 1000)])
    assert recent.prune(150.0) == 50                    # t 100..149
    assert len(recent) == 1951 and recent.get(b"old49") is None
    assert recent.get(b"old50") == (1, b"r50", 7, 150.0) and recent.get(b"new999") is not None
    assert recent.prune(1e9) == 1951 and len(recent) == 0 and recent.get(b"old50") is None
    recent.put(b"again", 5, b"r", 1, 1.0)
    assert recent.get(b"again") == (5, b"r", 1, 1.0)
