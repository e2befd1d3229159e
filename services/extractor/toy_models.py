"""PROVISIONAL: adapter to the toy world's models (toynet, planted, tiny CLIP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

TOY_MODELS = ("toynet", "planted")
INPUT_SIZE = 64


def identity(name: str) -> str:
    """Content identity of a toy model trained/built by the toy world."""
    raise NotImplementedError


def architecture(name: str) -> nn.Module:
    """The toy model's architecture, untrained."""
    raise NotImplementedError


def load(name: str, cache_dir: Path) -> nn.Module:
    """The toy model, trained on demand and cached."""
    raise NotImplementedError


def clip_identity() -> str:
    """Content identity of the toy CLIP."""
    raise NotImplementedError


def load_clip(
    cache_dir: Path, weights: Path | None
) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor], Callable[[list[str]], torch.Tensor]]:
    """The tiny CLIP model, its image preprocessing and tokenizer."""
    raise NotImplementedError
