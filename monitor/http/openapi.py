"""The OpenAPI schema the sidecar serves (/openapi.json), completed with what FastAPI cannot see.

Routes that read their body themselves (ingest: msgspec, not pydantic) have no request body in
FastAPI's schema, and every route answers errors as ``{"error": ...}`` with 400/401/404/413/415/429
rather than FastAPI's 422. Both are added here, so that clients, and the schemathesis fuzz test,
see the API as it is: the record schema comes from the msgspec Struct itself.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI

from ..record import Record

ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
ERROR_STATUSES = {"400": "bad input, named in `error`", "401": "missing or wrong bearer token",
                  "404": "no such run, alert or route", "413": "body or batch over a limit",
                  "415": "unsupported content type or encoding", "429": "a cap on runs or ranks is reached",
                  "503": "not ready (the store or the recorder cannot write)"}
JSON_OBJECT = {"type": "object"}
_INT = {"type": "integer"}
INGEST_ANSWER = {"type": "object", "required": ["accepted", "rejected", "alerts"], "properties": {
    "accepted": _INT, "rejected": _INT, "alerts": _INT,
    "errors": {"type": "array", "items": {"type": "object", "required": ["index", "field", "reason"],
                                          "properties": {"index": _INT, "field": {"type": "string"},
                                                         "reason": {"type": "string"}}}}}}
INGEST_REFUSED = {"anyOf": [ERROR, INGEST_ANSWER]}  # a whole body refused, or every record rejected
OK = {"200": {"description": "OK", "content": {"application/json": {"schema": JSON_OBJECT}}}}
OK_BY_ROUTE = {  # where the answer is not a JSON object with 200
    ("/metrics", "get"): {"200": {"description": "Prometheus exposition", "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/openmetrics-text": {"schema": {"type": "string"}}}}},
    ("/v1/ingest", "post"): {"200": {"description": "counts, and a reason per rejected record",
                                     "content": {"application/json": {"schema": INGEST_ANSWER}}}},
    ("/v1/silences", "post"): {"201": {"description": "the silence",
                                       "content": {"application/json": {"schema": JSON_OBJECT}}}},
    ("/", "get"): {"200": {"description": "the live page (or, with part=live, its refreshed fragment)",
                           "content": {"text/html": {"schema": {"type": "string"}}}}},
}


def describe(app: FastAPI) -> None:
    """Complete ``app.openapi()`` (built once, on the first request for it)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        (records,), components = msgspec.json.schema_components(
            (list[Record],), ref_template="#/components/schemas/{name}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        bodies = {
            ("/v1/ingest", "post"): {"application/json": {"schema": records},
                                     "application/x-ndjson": {"schema": {"type": "string"}}},
            ("/v1/silences", "post"): {"application/json": {"schema": JSON_OBJECT}},
            ("/v1/alerts/{alert_id}/ack", "post"): {"application/json": {"schema": JSON_OBJECT}},
        }
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                body = bodies.get((path, method))
                if body is not None:
                    op["requestBody"] = {"required": False, "content": body}
                responses = op["responses"] = dict(OK_BY_ROUTE.get((path, method), OK))  # FastAPI says "string"
                for status, what in ERROR_STATUSES.items():
                    body_schema = INGEST_REFUSED if path == "/v1/ingest" and status in ("400", "429") else ERROR
                    responses.setdefault(status, {"description": what,
                                                  "content": {"application/json": {"schema": body_schema}}})
                if path == "/v1/ingest":  # launches.py: two jobs under one run name
                    responses["409"] = {"description": "the run name belongs to another job (X-Trainhealth-Launch): "
                                                       "`error` says which and what to do",
                                        "content": {"application/json": {"schema": INGEST_REFUSED}}}
                if path == "/v1/runs/{run}/watch":
                    responses["409"] = {"description": "the run belongs to another job than the asking client's "
                                                       "(X-Trainhealth-Launch): its alerts are not this job's",
                                        "content": {"application/json": {"schema": ERROR}}}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
