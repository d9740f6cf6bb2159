"""Min/max downsampling of a long recording, streamed: spikes and NaNs survive, the size does not grow.

Per rank, record time is cut into buckets; a bucket keeps, for each charted value, its lowest and highest
finite value and its first non-finite one, plus the first and last step. When a rank holds more than
``2 x buckets`` buckets, neighbours merge (the width doubles), so memory and output are bounded by the
bucket count whatever the recording's length. Output: two rows per bucket (each value's min and max in
the order they happened) and a third only where a bucket saw a NaN or an infinity: a one-second spike in
a week-long run is still drawn at its height, and a NaN is still a red mark, never a gap.
"""

from __future__ import annotations

import math
from typing import Any

from ..history import COLUMNS

VALUES = COLUMNS[2:]  # loss, lr, grad_norm, gpu_mem_peak_bytes, host_mem_bytes
BUCKETS = 300  # per rank in the output (<= this many; two or three rows each)
_INF = math.inf


def _new(step: int) -> list[Any]:
    # [first_step, last_step, then per value: lo, lo_t, hi, hi_t, bad, bad_t]
    b: list[Any] = [step, step]
    for _ in VALUES:
        b += [_INF, 0.0, -_INF, 0.0, None, 0.0]
    return b


def _merge(a: list[Any], b: list[Any]) -> list[Any]:
    out = [a[0], b[1]]
    for k in range(len(VALUES)):
        i = 2 + 6 * k
        lo = a[i:i + 2] if a[i] <= b[i] else b[i:i + 2]
        hi = a[i + 2:i + 4] if a[i + 2] >= b[i + 2] else b[i + 2:i + 4]
        bad = a[i + 4:i + 6] if a[i + 4] is not None else b[i + 4:i + 6]
        out += lo + hi + bad
    return out


class RankBuckets:
    __slots__ = ("t0", "width", "buckets", "limit")

    def __init__(self, t0: float, width: float = 1 / 64, limit: int = BUCKETS) -> None:
        self.t0, self.width, self.limit = t0, width, limit
        self.buckets: dict[int, list[Any]] = {}

    def add(self, time: float, step: int, values: tuple[float | None, ...]) -> None:
        key = int((time - self.t0) // self.width) if time >= self.t0 else 0
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = _new(step)
            if len(self.buckets) > 2 * self.limit:
                self._coarsen()
                self.add(time, step, values)
                return
        if step > b[1]:
            b[1] = step
        for k, v in enumerate(values):
            if v is None:
                continue
            i = 2 + 6 * k
            if v - v == 0:  # finite
                if v < b[i]:
                    b[i], b[i + 1] = v, time
                if v > b[i + 2]:
                    b[i + 2], b[i + 3] = v, time
            elif b[i + 4] is None:
                b[i + 4], b[i + 5] = v, time

    def _coarsen(self) -> None:
        merged: dict[int, list[Any]] = {}
        for key in sorted(self.buckets):
            b = self.buckets[key]
            half = key // 2
            merged[half] = _merge(merged[half], b) if half in merged else b
        self.buckets = merged
        self.width *= 2

    def rows(self, limit: int | None = None) -> list[tuple[float, int, list[Any]]]:
        """(time, step, values) rows, oldest first: at most ``limit`` buckets (merged further if needed)."""
        limit = limit or self.limit
        while len(self.buckets) > limit:
            self._coarsen()
        out: list[tuple[float, int, list[Any]]] = []
        for key in sorted(self.buckets):
            b = self.buckets[key]
            start = self.t0 + key * self.width
            first: list[Any] = []
            second: list[Any] = []
            bad: list[Any] = []
            for k in range(len(VALUES)):
                i = 2 + 6 * k
                lo, lo_t, hi, hi_t = b[i:i + 4]
                if lo == _INF:
                    first.append(None)
                    second.append(None)
                else:
                    early, late = (lo, hi) if lo_t <= hi_t else (hi, lo)
                    first.append(early)
                    second.append(late)
                bad.append(b[i + 4])
            out.append((start + self.width * 0.25, b[0], first))
            if second != first:
                out.append((start + self.width * 0.75, b[1], second))
            if any(v is not None for v in bad):
                out.append((start + self.width * 0.5, b[1], bad))
        return out
