"""Shared fixtures: the real sidecar as a subprocess on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_path() -> str:
    """PYTHONPATH for a child process: the checkout (for ``tests.*``) ahead of what was already there."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_binary(name: str) -> str:
    """The path of a server binary; skip without it on a laptop, fail in CI."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (CI=true) but is not installed")
        pytest.skip(f"{name} not installed")
    return path


def stop_process(proc: subprocess.Popen[Any], kill: bool = False, timeout: float = 10) -> None:
    """SIGTERM (or SIGKILL) a child still running, SIGKILL it after ``timeout`` s, and reap it."""
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Sidecar:
    """A running ``python -m trainhealth serve`` process."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        """``wrap``: the command line as it is to run (e.g. on a node of tests/twonodes.py)."""
        full_env = {**os.environ, "PYTHONPATH": python_path(), **(env or {})}
        for key in [k for k in full_env if k.startswith("TRAINHEALTH_") and k not in (env or {})]:
            del full_env[key]
        argv = [sys.executable, "-m", "trainhealth", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            wrap(argv) if wrap is not None else argv,
            cwd=str(cwd or ROOT), env=full_env, stderr=subprocess.PIPE, text=True,
        )
        self.startup: list[str] = []  # what it printed up to "listening on" (warnings at start)
        self.url = self._wait_for_port()
        self.client = httpx.Client(base_url=self.url, timeout=10)
        # its console (alert lines, warnings) is drained by a thread: a full pipe would stall the sidecar
        self.lines: deque[str] = deque(self.startup, maxlen=5000)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stderr_text(self, timeout: float = 10.0) -> str:
        """What it printed after its start (all of it once the process has exited)."""
        if self.proc.poll() is not None:
            self._drain.join(timeout)
        return "".join(list(self.lines))

    def _wait_for_port(self) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        lines = self.startup
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                return m.group(1)
        self.proc.kill()
        raise RuntimeError("sidecar did not start:\n" + "".join(lines))

    def stop(self, kill: bool = False) -> None:
        self.client.close()
        stop_process(self.proc, kill)
        self._drain.join(10)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator:
    """Factory: start_sidecar(*args, env=..., config=TOML text, record=True) -> Sidecar; all are stopped at
    teardown. ``config`` is written to a file for ``--config``; ``record`` turns the flight recorder on in
    ``tmp_path / "records"``."""
    started: list[Sidecar] = []

    def start(*args: str, env: dict[str, str] | None = None, db: bool = True, config: str | None = None,
              record: bool = False) -> Sidecar:
        extra = ["--db", str(tmp_path / f"trainhealth{len(started)}.db")] if db else []
        if config is not None:
            path = tmp_path / f"trainhealth{len(started)}.toml"
            path.write_text(config)
            extra += ["--config", str(path)]
        if record:
            extra += ["--record", str(tmp_path / "records")]
        sidecar = Sidecar([*extra, *args], env=env, cwd=tmp_path)
        started.append(sidecar)
        return sidecar

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def sidecar(start_sidecar) -> Sidecar:
    return start_sidecar()


@pytest.fixture(scope="module")
def module_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """One sidecar (store attached) for a whole test module: for tests that need no fresh state (they use run
    names of their own, or none). A start costs a second or more, under load several: most of a short test."""
    tmp = tmp_path_factory.mktemp("module-sidecar")
    sc = Sidecar(["--db", str(tmp / "trainhealth.db")], cwd=tmp)
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium (tests/browser.py) for a whole test module: a start costs seconds."""
    from tests.browser import Browser

    b = Browser(need_binary("chromium"), tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


@pytest.fixture
def machine_oom_lock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Held by the tests that make the kernel's OOM killer kill and by those that tell a SIGKILL from an OOM kill
    by the machine's OOM-kill count (a launcher outside any memory cgroup reads that one): under pytest-xdist
    they would overlap, and one test's OOM kill would read as the other's. Shared by the workers of one run."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: the tests run one after the other anyway
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "machine-oom.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
