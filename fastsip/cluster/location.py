"""The shared location read and changed directly, with no node running: what
``fastsip show/bindings/remove --cluster`` and a node's admin API use.

AORs are given in their canonical form (``RegistrarCore.aor_of``); bindings come
back as ``fastsip.Binding`` objects, lapsed ones left out.
"""
from __future__ import annotations

import time

from fastsip.cluster.sync import SyncCluster, aor_key
from fastsip.core._core import uri_compare_key
from fastsip.errors import ClusterError
from fastsip.registrar import decode_record, encode_record

MAX_TRIES = 16          # compare-and-set attempts of one removal
GRACE = 10.0            # as the nodes write it by default (--cluster-grace)


def lookup(sync: SyncCluster, aor: str, now: float | None = None) -> list:
    """The valid bindings of ``aor``."""
    record = sync.get(aor)
    if record is None:
        return []
    now = time.time() if now is None else now
    return [b for b in decode_record(record)[1] if b.expires_at > now]


def bindings(sync: SyncCluster, limit: int = 100000, now: float | None = None) -> tuple:
    """``([(aor, Binding)], truncated)``: every valid binding, at most ``limit``."""
    now = time.time() if now is None else now
    out = []
    for aor, record in sync.scan():
        for b in decode_record(record)[1]:
            if b.expires_at > now:
                if len(out) >= limit:
                    return sorted(out, key=_order), True
                out.append((aor, b))
    return sorted(out, key=_order), False


def _order(item):
    return item[0], item[1].uri


def remove(sync: SyncCluster, aor: str, contact: str | None = None,
           now: float | None = None) -> int:
    """Remove the bindings of ``aor`` (or the one whose URI is ``contact``, by
    RFC 3261 comparison), with the nodes' compare-and-set: how many went."""
    key = aor_key(aor)
    want = uri_compare_key(contact) if contact else None
    for _ in range(MAX_TRIES):
        now = time.time() if now is None else now
        record = sync.get(aor)
        if record is None:
            return 0
        version, stored = decode_record(record)
        keep = [b for b in stored if b.expires_at > now and
                (want is not None and uri_compare_key(b.uri) != want)]
        removed = sum(1 for b in stored if b.expires_at > now) - len(keep)
        if not removed:
            return 0
        new = max(version + 1, int(now * 1e6))
        value = encode_record(keep, new) if keep else b""
        pxat = int((max(b.expires_at for b in keep) + GRACE) * 1000) if keep else 0
        node = sync.node(sync.slots.node_for(key))
        done = node.call(b"FCALL", b"fastsip_cas", b"1", key, version.to_bytes(8, "little"),
                         value, str(pxat).encode())
        if done == 1:
            return removed
        now = None
    raise ClusterError(f"{aor}: changed by others {MAX_TRIES} times while being removed")
