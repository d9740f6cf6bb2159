"""Jobs kept apart (issue 21): who sent a batch (``X-Trainhealth-Launch``) and which job owns a run name,
through the real Service: the second job's records are refused with one line (409, an info alert), never
seen by a detector; the name passes on once its owner is done; the ranks' host and pid are known without
a start record."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from trainhealth.config import Settings
from trainhealth.launches import JobOwners, LaunchError, parse
from trainhealth.service import Service
from trainhealth.trainer.settings import ClientSettings, from_environ, job_of, launch_header

from .trainer_fakes import Clock

T0 = 1_000_000.0
A0 = "id=aaaa0; pid=100; host=node-a; job=node-a/127.0.0.1:29500"
A1 = "id=aaaa1; pid=101; host=node-a; job=node-a/127.0.0.1:29500"
B0 = "id=bbbb0; pid=200; host=node-a; job=node-a/127.0.0.1:29511"


def send(service: Service, launch: str | None, rank: int, first: int, last: int,
         loss: float = 1.0) -> tuple[int, dict[str, Any]]:
    records = [{"run": "none", "rank": rank, "time": service.clock() - (last - s) * 0.05, "step": s, "loss": loss}
               for s in range(first, last + 1)]
    answer = service.ingest(json.dumps(records).encode(), "application/json", launch=launch)
    return answer.status, answer.body


def test_the_second_job_under_a_taken_name_is_refused_in_one_line_and_no_detector_sees_it():
    clock = Clock(T0)
    service = Service(Settings(), clock=clock)
    for step in range(1, 40, 5):
        clock.now += 0.25
        assert send(service, A0, 0, step, step + 4)[0] == 200
        assert send(service, A1, 1, step, step + 4)[0] == 200
        status, body = send(service, B0, 0, step, step + 4, loss=50.0)  # a loss 50x: mixed, a spike page
        assert status == 409 and body["accepted"] == 0 and body["rejected"] == 5, body
        assert body["error"] == ("run none is taken by another job (job node-a/127.0.0.1:29500 (pid 101 on node-a)): "
                                 "give each job its own run name (TRAINHEALTH_RUN, or torchrun --rdzv-id); the "
                                 "records of job node-a/127.0.0.1:29511 (pid 200 on node-a) are refused")
    alerts = service.book.query(run="none")
    assert [(a["alert"], a["severity"], a["state"]) for a in alerts] == [("run_name_taken", "info", "firing")]
    (taken,) = alerts
    assert (taken["job"], taken["other_job"], taken["pid"], taken["other_pid"]) == (
        "node-a/127.0.0.1:29500", "node-a/127.0.0.1:29511", 101, 200)  # the owner's newest launch
    run = service.pipeline.runs["none"]
    assert run.records == 80 and {q: (s.host, s.pid) for q, s in run.ranks.items()} == {
        0: ("node-a", 100), 1: ("node-a", 101)}  # host and pid without a start record
    assert service.stats.rejected == {"run_name_taken": 40}
    clock.now += 16  # the second job stopped: its conflict is over
    assert [(a["alert"], a["state"]) for a in service.tick()] == [("run_name_taken", "resolved")]


def test_a_client_of_the_other_job_does_not_hear_the_runs_alerts_and_stops():
    clock = Clock(T0)
    service = Service(Settings(), clock=clock)
    assert send(service, A0, 0, 1, 5)[0] == 200
    assert service.other_job("none", A1) == "" and service.other_job("none", None) == ""
    assert service.other_job("none", B0) == (
        "run none is taken by another job (job node-a/127.0.0.1:29500 (pid 100 on node-a)): its alerts are not "
        "this job's (give each job its own run name: TRAINHEALTH_RUN, or torchrun --rdzv-id)")
    assert service.other_job("other", B0) == ""  # a run nobody owns yet


def test_the_name_passes_on_when_its_owner_ended_or_went_quiet_and_the_old_state_is_forgotten():
    clock = Clock(T0)
    service = Service(Settings(), clock=clock)
    assert send(service, A0, 0, 1, 10)[0] == 200
    end = [{"type": "end", "run": "none", "rank": 0, "time": clock.now, "step": 10, "status": "completed"}]
    assert service.ingest(json.dumps(end).encode(), "application/json", launch=A0).status == 200
    clock.now += 1
    assert send(service, B0, 0, 1, 3)[0] == 200  # the owner ended: the next job takes the name at once
    assert service.pipeline.runs["none"].ranks[0].pid == 200 and service.pipeline.runs["none"].records == 3
    clock.now += 5
    assert send(service, A0, 0, 11, 12)[0] == 409  # now the first job is the other one
    clock.now += 16
    assert send(service, A0, 0, 13, 14)[0] == 200  # the owner went quiet for 15 s: it passes back


def test_batches_without_the_header_or_of_an_unknown_job_are_taken_as_before():
    service = Service(Settings(), clock=Clock(T0))
    assert send(service, A0, 0, 1, 5)[0] == 200
    assert send(service, None, 0, 6, 9)[0] == 200  # an older client (or a replay): no owner check
    assert send(service, "id=cc; pid=300; host=node-c; job=-", 1, 6, 9)[0] == 200  # a job not known
    assert service.pipeline.runs["none"].ranks[1].host == "node-c"  # its host and pid are still learned


@pytest.mark.parametrize("bad", ["", "id=a", "id=a; pid=x; host=h; job=j", "id=a; pid=1; host=h h; job=j",
                                 "pid=1; id=a; host=h; job=j", "id=a; pid=1; host=h; job=" + "j" * 161])
def test_a_bad_launch_header_is_a_400_naming_it(bad):
    service = Service(Settings(), clock=Clock(T0))
    status, body = send(service, bad, 0, 1, 2)
    assert status == 400 and body["error"].startswith("X-Trainhealth-Launch: must be 'id=ID; pid=PID; host=HOST; ")
    with pytest.raises(LaunchError):
        parse(bad)


def test_the_owner_table_is_bounded():
    owners = JobOwners(max_runs=2)
    for i, run in enumerate(("a", "b", "c")):
        assert owners.claim(run, parse(A0), T0 + i, False) == (True, "")
    assert list(owners.owners) == ["b", "c"]


def test_the_client_names_its_job_as_the_ranks_of_one_job_share_it():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TRAINHEALTH_HOST": "node-a",
           "TRAINHEALTH_LAUNCH_ID": "abc"}
    s = from_environ(env)
    machine = socket.gethostname()  # a loopback rendezvous is the machine's, whatever TRAINHEALTH_HOST says
    assert (s.launch_id, s.job) == ("abc", f"{machine}/127.0.0.1:29500")
    assert launch_header(s, 42) == f"id=abc; pid=42; host=node-a; job={machine}/127.0.0.1:29500"
    assert parse(launch_header(s, 42)).job == f"{machine}/127.0.0.1:29500"
    assert job_of({"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}, "node-b", "x") == "10.0.0.7:29500"
    assert job_of({"TRAINHEALTH_JOB": "sweep 7"}, "node-b", "x") == "sweep-7"
    elastic = {"TORCHELASTIC_RUN_ID": "exp42", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
    assert job_of(elastic, "node-b", "x") == "rdzv:exp42"  # kept when a restart moves the rendezvous port
    assert job_of({**elastic, "TORCHELASTIC_RUN_ID": "none"}, "node-b", "x") == "10.0.0.7:29500"  # static
    assert job_of({}, "node-b", "x") == "x"  # a job of one process
    assert job_of({"WORLD_SIZE": "2"}, "node-b", "x") == "-"  # ranks started by hand: not known, not judged
    assert job_of({}, "node-b", "x", world_size=4) == "-"  # Telemetry(world_size=4) without torchrun's environment
    # four processes started by hand, each told its rank and the world size: one run, no job claims it
    jobs = {from_environ({}, run="pause", rank=r, world_size=4).job for r in range(4)}
    assert jobs == {"-"}
    assert from_environ({}).launch_id == from_environ({}).launch_id  # one per process
    assert parse(launch_header(ClientSettings(host="my host!"), 1)).host == "my-host-"
