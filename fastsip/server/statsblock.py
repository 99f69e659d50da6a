"""A worker's counters in shared memory: what the supervisor still has when the worker dies.

The supervisor asks the workers for their counters over the control channel
(at each scrape and every ``STATS_EVERY`` seconds); a worker killed with
SIGKILL cannot answer any more, so every worker also writes its report, at
most ``PUBLISH_EVERY`` seconds old, into a block of memory it shares with
the supervisor, and a last time when it exits.  The supervisor maps one block
per worker slot (anonymous shared memory, before the first fork; a restarted
worker inherits the same block) and reads it when the worker is gone.

The block has two halves, each ``[generation u64][length u32][crc32 u32][JSON]``;
the worker fills the older half, the JSON first, its header last, so a write
cut short by SIGKILL leaves the previous report readable: the reader takes the
half whose CRC checks with the higher generation.
"""
from __future__ import annotations

import json
import mmap
import struct
import zlib

_HEAD = struct.Struct("<QII")
HALF = 64 * 1024                # bytes per half (a report is 1 to 2 KiB)


class StatsBlock:
    def __init__(self, half: int = HALF) -> None:
        self.half = half
        self.mem = mmap.mmap(-1, 2 * half)      # MAP_SHARED | MAP_ANONYMOUS: forked children share it
        self.generation = 0

    def write(self, report: dict) -> bool:
        """Publish ``report`` (the worker's side); False when it does not fit."""
        data = json.dumps(report, separators=(",", ":")).encode()
        if len(data) > self.half - _HEAD.size:
            return False
        self.generation += 1
        off = (self.generation % 2) * self.half
        body = off + _HEAD.size
        self.mem[body:body + len(data)] = data
        self.mem[off:body] = _HEAD.pack(self.generation, len(data), zlib.crc32(data))
        return True

    def read(self) -> dict:
        """The latest whole report written, or {} (the supervisor's side)."""
        best, best_gen = {}, 0
        for off in (0, self.half):
            gen, n, crc = _HEAD.unpack_from(self.mem, off)
            if gen <= best_gen or n > self.half - _HEAD.size:
                continue
            data = self.mem[off + _HEAD.size:off + _HEAD.size + n]
            if zlib.crc32(data) != crc:
                continue
            try:
                report = json.loads(data)
            except ValueError:
                continue
            if isinstance(report, dict):
                best, best_gen = report, gen
        return best

    def clear(self) -> None:
        """Forget what was written (before the slot's next worker starts)."""
        self.mem[0:_HEAD.size] = bytes(_HEAD.size)
        self.mem[self.half:self.half + _HEAD.size] = bytes(_HEAD.size)
        self.generation = 0

    def close(self) -> None:
        self.mem.close()
