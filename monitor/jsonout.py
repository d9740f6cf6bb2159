"""JSON for everything the sidecar writes (API answers, replay lines, webhooks).

Standard JSON has no NaN; fast encoders write it as ``null``, which would turn
"the loss is NaN" into "not measured". Non-finite floats are written as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` instead: valid JSON that
every client parses, and that the ingest contract reads back as floats.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _nonfinite(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def clean(obj: Any) -> Any:
    """A copy of ``obj`` with non-finite floats replaced by their string spellings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _nonfinite(obj)
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _fallback(obj: Any) -> Any:
    """A value JSON has no type for (a set, a numpy scalar): its plain form, so one odd field of a
    detector's ``data`` never costs the alert that carries it."""
    if hasattr(obj, "item"):  # numpy scalars
        return clean(obj.item())
    if isinstance(obj, (set, frozenset)):
        return clean(sorted(obj, key=repr))
    return repr(obj)


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(clean(obj), allow_nan=False, separators=(",", ":"), default=_fallback, **kw)


def dumpb(obj: Any) -> bytes:
    return dumps(obj).encode()
