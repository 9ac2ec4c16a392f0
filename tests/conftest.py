"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a shared 2-vCPU machine every OpenMP
    region waits for a descheduled thread (docs/kernel_notes.md, "Demo model, continuous batching
    vs one sequence at a time"): modules that run many tiny matmuls opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
