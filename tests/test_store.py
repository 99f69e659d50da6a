"""The binding store: direct tests, and a hypothesis state machine that drives
Registrar.handle with random REGISTERs and compares every answer and every lookup
with a plain-Python model of RFC 3261 10.3."""
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import fastsip
from fastsip import Binding, Registrar, Store, shard_of, stable_hash
from test_registrar import request

MIN, MAX, MAXC = 60, 3600, 3
AORS = ["alice", "bob", "carol"]
URIS = ["sip:a@h1", "sip:b@h2", "sip:c@h3", "sip:d@h4"]


class Model:
    """RFC 3261 10.3 steps 6-8 in the plainest Python (the oracle)."""

    def __init__(self):
        self.aors = {}      # aor -> {uri: (expires_at, call_id, cseq)}

    def live(self, aor, now):
        return {u: b for u, b in self.aors.get(aor, {}).items() if b[0] > now}

    def register(self, aor, contacts, header, call_id, cseq, now):
        book = self.live(aor, now)
        if contacts == "*":
            if header != 0:
                return 400
            if any(b[1] == call_id and b[2] >= cseq for b in book.values()):
                return 400
            self.aors[aor] = {}
            return 200
        plan = {}
        for uri, param in contacts:
            e = param if param is not None else header if header is not None else MAX
            plan[uri] = min(e, MAX)
        if any(0 < e < MIN for e in plan.values()):
            return 423
        retrans = False
        for uri in plan:
            if uri in book and book[uri][1] == call_id:
                if cseq < book[uri][2]:
                    return 400
                if cseq == book[uri][2]:
                    retrans = True
        if retrans:
            return 200
        after = {u for u in book if not (u in plan and plan[u] == 0)} | {
            u for u, e in plan.items() if e > 0}
        if len(after) > MAXC:
            return 503
        for uri, e in plan.items():
            if e == 0:
                book.pop(uri, None)
            else:
                book[uri] = (now + e, call_id, cseq)
        self.aors[aor] = book
        return 200


expires_values = st.sampled_from([None, 0, 30, 100, 5000])


class RegistrarMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.reg = Registrar(min_expires=MIN, max_expires=MAX, max_contacts=MAXC)
        self.model = Model()
        self.now = 1_000_000.0

    @rule(aor=st.sampled_from(AORS),
          contacts=st.lists(st.tuples(st.sampled_from(URIS), expires_values), max_size=3,
                            unique_by=lambda c: c[0]),
          header=expires_values, call_id=st.sampled_from(["c1", "c2"]), cseq=st.integers(1, 4))
    def register(self, aor, contacts, header, call_id, cseq):
        lines = [f"<{u}>" + ("" if e is None else f";expires={e}") for u, e in contacts]
        reply = self.reg.handle(request(user=aor, contacts=lines, expires=header,
                                        call_id=call_id, cseq=cseq), ("192.0.2.1", 5060), self.now)
        want = self.model.register(f"sip:{aor}@example.com", contacts, header, call_id, cseq,
                                   self.now)
        assert fastsip.parse(reply).status == want

    @rule(aor=st.sampled_from(AORS), header=st.sampled_from([None, 0, 60]),
          call_id=st.sampled_from(["c1", "c2"]), cseq=st.integers(1, 4))
    def unregister_all(self, aor, header, call_id, cseq):
        reply = self.reg.handle(request(user=aor, contacts=["*"], expires=header, call_id=call_id,
                                        cseq=cseq), ("192.0.2.1", 5060), self.now)
        assert fastsip.parse(reply).status == self.model.register(
            f"sip:{aor}@example.com", "*", header, call_id, cseq, self.now)

    @rule(seconds=st.sampled_from([1, 40, 99, 100, 101, 3000]))
    def advance(self, seconds):
        self.now += seconds

    @rule(max_work=st.integers(1, 20))
    def expire(self, max_work):
        self.reg.expire(self.now, max_work)

    @invariant()
    def lookups_agree(self):
        for aor in AORS:
            got = {b.uri: (b.expires_at, b.call_id, b.cseq)
                   for b in self.reg.lookup(f"sip:{aor}@example.com", now=self.now)}
            assert got == self.model.live(f"sip:{aor}@example.com", self.now)
        assert self.reg.store.n_bindings >= sum(len(self.model.live(f"sip:{a}@example.com",
                                                                    self.now)) for a in AORS)


TestRegistrarMachine = RegistrarMachine.TestCase
TestRegistrarMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- the store on its own -------------------------------------------------------------------

def test_load_lookup_changes_and_expiry():
    s = Store(track_changes=True)
    s.load("sip:a@x", [Binding("sip:1@h", 100.0, q=0.5, call_id="c", cseq=3,
                               source=("192.0.2.1", 5060), transport="tcp", conn_id=4,
                               path=("<sip:p;lr>",), instance="<urn:x>", reg_id=1,
                               user_agent="ua"),
                       Binding("sip:2@h", 200.0)])
    [b1, b2] = s.lookup("sip:a@x")
    assert b1.as_dict() == dict(uri="sip:1@h", expires_at=100.0, q=0.5, call_id="c", cseq=3,
                                source=["192.0.2.1", 5060], transport="tcp", conn_id=4,
                                path=["<sip:p;lr>"], instance="<urn:x>", reg_id=1,
                                user_agent="ua")
    assert [a for a, rows in s.changes()] == ["sip:a@x"] and s.changes() == []
    assert s.expire(150.0) == 1 and [b.uri for b in s.lookup("sip:a@x")] == ["sip:2@h"]
    assert s.changes() == [("sip:a@x", [b2])]
    assert s.expire(1e9) == 1
    assert s.changes() == [("sip:a@x", [])]
    assert (len(s), s.n_aors, s.aor_names()) == (0, 0, [])


def test_many_aors_grow_and_shrink():
    s = Store()
    for i in range(5000):
        s.load(f"sip:user{i}@example.com", [Binding(f"sip:user{i}@10.0.{i % 256}.1", 10.0 + i)])
    assert (len(s), s.n_aors) == (5000, 5000)
    assert s.lookup("sip:user4321@example.com")[0].uri == "sip:user4321@10.0.225.1"
    assert s.expire(2509.5, max_work=100000) == 2500
    assert s.n_aors == 2500 and s.lookup("sip:user10@example.com") == []
    for i in range(5000):      # reuse freed slots and tombstoned buckets
        s.load(f"sip:new{i}@example.com", [Binding("sip:x@y", 1e9)])
    assert s.n_aors == 7500 and s.lookup("sip:user4999@example.com")


def test_aor_names_survive_churn():
    # AOR names share one block that is compacted when freed names are half of it:
    # whatever the churn, every AOR keeps its own name and bindings
    import random
    rnd = random.Random(11)
    s, live, n = Store(), {}, 0
    for _ in range(6):
        for _ in range(3000):
            aor = f"sip:{'u' * rnd.randrange(0, 60)}{n}@example.com"
            live[aor] = f"sip:{n}@192.0.2.1"
            s.load(aor, [Binding(live[aor], 1e9)])
            n += 1
        for aor in rnd.sample(sorted(live), len(live) * 2 // 3):
            assert s.remove_aor(aor) == 1
            del live[aor]
    assert sorted(s.aor_names()) == sorted(live) and s.n_aors == len(live)
    assert all([b.uri for b in s.lookup(aor)] == [uri] for aor, uri in live.items())


def test_aor_name_longer_than_the_table_holds():
    s = Store()
    with pytest.raises(ValueError, match="65535"):
        s.load("sip:" + "a" * 65536 + "@x", [Binding("sip:1@h", 10.0)])
    s.load("sip:" + "a" * 65000 + "@x", [Binding("sip:1@h", 10.0)])
    assert s.n_aors == 1 and s.lookup("sip:" + "a" * 65000 + "@x")[0].uri == "sip:1@h"


def test_refresh_keeps_heap_bounded():
    s = Store()
    s.load("sip:a@x", [Binding("sip:1@h", 1.0)])
    for t in range(2, 5000):
        s.load("sip:a@x", [Binding("sip:1@h", float(t))])
    assert len(s) == 1 and s.heap_size < 2 * len(s) + 1030
    assert s.lookup("sip:a@x")[0].expires_at == 4999.0


def test_register_unregister_churn_keeps_heap_bounded():
    # a binding removed before it is due leaves a stale heap entry; adds must not
    # pile them up until the far-off expiry time
    s = Store()
    for t in range(5000):
        s.load("sip:a@x", [Binding("sip:1@h", 1e9 + t)])
        s.remove_aor("sip:a@x")
    s.load("sip:a@x", [Binding("sip:2@h", 1e9)])
    assert len(s) == 1 and s.heap_size < 2 * len(s) + 1030
    assert s.expire(2e9) == 1 and len(s) == 0 and s.heap_size == 0


def test_binding_validation():
    with pytest.raises(ValueError):
        Binding("sip:a@b", 1.0, transport="carrier-pigeon")
    with pytest.raises(ValueError):
        Binding("sip:a@b", 1.0, q=1.5)


def test_stable_hash_and_shards():
    # fixed values: shards must not move between processes, restarts or machines
    # (FNV-1a 64 and a final mix, as the kernel steering program computes it)
    assert stable_hash("sip:alice@example.com") == 9940826549658344246
    assert stable_hash(b"sip:alice@example.com") == stable_hash("sip:alice@example.com")
    counts = [0] * 4
    for i in range(4000):
        counts[shard_of(f"sip:user{i}@example.com", 4)] += 1
    assert min(counts) > 800
    with pytest.raises(ValueError):
        shard_of("sip:a@b", 0)


def test_aor_key():
    assert fastsip.aor_key(request(user="Bob", domain="EXAMPLE.com")) == b"sip:Bob@example.com"
    assert fastsip.aor_key(request(method="OPTIONS")) is None
    assert fastsip.aor_key(b"garbage") is None


def test_bad_input_leaves_no_trace():
    s = Store()
    with pytest.raises(OverflowError):
        s.load("sip:a@x", [Binding("sip:1@h", 10.0), Binding("sip:2@h", 10.0, source=("h", 70000))])
    assert (len(s), s.n_aors) == (1, 1)          # what was loaded before the bad row stays
    s2 = Store()
    with pytest.raises(OverflowError):
        s2.load("sip:a@x", [Binding("sip:2@h", 10.0, source=("h", 70000))])
    assert s2.n_aors == 0                         # no empty AOR left behind
    assert s.lookup("sip:\ud800@x") == [] and s.remove_aor("sip:\ud800@x") == 0


def test_unknown_transport_changes_nothing():
    reg = Registrar()
    with pytest.raises(ValueError):
        reg.handle(request(), ("192.0.2.1", 5060), 1e9, "carrier-pigeon")
    assert (reg.store.n_aors, reg.store.n_bindings) == (0, 0)
