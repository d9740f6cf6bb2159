"""The detector interface: a small pure class per concern.

A detector watches one run. It is built with its settings and a read-only view
of the run's state, and answers each record with a list of Events. It never
reads the wall clock and does no I/O: the record's time is the clock, and
``tick(now)`` is how time passes without records (the server calls it from a
timer, replay from the records' own timestamps).

Thresholds are read from ``self.settings`` on every call, so a config reload
(which assigns a new settings object) changes them without losing state.

``record_types`` says which records ``update`` reads: record types, and ``GPU_HEALTH`` for any record
that carries a GPU reading (``gpu_health``) whatever its type. The pipeline calls it only for those (a
heartbeat, the most frequent record after samples, reaches only the detectors that read it). For any
other record ``update`` must return ``[]`` and change nothing, so that skipping the call is exactly the
same as making it (tests/unit/test_detector_record_types.py feeds each detector the others).

``Detector`` is generic over its settings type: ``class GpuOom(Detector[GpuOomSettings])``
types ``self.settings`` as ``GpuOomSettings`` (set ``Settings`` to the same class: the config
builds it from that; a ClassVar cannot name a type variable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..record import RECORD_TYPES

GPU_HEALTH = "gpu_health"  # in record_types: any record with a GPU reading (see above)

if TYPE_CHECKING:
    from ..events import Event
    from ..record import Record
    from ..state import RunState


@dataclass(kw_only=True, slots=True)
class NoSettings:
    """For a detector with nothing to tune."""


SettingsT = TypeVar("SettingsT")


class Detector(Generic[SettingsT]):
    """Base class; subclasses set ``name`` (the config section) and ``Settings`` (the class of SettingsT)."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[Any]] = NoSettings
    record_types: ClassVar[tuple[str, ...]] = RECORD_TYPES  # the records ``update`` reads (see above)

    def __init__(self, settings: SettingsT, run: RunState) -> None:
        self.settings: SettingsT = settings
        self.run = run

    def update(self, record: Record) -> list[Event]:  # pragma: no cover - interface
        raise NotImplementedError

    def tick(self, now: float) -> list[Event]:
        """Time passed without records (``now`` in record-time seconds)."""
        return []

    def facts(self) -> dict[str, Any]:
        """Run-level findings for the status API (e.g. the rank that diverged first); {} for none."""
        return {}
