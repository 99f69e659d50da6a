"""A worker's side of the control channel: what the supervisor asks, and SIGHUP reloads.

The supervisor asks (``control.py`` frames the messages): ``stats`` (the
worker's report, for /metrics), ``lookup``, ``bindings`` and ``remove`` (the
admin API), ``reload`` (the live settings after a SIGHUP, see
``config.LIVE``).  Every request gets one answer, in order; a request that
fails gets ``{"error": ...}``.  When the channel closes (the supervisor is
gone) the worker stops.
"""
from __future__ import annotations

import os
import time

import fastsip
from fastsip.server import control, logs

LOG = logs.LOG


def make_authorize(cfg, secret):
    """The digest check for ``--realm``/``--users``, or None when authentication is off."""
    if cfg.realm is None:
        return None
    return fastsip.Authorize(realm=cfg.realm, users=cfg.users, secret=secret,
                             algorithms=cfg.auth_algorithms, nonce_ttl=cfg.nonce_ttl,
                             fail_limit=cfg.auth_fail_limit, fail_backoff=cfg.auth_fail_backoff)


def worker_max_bindings(cfg) -> int:
    """This worker's share of --max-bindings (AORs are spread evenly over the
    workers by hash, so each holds about 1/N of them); 0: no limit."""
    if not cfg.max_bindings:
        return 0
    return -(-cfg.max_bindings // cfg.workers)


def binding_dict(aor, b, now) -> dict:
    """A Binding as JSON for the admin API."""
    src = b.source or ("", 0)
    return {
        "aor": aor, "contact": b.uri, "expires": max(0, int(round(b.expires_at - now))),
        "expires_at": b.expires_at, "q": b.q, "call_id": b.call_id, "cseq": b.cseq,
        "source": [src[0], src[1]], "transport": b.transport, "conn_id": b.conn_id,
        "path": list(b.path or ()), "instance": b.instance, "reg_id": b.reg_id,
        "user_agent": b.user_agent,
    }


class Commands:
    """Answers the requests that arrive on ``sock``.

    ``report()`` gives the worker's counters; ``reloaded(tls)`` is called after a
    reload changed ``cfg``; ``gone()`` when the supervisor is gone.
    """

    def __init__(self, sock, index: int, cfg, secret: bytes, reg, report, reloaded, gone) -> None:
        self.sock = sock
        self.index = index
        self.cfg = cfg
        self.secret = secret
        self.reg = reg
        self.report = report
        self.reloaded = reloaded
        self.gone = gone
        self.reader = control.Reader()

    def on_readable(self, events: int = 0) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except (TimeoutError, BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                     # the supervisor is gone: stop
            self.gone()
            return
        try:
            msgs = self.reader.feed(data)
        except ValueError:
            self.gone()
            return
        for msg in msgs:
            try:
                answer = self.answer(msg)
            except Exception as exc:     # noqa: BLE001 - a bug: log it, answer, go on
                LOG.exception("control request %r failed", msg.get("op"))
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            if "id" in msg:
                answer["id"] = msg["id"]
            try:
                self.sock.sendall(control.encode(answer))
            except OSError:
                self.gone()

    def answer(self, msg) -> dict:
        op = msg.get("op")
        now = time.time()
        reg = self.reg
        if op == "stats":
            return {"index": self.index, "pid": os.getpid(), "report": self.report()}
        if op == "lookup":
            aor = reg.aor_of(msg["aor"])
            found = [binding_dict(aor, b, now) for b in reg.lookup(aor, now)]
            return {"aor": aor, "bindings": found, "near": [] if found else reg.near(aor)}
        if op == "bindings":
            limit = int(msg.get("limit", 100000))
            out = []
            for aor, b in reg.bindings(now):
                if len(out) >= limit:
                    break
                out.append(binding_dict(aor, b, now))
            return {"bindings": out}
        if op == "remove":
            aor = reg.aor_of(msg["aor"])
            removed = reg.remove(aor, msg.get("contact"), now)
            return {"aor": aor, "removed": removed,
                    "near": [] if removed or msg.get("contact") else reg.near(aor)}
        if op == "conns_gone":
            # worker msg["worker"] died: its connections are gone, and the flows
            # held here for them end (connection ids carry their worker in 8 bits)
            gone = msg["worker"]
            return {"removed": sum(reg.connection_closed(cid, now)
                                   for cid in reg.store.flow_connections()
                                   if cid & 0xFF == gone)}
        if op == "reload":
            self.reload(msg["values"], msg.get("tls", False))
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    def reload(self, values: dict, tls: bool = False) -> None:
        """Apply the live settings of a SIGHUP (see config.LIVE); with ``tls``, the
        certificate files are read again (the supervisor found them usable)."""
        cfg, reg = self.cfg, self.reg
        old_users, old_domains = cfg.users, cfg.domain
        for k, v in values.items():
            setattr(cfg, k, v)
        logs.setup(cfg.log_level, cfg.log_format, cfg.log_file)
        if cfg.domain != old_domains:
            reg.set_domains(cfg.domain or None)
        try:
            reg.configure(min_expires=cfg.min_expires, max_expires=cfg.max_expires,
                          default_expires=cfg.default_expires, max_contacts=cfg.max_contacts,
                          max_bindings=worker_max_bindings(cfg), redirect=cfg.redirect)
        except ValueError as exc:
            LOG.error("reload: %s (keeping the old limits)", exc)
        if cfg.realm is not None:
            # the users file is re-read even under the same name (it may have changed)
            try:
                reg.authorize = make_authorize(cfg, self.secret)
            except (OSError, ValueError) as exc:
                cfg.users = old_users
                LOG.error("reload: users file: %s (keeping the old one)", exc)
        self.reloaded(tls)
