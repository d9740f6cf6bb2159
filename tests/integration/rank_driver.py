"""A training rank stand-in for the fault tests: the real client, a step every 0.1 s, until killed.

    python -m tests.integration.rank_driver URL RUN RANK WORLD_SIZE [STEP_SECONDS]
"""

from __future__ import annotations

import sys
import time

from trainhealth import Telemetry


def main(url: str, run: str, rank: str, world_size: str, step_seconds: str = "0.1") -> None:
    tm = Telemetry(url=url, run=run, rank=int(rank), world_size=int(world_size), heartbeat_seconds=0.5,
                   probes=[])
    step = 0
    while True:
        step += 1
        tm.record(step, loss=1.0 / step)
        time.sleep(float(step_seconds))


if __name__ == "__main__":
    main(*sys.argv[1:])
