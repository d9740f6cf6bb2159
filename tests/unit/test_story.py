"""The incident card (monitor/page/story.py): which alert is the incident, the root before the consequences,
and what the job did (stopped by stop_on, failed, ended, killed), from alerts it reads by their common fields."""

from __future__ import annotations

from trainhealth.page import story
from trainhealth.page.html import esc


def alert(name: str, severity: str = "critical", time: float = 10.0, **kw) -> dict:
    return {"alert": name, "state": "firing", "severity": severity, "time": time, "rank": None, "step": 5,
            "summary": f"{name} summary", **kw}


def test_the_incident_is_the_most_severe_event_not_the_setting_flagged_at_the_start() -> None:
    scaling = alert("lr_scaling", time=0.0, step=0)
    spike = alert("loss_spike", "warning", time=5.0, rank=0)
    nan = alert("nan_divergence", time=6.0)
    assert story.choose([scaling, spike, nan]) is nan
    assert story.choose([scaling, spike]) is spike
    assert story.choose([scaling]) is scaling and story.choose([]) is None
    # an alert this module never heard of is told like the others
    assert story.choose([spike, alert("gpu_fault", time=7.0, rank=3)])["alert"] == "gpu_fault"


def test_the_card_names_where_why_and_the_stop_on_stop() -> None:
    starts = [{"rank": r, "host": f"node-{r}", "config": {"stop_on": "nan_divergence"}} for r in range(2)]
    fired = [alert("lr_scaling", time=0.0, step=0), alert("loss_spike", "warning", time=5.0, rank=0, step=40),
             alert("loss_spike", "warning", time=5.0, rank=1, step=40),
             alert("nan_divergence", time=6.0, step=42, root_ranks=[1], cause="nonfinite_loss")]
    ends = {r: {"status": "completed", "step": 44, "time": 7.0} for r in range(2)}
    card = story.incident_html(fired, ends, [0, 1], starts)
    assert 'data-alert="nan_divergence" data-step="42"' in card
    assert "rank 1, host node-1, step <b>42</b>" in card
    assert "cause: nonfinite_loss" in card
    assert card.index("<b>lr_scaling</b> (run, step 0)") < card.index("<b>loss_spike</b> (ranks 0, 1, step 40)")
    assert "every rank stopped at step <b>44</b> by <code>stop_on</code>: nan_divergence fired at step 42" in card
    # the client's own form (Telemetry(stop_on=...) adds it to the start's config as a list): the same
    listed = [{"rank": r, "config": {"stop_on": ["nan_divergence", "rank_stalled"]}} for r in range(2)]
    stopped = "every rank stopped at step <b>44</b> by <code>stop_on</code>"
    assert stopped in story.incident_html(fired, ends, [0, 1], listed)
    # the same ends without stop_on in the config: ended, no claim of a stop
    plain = story.incident_html(fired, ends, [0, 1], [{"rank": 0, "config": {}}])
    assert "every rank ended at step <b>44</b>" in plain and "stop_on" not in plain


def test_the_failed_root_comes_before_the_rank_that_failed_because_of_it_and_silent_ranks_are_named() -> None:
    gloo = "Connection closed by peer \u274c"
    ends = {0: {"status": "failed", "step": 9, "time": 1.0, "error": {"type": "DistBackendError", "message": gloo}},
            2: {"status": "failed", "step": 9, "time": 2.0, "error": {"type": "RuntimeError", "message": "CUDA"}}}
    card = story.incident_html([alert("rank_failed", root_ranks=[2])], ends, [0, 1, 2], [])
    did = card.split("what the job did")[1]
    assert did.index("rank 2 failed at step 9: <code>RuntimeError: CUDA") < did.index("rank 0 then failed at step 9")
    assert "\u274c" not in card and esc(gloo) == "Connection closed by peer [x]"
    assert esc("GLHF! \U0001f3d6\ufe0f") == "GLHF!" and esc("a \u26a0\ufe0f b") == "a [!] b"
    assert "rank 1 sent no end record" in did


def test_a_quiet_run_says_so_and_what_its_ranks_did() -> None:
    ends = {0: {"status": "completed", "step": 300, "time": 1.0}}
    card = story.incident_html([], ends, [0, 1], [])
    assert "No incident" in card and "rank 0 ended at step <b>300</b>" in card
    assert "rank 1 sent no end record" in card
    live = story.live_outcome_html([{"rank": 0, "ended": True, "step": 300}, {"rank": 1, "ended": False, "step": 12}],
                                   [], [])
    assert live == '<ul class="outcome"><li>rank 0 ended (last step 300)</li><li>rank 1 running (at step 12)</li></ul>'


def test_ranks_read_as_ranges() -> None:
    assert story.ranks_text(list(range(64))) == "ranks 0-63"
    assert story.ranks_text([8, 0, 1, 2, 5, 6]) == "ranks 0-2, 5, 6, 8"
    assert story.ranks_text([3]) == "rank 3"
