"""A client's place in its process: how it hears that the process ends, crashes or forks.

``register(tm)`` (a client with threads): a normal interpreter exit calls ``tm._at_exit()`` (atexit); an
uncaught exception calls ``tm._crashed(...)`` (crash.py's hooks, installed once); in a forked child (a
DataLoader worker) the copy of ``tm`` gets ``tm._after_fork_in_child()`` and goes quiet; a segfault or an
abort prints the Python stack of every thread (faulthandler); a SIGTERM, where it would kill the process
silently, calls ``tm._signalled("SIGTERM")`` and waits for its end first (sigterm.py; ``report_sigterm``, not under
trainhealth.launch). ``unregister(tm)`` at close.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import weakref
from typing import Any

from . import sigterm
from .crash import install_hooks
from .transport import Result

log = logging.getLogger("trainhealth.trainer.client")

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # clients with threads, for the hooks


def register(tm: Any) -> None:
    atexit.register(tm._at_exit)
    _LIVE.add(tm)
    install_hooks(_LIVE)
    _python_stacks_on_fatal_signals()
    if tm.settings.report_sigterm and not tm._launched:
        sigterm.watch(tm)


def unregister(tm: Any) -> None:
    atexit.unregister(tm._at_exit)
    _LIVE.discard(tm)
    sigterm.unwatch(tm)


def drop(rec: dict[str, Any]) -> None:
    """Where a forked child's copy puts its records."""


class Forked:
    """The sender of a forked child's copy: the parent's connection is not ours to use."""

    def send(self, records: list[dict[str, Any]], batch_id: str | None = None) -> Result:
        return Result("drop", "a forked child does not send (its parent's client does)")

    def close(self) -> None:
        pass


def _after_fork_in_child() -> None:
    for tm in list(_LIVE):
        tm._after_fork_in_child()
    _LIVE.clear()
    sigterm.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _python_stacks_on_fatal_signals() -> None:
    """faulthandler: a segfault or an abort prints the Python stack of every thread on stderr (where
    trainhealth.launch keeps the last lines for the rank's end record); left alone if already on."""
    try:
        if not faulthandler.is_enabled():
            faulthandler.enable(all_threads=True)
    except Exception as exc:  # no usable stderr (closed, replaced by an object without a file descriptor)
        log.debug("trainhealth: faulthandler not enabled: %r", exc)
