"""The sidecar as assembly.py builds it: collaborators passed in, and the HTTP app's parameters checked by
FastAPI from their annotations (one 400 shape, a schema that says the same)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from trainhealth.assembly import build_app, build_service
from trainhealth.checkpoint import Checkpoint
from trainhealth.config import load
from trainhealth.http.app import create_app
from trainhealth.service import Service

from .trainer_fakes import Clock

T0 = 1_700_000_000.0


def samples(steps: range) -> bytes:
    return json.dumps([{"run": "job", "rank": 0, "time": T0 + s, "step": s, "loss": 1.0} for s in steps]).encode()


def test_the_checkpoint_is_passed_in_and_a_rebuilt_sidecar_resumes_the_run(tmp_path: Path) -> None:
    settings = load(None, {"db": str(tmp_path / "t.db")})
    clock = Clock(T0)
    service, _ = build_service(settings, clock=clock, keep_state=True)
    assert isinstance(service.journal, Checkpoint)
    assert [f.name for f in service.faults] == ["store", "state"]
    assert service.ingest(samples(range(1, 4)), "application/json").status == 200
    service.close()  # a clean stop: the final snapshot

    again, _ = build_service(settings, clock=clock, keep_state=True)
    try:
        assert again.pipeline.runs["job"].ranks[0].last_step == 3
    finally:
        again.close()
    bare, _ = build_service(load(None, {"db": str(tmp_path / "bare.db")}), clock=clock)
    try:
        assert bare.journal is None and [f.name for f in bare.faults] == ["store"]
    finally:
        bare.close()


async def ask(app: Any, *paths: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as client:
        return [await client.get(path) for path in paths]


def test_a_bad_query_parameter_is_a_400_naming_it_in_the_project_words() -> None:
    app = create_app(Service(load(None, {"db": ":memory:"})))
    answers = asyncio.run(ask(app, "/v1/alerts?state=open", "/v1/alerts?delivery=lost", "/v1/alerts?limit=0",
                              "/v1/alerts?limit=10001", "/v1/runs/r/watch?timeout=61", "/v1/alerts?delivery=pending"))
    assert [(a.status_code, a.json()["error"]) for a in answers] == [
        (400, "state: must be 'firing' or 'resolved', got 'open'"),
        (400, "delivery: must be 'pending', 'delivered' or 'undelivered', got 'lost'"),
        (400, "limit: Input should be greater than or equal to 1 (value: '0')"),
        (400, "limit: Input should be less than or equal to 10000 (value: '10001')"),
        (400, "timeout: Input should be less than or equal to 60 (value: '61')"),
        (400, "delivery: this sidecar keeps no alert store"),
    ]


def test_the_schema_says_what_the_parameters_refuse(tmp_path: Path) -> None:
    service, alerts_out = build_service(load(None, {"db": str(tmp_path / "s.db")}))
    try:
        schema = build_app(service, alerts_out).openapi()
    finally:
        service.close()

    def params(path: str, method: str = "get") -> dict[str, Any]:
        return {p["name"]: p["schema"] for p in schema["paths"][path][method]["parameters"]}

    alerts = params("/v1/alerts")
    assert alerts["state"] == {"type": "string", "enum": ["firing", "resolved"], "title": "State"}
    assert (alerts["limit"]["minimum"], alerts["limit"]["maximum"], alerts["limit"]["default"]) == (1, 10_000, 1000)
    assert alerts["cursor"] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "title": "Cursor"}
    assert params("/")["part"]["enum"] == ["live"]
    assert (params("/v1/runs/{run}/watch")["timeout"]["maximum"], params("/v1/silences/{silence_id}", "delete")[
        "silence_id"]["minimum"]) == (60.0, 0)
    queries = [p["schema"] for item in schema["paths"].values() for op in item.values()
               for p in op.get("parameters", []) if p["in"] == "query"]
    assert queries and not [s for s in queries if "anyOf" in s or "const" in s]  # never null, one choice an enum
