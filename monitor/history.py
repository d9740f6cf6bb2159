"""A bounded per-rank history of the charted values: the recent window the live page draws.

One flat ``array('d')`` of rows (time, step, loss, lr, grad_norm, GPU peak, host memory) per rank:
8 bytes a value, no Python object per sample, and one ``frombytes`` of the packed row on the ingest
path (about 0.3 us; see ``_pack_row``). It keeps the newest ``POINTS`` samples; the
array grows to a quarter more and then drops its oldest rows in one move, so trimming costs a
memmove every ``POINTS // 4`` samples, never a per-sample shift.

"Not measured" must not read as NaN (a NaN loss is the news; a missing one is not): a missing value
is stored as a NaN with its own payload, ``MISSING``, told apart from a real NaN by its bits when the
window is read (``window()``: missing -> None, NaN stays NaN).
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

COLUMNS = ("time", "step", "loss", "lr", "grad_norm", "gpu_mem_peak_bytes", "host_mem_bytes")
WIDTH = len(COLUMNS)
POINTS = 240  # samples kept per rank: 240 x 7 x 8 bytes = 13 KiB at most (16.8 KiB before a trim)

# A quiet NaN with a payload of its own: parsers and arithmetic make 0x7FF8000000000000 (or with the sign bit)
MISSING: float = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_1DE5))[0]
_MISSING_BYTES = struct.pack("<d", MISSING)
# one row as the array's own bytes (native doubles): packing the 7 values in one call and appending the bytes
# costs about a third of ``array.extend`` of a tuple, which converts and appends the values one at a time
_pack_row = struct.Struct(f"{WIDTH}d").pack


def is_missing(x: float) -> bool:
    return x != x and struct.pack("<d", x) == _MISSING_BYTES


class RankHistory:
    __slots__ = ("rows", "points", "trim_at")

    def __init__(self, points: int = POINTS) -> None:
        self.rows: array[float] = array("d")
        self.points = points
        self.trim_at = (points + points // 4) * WIDTH

    def add(self, rec: Any) -> None:
        """A sample record (the newest of its rank). The ingest hot path: keep it this small."""
        rows = self.rows
        if len(rows) >= self.trim_at:
            del rows[: len(rows) - self.points * WIDTH]
        m = MISSING
        rows.frombytes(_pack_row(
            rec.time,
            rec.step or 0,
            m if (v := rec.loss) is None else v,
            m if (v := rec.lr) is None else v,
            m if (v := rec.grad_norm) is None else v,
            m if (v := rec.gpu_mem_peak_bytes) is None else v,
            m if (v := rec.host_mem_bytes) is None else v,
        ))

    def __len__(self) -> int:
        return min(len(self.rows) // WIDTH, self.points)

    def copy(self) -> array[float]:
        """The newest ``points`` rows, copied (a memcpy: cheap enough on the event loop)."""
        return self.rows[-self.points * WIDTH:] if self.rows else array("d")


def columns(rows: array[float]) -> dict[str, list[Any]]:
    """Rows (from ``copy()``) -> one list per column; missing -> None, NaN and infinities kept as floats."""
    out: dict[str, list[Any]] = {}
    for i, name in enumerate(COLUMNS):
        col: list[Any] = rows[i::WIDTH].tolist()
        if any(x != x for x in col):
            col = [None if x != x and is_missing(x) else x for x in col]
        out[name] = col
    return out
