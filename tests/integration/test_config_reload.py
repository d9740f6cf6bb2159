"""Configuration errors against the real sidecar: at start (exit 2, one line, no traceback) and at reload
(POST /-/reload and SIGHUP refuse with the same line and keep running); what a reload applies and what it
refuses as needing a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import ROOT, Sidecar
from .alerting import Receiver, ingest, nan_records

# (config text, the one line it must give): one bad value per section, and the shapes a typo takes
BAD = [
    ("[server]\ntick_seconds = 0\n", "server.tick_seconds: must be a positive number, got 0"),
    ("[limits]\nmax_runs = -1\n", "limits.max_runs: must be a positive number, got -1"),
    ("[detectors.rank_stalled]\nfloor_seconds = -1\n",
     "detectors.rank_stalled.floor_seconds: must be a positive number, got -1"),
    ("[detectors.nan_divergence]\namp_min_scale = -1\n",
     "detectors.nan_divergence.amp_min_scale: must be a number >= 0, got -1"),
    ("[detectors.loss_spike]\nwindow = 2.5\n", "detectors.loss_spike.window: must be an integer >= 1, got 2.5"),
    ("[detectors.grad_explosion]\nz_threshold = \"high\"\n",
     "detectors.grad_explosion.z_threshold: must be a number > 0, got 'high'"),
    ("[detectors.gpu_oom_risk]\nnear_fraction = 2\n",
     "detectors.gpu_oom_risk.near_fraction: must be a number in (0, 1], got 2"),
    ("[detectors.gpu_oom]\nresolve_after_steps = -1\n",
     "detectors.gpu_oom.resolve_after_steps: must be an integer >= 1, got -1"),
    ("[detectors.host_memory_leak]\nbucket_seconds = -1\n",
     "detectors.host_memory_leak.bucket_seconds: must be a positive number, got -1"),
    ("[detectors.straggler]\nratio = 0.5\n", "detectors.straggler.ratio: must be > 1, got 0.5"),
    ("[detectors.lr_scaling]\nfactor = 1\n", "detectors.lr_scaling.factor: must be a number > 1, got 1"),
    ("[[webhooks]]\nurl = \"ftp://x\"\n", "webhooks[0].url: must be an http(s) URL, got 'ftp://x'"),
    ("[alertmanager]\nurl = \"http://am:9093\"\ntimeout = -1\n",
     "alertmanager.timeout: must be a positive number, got -1"),
    ("[exporter]\nmax_series = 0\n", "exporter.max_series: must be an integer >= 1, got 0"),
    ("[detector.rank_stalled]\nfloor_seconds = 5\n",
     "detector: unknown section (known: server, limits, detectors, webhooks, alertmanager, exporter, stop)"),
    ("[detectors.rank_stalled]\nflor_seconds = 5\n",
     "detectors.rank_stalled.flor_seconds: unknown setting (known: ceiling_seconds, enabled, factor, "
     "floor_seconds, silence_floor_seconds, startup_seconds)"),
]


def serve(tmp_path: Path, config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "trainhealth", "serve", "--port", "0", "--config", str(config),
                           "--db", str(tmp_path / "t.db")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("text, line", BAD, ids=[line.split(":")[0] for _, line in BAD])
def test_bad_value_at_start_exits_2_with_one_line(tmp_path: Path, text: str, line: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    done = serve(tmp_path, config)
    assert done.returncode == 2
    assert done.stderr == f"trainhealth: {line}\n"  # one line, no traceback
    assert done.stdout == ""


class StderrLines:
    """A running sidecar's stderr lines (the Sidecar fixture drains its pipe in a thread)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    @property
    def lines(self) -> list[str]:
        return list(self.sidecar.lines)

    def wait_for(self, needle: str, count: int = 1, timeout: float = 20.0) -> None:
        """Until ``count`` lines hold ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(needle in ln for ln in self.lines) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"not {count} log lines with {needle!r}; got:\n{''.join(self.lines[-30:])}")


GOOD = "[detectors.rank_stalled]\nfloor_seconds = 30\n"


def test_every_bad_section_is_refused_at_reload_by_post_and_sighup(start_sidecar, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    sc = start_sidecar("--config", str(config))
    log = StderrLines(sc)
    for text, line in BAD:
        config.write_text(text)
        r = sc.client.post("/-/reload")
        assert (r.status_code, r.json()) == (400, {"reloaded": False, "error": line})
        logged = f"config reload refused, keeping the running settings: {line}\n"
        log.wait_for(logged, count=1)  # the POST's
        sc.proc.send_signal(signal.SIGHUP)
        log.wait_for(logged, count=2)  # the signal's: the same line
    assert "Traceback" not in "".join(log.lines)
    config.write_text(GOOD.replace("30", "45"))
    assert sc.client.post("/-/reload").json() == {"reloaded": True}
    assert sc.client.get("/healthz").status_code == 200


@pytest.mark.parametrize("text, line", [
    ("[limits]\nmax_runs = 10\n", "limits.max_runs: needs a restart (running 256, the config now says 10)"),
    ("[server]\ntick_seconds = 2.0\n",
     "server.tick_seconds: needs a restart (running 1.0, the config now says 2.0)"),
    ("[server]\ntoken = \"s3cret\"\n", "server.token: needs a restart"),  # the values are not shown
    ("[exporter]\nmax_series = 10\n", "exporter: needs a restart (the [exporter] table changed)"),
])
def test_a_change_that_cannot_apply_live_is_refused_as_needing_a_restart(start_sidecar, tmp_path: Path,
                                                                        text: str, line: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    sc = start_sidecar("--config", str(config))
    config.write_text(GOOD + text)
    r = sc.client.post("/-/reload")
    assert (r.status_code, r.json()) == (400, {"reloaded": False, "error": line})
    config.write_text(GOOD)  # put back as it was: nothing to restart for
    assert sc.client.post("/-/reload").json() == {"reloaded": True}


def test_reload_applies_new_webhook_targets(start_sidecar, tmp_path: Path) -> None:
    old, new = Receiver().start(), Receiver().start()
    try:
        config = tmp_path / "c.toml"
        config.write_text(f'[[webhooks]]\nurl = "{old.url}/hook"\n')
        sc = start_sidecar("--config", str(config))
        ingest(sc, nan_records("before", [0]))
        old.wait_for(lambda: len(old.deliveries()) == 1, what="the alert raised before the reload")
        config.write_text(f'[[webhooks]]\nurl = "{new.url}/hook"\nname = "fixed"\n')
        assert sc.client.post("/-/reload").json() == {"reloaded": True}
        ingest(sc, nan_records("after", [0]))
        new.wait_for(lambda: len(new.deliveries()) == 1, what="the alert raised after the reload")
        assert new.deliveries()[0].json()["run"] == "after"
        time.sleep(1.0)
        assert [d.json()["run"] for d in old.deliveries()] == ["before"]
        metrics = sc.client.get("/metrics").text
        assert 'trainhealth_webhook_undelivered{target="fixed"} 0.0' in metrics
    finally:
        old.stop()
        new.stop()
