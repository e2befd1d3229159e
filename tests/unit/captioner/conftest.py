"""Fixtures shared by the captioner tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from services.captioner.vocabulary import Vocabulary


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one thread: these models are tiny and thread hand-offs would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vocabulary() -> Vocabulary:
    return Vocabulary.build(
        ["a red circle", "a blue square", "the green star .", "stripes and dots, red"]
    )
