"""Logging for the server: one line per event worth a human's attention.

Text (``2024-05-01 12:00:00,123 INFO fastsip[sup]: message``) or JSON (one
object per line).  ``--log-file`` appends to a file that SIGHUP reopens.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

LOG = logging.getLogger("fastsip.server")


class JsonFormatter(logging.Formatter):
    def format(self, record):
        obj = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": getattr(record, "role", "supervisor"),
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in getattr(record, "fields", {}).items():
            obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"))


class _RoleFilter(logging.Filter):
    role = "supervisor"
    node = ""           # "NODE-ID/" of a node of a cluster (--node-id with --cluster)

    def filter(self, record):
        if not hasattr(record, "role"):
            record.role = self.node + self.role
        return True


_filter = _RoleFilter()


def setup(level: str = "info", fmt: str = "text", path: str | None = None) -> None:
    """(Re)configure the server's logger; called at start, in each worker, and on SIGHUP."""
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s fastsip[%(role)s]: %(message)s"))
    handler.addFilter(_filter)
    LOG.addHandler(handler)
    LOG.setLevel(level.upper())
    LOG.propagate = False


def same_as_stdout() -> bool:
    """Whether the log goes to the same file or terminal as standard output
    (a text log on stderr with ``2>&1``, or both on one terminal)."""
    for h in LOG.handlers:
        stream = getattr(h, "stream", None)
        try:
            a, b = os.fstat(stream.fileno()), os.fstat(sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):
            continue
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return True
    return False


def set_role(role: str) -> None:
    _filter.role = role


def set_node(node: str | None) -> None:
    """Name the node in every line (``fastsip[edge-1/worker 0]``), for the logs of
    a cluster's nodes gathered in one place."""
    _filter.node = f"{node}/" if node else ""


def event(level: int, msg: str, **fields) -> None:
    """Log ``msg``; ``fields`` go into the JSON object (and nowhere in the text form)."""
    LOG.log(level, msg, extra={"fields": fields})
