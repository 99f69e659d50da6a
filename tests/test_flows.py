"""Flows (RFC 5626, RFC 7118 5): bindings that live only as long as the stream
connection they came over, removed by ``connection_closed`` through the store's
flow index.  Sans-I/O, with a fake clock; a hypothesis state machine holds the
index against a plain-Python model."""
import random
import zlib
from types import SimpleNamespace

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import fastsip
from fastsip import Binding, Registrar, Store
from test_registrar import NOW, request

AOR = "sip:alice@example.com"
PHONE = ("198.51.100.9", 40000)
INSTANCE = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000a95a0e128>"'
FLOW = f"<sip:alice@198.51.100.9:40000;transport=tcp>;{INSTANCE};reg-id=1"
PLAIN = "<sip:alice@203.0.113.5:5060;transport=tcp>"
WS = "<sip:x8ft2k@df7jal23ls0d.invalid;transport=ws>"
UDP = "<sip:alice@192.0.2.7:5060>"


def reg_over(reg, contact, transport, conn_id, user="alice", call_id=None, cseq=1, now=NOW,
             expires=600, extra=()):
    """REGISTER ``contact`` over ``transport`` (connection ``conn_id``): the parsed 200."""
    data = request(user=user, contacts=(contact,), expires=expires, cseq=cseq, extra=extra,
                   call_id=call_id or f"{user}-{transport}-{conn_id}-{zlib.crc32(contact.encode())}")
    reply = fastsip.parse(reg.handle(data, PHONE, now, transport=transport, conn_id=conn_id))
    assert reply.status == 200, reply.reason
    return reply


def uris(reg, aor=AOR, now=NOW):
    return sorted(b.uri for b in reg.lookup(aor, now))


def fetch(reg, user="alice", now=NOW):
    reply = fastsip.parse(reg.handle(request(user=user, contacts=(), call_id="fetch"), PHONE, now))
    assert reply.status == 200
    return sorted(c.uri for c in reply.contacts)


def four_bindings(reg):
    """alice: an RFC 5626 flow, a plain TCP binding and a WebSocket .invalid
    contact over connection 7, and a UDP binding."""
    reg_over(reg, FLOW, "tcp", 7)
    reg_over(reg, PLAIN, "tcp", 7)
    reg_over(reg, WS, "ws", 7)
    reg_over(reg, UDP, "udp", -1)


def test_close_removes_exactly_the_flow_and_the_invalid_contact():
    reg = Registrar(min_expires=60, max_expires=3600)
    four_bindings(reg)
    assert len(reg.store.flow_bindings(7)) == 2
    assert reg.connection_closed(7, NOW + 1) == 2
    assert fetch(reg, now=NOW + 1) == ["sip:alice@192.0.2.7:5060",
                                       "sip:alice@203.0.113.5:5060;transport=tcp"]
    stats = reg.stats()
    assert (stats["flow_bindings_removed"], stats["flow_bindings"], stats["bindings"]) == (2, 0, 2)
    assert stats["expired"] == 0
    assert reg.connection_closed(7, NOW + 2) == 0          # nothing twice


def test_close_of_another_connection_or_udp_removes_nothing():
    reg = Registrar(min_expires=60, max_expires=3600)
    four_bindings(reg)
    reg_over(reg, f"<sip:alice@192.0.2.7:5061>;{INSTANCE};reg-id=2", "udp", -1)
    assert reg.connection_closed(8, NOW) == 0
    assert reg.connection_closed(-1, NOW) == 0              # UDP has no connection
    assert len(reg.lookup(AOR, NOW)) == 5


def test_flow_over_tls_and_wss_and_invalid_host_forms():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tls", 3)
    reg_over(reg, "<sip:a@QX7.INVALID;transport=ws>", "wss", 3)     # case-insensitive
    reg_over(reg, "<sip:b@qx8.invalid.;transport=ws>", "wss", 3)    # fully qualified
    reg_over(reg, "<sip:c@invalid.example.com;transport=ws>", "wss", 3)
    reg_over(reg, "<sip:d@notinvalid;transport=ws>", "wss", 3)
    reg_over(reg, "<sip:e@x.invalid>", "udp", -1)                   # UDP: no connection
    assert reg.connection_closed(3, NOW) == 3
    assert uris(reg) == ["sip:c@invalid.example.com;transport=ws",
                         "sip:d@notinvalid;transport=ws", "sip:e@x.invalid"]


def test_instance_without_reg_id_is_no_flow():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, f"<sip:alice@198.51.100.9:40000;transport=tcp>;{INSTANCE}", "tcp", 7)
    assert reg.connection_closed(7, NOW) == 0 and len(reg.lookup(AOR, NOW)) == 1


def test_behind_an_edge_proxy_path_the_connection_is_not_the_flow():
    # RFC 5626 5.2: with Path the edge proxy keeps the flow; the registrar's
    # connection to it may close and reopen without the UA's binding going
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tcp", 7, extra=("Path: <sip:edge.example.com;lr;ob>",))
    reg_over(reg, WS, "tcp", 7, extra=("Path: <sip:edge.example.com;lr;ob>",))
    assert reg.store.flow_bindings(7) == []
    assert reg.connection_closed(7, NOW) == 0 and len(reg.lookup(AOR, NOW)) == 2


def test_refresh_over_a_new_connection_moves_the_flow():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tcp", 7, call_id="c", cseq=1)
    # the phone reconnected: same instance and reg-id, a new source port
    moved = FLOW.replace("40000", "40002")
    reg_over(reg, moved, "tcp", 9, call_id="c", cseq=2, now=NOW + 10)
    [b] = reg.lookup(AOR, NOW + 10)
    assert (b.uri, b.conn_id) == ("sip:alice@198.51.100.9:40002;transport=tcp", 9)
    assert reg.connection_closed(7, NOW + 11) == 0
    assert len(reg.lookup(AOR, NOW + 11)) == 1
    assert [bd.conn_id for _, bd in reg.store.flow_bindings(9)] == [9]
    assert reg.connection_closed(9, NOW + 12) == 1
    assert reg.lookup(AOR, NOW + 12) == []


def test_refresh_on_the_same_connection_keeps_one_index_entry():
    reg = Registrar(min_expires=60, max_expires=3600)
    for cseq in range(1, 6):
        reg_over(reg, FLOW, "tcp", 7, call_id="c", cseq=cseq, now=NOW + cseq)
    assert len(reg.store.flow_bindings(7)) == 1 and reg.stats()["flow_bindings"] == 1
    assert reg.connection_closed(7, NOW + 10) == 1


def test_refresh_that_is_no_flow_any_more_leaves_the_index():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, WS, "ws", 7, call_id="c", cseq=1)
    reg_over(reg, WS, "udp", -1, call_id="c", cseq=2)       # the same contact, now over UDP
    reg_over(reg, FLOW, "tcp", 7, call_id="d", cseq=1)
    reg_over(reg, FLOW, "tcp", 7, call_id="d", cseq=2,      # now with Path: the edge's flow
             extra=("Path: <sip:edge.example.com;lr;ob>",))
    assert reg.store.flow_bindings(7) == [] and reg.stats()["flow_bindings"] == 0
    assert reg.connection_closed(7, NOW) == 0 and len(reg.lookup(AOR, NOW)) == 2


def test_unregistered_flow_is_not_removed_again():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tcp", 7, call_id="c", cseq=1)
    reg_over(reg, FLOW, "tcp", 7, call_id="c", cseq=2, expires=0)
    assert reg.lookup(AOR, NOW) == []
    reg_over(reg, UDP, "udp", -1, user="bob")               # may take the freed slot
    assert reg.connection_closed(7, NOW) == 0
    assert uris(reg, "sip:bob@example.com") == ["sip:alice@192.0.2.7:5060"]


def test_expiry_then_close_removes_nothing_twice_and_spares_the_slot_reuser():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tcp", 7, expires=60)
    reg_over(reg, WS, "ws", 7, expires=60)
    assert reg.expire(NOW + 61) == 2
    # bob's bindings take the freed slots (one over the same connection, not a flow)
    reg_over(reg, UDP, "udp", -1, user="bob", now=NOW + 62)
    reg_over(reg, PLAIN, "tcp", 7, user="bob", now=NOW + 62)
    assert reg.connection_closed(7, NOW + 63) == 0
    assert len(reg.lookup("sip:bob@example.com", NOW + 63)) == 2
    stats = reg.stats()
    assert (stats["expired"], stats["flow_bindings_removed"]) == (2, 0)


def test_close_after_lapse_before_the_heap_counts_as_expired_once():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tcp", 7, expires=60)
    reg_over(reg, UDP, "udp", -1, expires=600)
    assert reg.connection_closed(7, NOW + 61) == 0          # lapsed: not a flow removal
    assert reg.expire(NOW + 700) == 1                       # only the UDP binding is left
    stats = reg.stats()
    assert (stats["expired"], stats["flow_bindings_removed"], stats["bindings"]) == (2, 0, 0)


def test_purge_by_the_next_register_then_close():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tcp", 7, expires=60)
    # the AOR's next REGISTER drops its lapsed bindings (purge), not the heap
    reg_over(reg, UDP, "udp", -1, now=NOW + 100)
    assert reg.store.flow_bindings(7) == []
    reg_over(reg, WS, "ws", 5, user="bob", now=NOW + 100)
    assert reg.connection_closed(7, NOW + 101) == 0
    assert len(reg.lookup("sip:bob@example.com", NOW + 101)) == 1


def test_star_then_close():
    reg = Registrar(min_expires=60, max_expires=3600)
    reg_over(reg, FLOW, "tcp", 7, call_id="c", cseq=1)
    reg_over(reg, WS, "ws", 7, call_id="c", cseq=2)
    data = request(contacts=("*",), expires=0, call_id="c", cseq=3)
    assert fastsip.parse(reg.handle(data, PHONE, NOW, "tcp", 7)).status == 200
    assert reg.lookup(AOR, NOW) == [] and reg.store.flow_bindings(7) == []
    reg_over(reg, FLOW, "tcp", 7, user="bob")
    assert reg.connection_closed(7, NOW) == 1
    assert reg.lookup("sip:bob@example.com", NOW) == []


def test_remove_by_the_api_then_close():
    reg = Registrar(min_expires=60, max_expires=3600)
    four_bindings(reg)
    assert reg.remove(AOR, "sip:x8ft2k@df7jal23ls0d.invalid;transport=ws") == 1
    assert reg.connection_closed(7, NOW) == 1 and len(reg.lookup(AOR, NOW)) == 2


def test_many_aors_on_one_connection():
    # one multi-line phone or one browser tab per AOR, over connection 7; others over 8
    reg = Registrar(min_expires=60, max_expires=3600)
    for i in range(300):
        reg_over(reg, FLOW, "tcp", 7, user=f"line{i}")
        reg_over(reg, UDP, "udp", -1, user=f"line{i}")
        reg_over(reg, WS, "wss", 8, user=f"tab{i}")
    assert reg.connection_closed(7, NOW) == 300
    assert all(uris(reg, f"sip:line{i}@example.com") == ["sip:alice@192.0.2.7:5060"]
               for i in range(300))
    assert reg.stats()["aors"] == 600 and len(reg.store.flow_bindings(8)) == 300
    assert reg.connection_closed(8, NOW) == 300
    assert reg.stats()["aors"] == 300 and reg.store.n_aors == 300   # emptied AORs released


def test_thousands_of_connections_closed_in_any_order():
    # the connection table grows, and each close deletes a bucket from the middle
    # of its probe run: every other connection's flows must stay findable
    store = Store()
    conns = [(1_764_115_200_000 + k) << 8 | 3 for k in range(3000)]     # as the server numbers them
    for k, cid in enumerate(conns):
        store.load(f"sip:u{k}@example.com",
                   [Binding(f"sip:u{k}@h{k}.invalid;transport=ws", 1e10, transport="wss",
                            conn_id=cid)] +
                   [Binding(f"sip:u{k}@10.0.0.1:{5000 + j};transport=tcp", 1e10, transport="tcp",
                            conn_id=cid, instance=f"<urn:uuid:{k}>", reg_id=j) for j in (1, 2)])
    assert (store.n_flows, store.n_conns) == (9000, 3000)
    assert sorted(store.flow_connections()) == conns
    order = list(range(3000))
    random.Random(13).shuffle(order)
    for n, k in enumerate(order):
        assert store.connection_closed(conns[k], 0.0) == 3
        if n % 500 == 0:
            assert all(len(store.flow_bindings(conns[j])) == 3 for j in order[n + 1:])
    assert (len(store), store.n_flows, store.n_conns, store.n_flow_removed) == (0, 0, 0, 9000)


def test_the_change_feed_lists_the_removals():
    reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
    four_bindings(reg)
    reg_over(reg, WS, "ws", 7, user="bob")
    reg_over(reg, UDP, "udp", -1, user="carol")
    reg.store.changes()
    assert reg.connection_closed(7, NOW) == 3
    changes = dict(reg.store.changes())
    assert sorted(changes) == [AOR, "sip:bob@example.com"]     # carol did not change
    assert sorted(b.uri for b in changes[AOR]) == ["sip:alice@192.0.2.7:5060",
                                                   "sip:alice@203.0.113.5:5060;transport=tcp"]
    assert changes["sip:bob@example.com"] == []                # its row goes
    assert reg.store.changes() == [] and reg.store.n_aors == 2


# -- loading the state file at start: every connection is gone ---------------------------

def stored_bindings():
    """alice's bindings as a state file holds them: a flow, a plain TCP binding
    and a .invalid contact of connection 7, a UDP binding, a flow behind Path."""
    common = dict(call_id="c", cseq=1, source=PHONE)
    return [Binding("sip:alice@198.51.100.9:40000;transport=tcp", NOW + 600, transport="tcp",
                    conn_id=7, instance="<urn:uuid:1>", reg_id=1, **common),
            Binding("sip:alice@203.0.113.5:5060;transport=tcp", NOW + 600, transport="tcp",
                    conn_id=7, **common),
            Binding("sip:x8ft2k@df7jal23ls0d.invalid;transport=ws", NOW + 600, transport="ws",
                    conn_id=7, **common),
            Binding("sip:alice@192.0.2.7:5060", NOW + 600, **common),
            Binding("sip:alice@10.9.9.9:5060;transport=tls", NOW + 600, transport="tls",
                    conn_id=8, instance="<urn:uuid:2>", reg_id=1,
                    path=("<sip:edge.example.com;lr;ob>",), **common)]


def test_load_drops_flow_bindings_when_asked():
    store = Store()
    assert store.load(AOR, stored_bindings(), drop_flows=True) == 3
    assert sorted(b.uri for b in store.lookup(AOR)) == [
        "sip:alice@10.9.9.9:5060;transport=tls", "sip:alice@192.0.2.7:5060",
        "sip:alice@203.0.113.5:5060;transport=tcp"]
    assert (store.n_flows, store.n_conns) == (0, 0)
    assert store.load("sip:bob@example.com", stored_bindings()[:1], drop_flows=True) == 0
    assert store.n_aors == 1                                   # no empty AOR left behind


def test_load_drops_the_flows_of_the_connections_said_gone():
    # a worker restarted: its own connections died with it, other workers' live on
    store = Store()
    alive = Binding("sip:y7@k2.invalid;transport=ws", NOW + 600, transport="ws", conn_id=9)
    assert store.load(AOR, stored_bindings() + [alive], drop_flows=lambda cid: cid == 7) == 4
    assert store.flow_connections() == [9]
    assert [b.uri for _, b in store.flow_bindings(9)] == [alive.uri]


def test_load_without_the_flag_indexes_the_flows():
    store = Store()
    assert store.load(AOR, stored_bindings()) == 5
    assert store.n_flows == 2 and store.connection_closed(7, NOW) == 2
    assert len(store.lookup(AOR)) == 3


def test_restart_does_not_bring_back_flows_and_rewrites_their_rows(tmp_path):
    from fastsip.registrar import decode_record
    from fastsip.server.state import Folder, StateFile, row_of, sql_writer
    from fastsip.server.timers import StateWriter
    path = str(tmp_path / "state.db")
    f = StateFile(path)
    f.write([row_of(AOR, stored_bindings()),
             row_of("sip:bob@example.com", stored_bindings()[2:3]),    # a browser only
             row_of("sip:carol@example.com", stored_bindings()[3:4])]) # UDP only
    f.close()
    reg = Registrar(min_expires=60, max_expires=3600, track_changes=True)
    writer = StateWriter(path, 0, 1, reg, SimpleNamespace(state_errors=0))
    assert writer.load(NOW) == (2, 4)                          # (AORs, bindings) loaded
    assert len(reg.lookup(AOR, NOW)) == 3 and reg.lookup("sip:bob@example.com", NOW) == []
    assert reg.store.n_flows == 0
    writer.write(None)                                         # the rows as the store has them
    writer.finish()
    folder = Folder(path, sql_writer(path, checkpoints=False))  # as the supervisor does
    folder.fold(final=True)
    folder.close()
    rows = {aor: sorted(b.uri for b in decode_record(rec)[1])
            for aor, rec in StateFile(path).load(0, 1, NOW)}
    assert rows == {AOR: sorted(b.uri for b in reg.lookup(AOR, NOW)),
                    "sip:carol@example.com": ["sip:alice@192.0.2.7:5060"]}


# -- the flow index against a model ------------------------------------------------------

CONNS = [-1, 5, 6, 7, (1 << 40) | 7]
CONTACTS = ["sip:a@h1;transport=tcp", "sip:b@h2.invalid;transport=ws", "sip:c@h3"]


class FlowMachine(RuleBasedStateMachine):
    """Store.load (add, refresh, move), remove_aor, expire and connection_closed
    in any order; the store's flow index must list what the model says."""

    def __init__(self):
        super().__init__()
        self.store = Store()
        self.model = {}         # (aor, uri) -> (expires_at, conn_id, flow)
        self.now = 0.0

    @rule(aor=st.sampled_from(["x", "y", "z"]), uri=st.sampled_from(CONTACTS),
          conn=st.sampled_from(CONNS), flow=st.booleans(), path=st.booleans(),
          life=st.sampled_from([1.0, 5.0, 50.0]))
    def load(self, aor, uri, conn, flow, path, life):
        transport = "udp" if conn < 0 else "ws" if ".invalid" in uri else "tcp"
        b = Binding(uri, self.now + life, transport=transport, conn_id=conn,
                    instance="<urn:x>" if flow else None, reg_id=1 if flow else None,
                    path=("<sip:edge;lr>",) if path else ())
        self.store.load(f"sip:{aor}@e", [b])
        is_flow = conn >= 0 and not path and (flow or ".invalid" in uri)
        self.model[(aor, uri)] = (self.now + life, conn, is_flow)

    @rule(aor=st.sampled_from(["x", "y", "z"]), uri=st.sampled_from(CONTACTS))
    def remove(self, aor, uri):
        assert self.store.remove_aor(f"sip:{aor}@e", uri) == (self.model.pop((aor, uri), None)
                                                              is not None)

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0]), max_work=st.integers(1, 4))
    def expire(self, seconds, max_work):
        self.now += seconds
        self.store.expire(self.now, max_work)
        for key in [k for k, v in self.model.items() if v[0] <= self.now]:
            if not any(b.uri == key[1] for b in self.store.lookup(f"sip:{key[0]}@e")):
                del self.model[key]         # the heap got to it

    @rule(conn=st.sampled_from(CONNS))
    def close(self, conn):
        gone = [k for k, v in self.model.items() if v[1] == conn and v[2]]
        valid = sum(self.model[k][0] > self.now for k in gone)
        assert self.store.connection_closed(conn, self.now) == valid
        for k in gone:
            del self.model[k]

    @invariant()
    def index_agrees(self):
        for conn in CONNS:
            got = sorted((aor, b.uri) for aor, b in self.store.flow_bindings(conn))
            want = sorted((f"sip:{k[0]}@e", k[1]) for k, v in self.model.items()
                          if v[1] == conn and v[2])
            assert got == want
        assert self.store.n_flows == sum(v[2] for v in self.model.values())
        assert len(self.store) == len(self.model)


TestFlowMachine = FlowMachine.TestCase
TestFlowMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
