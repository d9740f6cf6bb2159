"""A new user's walk through README.md against the real sidecar: the README's own examples, exact answers.

The curl example and its answer are read from README.md itself, so the README cannot drift from the server.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

README = (ROOT / "README.md").read_text()


def readme_curl_example() -> tuple[bytes, dict]:
    """The body of README's `curl ... -d '...'` example and the answer printed under it."""
    m = re.search(r"curl -s localhost:9464/v1/ingest -H 'content-type: application/json' -d '(.*?)'\n# (\{.*?\})\n",
                  README, re.S)
    assert m, "README's curl example moved: update this test with it"
    return m.group(1).encode(), json.loads(m.group(2))


def post(sc, body: bytes, ctype: str = "application/json", **headers):
    return sc.client.post("/v1/ingest", content=body, headers={"content-type": ctype, **headers})


def test_readme_walkthrough_gives_the_answers_it_shows(start_sidecar, tmp_path):
    sc = start_sidecar("--record", str(tmp_path / "records"))
    body, answer = readme_curl_example()
    r = post(sc, body)
    assert (r.status_code, r.json()) == (200, answer) == (200, {"accepted": 2, "rejected": 0, "alerts": 2})

    # the README's partial-batch example: good records pass, the bad one is named
    batch = [{"run": "job-7", "rank": 0, "time": 1732500002.0, "step": 813, "loss": 0.5},
             {"run": "job-7", "rank": -3, "time": 1732500002.0, "step": 813},
             {"run": "job-7", "rank": 0, "time": 1732500003.0, "step": 814, "loss": 0.4}]
    r = post(sc, json.dumps(batch).encode())
    assert (r.status_code, r.json()) == (200, {"accepted": 2, "rejected": 1, "alerts": 0, "errors": [
        {"index": 1, "field": "rank", "reason": "Expected `int` >= 0 (value: -3)"}]})

    firing = sc.client.get("/v1/alerts", params={"run": "job-7", "state": "firing"}).json()["alerts"]
    assert [(a["alert"], a["rank"], a["step"], a["severity"]) for a in firing] == [
        ("nan_divergence", None, 812, "critical"), ("lr_scaling", None, 0, "critical")]
    nan = firing[0]
    assert {k: nan[k] for k in ("state", "run", "time", "started_at", "fingerprint", "first_rank", "first_step",
                                "loss", "grad_norm")} == {
        "state": "firing", "run": "job-7", "time": 1732500001.5, "started_at": 1732500001.5,
        "fingerprint": "job-7/-/nan_divergence", "first_rank": 0, "first_step": 812,
        "loss": "NaN", "grad_norm": "Infinity"}  # non-finite numbers as strings, never null
    assert nan["summary"].startswith("loss became nan at step 812 on rank 0 (its own loss); ")
    lr = firing[1]
    assert (lr["lr"], lr["expected_lr"], lr["total_batch"], lr["ratio"]) == (0.02, 0.0025, 2, 8.0)
    assert lr["summary"].startswith("LR 0.02 is 8.0x the linear-scaling value 0.0025 for total batch 2")

    alerts = sc.client.get
    assert [a["alert"] for a in alerts("/v1/alerts", params={"alert": "lr_scaling"}).json()["alerts"]] == [
        "lr_scaling"]
    assert [a["alert"] for a in alerts("/v1/alerts", params={"since": 1732500001}).json()["alerts"]] == [
        "nan_divergence"]
    assert [a["alert"] for a in alerts("/v1/alerts", params={"limit": 1}).json()["alerts"]] == ["nan_divergence"]
    assert alerts("/v1/alerts", params={"state": "resolved"}).json()["alerts"] == []
    assert alerts("/v1/alerts", params={"run": "other"}).json()["alerts"] == []

    runs = sc.client.get("/v1/runs").json()["runs"]
    assert [(r["run"], r["ranks"], r["step"], r["records"], sorted(a["alert"] for a in r["firing"]))
            for r in runs] == [("job-7", 1, 814, 4, ["lr_scaling", "nan_divergence"])]
    run = sc.client.get("/v1/runs/job-7").json()
    rank0 = run["rank_states"][0]
    assert (rank0["rank"], rank0["step"], rank0["records"], rank0["last_sample_time"]) == (0, 814, 4, 1732500003.0)
    assert rank0["latest"] == {"loss": 0.4, "lr": 0.02, "grad_norm": "Infinity"}
    assert run["starts"] == [{"run": "job-7", "rank": 0, "time": 1732500000.0, "type": "start", "lr": 0.02,
                              "batch_size": 2, "world_size": 1, "reference_lr": 0.02,
                              "reference_batch_size": 16, "warmup_steps": 500}]
    assert sc.client.get("/healthz").json() == {"status": "ok", "runs": 1}
    job7 = {ln for ln in sc.client.get("/metrics").text.splitlines() if 'run="job-7"' in ln}
    assert {'trainhealth_loss{rank="0",run="job-7"} 0.4', 'trainhealth_grad_norm{rank="0",run="job-7"} +Inf',
            'trainhealth_step{rank="0",run="job-7"} 814.0',
            'trainhealth_alerts_firing{alert="nan_divergence",run="job-7",severity="critical"} 1.0',
            'trainhealth_alerts_firing{alert="lr_scaling",run="job-7",severity="critical"} 1.0'} <= job7

    # replay on what the flight recorder saw: the same transitions, in the order they happened
    out = subprocess.run([sys.executable, "-m", "trainhealth", "replay", str(tmp_path / "records" / "job-7.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    replayed = [json.loads(line) for line in out.stdout.splitlines()]
    served = sc.client.get("/v1/alerts").json()["alerts"]
    assert [(a.pop("id"), a.pop("silenced"), a.pop("acknowledged"), a.pop("delivery")) for a in served] == [
        (2, False, False, []), (1, False, False, [])]  # what the store adds (no webhook: no deliveries)
    assert replayed == list(reversed(served))
    assert out.stderr.splitlines()[0] == "trainhealth replay: 4 records, 0 corrupt lines skipped"


def test_every_body_shape_the_readme_names_is_taken(module_sidecar):
    sidecar = module_sidecar
    one = {"run": "shapes", "rank": 0, "time": 1700000000.0, "step": 1, "loss": "nan"}
    pretty = json.dumps(one, indent=2).encode()
    assert post(sidecar, pretty).json() == {"accepted": 1, "rejected": 0, "alerts": 1}
    lines = b"\r\n\r\n".join(json.dumps({**one, "step": s, "loss": 1.0}).encode() for s in (2, 3)) + b"\r\n"
    assert post(sidecar, lines, "application/x-ndjson").json() == {"accepted": 2, "rejected": 0, "alerts": 0}
    zipped = gzip.compress(b'[{"run":"shapes","rank":1,"time":1700000004,"step":4,"loss":-Infinity}]')
    r = post(sidecar, zipped, "application/json", **{"content-encoding": "gzip"})
    assert r.json()["accepted"] == 1
    latest = sidecar.client.get("/v1/runs/shapes").json()["rank_states"][1]["latest"]
    assert latest == {"loss": "-Infinity"}


def test_mistakes_a_new_user_makes_get_answers_that_say_what_to_do(module_sidecar):
    sidecar = module_sidecar
    # urllib (like curl -d) sends form content-type unless told
    req = urllib.request.Request(sidecar.url + "/v1/ingest", data=b'{"run":"a","rank":0,"time":1,"step":1}')
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 415
    assert "add -H 'content-type: application/json'" in json.loads(info.value.read())["error"]

    r = post(sidecar, b'[{"run":"a","rank":0,"time":1,"step":1,"loss":"0.5","metrics":{"acc":"0.9"}}]')
    assert r.status_code == 400 and r.json()["errors"] == [{"index": 0, "field": "loss", "reason": (
        'must be a number or null; the only strings taken are non-finite spellings ("nan", "-inf", "+Infinity") '
        "(value: '0.5')")}]
    r = post(sidecar, b'[{"run":"my job","rank":0,"time":1,"step":1}]')
    assert r.json()["errors"][0] == {"index": 0, "field": "run",
                                     "reason": "must be 1-128 characters of [A-Za-z0-9._:-] (value: 'my job')"}
    r = post(sidecar, b'{"run":"a","rank":0,"time":1}')
    assert r.json()["errors"] == [{"index": 0, "field": "step", "reason": "required for a 'sample' record, got null"}]

    assert sidecar.client.get("/v1/alerts", params={"limit": "ten"}).json() == {
        "error": "limit: Input should be a valid integer, unable to parse string as an integer (value: 'ten')"}
    r = sidecar.client.get("/v1/ingest")
    assert (r.status_code, r.json()) == (405, {"error": "GET /v1/ingest: Method Not Allowed"})
    r = sidecar.client.get("/v1/run")
    assert r.status_code == 404 and r.json()["error"].startswith(
        "GET /v1/run: Not Found (routes: /v1/ingest, /v1/runs, /v1/runs/{run}, /v1/alerts")


def test_token_accepts_the_bearer_scheme_in_any_case(start_sidecar):
    sc = start_sidecar("--token", "s3cret")
    body = b'[{"run":"t","rank":0,"time":1,"step":1}]'
    assert post(sc, body).status_code == 401
    assert post(sc, body, authorization="Bearer wrong").status_code == 401
    assert post(sc, body, authorization="bearer s3cret").json()["accepted"] == 1
    assert post(sc, body, authorization="Bearer s3cret").json()["accepted"] == 1
    assert sc.client.get("/healthz").status_code == 200


@pytest.mark.parametrize("method,path", [
    ("DELETE", "/v1/silences/99999999999999999999999"), ("POST", "/v1/alerts/99999999999999999999999/ack"),
    ("GET", "/v1/alerts?cursor=99999999999999999999999"), ("DELETE", "/v1/silences/-1")])
def test_ids_past_sqlite_integers_are_a_400_naming_the_parameter_not_a_500(module_sidecar, method, path):
    sidecar = module_sidecar
    r = sidecar.client.request(method, path, content=b"{}")
    assert r.status_code == 400 and r.json()["error"].split(":")[0] in ("silence_id", "alert_id", "cursor")
    assert sidecar.client.get("/healthz").status_code == 200
