"""``POST /v1/ingest``: a batch of records (JSON array or NDJSON, maybe gzip) -> counts and a reason per
rejected record. The body is read here against ``limits.max_body_bytes``; the Service screens, decodes and
takes it (docs/record.md)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from ..ingest import Decoded
from ..service import Service
from .answers import JSON

INLINE_DECODE_BYTES = 1 << 20  # larger bodies (and every gzip body) are decoded off the event loop


def router(service: Service) -> APIRouter:
    api = APIRouter()
    decoding = asyncio.Lock()

    @api.post("/v1/ingest")
    async def ingest(request: Request) -> Response:
        limit = service.settings.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            answer = service.refuse(413, f"body of {declared} bytes is over the limit of {limit} bytes "
                                         "(limits.max_body_bytes): send smaller batches")
            return JSON(answer.body, answer.status)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    answer = service.refuse(413, f"body is over the limit of {limit} bytes "
                                                 "(limits.max_body_bytes): send smaller batches")
                    return JSON(answer.body, answer.status)
                chunks.append(chunk)
        except ClientDisconnect:  # the client went away mid-body (or the body timeout closed it): no answer
            return Response(status_code=400)
        headers = request.headers
        batch_id = headers.get("x-trainhealth-batch")
        launch = headers.get("x-trainhealth-launch")
        early = service.screen(batch_id, launch)
        if early is not None:
            return JSON(early.body, early.status)
        body, encoding = b"".join(chunks), headers.get("content-encoding")
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
