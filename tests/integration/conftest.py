"""Fixtures the integration modules share."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.integration.alerting import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 (alerting.py); answers a test held are let go before it stops."""
    r = Receiver().start()
    yield r
    r.release()
    r.stop()
