from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import default_bpe
from PIL import Image

from services.toyworld import clip
from services.toyworld.clip import (
    CONTEXT_LENGTH,
    ClipRecipe,
    build_toy_clip,
    clip_normalize,
    load_toy_clip,
    multi_positive_loss,
    toy_clip_key,
    toy_clip_metrics,
    toy_clip_preprocess,
    toy_clip_tokenizer,
    zero_shot_accuracy,
)
from services.toyworld.raster import render_images

REPO_CACHE = Path(__file__).resolve().parents[3] / "var" / "cache"
TINY = ClipRecipe(n_images=32, eval_images=16, steps=2, batch_size=8, widths=(4, 4, 4, 4))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tokenizer_and_model_need_no_download(no_network: None) -> None:
    bpe = Path(default_bpe())
    assert bpe.is_file() and bpe.parent == Path(open_clip.__file__).parent
    tokens = toy_clip_tokenizer()(["a red circle", "stripes"])
    assert tokens.shape == (2, CONTEXT_LENGTH) and tokens.dtype == torch.long
    model = build_toy_clip(ClipRecipe())
    image = model.encode_image(torch.zeros(2, 3, 64, 64))
    text = model.encode_text(tokens)
    assert image.shape == text.shape == (2, ClipRecipe().embed_dim)


def test_preprocess_matches_training_normalisation() -> None:
    images, _ = render_images(seed=1, n_images=2, size=64)
    expected = clip_normalize(images)
    preprocess = toy_clip_preprocess(64)
    for image, want in zip(images, expected, strict=True):
        assert torch.allclose(preprocess(Image.fromarray(image)), want, atol=1e-5)


def test_multi_positive_loss_reduces_to_clip_loss_with_one_positive_each() -> None:
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    clip_loss = (
        F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    ) / 2
    assert torch.allclose(multi_positive_loss(logits, torch.eye(5, dtype=torch.bool)), clip_loss)


def test_multi_positive_loss_prefers_all_positives_high() -> None:
    truth = torch.tensor([[True, True, False], [False, True, True]])
    aligned = torch.where(truth, 5.0, -5.0)
    one_positive = torch.tensor([[5.0, -5.0, -5.0], [-5.0, -5.0, 5.0]])
    assert multi_positive_loss(aligned, truth) < multi_positive_loss(one_positive, truth)


def test_training_is_cached_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, preprocess, tokenizer = load_toy_clip(tmp_path, TINY)
    assert not model.training
    path = clip.toy_clip_path(tmp_path, TINY)
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    def fail(_recipe: ClipRecipe) -> Any:
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(clip, "train_toy_clip", fail)
    again, _, _ = load_toy_clip(tmp_path, TINY)
    image = preprocess(Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))).unsqueeze(0)
    assert torch.equal(again.encode_image(image), model.encode_image(image))
    assert set(toy_clip_metrics(tmp_path, TINY)["zero_shot"]) == {
        "color", "shape", "pattern_color", "shape_color"
    }
    assert tokenizer.context_length == CONTEXT_LENGTH


def test_key_changes_with_the_recipe() -> None:
    assert toy_clip_key(TINY) == toy_clip_key(ClipRecipe(**vars(TINY)))
    assert toy_clip_key(TINY) != toy_clip_key(ClipRecipe(**{**vars(TINY), "steps": 3}))


@pytest.mark.slow
def test_default_tiny_clip_reaches_zero_shot_aims() -> None:
    # The repository's cache, which the services use too: trained once per checkout.
    metrics = toy_clip_metrics(REPO_CACHE)
    assert metrics["zero_shot"]["color"] >= 0.8
    assert metrics["zero_shot"]["shape"] >= 0.6
    assert metrics["zero_shot"]["pattern_color"] >= 0.8
    model, _, tokenizer = load_toy_clip(REPO_CACHE)
    # Held-out images the training never saw, and a second check that the reload is faithful.
    fresh = zero_shot_accuracy(model, tokenizer, seed=99, n_images=400, image_size=64)
    assert fresh["color"] >= 0.8 and fresh["shape"] >= 0.55
    assert fresh["pattern_color"] >= 0.8
