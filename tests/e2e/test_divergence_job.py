"""A real divergence, end to end: 2 DDP ranks on gloo under torchrun (tests/e2e/loop_worker.py), a real sidecar.
At step 30 the job's LR is raised 1000x (a resume or a schedule bug); the loss and the all-reduced grad norm
climb until they overflow to NaN on both ranks; the job runs on to its last step and exits cleanly.

On-call gets at most 2 pages (the rise, then the NaN, whose timeline names the LR change), the same text in
the API and on the console, and once both ranks have ended nothing of the run is left firing."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Sidecar
from tests.e2e.test_rank_ends import CONFIG, Launch

pytest.importorskip("torch")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def sidecar(start_sidecar) -> Sidecar:
    return start_sidecar(config=CONFIG, record=True)


def test_lr_raised_1000x_is_two_pages_naming_the_lr_change_and_nothing_firing_after_the_end(sidecar, tmp_path):
    job = Launch(sidecar, tmp_path, ("--steps", "90", "--step-sleep", "0.02", "--lr-step", "30",
                                     "--lr-factor", "1000"), 2, False)
    try:
        assert job.wait() == 0, job.log()
    finally:
        job.kill()
    ends = sorted((r["rank"], r["status"]) for r in job.records(tmp_path) if r["type"] == "end")
    assert ends == [(0, "completed"), (1, "completed")]
    firing_now = lambda: sidecar.client.get(  # noqa: E731
        "/v1/alerts", params={"run": job.run, "state": "firing"}).json()["alerts"]
    deadline = time.monotonic() + 30
    while True:  # the ends are in once the run's alerts have resolved
        alerts = job.alerts()
        if any(a["alert"] == "nan_divergence" for a in alerts) and not firing_now() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    pages = [a for a in alerts if a["state"] == "firing"]
    print("pages:", [(a["alert"], a["step"]) for a in pages])
    assert 1 <= len(pages) <= 2 and pages[-1]["alert"] == "nan_divergence", [a["alert"] for a in alerts]
    nan = pages[-1]
    assert nan["root_ranks"] == [0, 1] and nan["timeline"][0] == "LR changed 0.01 -> 10 at step 30 (1e+03x)"
    assert "LR changed 0.01 -> 10 at step 30 (1e+03x)" in nan["summary"]
    assert "with the LR it had (0.01)" in nan["summary"]
    if len(pages) == 2:  # the rise before the NaN: one run-level incident for both ranks, folded into the NaN
        rise = pages[0]
        assert rise["alert"] in ("loss_spike", "grad_explosion") and rise["rank"] is None
        assert rise["step"] < nan["step"]
    # nothing stale: both ranks ended, so every alert of the run resolved, saying how
    assert firing_now() == []
    closing = [a for a in alerts if a.get("resolved_by") == "run_ended"]
    assert [a["alert"] for a in closing] == ["nan_divergence"]
    assert closing[0]["summary"] == "run ended completed at step 90"
    # one text: the console's last line for the NaN alert says what the API says
    console = sidecar.stderr_text(timeout=2.0)
    said = [line for line in console.splitlines() if " nan_divergence run=" + job.run in line
            and ("ALERT firing" in line or "ALERT updated" in line)]
    assert said and said[-1].endswith(nan["summary"])
