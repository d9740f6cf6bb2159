"""The client's threads: the sending loop, the heartbeats, and the long poll that hears the run's alerts.

- ``trainhealth-sender``: a cycle (``cycle``: measure, then send what is ready) every ``flush_seconds``; at
  once when the outbox is woken (a full batch, a flush, an urgent record); between cycles, while device
  values are on their way, a look every ``poll_seconds`` for finished copies, so a non-finite one goes
  out at once.
- ``trainhealth-heartbeat``: ``beat`` every ``heartbeat_seconds``, while the training thread is busy or
  blocked.
- ``trainhealth-watch`` (only with a view poller: ``stop_on`` or ``on_alert`` over HTTP): the long poll of the
  run's view, so alerts and stop steps are heard within milliseconds of firing (hearing.py).

The threads are daemons named ``trainhealth-...`` (crash.py leaves their exceptions alone).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .hearing import Hearing
from .outbox import Outbox
from .settings import ClientSettings


class Background:
    def __init__(self, outbox: Outbox, settings: ClientSettings, cycle: Callable[[], None], beat: Callable[[], None],
                 hearing: Hearing, poller: Any, warn: Callable[..., None]) -> None:
        self.outbox = outbox
        self.settings = settings
        self.cycle = cycle
        self.beat = beat
        self.hearing = hearing
        self.poller = poller  # transport.ViewPoller, or None: nothing to listen to
        self._warn = warn
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        loops = [(self._send_loop, "trainhealth-sender"), (self._heartbeat_loop, "trainhealth-heartbeat")]
        if self.poller is not None:
            loops.append((self._poll_view_loop, "trainhealth-watch"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def end(self, deadline: float, monotonic: Callable[[], float]) -> bool:
        """Stop the threads, waiting for them until ``deadline`` (``monotonic`` time); False when one is still
        stuck (in a slow request: its daemon thread and connection are left be)."""
        self.stop.set()
        self.outbox.wake.set()
        if self.poller is not None:
            self.poller.abort()  # its long poll would hold close() up
        for thread in self.threads:
            thread.join(timeout=max(0.1, deadline - monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_seconds):
            self.beat()

    def _send_loop(self) -> None:
        outbox, wake = self.outbox, self.outbox.wake
        flush, poll = self.settings.flush_seconds, self.settings.poll_seconds
        next_cycle = time.monotonic() + flush
        while not self.stop.is_set():
            timeout = max(0.0, next_cycle - time.monotonic())
            if outbox.has_staged():
                timeout = min(timeout, poll)
            woke = wake.wait(timeout)
            wake.clear()
            try:
                urgent = outbox.poll_staged()
                if urgent:
                    outbox.request_flush()
                    wake.clear()
                if time.monotonic() >= next_cycle:
                    next_cycle = time.monotonic() + flush
                    self.cycle()
                elif (woke or urgent) and outbox.due():
                    outbox.cycle()
            except Exception as exc:  # pragma: no cover - a bug here must not kill the thread
                self._warn("sender", "sender cycle failed: %r", exc)

    def _poll_view_loop(self) -> None:
        poller = self.poller
        delay = 0.0
        try:
            while poller is not None and not self.stop.is_set():
                got = poller.poll(self.hearing.version)
                if self.stop.is_set():
                    break
                if isinstance(got, str):
                    delay = min(max(delay * 2, 0.5), 10.0)
                    self._warn("watch", "cannot hear the run's alerts (%s); again in %.1fs", got, delay)
                    self.stop.wait(delay)
                    continue
                delay = 0.0
                self.hearing.view(got)
        finally:
            if poller is not None:
                poller.close()  # its keep-alive connection (an answer that came as close() began left it open)
