"""Who sent a batch (``X-Trainhealth-Launch``), and which job owns a run name.

The client names the sender of every batch: ``id=LAUNCH; pid=PID; host=HOST; job=JOB`` (docs/record.md):
a launch id made once per process (trainhealth.launch hands its own to the rank it starts), the rank
process's pid and host, and the job its ranks share (the rendezvous address ``MASTER_ADDR:MASTER_PORT``
of a torch.distributed job, torchrun's rendezvous id, ``TRAINHEALTH_JOB``, the launch id of a job of one
process, or "-": not known). The sidecar learns each rank's host and pid from it without a ``start`` record.

Two jobs under one run name never share state (torchrun's static rendezvous without ``--rdzv-id`` names
every job "none"): the first job to send owns the name, and records of another job for it are refused
with one line that says why (ingest answer 409, the sidecar's console, an info alert ``run_name_taken``
on the run). The name passes to the next job once its owner is done: every rank ended, or nothing from
the owner for ``TAKEOVER_SECONDS`` (a restarted job whose rendezvous port changed, a new job after a
killed one); the old job's state is forgotten then (its alerts resolve), the new job starts fresh.
Records without the header (older clients, replay), or of a job not known ("-"), are taken as before.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

HEADER = "x-trainhealth-launch"
UNKNOWN = "-"  # a job the client could not name (several ranks, no MASTER_ADDR/PORT): never judged
TAKEOVER_SECONDS = 15.0  # an owner quiet this long (3 heartbeats of 5 s missed) gives its run name up
_VALUE = r"[A-Za-z0-9._:/-]{1,160}"
_ID = re.compile(rf"\Aid=({_VALUE}); pid=([0-9]{{1,10}}); host=({_VALUE}); job=({_VALUE})\Z")
RULE = ("must be 'id=ID; pid=PID; host=HOST; job=JOB' (ID, HOST, JOB: 1-160 characters of [A-Za-z0-9._:/-]; "
        "PID: a whole number)")


class LaunchError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Launch:
    id: str
    pid: int
    host: str
    job: str

    def said(self) -> str:
        return f"job {self.job} (pid {self.pid} on {self.host})"


def parse(value: str) -> Launch:
    m = _ID.match(value.strip())
    if m is None:
        raise LaunchError(f"X-Trainhealth-Launch: {RULE}, got {value[:200]!r}")
    return Launch(m.group(1), int(m.group(2)), m.group(3), m.group(4))


@dataclass(slots=True)
class Owner:
    launch: Launch  # one of its launches (for the words)
    seen: float  # wall time of its newest batch


@dataclass(slots=True)
class Conflict:
    run: str
    owner: Launch
    other: Launch
    seen: float  # wall time of the other job's newest refused batch
    refused: int = 0  # its records refused so far


class JobOwners:
    """Which job owns each run name (bounded: the oldest names are forgotten first). Pure: wall time is
    passed in."""

    def __init__(self, takeover_seconds: float = TAKEOVER_SECONDS, max_runs: int = 100_000) -> None:
        self.takeover_seconds = takeover_seconds
        self.max_runs = max_runs
        self.owners: OrderedDict[str, Owner] = OrderedDict()
        self.conflicts: dict[tuple[str, str], Conflict] = {}  # (run, other job) -> its refusals

    def claim(self, run: str, launch: Launch, wall: float, ended: bool) -> tuple[bool, str]:
        """May ``launch`` send for ``run`` now? (True, "") as its owner; (True, why) when the name passes to
        its job now (the caller forgets the old job's state); (False, why) when another job owns it.
        ``ended``: every rank of the run as the sidecar knows it sent ``end``."""
        if launch.job == UNKNOWN:
            return True, ""  # ranks started without a rendezvous the client could read: not judged
        owner = self.owners.get(run)
        if owner is None or owner.launch.job == launch.job:
            self._own(run, launch, wall)
            return True, ""
        quiet = wall - owner.seen
        if ended or quiet > self.takeover_seconds:
            why = (f"run {run}: {owner.launch.said()} "
                   f"{'ended' if ended else f'sent nothing for {quiet:.0f} s'}; the name passes to {launch.said()}")
            self.conflicts.pop((run, launch.job), None)
            self._own(run, launch, wall)
            return True, why
        key = (run, launch.job)
        conflict = self.conflicts.get(key)
        if conflict is None:
            conflict = self.conflicts[key] = Conflict(run, owner.launch, launch, wall)
        conflict.seen = wall
        return False, (f"run {run} is taken by another job ({owner.launch.said()}): give each job its own run "
                       f"name (TRAINHEALTH_RUN, or torchrun --rdzv-id); the records of {launch.said()} are refused")

    def other_job(self, run: str, launch: Launch, wall: float) -> str:
        """Why ``launch`` belongs to another job than ``run``'s live owner (it must not hear the run's alerts
        and stops), or "". Changes nothing."""
        owner = self.owners.get(run)
        if (owner is None or launch.job == UNKNOWN or owner.launch.job == launch.job
                or wall - owner.seen > self.takeover_seconds):
            return ""
        return (f"run {run} is taken by another job ({owner.launch.said()}): its alerts are not this job's "
                f"(give each job its own run name: TRAINHEALTH_RUN, or torchrun --rdzv-id)")

    def _own(self, run: str, launch: Launch, wall: float) -> None:
        owner = self.owners.get(run)
        if owner is None:
            if len(self.owners) >= self.max_runs:
                self.owners.popitem(last=False)
            self.owners[run] = Owner(launch, wall)
        else:
            owner.launch, owner.seen = launch, wall
            self.owners.move_to_end(run)

    def quiet(self, wall: float) -> list[Conflict]:
        """The conflicts whose other job sent nothing for ``takeover_seconds``: over (removed)."""
        done = [c for c in self.conflicts.values() if wall - c.seen > self.takeover_seconds]
        for c in done:
            del self.conflicts[(c.run, c.other.job)]
        return done

    def forget(self, run: str) -> None:
        self.owners.pop(run, None)
        for key in [k for k in self.conflicts if k[0] == run]:
            del self.conflicts[key]
