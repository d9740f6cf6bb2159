"""Hostile input and faults, round 2 (docs/operations.md, "Hostile input"): lone surrogates in any field,
bodies that would cost gigabytes to decode, two sidecars on one database, and the small ones. The real
sidecar process, real bytes on raw sockets."""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainhealth.trainer.client import Telemetry

from tests.conftest import python_path
from tests.integration.alerting import free_port, ingest, nan_records, until

from .test_hostile_bytes import send

pytestmark = pytest.mark.integration

INGEST = b"POST /v1/ingest HTTP/1.1\r\nContent-Type: application/json\r\n"
FAST = {"flush_seconds": 0.05, "backoff_seconds": 0.05, "max_backoff_seconds": 0.2, "heartbeat_seconds": 60.0}


def rec(extra: bytes = b"", run: bytes = b"good") -> bytes:
    return b'{"run":"%s","rank":0,"time":1700000000,"step":1%s}' % (run, extra)


@pytest.mark.parametrize("surrogate", [b"\\udfff", b"\\ude00", b"\\ud800", b"\\udbff\\udbff"])
def test_a_lone_surrogate_anywhere_is_a_rejection_naming_the_field_never_a_500(sidecar, surrogate: bytes) -> None:
    cases = [  # (record, the field named; None: taken, an unknown key is ignored)
        (rec(run=b"a" + surrogate), "run"),
        (b'{"run":"good","rank":0,"time":1700000000,"type":"start","host":"node-%s"}' % surrogate, "host"),
        (b'{"run":"good","rank":0,"time":1700000000,"type":"start","config":{"%s":1}}' % surrogate, "config"),
        (b'{"run":"good","rank":0,"time":1700000000,"type":"start","config":{"a":["%s"]}}' % surrogate,
         "config.a[0]"),
        (rec(b',"metrics":{"%s":1}' % surrogate), "metrics"),
        (rec(b',"zz%s":"%s"' % (surrogate, surrogate)), None),
    ]
    for body, field in cases:
        for content_type, data in ((b"application/json", b"[" + body + b"," + rec() + b"]"),
                                   (b"application/x-ndjson", body + b"\n" + rec() + b"\n")):
            status, answer = send(sidecar.url, b"POST /v1/ingest HTTP/1.1\r\nContent-Type: " + content_type
                                  + b"\r\n", data)
            assert status == 200, (body, answer)
            got = json.loads(answer)
            if field is None:
                assert got["accepted"] == 2 and got["rejected"] == 0, got
                continue
            assert got["accepted"] == 1, (body, got)
            (error,) = got["errors"]
            assert error["index"] == 0 and error["field"] == field, (body, error)
            assert "not valid UTF-8" in error["reason"] and "\\xed" in error["reason"], error
        status, answer = send(sidecar.url, INGEST, body)  # alone: the whole body refused, by name
        assert status == (200 if field is None else 400), (body, answer)
    status, answer = send(sidecar.url, b"POST /v1/silences HTTP/1.1\r\nContent-Type: application/json\r\n",
                          b'{"run":"good","until":9999999999,"comment":"%s"}' % surrogate)
    assert status == 400 and "body.comment: not valid UTF-8" in json.loads(answer)["error"], answer
    assert sidecar.client.get("/healthz").status_code == 200


def test_the_client_drops_counts_and_says_once_what_the_sidecar_refuses(sidecar, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="trainhealth")
    tm = Telemetry(sidecar.url, run="surrogate-run", rank=0, world_size=1, **FAST)
    tm.start(host="node-\ude00", config={"lr\udfff": 1})
    for step in range(1, 6):
        tm.record(step, loss=1.0 / step)
    assert tm.flush(timeout=20)
    tm.close()
    stats = tm.stats()
    assert stats["rejected"] == 1 and stats["sent"] == 5 and stats["queued"] == 0 and stats["failures"] == 0, stats
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1 and "host" in said[0] and "not valid UTF-8" in said[0], said
    assert sidecar.client.get("/v1/runs/surrogate-run").status_code == 200


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def test_bodies_that_decode_to_millions_of_values_are_refused_unread(sidecar) -> None:
    before = peak_rss_mb(sidecar.proc.pid)
    arrays = gzip.compress(b"[" + b"[]," * (20_000_000 - 1) + b"[]]", 9)  # 58 KB on the wire, 60 MB unzipped
    objects = b"[" + b"{}," * (5_000_000 - 1) + b"{}]"  # 15 MB
    nested = b'[{"run":"a","rank":0,"time":1,"type":"start","config":{"x":[' + b"[]," * 4_000_000 + b"[]]}}]"
    for body, encoding in ((arrays, b"gzip"), (objects, None), (nested, None)):
        head = INGEST + (b"Content-Encoding: " + encoding + b"\r\n" if encoding else b"")
        status, answer = send(sidecar.url, head, body)
        assert status == 413 and "limits.max_values_per_batch" in json.loads(answer)["error"], answer[:300]
    grown = peak_rss_mb(sidecar.proc.pid) - before
    assert grown < 200, f"the sidecar's peak memory grew by {grown:.0f} MB"  # was 1,500 MB for the gzip body
    status, answer = send(sidecar.url, INGEST, b"[" + b",".join([rec()] * 3) + b"]")
    assert status == 200 and json.loads(answer)["accepted"] == 3


def test_a_client_gone_mid_body_leaves_no_traceback(sidecar) -> None:
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    for path, kind in ((b"/v1/ingest", b"application/json"), (b"/v1/silences", b"application/json"),
                       (b"/v1/alerts/1/ack", b"application/json")):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + kind
                      + b"\r\nContent-Length: 100000\r\n\r\n[" + b"{}," * 1000)
    assert sidecar.client.get("/healthz").status_code == 200
    status, answer = send(sidecar.url, INGEST, b"[" + rec() + b"]")
    assert status == 200
    assert "Traceback" not in sidecar.stderr_text() and "Exception" not in sidecar.stderr_text()


def test_a_second_sidecar_on_the_same_db_refuses_in_one_line(start_sidecar, tmp_path) -> None:
    db = tmp_path / "shared.db"
    first = start_sidecar("--db", str(db), db=False)
    second = subprocess.run([sys.executable, "-m", "trainhealth", "serve", "--port", "0", "--db", str(db)],
                            env={**os.environ, "PYTHONPATH": python_path()}, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"trainhealth: server.db: {str(db)!r} is in use by another sidecar "
                                     f"(pid {first.proc.pid}); stop it, or give this one another --db"), second.stderr
    assert first.client.get("/healthz").status_code == 200
    first.stop(kill=True)  # gone, however: the next one starts on the same file
    again = start_sidecar("--db", str(db), db=False)
    assert again.client.get("/healthz").status_code == 200


def test_a_restart_with_pending_notifications_does_not_call_their_webhook_gone(start_sidecar, tmp_path) -> None:
    hook = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: the notification stays pending
    db = str(tmp_path / "pending.db")
    first = start_sidecar("--db", db, "--webhook", hook, db=False)
    assert ingest(first, nan_records("pending", range(2)))["alerts"] == 1
    first.stop()
    again = start_sidecar("--db", db, "--webhook", hook, db=False)
    assert again.client.get("/healthz").status_code == 200
    assert "no longer configured" not in again.stderr_text(), again.stderr_text()
    again.stop()
    moved = start_sidecar("--db", db, "--webhook", "http://user:s3cret@127.0.0.1:9/other", db=False)
    said = moved.stderr_text()
    assert "no longer configured" in said and "127.0.0.1" in said and "s3cret" not in said, said


def test_credentials_in_a_refused_webhook_url_are_never_echoed(start_sidecar, tmp_path) -> None:
    bad = "ftp://alice:s3cret@hooks.example/x?key=s3cret2"
    refused = subprocess.run([sys.executable, "-m", "trainhealth", "serve", "--port", "0", "--db",
                              str(tmp_path / "r.db"), "--webhook", bad],
                             env={**os.environ, "PYTHONPATH": python_path()}, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "server.webhooks[0]: must be an http(s) URL" in refused.stderr
    assert "s3cret" not in refused.stderr and "ftp://***@hooks.example/x?key=***" in refused.stderr, refused.stderr
    sidecar = start_sidecar(config="")
    config_file = tmp_path / "trainhealth0.toml"
    config_file.write_text(f'[[webhooks]]\nurl = "{bad}"\n')
    answer = sidecar.client.post("/-/reload")
    assert answer.status_code == 400 and "s3cret" not in answer.text, answer.text
    assert "must be an http(s) URL" in answer.json()["error"]
    until(lambda: "config reload refused" in sidecar.stderr_text(), what="the refused reload, logged")
    assert "s3cret" not in sidecar.stderr_text() and "***@hooks.example" in sidecar.stderr_text()


def test_run_names_of_only_dots_are_refused(sidecar, tmp_path) -> None:
    for run in (b".", b"..", b"..."):
        status, answer = send(sidecar.url, INGEST, b"[" + rec(run=run) + b"," + rec() + b"]")
        got = json.loads(answer)
        assert status == 200 and got["accepted"] == 1, got
        assert got["errors"][0]["field"] == "run" and "only dots" in got["errors"][0]["reason"], got
        silence = sidecar.client.post("/v1/silences", json={"run": run.decode(), "until": time.time() + 60})
        assert silence.status_code == 400, silence.text
    assert sidecar.client.post("/v1/silences", json={"run": ".a", "until": time.time() + 60}).status_code == 201


@pytest.mark.parametrize("token, warned", [("change-me-to-a-long-random-string", "the placeholder"),
                                           ("x", "1 characters long"), ("9f8e7d6c5b4a39281706f5e4d3c2b1a0", None)])
def test_a_guessable_token_is_warned_about_and_the_token_can_come_from_a_file(start_sidecar, tmp_path, token,
                                                                              warned) -> None:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    sidecar = start_sidecar("--token-file", str(path))
    said = sidecar.stderr_text()
    if warned:
        assert f"WARNING: the token is {warned}" in said, said
    else:
        assert "WARNING" not in said, said
    assert token.encode() not in Path(f"/proc/{sidecar.proc.pid}/cmdline").read_bytes()  # what ps shows
    assert sidecar.client.get("/v1/runs").status_code == 401
    assert sidecar.client.get("/v1/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_options_and_405_list_every_method_of_a_path(sidecar) -> None:
    for path, methods in (("/v1/silences", "GET, OPTIONS, POST"), ("/v1/ingest", "OPTIONS, POST"),
                          ("/v1/silences/3", "DELETE, OPTIONS"), ("/-/reload", "OPTIONS, POST")):
        answer = sidecar.client.options(path)
        assert answer.status_code == 204 and answer.headers["allow"] == methods, (path, answer.headers)
        assert "access-control-allow-origin" not in answer.headers  # a preflight is never granted
        wrong = sidecar.client.put(path)
        assert wrong.status_code == 405 and wrong.headers["allow"] == methods, (path, wrong.headers)
    assert sidecar.client.options("/nowhere").status_code == 404
    schema = sidecar.client.get("/openapi.json").json()
    silence = schema["paths"]["/v1/silences"]["post"]["requestBody"]
    assert silence["required"] and silence["content"]["application/json"]["schema"]["required"] == ["run", "until"]
    watch = {p["name"]: p["schema"] for p in schema["paths"]["/v1/runs/{run}/watch"]["get"]["parameters"]}
    assert watch["run"]["pattern"] == "^(?!\\.+$)[A-Za-z0-9._:-]{1,128}$"
    alerts = {p["name"]: p["schema"] for p in schema["paths"]["/v1/alerts"]["get"]["parameters"]}
    assert alerts["delivery"]["enum"] == ["pending", "delivered", "undelivered"]
    page = {p["name"]: p["schema"] for p in schema["paths"]["/"]["get"]["parameters"]}
    assert page["part"]["enum"] == ["live"]
    assert sidecar.client.get("/", params={"part": ""}).status_code == 400
    assert sidecar.client.get("/v1/alerts", params={"delivery": ""}).status_code == 400


def test_oom_details_and_start_configs_share_one_memory_budget(start_sidecar) -> None:
    sidecar = start_sidecar(config="[limits]\nmax_text_bytes = 4500000\n")  # 4.5 MB
    now = time.time()
    mib = "x" * ((1 << 20) - 10)
    start = {"run": "text", "rank": 0, "time": now, "type": "start", "config": {"notes": mib}}
    ooms = [{"run": "text", "rank": rank, "time": now + rank, "step": 1, "type": "oom", "message": "CUDA out of memory",
             "detail": f"rank {rank} " + mib} for rank in range(6)]
    for batch in ([start], ooms[:3], ooms[3:]):
        assert ingest(sidecar, batch)["accepted"] == len(batch)
    view = sidecar.client.get("/v1/runs/text").json()
    details = [r["last_oom"]["detail"] for r in view["rank_states"]]
    kept = [d.startswith("rank ") for d in details]
    assert kept == [False, False, True, True, True, True], [d[:40] for d in details]  # the newest four fit
    assert "limits.max_text_bytes" in details[0] and len(details[0]) < 300
    assert "limits.max_text_bytes" in view["starts"][0]["config"]["trainhealth"]  # the oldest text of all
    assert view["rank_states"][0]["last_oom"]["message"] == "CUDA out of memory"  # only the long text goes
