"""The OpenAPI schema the sidecar serves (/openapi.json), completed with what FastAPI cannot see.

Routes that read their body themselves (ingest: msgspec, not pydantic) have no request body in
FastAPI's schema, and every route answers errors as ``{"error": ...}`` with 400/401/404/413/415/421/429/503
rather than FastAPI's 422. Both are added here, so that clients, and the schemathesis fuzz test,
see the API as it is: the record schema comes from the msgspec Struct itself.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from fastapi import FastAPI

from ..notify.silences import MAX_COMMENT, MAX_RANK, MAX_SILENCE_SECONDS
from ..record import RUN_PATTERN, Record

ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
ERROR_STATUSES = {"400": "bad input, named in `error`", "401": "missing or wrong bearer token",
                  "404": "no such run, alert or route", "413": "body or batch over a limit",
                  "421": "the Host header is not a name this sidecar is reached by (server.allowed_hosts)",
                  "415": "unsupported content type or encoding", "429": "a cap on runs or ranks is reached",
                  "503": "not ready (the store or the recorder cannot write), or the bodies being received fill "
                         "limits.max_buffered_bytes (with Retry-After)"}
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


# JSON Schema's "pattern" is ECMA-262: no \A or \Z (a pattern there is searched, so ^...$ anchors it whole)
RUN_NAME = {"type": "string", "pattern": "^(?!\\.+$)[A-Za-z0-9._:-]{1,128}$"}
assert RUN_PATTERN == r"\A(?!\.+\Z)[A-Za-z0-9._:-]{1,128}\Z", "RUN_NAME above says what RUN_PATTERN does"
# what a route checks by hand, beyond its parameters' annotations (which FastAPI checks and puts in the
# schema itself): a run name, by the record's own rule and words (record.check_run)
PARAMETERS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("/v1/runs/{run}/watch", "get", "run"): RUN_NAME,
}
_TEXT_OR_NULL = {"anyOf": [{"type": "string", "maxLength": 1000}, {"type": "null"}]}
ACK_BODY = {"type": "object", "additionalProperties": False,
            "properties": {"by": _TEXT_OR_NULL, "comment": _TEXT_OR_NULL}}


def silence_body(now: float) -> dict[str, Any]:
    """A silence's fields; ``until`` must be ahead of the sidecar's clock (as of this schema) and within 366 days."""
    return {"type": "object", "additionalProperties": False, "required": ["run", "until"], "properties": {
        "run": RUN_NAME,
        "alert": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 128}, {"type": "null"}]},
        "rank": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_RANK}, {"type": "null"}]},
        "until": {"type": "number", "minimum": int(now) + 3600, "maximum": int(now) + MAX_SILENCE_SECONDS - 3600},
        "comment": {"anyOf": [{"type": "string", "maxLength": MAX_COMMENT}, {"type": "null"}]},
        "created_by": {"anyOf": [{"type": "string", "maxLength": 128}, {"type": "null"}]}}}


def query_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter as a client sends it: absent or a value, never null (an optional one's ``anyOf``
    with null is its first branch), and one choice (``Literal["live"]``, a JSON Schema ``const``) an enum."""
    branches = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
    if len(branches) == 1:
        schema = {**branches[0], **{k: v for k, v in schema.items() if k != "anyOf"}}
    if "const" in schema:
        schema = {**{k: v for k, v in schema.items() if k != "const"}, "enum": [schema["const"]]}
    return schema


def describe(app: FastAPI) -> None:
    """Complete ``app.openapi()`` (built once, on the first request for it)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:  # the silence window moves with the clock
            body = app.openapi_schema["paths"]["/v1/silences"]["post"]["requestBody"]
            body["content"]["application/json"]["schema"] = silence_body(time.time())
            return app.openapi_schema
        schema = generate()
        (records,), components = msgspec.json.schema_components(
            (list[Record],), ref_template="#/components/schemas/{name}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        bodies = {
            ("/v1/ingest", "post"): {"application/json": {"schema": records},
                                     "application/x-ndjson": {"schema": {"type": "string"}}},
            ("/v1/silences", "post"): {"application/json": {"schema": silence_body(time.time())}},
            ("/v1/alerts/{alert_id}/ack", "post"): {"application/json": {"schema": ACK_BODY}},
        }
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                body = bodies.get((path, method))
                if body is not None:
                    op["requestBody"] = {"required": (path, method) == ("/v1/silences", "post"), "content": body}
                for param in op.get("parameters", []):
                    if param["in"] == "query":
                        param["schema"] = query_schema(param["schema"])
                    rule = PARAMETERS.get((path, method, param["name"]))
                    if rule is not None:
                        param["schema"] = {**rule, **({"title": param["schema"]["title"]}
                                                      if "title" in param.get("schema", {}) else {})}
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
