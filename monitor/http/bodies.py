"""Request bodies being received, all together, within ``limits.max_buffered_bytes`` (docs/operations.md,
"Bounds").

Each body is capped (``limits.max_body_bytes``, 16 MiB), but a body is held whole until it is decoded and
taken, so N connections sending at once could hold N times the cap: 4,096 connections, 64 GiB. The budget
counts the bytes actually held (not what ``Content-Length`` promises: a request that promises 16 MiB and
sends nothing must not lock others out) from the first chunk until the request is answered. A chunk that
does not fit, or a declared length that cannot fit now, is a 503 with ``Retry-After``: the sender's body is
not kept (uvicorn reads and drops the rest of it), the bodies already in progress finish, and the client
retries after the wait (trainer/transport.py). Everything runs on the event loop: no lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from ..config import Settings

RETRY_AFTER_SECONDS = 1  # bodies in progress finish in milliseconds, or are closed at server.body_timeout_seconds
BUDGET_BODIES = 16  # the default budget: this many bodies at the per-body cap (fewer with fewer connections)


def default_budget(max_body_bytes: int, max_connections: int) -> int:
    """``limits.max_buffered_bytes`` when it is not set: 16 bodies at the cap (256 MiB by default), or one per
    connection when fewer connections are allowed."""
    return min(BUDGET_BODIES, max_connections) * max_body_bytes


def budget_of(settings: Settings) -> BodyBudget:
    """The budget of ``limits.max_buffered_bytes``, or the default one."""
    limits = settings.limits
    return BodyBudget(limits.max_buffered_bytes or default_budget(limits.max_body_bytes,
                                                                  settings.server.max_connections))


class BodyBudget:
    """The bytes of request bodies held now, by every request together, and how many bodies it refused
    (/metrics: ``trainhealth_request_bodies_held_bytes``, ``trainhealth_request_bodies_refused_total``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0

    def fits(self, size: int) -> bool:
        return self.held + size <= self.limit

    def refuse(self, what: str) -> Busy:
        """The 503 for a body that does not fit now, counted."""
        self.refused += 1
        return Busy(f"{what}: the bodies being received hold {self.held} bytes of the {self.limit} allowed "
                    f"(limits.max_buffered_bytes): retry after {RETRY_AFTER_SECONDS} s")


class TooBig(Exception):
    """The body is over its own cap (413)."""


class Busy(Exception):
    """The budget has no room for the body now (503, Retry-After)."""


class Receiving:
    """One request's body, counted in the budget (when there is one) from its first chunk until ``close``."""

    def __init__(self, budget: BodyBudget | None) -> None:
        self.budget = budget
        self.counted = 0

    async def read(self, request: Request, limit: int) -> bytes:
        """The whole body. Raises TooBig over ``limit``, Busy when the budget has no room, ClientDisconnect."""
        budget = self.budget
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                raise TooBig(f"body of {declared} bytes is over the limit of {limit} bytes")
            if budget is not None and not budget.fits(int(declared)):
                raise budget.refuse(f"a body of {declared} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooBig(f"body is over the limit of {limit} bytes")
            if budget is not None:
                if not budget.fits(len(chunk)):
                    raise budget.refuse(f"a body past {size - len(chunk)} bytes")
                budget.held += len(chunk)
                self.counted += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)  # the chunks go with this frame: one copy held, and counted, until close()

    def close(self) -> None:
        """The request is answered: its body no longer counts."""
        if self.budget is not None:
            self.budget.held -= self.counted
        self.counted = 0
