"""One batch, one pass (docs/code-structure.md): every refusal on a batch's way (the decoder's, a record
from the future, a run name another job owns, a cap) joins one list of rejections, answered in the order of
the body with each record's own index, and the decoded batch handed to the Service is not edited."""

from __future__ import annotations

import json

from trainhealth.config import Settings
from trainhealth.ingest import Decoded
from trainhealth.service import Service

T0 = 1_000_000.0
A0 = "id=aaaa0; pid=100; host=node-a; job=node-a/127.0.0.1:29500"
B0 = "id=bbbb0; pid=200; host=node-a; job=node-a/127.0.0.1:29511"


def test_every_refusal_of_a_batch_is_answered_once_in_body_order_and_the_decoded_batch_is_left_as_it_was():
    settings = Settings()
    settings.limits.max_ranks_per_run = 1
    service = Service(settings, clock=lambda: T0)
    owned = [{"run": "taken", "rank": 0, "time": T0 - 1, "step": 1, "loss": 1.0}]
    assert service.ingest(json.dumps(owned).encode(), "application/json", launch=A0).status == 200
    batch = [
        {"run": "taken", "rank": 0, "time": T0, "step": 2, "loss": 1.0},  # another job's run name
        {"run": "ok", "rank": 0, "time": T0, "step": "x"},  # the decoder's
        {"run": "ok", "rank": 0, "time": T0, "step": 1, "loss": 1.0},  # the one taken
        {"run": "ok", "rank": 1, "time": T0 + 1e6, "step": 1, "loss": 1.0},  # from the future
        {"run": "taken", "rank": 1, "time": T0, "step": 2, "loss": 1.0},
        {"run": "ok", "rank": 2, "time": T0, "step": 1, "loss": 1.0},  # past limits.max_ranks_per_run
    ]
    decoded = service.decode(json.dumps(batch).encode(), "application/json")
    assert isinstance(decoded, Decoded)
    records, indexes, rejected = list(decoded.records), list(decoded.indexes), list(decoded.rejected)
    answer = service.take(decoded, launch=B0)
    assert (answer.status, answer.body["accepted"], answer.body["rejected"]) == (200, 1, 5)
    assert [(e["index"], e["field"]) for e in answer.body["errors"]] == [
        (0, "run"), (1, "step"), (3, "time"), (4, "run"), (5, "rank")]
    errors = answer.body["errors"]
    assert errors[0]["reason"].startswith("run taken is taken by another job") and errors[0] == {**errors[3],
                                                                                               "index": 0}
    assert errors[2]["reason"].startswith(f"{T0 + 1e6!r} is 1000000 s ahead of this sidecar's clock")
    assert errors[4]["reason"] == ("run 'ok' already has 1 ranks (limits.max_ranks_per_run); "
                                   "rank 2 is refused")
    assert service.stats.rejected == {"invalid": 2, "run_name_taken": 2, "capped": 1}
    assert (decoded.records, decoded.indexes, decoded.rejected) == (records, indexes, rejected)
    assert list(service.pipeline.runs["ok"].ranks) == [0] and service.pipeline.runs["taken"].records == 1
