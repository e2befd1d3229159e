"""`neurodissect toyworld train`: train the toy models by their default recipes and ship them.

Training is deterministic on one CPU but not across CPUs, so the project ships the weights
this command makes (`services.toyworld.shipped`) and every machine loads those. It trains
toynet, the tiny CLIP and the toy captioner, in that order (the captioner is built over
the toynet just shipped), each in a fresh temporary cache with the fixed training thread
count, and copies each file with its record (recipe key, sha256, metrics) into the
weights folder. Run it after changing a recipe or the training code, and commit the files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from services.toyworld.clip import ClipRecipe, toy_clip_key, train_toy_clip
from services.toyworld.model_cache import training_threads
from services.toyworld.shipped import WEIGHTS_DIR, ship
from services.toyworld.toynet import ToyNetRecipe, toynet_key, train_toynet


def train_toy_models(
    weights_dir: Path = WEIGHTS_DIR,
    models: tuple[str, ...] = ("toynet", "toy_clip", "toy_captioner"),
    say: Callable[[str], object] = print,
) -> list[Path]:
    """Train `models` (default all three) and ship them into `weights_dir`; their paths."""
    shipped: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="toy-training-") as tmp:
        scratch = Path(tmp)
        if "toynet" in models:
            metrics = _train_and_ship(
                "toynet", toynet_key(ToyNetRecipe()), lambda: train_toynet(ToyNetRecipe()),
                scratch, weights_dir, shipped,
            )
            say(f"toynet: held-out scene accuracy {metrics['accuracy']:.3f} -> {shipped[-1]}")
        if "toy_clip" in models:
            metrics = _train_and_ship(
                "toy_clip", toy_clip_key(ClipRecipe()), lambda: train_toy_clip(ClipRecipe()),
                scratch, weights_dir, shipped,
            )
            say(f"tiny CLIP: zero-shot {metrics['zero_shot']} -> {shipped[-1]}")
        if "toy_captioner" in models:
            shipped.append(_ship_toy_captioner(scratch, weights_dir, say))
    return shipped


def _train_and_ship(
    name: str,
    key: str,
    train: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    scratch: Path,
    weights_dir: Path,
    shipped: list[Path],
) -> dict[str, Any]:
    """Train with the fixed thread count, ship the state dict as `name`; the metrics."""
    with training_threads():
        state, metrics = train()
    torch.save(state, scratch / f"{name}.pt")
    shipped.append(ship(name, key, scratch / f"{name}.pt", metrics, weights_dir))
    return metrics


def _ship_toy_captioner(
    scratch: Path, weights_dir: Path, say: Callable[[str], object]
) -> Path:
    from services.captioner.toy_captioner import (
        SHIPPED_NAME,
        ToyRecipe,
        build_toy_captioner,
        cached_toy_captioner_metrics,
        toy_captioner_key,
    )

    path = build_toy_captioner(scratch / "cache", show_progress=True)
    metrics = cached_toy_captioner_metrics(path)
    target = ship(SHIPPED_NAME, toy_captioner_key(ToyRecipe()), path, metrics, weights_dir)
    pmi = metrics["held_out"]["pmi"]["concept_accuracy"]
    say(f"toy captioner: held-out concept accuracy {pmi:.3f} (PMI) -> {target}")
    return target
