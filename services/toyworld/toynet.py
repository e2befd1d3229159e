"""`toynet`: a small CNN trained on the toy world's scene labels (background × texture family).

Layers (for 64 px inputs): `conv1` (N, 16, 64, 64), `layer1` (N, 32, 32, 32),
`layer2` (N, 64, 16, 16), `layer3` (N, 64, 8, 8), each conv + batch norm + ReLU, then
global average pooling and `fc` (N, 18) scene logits. Inputs: (N, 3, S, S) float32 RGB with
ImageNet normalisation (`preprocessing.imagenet_normalize`).

Training is seeded and runs on the CPU; the default recipe's weights ship with the package
(`shipped`), other recipes' are cached under a content key of the recipe, the architecture
and the toy world's format version (`model_cache`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.common.keys import content_key
from services.toyworld.generator import FORMAT_VERSION
from services.toyworld.model_cache import StateDict, trained_weights, weights_path
from services.toyworld.preprocessing import imagenet_normalize
from services.toyworld.raster import render_images
from services.toyworld.world import WORLD

TRAINING_VERSION = 2  # bump when the training code changes what it produces
LAYERS = ("conv1", "layer1", "layer2", "layer3", "fc")


@dataclass(frozen=True)
class ToyNetRecipe:
    """Everything that determines toynet's weights: data, architecture widths, optimisation."""

    n_images: int = 2000
    image_size: int = 64
    data_seed: int = 1
    eval_images: int = 500
    eval_seed: int = 2
    widths: tuple[int, int, int, int] = (16, 32, 64, 64)
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


class ToyNet(nn.Module):
    """Four conv stages and a linear scene classifier."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 64)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.conv1 = _stage(3, w0, stride=1)
        self.layer1 = _stage(w0, w1, stride=2)
        self.layer2 = _stage(w1, w2, stride=2)
        self.layer3 = _stage(w2, w3, stride=2)
        self.fc = nn.Linear(w3, len(WORLD.scenes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) ImageNet-normalised -> (N, n_scenes) logits."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def toynet_key(recipe: ToyNetRecipe) -> str:
    """The content key of the weights `recipe` produces."""
    with torch.device("meta"):  # the architecture's repr, without drawing random weights
        arch = repr(ToyNet(recipe.widths))
    return content_key("toynet", arch, asdict(recipe), FORMAT_VERSION, TRAINING_VERSION)


def toynet_path(cache_dir: Path | None = None, recipe: ToyNetRecipe | None = None) -> Path:
    """Where the state dict for `recipe` lies: shipped, else in the cache (maybe not yet)."""
    return weights_path("toynet", toynet_key(recipe or ToyNetRecipe()), cache_dir)


def load_toynet(cache_dir: Path | None = None, recipe: ToyNetRecipe | None = None) -> ToyNet:
    """The trained toynet in eval mode: shipped, else cached, else trained first."""
    recipe = recipe or ToyNetRecipe()
    state, _ = trained_weights(
        "toynet", toynet_key(recipe), lambda: train_toynet(recipe), cache_dir
    )
    model = ToyNet(recipe.widths)
    model.load_state_dict(state)
    return model.eval()


def toynet_metrics(
    cache_dir: Path | None = None, recipe: ToyNetRecipe | None = None
) -> dict[str, Any]:
    """What training reported (held-out accuracy, chance, seconds); trains if not at hand."""
    recipe = recipe or ToyNetRecipe()
    _, metrics = trained_weights(
        "toynet", toynet_key(recipe), lambda: train_toynet(recipe), cache_dir
    )
    return metrics


def train_toynet(recipe: ToyNetRecipe) -> tuple[StateDict, dict[str, Any]]:
    """Train from scratch; return the state dict and metrics (accuracy, chance, seconds)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(recipe.seed)
    images, specs = render_images(recipe.data_seed, recipe.n_images, recipe.image_size)
    x = imagenet_normalize(images)
    y = torch.tensor([spec.scene for spec in specs])
    model = ToyNet(recipe.widths)
    steps_per_epoch = max(1, recipe.n_images // recipe.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    order = torch.Generator().manual_seed(recipe.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(recipe.epochs):
        perm = torch.randperm(recipe.n_images, generator=order)
        for step in range(steps_per_epoch):
            batch = perm[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    accuracy = scene_accuracy(model, recipe.eval_seed, recipe.eval_images, recipe.image_size)
    metrics = {
        "accuracy": accuracy,
        "chance": 1.0 / len(WORLD.scenes),
        "train_seconds": round(train_seconds, 3),
        "train_cpu_seconds": round(cpu_seconds, 3),
        "final_loss": loss.item(),
        "recipe": asdict(recipe),
    }
    return model.state_dict(), metrics


@torch.no_grad()
def scene_accuracy(model: nn.Module, seed: int, n_images: int, image_size: int) -> float:
    """Top-1 scene accuracy of `model` on images 0..n_images-1 of the dataset with `seed`."""
    images, specs = render_images(seed, n_images, image_size)
    was_training = model.training
    model.eval()
    predictions = model(imagenet_normalize(images)).argmax(dim=1)
    model.train(was_training)
    truth = torch.tensor([spec.scene for spec in specs])
    return float((predictions == truth).float().mean())
