"""Exactly-once effect over at-least-once delivery: the ids of the client batches already taken.

A client names each batch ``X-Trainhealth-Batch: CLIENT/SEQ`` (a random client id, a sequence number)
and resends a batch it got no answer for under the same id, with the same records. A request that
timed out at the client may still be read later (the sidecar was stopped, or slow): the resend is then
a duplicate, answered 200 with ``"duplicate": true`` and not ingested again.

A client has one batch in flight at a time and resends only its newest, so a short memory per client
is enough (the last ``per_client`` sequence numbers); clients beyond ``max_clients`` are forgotten
oldest first. The memory is the sidecar's own: after a restart a resend may be ingested twice.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque

HEADER = "x-trainhealth-batch"
_ID = re.compile(r"\A([A-Za-z0-9._-]{1,64})/([0-9]{1,19})\Z")
RULE = "must be CLIENT/SEQ (CLIENT: 1-64 characters of [A-Za-z0-9._-], SEQ: a whole number)"


class BatchIdError(ValueError):
    pass


def parse(value: str) -> tuple[str, int]:
    m = _ID.match(value)
    if m is None:
        raise BatchIdError(f"X-Trainhealth-Batch: {RULE}, got {value[:100]!r}")
    return m.group(1), int(m.group(2))


class TakenBatches:
    def __init__(self, per_client: int = 64, max_clients: int = 10_000) -> None:
        self.per_client = per_client
        self.max_clients = max_clients
        self._clients: OrderedDict[str, tuple[set[int], deque[int]]] = OrderedDict()
        self.duplicates = 0

    def taken(self, client: str, seq: int) -> bool:
        entry = self._clients.get(client)
        if entry is None or seq not in entry[0]:
            return False
        self.duplicates += 1
        return True

    def take(self, client: str, seq: int) -> None:
        entry = self._clients.get(client)
        if entry is None:
            if len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)
            entry = self._clients[client] = (set(), deque())
        else:
            self._clients.move_to_end(client)
        seqs, order = entry
        if seq in seqs:
            return
        seqs.add(seq)
        order.append(seq)
        if len(order) > self.per_client:
            seqs.discard(order.popleft())
