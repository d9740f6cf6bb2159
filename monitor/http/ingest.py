"""``POST /v1/ingest``: a batch of records (JSON array or NDJSON, maybe gzip) -> counts and a reason per
rejected record. The body is read here against ``limits.max_body_bytes`` and, with every other body being
received, ``limits.max_buffered_bytes`` (bodies.py); the Service screens, decodes and takes it
(docs/record.md)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from ..ingest import Decoded
from ..service import Service
from .answers import JSON
from .bodies import RETRY_AFTER_SECONDS, BodyBudget, Busy, Receiving, TooBig

INLINE_DECODE_BYTES = 1 << 20  # larger bodies (and every gzip body) are decoded off the event loop


def router(service: Service, budget: BodyBudget | None = None) -> APIRouter:
    """``budget``: the bodies of every route together (bodies.py); None: this route's cap alone."""
    api = APIRouter()
    decoding = asyncio.Lock()

    @api.post("/v1/ingest")
    async def ingest(request: Request) -> Response:
        body = Receiving(budget)
        try:
            return await answer(request, body)
        finally:
            body.close()  # answered: its bytes leave the budget

    async def answer(request: Request, receiving: Receiving) -> Response:
        limit = service.settings.limits.max_body_bytes
        try:
            body = await receiving.read(request, limit)
        except TooBig as exc:
            answer = service.refuse(413, f"{exc} (limits.max_body_bytes): send smaller batches")
            return JSON(answer.body, answer.status)
        except Busy as exc:
            answer = service.refuse(503, str(exc))
            return JSON(answer.body, answer.status, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except ClientDisconnect:  # the client went away mid-body (or the body timeout closed it): no answer
            return Response(status_code=400)
        headers = request.headers
        batch_id = headers.get("x-trainhealth-batch")
        launch = headers.get("x-trainhealth-launch")
        early = service.screen(batch_id, launch)
        if early is not None:
            return JSON(early.body, early.status)
        encoding = headers.get("content-encoding")
        async with decoding:  # one body decoded at a time: memory is one body's bound (docs/operations.md)
            if len(body) > INLINE_DECODE_BYTES or (encoding or "").strip().lower() == "gzip":
                decoded = await asyncio.to_thread(service.decode, body, headers.get("content-type"), encoding)
            else:
                decoded = service.decode(body, headers.get("content-type"), encoding)
        if not isinstance(decoded, Decoded):
            return JSON(decoded.body, decoded.status)
        answer = service.take(decoded, batch_id, headers.get("x-trainhealth-views") == "1", launch)
        return JSON(answer.body, answer.status)

    return api
