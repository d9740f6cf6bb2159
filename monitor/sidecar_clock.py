"""The sidecar's own clock for judging silence: wall time less the time it was not watching.

A rank is convicted of silence by the run's clock running on while its records do not
come (pipeline.tick_wall). That is only fair for time in which the sidecar itself was
running and reading: a SIGSTOP, swap, a long GC, a stuck disk or one long synchronous
handler stops the event loop, and the ranks' requests queue up unread. So the pipeline's
wall time is this ``SidecarClock``:

* it runs on the monotonic clock (a wall-clock jump moves nothing), started at the wall
  time, so its values read like unix seconds;
* a gap with no sign of life from the event loop longer than ``pause_seconds`` (the
  loop beats every ``beat_seconds``; every ``now()`` is a sign of life too) is a pause:
  it is taken out of the clock, so no run's clock advances by it;
* after a pause, a wall-clock jump (wall and monotonic disagree) or a restart, judging
  is held for a grace period (``hold_until``): the records queued in the kernel and
  the ones the clients retry after their back-off (trainer: up to 10 s) are read
  before any tick may call a rank silent. Records are taken during the hold; only the
  verdicts wait.

A rank that really went silent is still caught: the other ranks' records carry their own
times (the ranks' clocks kept running), and once the hold ends the first tick judges
the silent rank against them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

log = logging.getLogger(__name__)

BEAT_SECONDS = 0.25
PAUSE_SECONDS = 2.0  # a gap this long without the event loop running is a pause
GRACE_SECONDS = 3.0  # after a pause: hold verdicts this long, plus the pause itself...
MAX_GRACE_SECONDS = 15.0  # ...up to this: a client's retry back-off (10 s) plus a flush


class SidecarClock:
    """The pipeline's wall time: monotonic, less the time the sidecar itself did not run; after such a
    pause (or a wall-clock jump) it holds verdicts until the queued records are read."""

    def __init__(self, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                 *, beat_seconds: float = BEAT_SECONDS, pause_seconds: float = PAUSE_SECONDS) -> None:
        self.wall, self.mono = wall, mono
        self.beat_seconds, self.pause_seconds = beat_seconds, pause_seconds
        self._mono0 = self._last = mono()
        self._base = self._last_wall = wall()
        self.paused = 0.0  # seconds taken out of the clock
        self.pauses = 0  # pauses seen (and clock jumps)
        self.hold_until = -math.inf  # clock time before which no verdict is given

    def now(self) -> float:
        """The clock's time (unix-like seconds); notices a pause or a clock jump first."""
        m, w = self.mono(), self.wall()
        gap = m - self._last
        jump = (w - self._last_wall) - gap  # the wall clock moved by more (or less) than time passed
        self._last, self._last_wall = m, w
        if gap > self.pause_seconds:
            lost = gap - self.beat_seconds
            self.paused += lost
            self.pauses += 1
            self.hold(min(GRACE_SECONDS + lost, MAX_GRACE_SECONDS))
            log.warning("the sidecar did not run for %.1f s (stopped, swapping, or a blocked event loop): "
                        "that time does not count as any rank's silence; verdicts wait %.0f s for the "
                        "queued records", lost, self.hold_until - self._clock_time(m))
        elif abs(jump) > self.pause_seconds:
            self.pauses += 1
            self.hold(min(GRACE_SECONDS + abs(jump), MAX_GRACE_SECONDS))
            log.warning("the wall clock jumped by %+.1f s: verdicts wait %.0f s", jump,
                        self.hold_until - self._clock_time(m))
        return self._clock_time(m)

    def _clock_time(self, m: float) -> float:
        return self._base + (m - self._mono0) - self.paused

    def hold(self, seconds: float) -> None:
        """No verdicts for ``seconds`` from now (after a pause, a jump or a restart)."""
        self.hold_until = max(self.hold_until, self._clock_time(self._last) + seconds)

    async def run(self) -> None:
        """The beat: proves the event loop runs, so that a gap in it is a pause."""
        m = self.mono()  # start-up (imports, a restore, uvicorn) is not watching either; not worth a warning
        self.paused += max(0.0, m - self._last - self.beat_seconds)
        self._last, self._last_wall = m, self.wall()
        while True:
            await asyncio.sleep(self.beat_seconds)
            self.now()
