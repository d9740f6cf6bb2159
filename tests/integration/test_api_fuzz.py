"""Fuzz the whole HTTP API of the real sidecar from the OpenAPI schema it serves (schemathesis).

Every operation gets valid and invalid paths, queries, headers and bodies (records from the msgspec
schema). No answer may be a 500, and every answer must match the schema: status codes, content
types, the ``{"error": ...}`` body. Bounded: EXAMPLES per operation and mode, about a minute in all.
(schemathesis' pytest loader does not run under pytest 9, so the operations are driven here.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from tests.conftest import Sidecar

pytestmark = pytest.mark.integration

EXAMPLES = 30
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]
# conformance: what the schema calls valid is taken, what it calls invalid is refused. Not for ingest (a
# batch is taken record by record: one bad record among good ones is a 200 naming it), and a silence is
# only held to the first: its `until` window moves with the clock, so its edges as the schema served
# them a minute ago are not the server's now.
CONFORMANCE = [checks.positive_data_acceptance, checks.negative_data_rejection]
CONFORMANCE_BY_OPERATION = {("POST", "/v1/ingest"): [], ("POST", "/v1/silences"): [checks.positive_data_acceptance]}


def test_no_input_gets_a_500_and_every_answer_matches_the_schema(tmp_path: Path) -> None:
    sidecar = Sidecar(["--db", str(tmp_path / "fuzz.db"), "--record", str(tmp_path / "recorded")], cwd=tmp_path)
    try:
        schema = schemathesis.openapi.from_url(f"{sidecar.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/ingest", "/v1/runs/{run}", "/v1/alerts", "/healthz"}
        tried = 0
        failures: list[str] = []
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                          derandomize=True, database=None)
                def call(case: schemathesis.Case) -> None:
                    path = case.operation.path
                    if path.endswith("/watch"):  # a long poll: at most a second here, not its default 30 s
                        case.query = {**(case.query or {}), "timeout": 1}
                    extra = CONFORMANCE_BY_OPERATION.get((case.method.upper(), path), CONFORMANCE)
                    case.call_and_validate(checks=CHECKS + extra)

                try:
                    call()
                except (AssertionError, checks.FailureGroup) as exc:
                    failures.append(f"{op.method.upper()} {op.path} {mode}: {str(exc)[:600]}")
                except Unsatisfiable:  # nothing in it can be made invalid (GET /v1/runs; any string is a run)
                    assert mode == GenerationMode.NEGATIVE
                tried += 1
        assert not failures, "\n\n".join(failures)
        for path, item in schema.raw_schema["paths"].items():  # OPTIONS lists exactly the documented methods
            concrete = path.replace("{run}", "r1").replace("{alert_id}", "1").replace("{silence_id}", "1")
            answer = sidecar.client.options(concrete)
            documented = {m.upper() for m in item} | {"OPTIONS"}
            assert answer.status_code == 204 and set(answer.headers["allow"].split(", ")) == documented, (
                path, answer.status_code, answer.headers.get("allow"))
        assert tried == 2 * len(operations)
        assert sidecar.proc.poll() is None, "the sidecar died"
    finally:
        sidecar.stop()
