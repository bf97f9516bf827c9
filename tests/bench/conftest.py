"""What every benchmark-harness test shares."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def keep_threads():
    """The bench sets one CPU thread for stable medians; the rest of the suite gets its count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
