"""SIGTERM: a rank asked to stop says so before it dies (docs/trainer.md, "What happens at the end").

torchrun's agent (when another rank died), a scheduler (scancel, a preemption, a pod's deletion) and a
user stop a process with SIGTERM, whose default disposition ends it at once and without a word. When
SIGTERM's disposition is still the default as a client registers (in the main thread, its setting
``report_sigterm`` on, not under trainhealth.launch, which reports its child's death itself), ``watch``
installs a handler: at SIGTERM each watching client sends ``end`` with status "failed" and ``signal``
"SIGTERM" and waits up to its ``crash_flush_seconds`` for it to leave; then the process dies by SIGTERM
as before (the default disposition restored, the signal raised again), so its parent sees the same
exit status.

The training thread may be blocked inside a C call when the signal comes (a gloo or NCCL collective, a
CUDA sync): a Python handler runs only when that call returns, maybe never. So the C-level handler's
wakeup fd (``signal.set_wakeup_fd``: it writes the signal's number at once, on whichever thread the
signal interrupted) is a socket that a thread of ours reads (``trainhealth-sigterm``); it does what the
handler would, and whichever of the two comes first acts, once. Other signal numbers on the socket (the
SIGINT handler's, a SIGCHLD handler's) are ignored. The wakeup fd is taken only when none is set (an
event loop's stays: the Python handler alone then). A handler installed after ours (Lightning,
accelerate, a requeue handler) wins: we act only while ours is SIGTERM's handler (one that chains to ours
is answered with nothing, as SIG_DFL would have been by it). A forked child
(a DataLoader worker) lets go of both, and never acts. ``release`` (the last watching client closed, in
the main thread) puts back what is still ours.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import weakref
from types import FrameType
from typing import Any

log = logging.getLogger("trainhealth.trainer.client")

THREAD_NAME = "trainhealth-sigterm"
MARGIN_SECONDS = 0.5  # beyond the clients' own flush bounds, before the process dies regardless

_clients: weakref.WeakSet[Any] = weakref.WeakSet()  # the clients that report a SIGTERM
_guard = threading.Lock()  # watch / release / the fork hook
_owner = -1  # the pid that installed the handler (a forked child is not it)
_wakeup: tuple[socket.socket, socket.socket] | None = None  # (reader, writer) while the wakeup fd is ours
_acting = threading.Lock()  # taken once, by whichever of the handler and the reader acts first
_reported = threading.Event()  # the ends are out (or their time is up): the process may die


def watch(tm: Any) -> bool:
    """``tm`` reports a SIGTERM from now on, if this process's SIGTERM is (still) left to its default or
    already ours; False (and nothing changed) otherwise, or outside the main thread."""
    global _owner, _wakeup
    if threading.current_thread() is not threading.main_thread():
        return False
    with _guard:
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_sigterm and _owner == os.getpid():
            _clients.add(tm)
            return True
        if current is not signal.SIG_DFL:
            return False  # the user's or a framework's handler (or ignored): theirs to handle
        signal.signal(signal.SIGTERM, _on_sigterm)
        _owner = os.getpid()
        _clients.add(tm)
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # the C-level handler must never block on it
        try:
            old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:  # pragma: no cover - main thread checked above
            log.debug("trainhealth: no wakeup fd for SIGTERM: %r", exc)
            old = -2
        if old != -1:  # someone's already (an event loop's): put it back, the Python handler alone acts
            if old >= 0:
                signal.set_wakeup_fd(old)
            reader.close()
            writer.close()
            return True
        _wakeup = (reader, writer)
        threading.Thread(target=_read, args=(reader,), name=THREAD_NAME, daemon=True).start()
        return True


def unwatch(tm: Any) -> None:
    """``tm`` is closed: the last watching client puts back what is still ours (from the main thread only:
    elsewhere the handler stays, and with no client left it only dies by SIGTERM as the default would)."""
    with _guard:
        _clients.discard(tm)
        if _clients or _owner != os.getpid() or threading.current_thread() is not threading.main_thread():
            return
        _let_go()


def after_fork_in_child() -> None:
    """A forked child: the parent's handler and wakeup socket are not its own (its SIGTERM kills it as
    before). Runs in the forking thread, the child's only one."""
    _clients.clear()  # no lock: a parent's thread may have held it at the fork, and this is the only thread
    if _owner != -1:
        try:
            _let_go()
        except ValueError as exc:  # pragma: no cover - not the child's main thread
            log.debug("trainhealth: SIGTERM handler kept in a forked child: %r", exc)


def _let_go() -> None:
    """Restore SIGTERM's default and the wakeup fd where they are still ours; close our socket."""
    global _owner, _wakeup
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _wakeup is not None:
        reader, writer = _wakeup
        current = signal.set_wakeup_fd(-1)
        if current not in (-1, writer.fileno()):
            signal.set_wakeup_fd(current)  # someone else's since: theirs stays
        writer.close()  # the reader sees the end of the stream and stops
        if _owner != os.getpid():
            reader.close()  # a forked child's copy: no reader thread here
    _owner, _wakeup = -1, None


def _read(reader: socket.socket) -> None:
    """The wakeup socket's reader: a SIGTERM byte, while ours is still the handler, acts at once."""
    try:
        while True:
            got = reader.recv(64)
            if not got:
                return  # released
            if signal.SIGTERM in got and _owner == os.getpid() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
                _act()
    except OSError:  # pragma: no cover - the socket closed under us
        return
    finally:
        reader.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """The Python handler (the main thread, between two bytecodes). It may have interrupted a client call that
    holds the outbox's lock, so the ends are sent from another thread; this one waits for them (bounded),
    then dies by SIGTERM. Called by a handler installed over ours that chains to the one it found (Lightning's
    does), it does nothing: that handler decides, as it would have without the client."""
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    if _owner == os.getpid():
        threading.Thread(target=_act, name=THREAD_NAME, daemon=True).start()
        _reported.wait(_bound() + MARGIN_SECONDS)
    _die()


def _act() -> None:
    """Once per process: every watching client sends its end, then they are waited for together, up to the
    longest ``crash_flush_seconds`` of them; then die."""
    if not _acting.acquire(blocking=False):
        return  # the other path acts, and kills the process
    try:
        deadline = time.monotonic() + _bound()
        sent = []
        for tm in list(_clients):
            try:
                if tm._signalled("SIGTERM"):
                    sent.append(tm)
            except Exception as exc:  # the report must never keep the process alive
                log.warning("trainhealth: could not report SIGTERM: %r", exc)
        for tm in sent:
            try:
                tm.flush(max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("trainhealth: could not deliver the SIGTERM report: %r", exc)
    finally:
        _reported.set()
        _die()


def _bound() -> float:
    return max((float(tm.settings.crash_flush_seconds) for tm in list(_clients)), default=0.0)


def _die() -> None:
    """Die by SIGTERM, as with the default disposition. ``signal.signal`` works in the main thread only; from
    our reader thread the default is restored at the C level (``PyOS_setsig``: Python's handler table still
    names ours, but the process is about to end)."""
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        else:
            import ctypes

            setsig = ctypes.pythonapi.PyOS_setsig
            setsig.argtypes = [ctypes.c_int, ctypes.c_void_p]
            setsig.restype = ctypes.c_void_p
            setsig(signal.SIGTERM, None)  # NULL: SIG_DFL
    except Exception as exc:  # pragma: no cover - no ctypes: exit with the status a shell gives a SIGTERM
        log.warning("trainhealth: cannot restore SIGTERM's default (%r); exiting with 143", exc)
        os._exit(128 + signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)  # delivered to some thread within microseconds: this one has nothing more to do
