"""Uncaught exceptions, quoted before the process dies: the hooks and the ``error`` they send.

``install_hooks`` wraps ``sys.excepthook`` (the main thread) and ``threading.excepthook`` (any other
thread) once per process, chaining to the hooks installed before, so a traceback is still printed
and a framework's own hook still runs. Each live client then sends ``end`` with status "failed" and
``error``: the exception's type, message and the last frames of its traceback (bounded). The client's
own threads and SystemExit are left alone.
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any, Iterable

from .fields import ERROR_TEXT_CHARS, TRACEBACK_CHARS, TRACEBACK_FRAMES

_installed = False
OUR_THREADS = "trainhealth-"  # the client's thread names start so


def error_info(exc_type: type[BaseException], exc: BaseException, tb: Any,
               thread: str | None = None) -> dict[str, str]:
    """{type, message, traceback}: the record's ErrorInfo, each part bounded."""
    name = exc_type.__qualname__
    if exc_type.__module__ not in ("builtins", "__main__"):
        name = f"{exc_type.__module__}.{name}"
    try:
        message = str(exc)
    except Exception as inner:  # a broken __str__
        message = f"<str() failed: {inner!r}>"
    try:
        text = "".join(traceback.format_exception(exc_type, exc, tb, limit=-TRACEBACK_FRAMES))
    except Exception as inner:  # pragma: no cover - formatting a traceback
        text = f"<traceback unavailable: {inner!r}>"
    if thread is not None:
        text = f"in thread {thread!r}:\n{text}"
    if len(text) > TRACEBACK_CHARS:
        text = "...\n" + text[-TRACEBACK_CHARS:]  # the last frames are where it happened
    return {"type": name[:ERROR_TEXT_CHARS], "message": message[:ERROR_TEXT_CHARS], "traceback": text}


def is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return isinstance(oom, type) and isinstance(exc, oom)


def install_hooks(clients: Iterable[Any]) -> None:
    """Once per process: every client in ``clients`` (a live set) hears of uncaught exceptions."""
    global _installed
    if _installed:
        return
    _installed = True
    previous_sys = sys.excepthook
    previous_threading = threading.excepthook

    def sys_hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        for tm in list(clients):
            tm._crashed(exc_type, exc, tb)
        previous_sys(exc_type, exc, tb)

    def threading_hook(args: Any) -> None:
        thread = args.thread
        name = thread.name if thread is not None else None
        if args.exc_type is not SystemExit and not (name or "").startswith(OUR_THREADS):
            for tm in list(clients):
                tm._crashed(args.exc_type, args.exc_value, args.exc_traceback, name)
        previous_threading(args)

    sys.excepthook = sys_hook
    threading.excepthook = threading_hook
