"""A training rank stand-in for the fault tests and drills: the real client, a step every 0.1 s, until killed.

    python -m tests.integration.rank_driver URL RUN RANK WORLD_SIZE [STEP_SECONDS [HANG_AT HANG_SECONDS [NAN_AT]]]

HANG_AT: at that step the training thread blocks for HANG_SECONDS (the client's heartbeats go on);
NAN_AT: from that step on its loss is NaN. 0 turns either off.
"""

from __future__ import annotations

import sys
import time

from trainhealth import Telemetry


def main(url: str, run: str, rank: str, world_size: str, step_seconds: str = "0.1", hang_at: str = "0",
         hang_seconds: str = "0", nan_at: str = "0") -> None:
    tm = Telemetry(url=url, run=run, rank=int(rank), world_size=int(world_size), heartbeat_seconds=0.5,
                   probes=[])
    step = 0
    while True:
        step += 1
        if step == int(hang_at):
            time.sleep(float(hang_seconds))
        diverged = 0 < int(nan_at) <= step
        tm.record(step, loss=float("nan") if diverged else 1.0 / step)
        time.sleep(float(step_seconds))


if __name__ == "__main__":
    main(*sys.argv[1:])
