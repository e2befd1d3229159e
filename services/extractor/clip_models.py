"""CLIP encoders for image and text embeddings: open_clip architectures or the toy world's.

A CLIP model is named by an open_clip architecture plus a local checkpoint, loaded with
`open_clip.create_model_and_transforms(arch, pretrained=<local file>)` (weights-only
unpickling), or by `toy` for the toy world's tiny CLIP (shipped with the toy world).
Images go through the CLIP model's own preprocessing; texts are embedded raw, with no
prompt template. Every embedding is L2-normalised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from services.common import keys
from services.common.clip_checkpoint import check_arch
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.settings import Settings
from services.extractor.local_paths import local_path
from services.extractor.models import load_weights, weights_digest
from services.toyworld.clip import (
    ClipRecipe,
    build_toy_clip,
    load_toy_clip,
    toy_clip_key,
    toy_clip_preprocess,
    toy_clip_tokenizer,
)

TEXT_BATCH = 256


@dataclass
class ClipEncoder:
    """A loaded CLIP model with its image preprocessing and tokenizer."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]  # RGB image -> (3, s, s) float32
    tokenizer: Callable[[list[str]], torch.Tensor]  # C texts -> (C, L) int64 tokens
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to(self, device: torch.device) -> ClipEncoder:
        """Move the model to `device`."""
        self.model.to(device)
        self.device = device
        return self

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, s, s) preprocessed images -> (B, D) float32, L2-normalised."""
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device))  # type: ignore[operator]
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """C raw strings -> (C, D) float32, L2-normalised, in batches of TEXT_BATCH."""
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), TEXT_BATCH):
                tokens = self.tokenizer(texts[start : start + TEXT_BATCH]).to(self.device)
                features = self.model.encode_text(tokens)  # type: ignore[operator]
                parts.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(parts).numpy()


@dataclass(frozen=True)
class ClipSource:
    """A resolved CLIP request: its content key and how to load it."""

    arch: str
    weights_uri: str
    key: str
    builder: Callable[[], ClipEncoder] = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        """`arch|weights_uri`, how ExtractProgress names this model's embeddings."""
        return f"{self.arch}|{self.weights_uri}"

    def load(self) -> ClipEncoder:
        """Build the encoder in eval mode on the CPU."""
        encoder = self.builder()
        encoder.model.eval()
        return encoder


def resolve_clip(arch: str, weights_uri: str, settings: Settings, field: str) -> ClipSource:
    """Check a CLIP request (`field` names it, e.g. `clip_models[0]`) and find its weights."""
    if arch == "toy":
        return _toy_clip(weights_uri, settings, field)
    import open_clip

    if not arch:
        raise InvalidArgument("an open_clip architecture name, or 'toy'", field=f"{field}.arch")
    check_arch(arch, field)
    if not weights_uri:
        raise FailedPrecondition(
            f"open_clip {arch} needs a local checkpoint in {field}.weights_uri "
            "(downloads are disabled)",
            field=f"{field}.weights_uri",
        )
    path = local_path(weights_uri, f"{field}.weights_uri", settings)
    identity = keys.content_key("open_clip", arch, weights_digest(path))

    def build() -> ClipEncoder:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path))
        except RuntimeError as exc:
            raise InvalidArgument(
                f"{path.name} is not an open_clip {arch} checkpoint: {str(exc)[:400]}",
                field=f"{field}.weights_uri",
            ) from None
        try:
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception as exc:
            raise FailedPrecondition(
                f"the tokenizer of {arch} is not available offline: {exc}",
                field=f"{field}.arch",
            ) from None
        transform = cast(Callable[[Image.Image], torch.Tensor], preprocess)
        return ClipEncoder(model, transform, tokenizer)

    return ClipSource(arch, weights_uri, identity, build)


def _toy_clip(weights_uri: str, settings: Settings, field: str) -> ClipSource:
    """The toy world's tiny CLIP: the shipped weights, or a local file."""
    path = local_path(weights_uri, f"{field}.weights_uri", settings) if weights_uri else None
    recipe = ClipRecipe()
    cache_dir = Path(settings.cache_dir)
    trained = toy_clip_key(recipe) if path is None else weights_digest(path)

    def build() -> ClipEncoder:
        if path is None:
            model, preprocess, tokenizer = load_toy_clip(cache_dir, recipe)
            return ClipEncoder(model, preprocess, tokenizer)
        model = build_toy_clip(recipe)
        load_weights(model, path, "the toy CLIP", f"{field}.weights_uri")
        return ClipEncoder(model, toy_clip_preprocess(recipe.image_size), toy_clip_tokenizer())

    return ClipSource("toy", weights_uri, keys.content_key("toy-clip", trained), build)
