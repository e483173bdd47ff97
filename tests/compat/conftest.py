"""The private containerd every parity test diffs with (one per session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import services

from .containerd import Containerd, unavailable_reason


@pytest.fixture(scope="session")
def ctrd() -> Iterator[Containerd]:
    services.require(unavailable_reason() is None, str(unavailable_reason()))
    with Containerd() as c:
        yield c
