"""The client's bounded buffer and its sender cycle: batches, backoff, drop-oldest, flush.

The training thread only calls ``push`` (a lock held for one append). Everything else runs on
the client's background thread: ``cycle`` takes the records that are ready (a device value not
yet copied keeps its record back, without holding up later ones), hands batches to the sender,
and settles the outcome: delivered, refused (dropped and counted), too large (halved), or failed
(kept as it is and retried, first, after an exponential backoff or the sidecar's Retry-After).

Each batch carries an id (this client's random id / a sequence number). A failed batch is resent
whole under the same id, so a request that timed out but did land is taken once by the sidecar
(it answers ``duplicate``). ``poll_staged`` reads finished device values between cycles and says
when one of them is a non-finite loss or grad norm: that sample goes out at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable

from .fields import STAGED, assign
from .settings import ClientSettings
from .transport import Result

log = logging.getLogger("trainhealth.trainer.client")


class LimitedLog:
    """Logs the first occurrence of each kind of trouble, then at most once a minute with a count."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, count = self._seen.get(key, (-1e18, 0))
        if now - last >= self.every:
            suffix = f" ({count} more since last report)" if count else ""
            log.warning("trainhealth: " + msg + suffix, *args)
            self._seen[key] = (now, 0)
        else:
            self._seen[key] = (last, count + 1)


class Outbox:
    def __init__(self, sender: Any, settings: ClientSettings, monotonic: Callable[[], float],
                 warn: LimitedLog) -> None:
        self.sender = sender
        self.settings = settings
        self._monotonic = monotonic
        self._warn = warn
        self._lock = threading.Lock()  # the training thread takes it only to append
        self._cond = threading.Condition(self._lock)
        self._queue: deque[dict[str, Any]] = deque()
        self._capacity = settings.capacity
        self.batch_limit = settings.batch_records
        self._backoff = 0.0
        self._next_send = 0.0
        self._cycles = 0
        self._last_failed = False
        self._flush_now = False
        self.counts = {"sent": 0, "dropped": 0, "rejected": 0, "failures": 0, "duplicates": 0}
        self.wake = threading.Event()  # the background thread waits on it between cycles
        self.client_id = os.urandom(8).hex()
        self._seq = 0
        self._held: tuple[str, list[dict[str, Any]]] | None = None  # a failed batch, resent as it is
        self._sending = 0  # records in the request on its way now (flush waits for its answer too)
        self._staged: deque[dict[str, Any]] = deque()  # records whose device values are on their way
        self._nonfinite = False  # the last staged value read was a non-finite loss or grad norm
        self.on_answer: Callable[[dict[str, Any]], None] | None = None  # the sidecar's answers to batches

    def push(self, rec: dict[str, Any]) -> None:
        with self._lock:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.counts["dropped"] += 1
            self._queue.append(rec)
            wake = len(self._queue) == self.batch_limit  # crossing it: wake the sender once, not per record
            if STAGED in rec:
                wake = wake or not self._staged  # the first one on its way: the sender starts looking
                self._staged.append(rec)
                if len(self._staged) > self._capacity:
                    self._staged.popleft()
        if wake:
            self.wake.set()

    def has_staged(self) -> bool:
        return bool(self._staged)

    def due(self) -> bool:
        """A send is asked for now (a flush, an urgent record, a full batch), not only a look at staged values."""
        return self._flush_now or len(self._queue) >= self.batch_limit

    def poll_staged(self) -> bool:
        """Read the device values whose copies are done (oldest first; never waits). True when one of
        them turns the loss or grad norm non-finite (the first of a run of them): send now."""
        urgent = False
        staged = self._staged
        while staged:
            with self._lock:
                rec = staged[0]
                held = rec.get(STAGED)
                if held is not None:
                    if not held.ready():  # cudaEventQuery: never blocks
                        break
                    _fill(rec)
                staged.popleft()
            bad = nonfinite(rec)
            if bad and not self._nonfinite:
                urgent = True
            self._nonfinite = bad
        return urgent

    def request_flush(self) -> None:
        """The next cycle sends at once, backoff or not."""
        self._flush_now = True
        self.wake.set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counts, "queued": self._pending()}

    def _pending(self) -> int:
        return len(self._queue) + (len(self._held[1]) if self._held is not None else 0) + self._sending

    def flush(self, timeout: float) -> bool:
        """Wait (a background thread runs the cycles) until the queue is empty; False on a failed
        cycle or after ``timeout``."""
        deadline = self._monotonic() + timeout
        while True:
            with self._cond:
                if not self._pending():
                    return True
                seen = self._cycles
                self._flush_now = True
                self.wake.set()
                left = deadline - self._monotonic()
                if left <= 0 or not self._cond.wait_for(self._cycle_after(seen), left):
                    return False
                if self._last_failed:
                    return not self._pending()

    def _cycle_after(self, seen: int) -> Callable[[], bool]:
        return lambda: self._cycles > seen

    def discard(self) -> int:
        """Drop what is left (at close); returns how many."""
        with self._lock:
            left = self._pending()
            self._queue.clear()
            self._held = None
            self._staged.clear()
            self.counts["dropped"] += left
        return left

    @property
    def last_failed(self) -> bool:
        return self._last_failed

    # -- the background thread ------------------------------------------------------------------------
    def cycle(self) -> None:
        """Send what is ready (unless backing off); resolve finished device values either way."""
        with self._lock:
            force, self._flush_now = self._flush_now, False
        failed = False
        if force or self._monotonic() >= self._next_send:
            while True:
                resend = self._held is not None
                if self._held is not None:
                    batch_id, batch = self._held
                    self._held = None
                else:
                    batch = self._take()
                    if not batch:
                        break
                    self._seq += 1
                    batch_id = f"{self.client_id}/{self._seq}"
                self._sending = len(batch)
                try:
                    failed = not self._settle(batch_id, batch, self.sender.send(batch, batch_id))
                finally:
                    self._sending = 0
                if failed or (len(batch) < self.batch_limit and not resend):
                    break
        else:
            self._resolve_ready()  # frees the pinned buffers of finished copies during an outage
            failed = True
        with self._cond:
            self._cycles += 1
            self._last_failed = failed
            self._cond.notify_all()

    def _take(self) -> list[dict[str, Any]]:
        """Pop up to a batch of ready records (oldest first); records the device has not finished stay."""
        batch: list[dict[str, Any]] = []
        held: list[dict[str, Any]] = []
        with self._lock:
            queue = self._queue
            while queue and len(batch) < self.batch_limit:
                rec = queue.popleft()
                staged = rec.get(STAGED)
                if staged is not None:
                    if not staged.ready():  # cudaEventQuery: never blocks
                        held.append(rec)
                        continue
                    _fill(rec)
                batch.append(rec)
            queue.extendleft(reversed(held))
        return batch

    def _resolve_ready(self) -> None:
        with self._lock:
            for rec in self._queue:
                staged = rec.get(STAGED)
                if staged is not None and staged.ready():
                    _fill(rec)

    def _settle(self, batch_id: str, batch: list[dict[str, Any]], result: Result) -> bool:
        """Account for a send; keep a failed batch for a resend under its id. True when the sender took a
        decision."""
        s = self.settings
        if result.outcome == "ok":
            answer = result.answer
            refused = _refused(answer)  # records the sidecar rejected one by one: dropped, never resent
            self.counts["sent"] += len(batch) - refused
            self.counts["rejected"] += refused
            self._backoff = 0.0
            if refused and answer is not None:
                self._warn("rejected", "sidecar refused %d of %d records, dropped them: %s", refused, len(batch),
                           (answer.get("errors") or [{}])[0])
            if answer is not None:
                if answer.get("duplicate") is True:
                    self.counts["duplicates"] += 1  # it had landed before: taken once
                if self.on_answer is not None:
                    try:
                        self.on_answer(answer)
                    except Exception as exc:  # pragma: no cover - a bug there must not lose the batch
                        self._warn("answer", "reading the sidecar's answer failed: %r", exc)
            return True
        if result.outcome == "drop":
            self.counts["rejected"] += len(batch)
            self._warn("rejected", "sidecar refused %d records, dropped them: %s", len(batch), result.reason)
            self._backoff = 0.0
            return True
        if result.outcome == "split" and len(batch) == 1:
            self.counts["rejected"] += 1
            self._warn("too-large", "a record too large for the sidecar was dropped: %s", result.reason)
            return True
        self.counts["failures"] += 1
        if result.outcome == "split":
            self.batch_limit = max(1, len(batch) // 2)
            self._warn("split", "batch too large (%s); now at most %d records per batch",
                       result.reason, self.batch_limit)
        else:
            self._backoff = min(max(self._backoff * 2, s.backoff_seconds), s.max_backoff_seconds)
            delay = max(self._backoff, result.retry_after or 0.0)
            self._next_send = self._monotonic() + delay
            self._warn("retry", "could not send %d records (%s); retrying in %.1fs",
                       len(batch), result.reason, delay)
            self._held = (batch_id, batch)  # it may have landed: resent as it is, under the same id
            return False
        with self._lock:  # too large: nothing was taken; smaller batches (new ids) from the same records
            self._queue.extendleft(reversed(batch))
            while len(self._queue) > self._capacity:
                self._queue.popleft()
                self.counts["dropped"] += 1
        return True


def _refused(answer: dict[str, Any] | None) -> int:
    """How many records of a delivered batch the sidecar rejected (its answer's ``rejected``)."""
    n = answer.get("rejected") if answer is not None else None
    return n if type(n) is int and n > 0 else 0


def _fill(rec: dict[str, Any]) -> None:
    for name, value in rec.pop(STAGED).values().items():
        assign(rec, name, value)


def nonfinite(rec: dict[str, Any]) -> bool:
    """The record's loss or grad norm is NaN or infinite (``x - x`` is 0.0 for every finite float)."""
    for name in ("loss", "grad_norm"):
        value = rec.get(name)
        if type(value) is float and value - value != 0.0:
            return True
    return False
