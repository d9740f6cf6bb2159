"""trainhealth: a sidecar that watches distributed PyTorch training, and the client the ranks use.

The repository keeps two folders, installed as one package (pyproject.toml's package-dir):

- ``monitor/`` is ``trainhealth``: the sidecar (``trainhealth serve``, ``python -m trainhealth``).
- ``trainer/`` is ``trainhealth.trainer``: the training side (the client, torch helpers, the reference trainer).

``from trainhealth import Telemetry`` is the client; it is loaded on first use, so the sidecar never imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from trainhealth.trainer.client import Telemetry

__all__ = ["Telemetry"]


def __getattr__(name: str) -> Any:
    if name == "Telemetry":
        return importlib.import_module("trainhealth.trainer.client").Telemetry
    raise AttributeError(f"module 'trainhealth' has no attribute {name!r}")
