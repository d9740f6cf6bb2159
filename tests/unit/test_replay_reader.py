"""The replay reader line by line: what counts as a line, what is skipped silently, what is counted as corrupt.

The reader takes msgspec's fast path for every line and looks closer only at a line that fails it; these are
the lines that fail it without being corrupt, and the ones that are corrupt, read as ``trainhealth replay``
always read them (universal newlines, any Unicode blank).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
from trainhealth.replay import ReadStats, read_file, read_files


def line(step: int, extra: str = "") -> bytes:
    return f'{{"run":"r","rank":0,"time":{step},"step":{step}{extra}}}'.encode()


CONTENT = (line(1) + b"\r\n"  # 1: a Windows line end
           + b"\n"  # 2: empty
           + b"  \t\n"  # 3: blanks
           + "\u00a0\u2028\n".encode()  # 4: Unicode blanks only (a no-break space, a line separator): blank too
           + line(2) + b"\r" + line(3) + b"\n"  # 5, 6: an old Mac line end between two records
           + line(4, ',"loss":NaN') + b"\n"  # 7: a bare NaN token (the slow path reads it)
           + b"{corrupt\n"  # 8
           + line(5, ',"step_time_seconds":"fast"') + b"\n"  # 9: a bad field, named
           + line(6))  # 10: the last line, without its line end


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz"])
def test_blank_lines_are_skipped_silently_and_corrupt_ones_counted_with_their_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(gzip.compress(CONTENT) if name.endswith(".gz") else CONTENT)
    stats = ReadStats()
    got = list(read_file(str(path), stats))
    assert [r.step for r in got] == [1, 2, 3, 4, 6]
    assert math.isnan(got[3].loss)  # type: ignore[arg-type]
    assert (stats.records, stats.skipped) == (5, 2)
    assert stats.first_errors[0].startswith(f"{path}:8: not valid JSON: ")
    assert stats.first_errors[1].startswith(f"{path}:9: step_time_seconds: ")


def test_files_merge_by_record_time(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"\n".join(line(s) for s in (1, 4, 5)) + b"\n")
    b.write_bytes(b"\n".join(line(s) for s in (2, 3, 6)) + b"\n")
    stats = ReadStats()
    assert [r.step for r in read_files([str(a), str(b)], stats)] == [1, 2, 3, 4, 5, 6]
    assert (stats.records, stats.skipped) == (6, 0)
