"""Shared fixtures: a small generated toy world and a one-layer model source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from services.extractor.models import ModelSource
from services.toyworld.generator import generate


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-image, 32 px toy world (Broden format)."""
    return generate(tmp_path_factory.mktemp("toy") / "world", 64, 32, seed=3)


def _one_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()).eval()


@pytest.fixture()
def conv_source() -> ModelSource:
    """A model whose layer `0` maps (B, 3, 32, 32) to (B, 4, 16, 16)."""
    return ModelSource("test", "one-conv", "one-conv", "imagenet", 32, _one_conv)
