"""The tiny CLIP: an open_clip `CLIP` trained contrastively on toy-world text, on the CPU.

Text: open_clip's own transformer text tower from a small config (width 64, 2 layers,
context 32) and its `SimpleTokenizer`, whose BPE file ships inside the open_clip package.
Image: a small conv tower (`ConvTower`) in place of open_clip's ViT/ResNet towers: four
conv stages with max pooling, then global mean and max pooling and a projection. Global
max pooling is what makes shapes learnable in minutes on two cores; open_clip's own ViT
and ModifiedResNet towers of similar cost stayed near chance on shape words.

Training texts per batch: every concept name true of its images (background colour,
texture, scene, shape kinds: the raw strings CLIP-Dissect embeds) and one descriptive
phrase per image ("a red circle", "white dots", the caption, ...), with a multi-positive
InfoNCE loss plus a sigmoid (SigLIP-style) presence loss on every image-text pair. The
softmax alone only ranks an image's texts: it learned secondary colours (a white or black
pattern beside the background) on one CPU and not on another from the same seed; the
per-pair presence term makes "is this text true of this image" an objective of its own.
The first `shape_steps` steps use shape names and the pattern colours (white, black)
only: background concepts are learned in a few dozen steps and, trained together from
the start, dominate the image embedding and slow shape learning several-fold; the
pattern colours, learned in the joint phase only, were learned (accuracy 0.96) or not
(0.51) depending on the CPU that trained them, and a phase of their own after the
shapes' made the tower forget the shapes.

Inputs: (N, 3, S, S) RGB normalised with OpenAI CLIP's mean and std (what `preprocess`
does to a PIL image). A bare colour word names any colour the image shows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torch import nn

from services.common.keys import content_key
from services.toyworld.captions import colors_present, concept_names, phrases
from services.toyworld.generator import FORMAT_VERSION
from services.toyworld.layout import sample_spec
from services.toyworld.model_cache import StateDict, trained_weights, weights_path
from services.toyworld.raster import render_images
from services.toyworld.world import WORLD

TRAINING_VERSION = 6  # bump when the training code changes what it produces
CONTEXT_LENGTH = 32
VOCAB_SIZE = 49408  # SimpleTokenizer's vocabulary
MAX_LOGIT_SCALE = 100.0
INIT_LOGIT_BIAS = -5.0  # the presence loss's bias: most image-text pairs are negatives

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class ClipRecipe:
    """Everything that determines the tiny CLIP's weights."""

    image_size: int = 64
    n_images: int = 6000
    data_seed: int = 21
    eval_images: int = 600
    eval_seed: int = 22
    widths: tuple[int, int, int, int] = (16, 32, 64, 64)
    embed_dim: int = 64
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 2
    steps: int = 800
    shape_steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    seed: int = 0


class ConvTower(nn.Module):
    """(N, 3, S, S) CLIP-normalised images -> (N, embed_dim) image features."""

    def __init__(self, widths: tuple[int, int, int, int], embed_dim: int, image_size: int) -> None:
        super().__init__()
        self.image_size = (image_size, image_size)  # read by open_clip helpers
        w0, w1, w2, w3 = widths
        self.stages = nn.Sequential(
            *_conv(3, w0), nn.MaxPool2d(2),
            *_conv(w0, w1), nn.MaxPool2d(2),
            *_conv(w1, w2), nn.MaxPool2d(2),
            *_conv(w2, w3),
        )  # fmt: skip
        self.proj = nn.Linear(2 * w3, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, embed_dim)."""
        f = self.stages(x)
        return self.proj(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def text_config(recipe: ClipRecipe) -> dict[str, Any]:
    """open_clip `CLIPTextCfg` fields of the tiny CLIP's text tower."""
    return {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": VOCAB_SIZE,
        "width": recipe.text_width,
        "heads": recipe.text_heads,
        "layers": recipe.text_layers,
        "mlp_ratio": 2.0,
    }


def build_toy_clip(recipe: ClipRecipe) -> open_clip.CLIP:
    """An untrained tiny CLIP for `recipe`."""
    # open_clip always builds a vision tower from its config: a one-patch, one-layer ViT
    # stands in until ConvTower replaces it.
    placeholder = {"image_size": recipe.image_size, "patch_size": recipe.image_size}
    placeholder |= {"layers": 1, "width": 8, "head_width": 8}
    model = open_clip.CLIP(
        embed_dim=recipe.embed_dim,
        vision_cfg=placeholder,
        text_cfg=text_config(recipe),
        init_logit_bias=INIT_LOGIT_BIAS,
    )
    model.visual = ConvTower(recipe.widths, recipe.embed_dim, recipe.image_size)
    return model


def toy_clip_tokenizer() -> SimpleTokenizer:
    """open_clip's BPE tokenizer (bundled vocabulary file) at the tiny CLIP's context length."""
    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def toy_clip_preprocess(image_size: int = 64) -> Preprocess:
    """PIL image -> (3, S, S) float32: resize, centre crop, OpenAI CLIP normalisation."""
    return open_clip.image_transform(image_size, is_train=False)


def clip_normalize(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 at the model's size -> (N, 3, S, S) float32, as `preprocess` does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def toy_clip_key(recipe: ClipRecipe) -> str:
    """The content key of the weights `recipe` produces."""
    with torch.device("meta"):  # the architecture's repr, without drawing random weights
        arch = repr(build_toy_clip(recipe))
    return content_key("toy_clip", arch, asdict(recipe), FORMAT_VERSION, TRAINING_VERSION)


def toy_clip_path(cache_dir: Path | None = None, recipe: ClipRecipe | None = None) -> Path:
    """Where the state dict for `recipe` lies: shipped, else in the cache (maybe not yet)."""
    return weights_path("toy_clip", toy_clip_key(recipe or ClipRecipe()), cache_dir)


def load_toy_clip(
    cache_dir: Path | None = None, recipe: ClipRecipe | None = None
) -> tuple[open_clip.CLIP, Preprocess, SimpleTokenizer]:
    """The trained tiny CLIP (eval mode), its preprocess and tokenizer; trains if not at hand."""
    recipe = recipe or ClipRecipe()
    state, _ = trained_weights(
        "toy_clip", toy_clip_key(recipe), lambda: train_toy_clip(recipe), cache_dir
    )
    model = build_toy_clip(recipe)
    model.load_state_dict(state)
    return model.eval(), toy_clip_preprocess(recipe.image_size), toy_clip_tokenizer()


def toy_clip_metrics(
    cache_dir: Path | None = None, recipe: ClipRecipe | None = None
) -> dict[str, Any]:
    """What training reported (zero-shot accuracies, seconds); trains if not at hand."""
    recipe = recipe or ClipRecipe()
    _, metrics = trained_weights(
        "toy_clip", toy_clip_key(recipe), lambda: train_toy_clip(recipe), cache_dir
    )
    return metrics


def train_toy_clip(recipe: ClipRecipe) -> tuple[StateDict, dict[str, Any]]:
    """Train from scratch; return the state dict and metrics (zero-shot accuracies, seconds)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(recipe.seed)
    images, specs = render_images(recipe.data_seed, recipe.n_images, recipe.image_size)
    x = clip_normalize(images)
    names = [concept_names(spec) for spec in specs]
    descriptions = [phrases(spec) for spec in specs]
    true_sets = [set(n) | set(d) for n, d in zip(names, descriptions, strict=True)]
    tokens = _TokenCache(toy_clip_tokenizer())
    model = build_toy_clip(recipe)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1
    )
    draw = torch.Generator().manual_seed(recipe.seed)
    pick = random.Random(recipe.seed)
    pattern_colors = set(WORLD.pattern_colors)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(recipe.steps):
        batch = torch.randint(recipe.n_images, (recipe.batch_size,), generator=draw).tolist()
        if step < recipe.shape_steps:
            shown = {c for i in batch for c in colors_present(specs[i])} & pattern_colors
            texts = sorted({s.kind for i in batch for s in specs[i].shapes} | shown)
        else:  # every concept name of the batch's images and one phrase per image
            texts = sorted({t for i in batch for t in (*names[i], pick.choice(descriptions[i]))})
        truth = torch.tensor([[t in true_sets[i] for t in texts] for i in batch])
        image_features = F.normalize(model.encode_image(x[batch]), dim=-1)
        text_features = F.normalize(model.encode_text(tokens(texts)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = multi_positive_loss(logits, truth) + presence_loss(
            logits + model.logit_bias, truth
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, float(np.log(MAX_LOGIT_SCALE)))
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    model.eval()
    accuracy = zero_shot_accuracy(
        model, toy_clip_tokenizer(), recipe.eval_seed, recipe.eval_images, recipe.image_size
    )
    metrics = {
        "zero_shot": accuracy,
        "chance": {
            "color": color_chance(recipe.eval_seed, recipe.eval_images),
            "shape": 1 / len(WORLD.shapes),
        },
        "train_seconds": round(train_seconds, 3),
        "train_cpu_seconds": round(cpu_seconds, 3),
        "final_loss": loss.item(),
        "recipe": asdict(recipe),
    }
    return model.state_dict(), metrics


def multi_positive_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every text true of an image is a positive.

    logits: (B, T) float32 image-text logits; truth: (B, T) bool, at least one True per
    row and per column. Each direction's target spreads evenly over the positives.
    """
    target = truth.float()
    per_image = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    per_text = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (per_image + per_text) / 2


def presence_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every image-text pair: (B, T) logits and (B, T) bool."""
    return F.binary_cross_entropy_with_logits(logits, truth.float())


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP, tokenizer: SimpleTokenizer, seed: int, n_images: int, image_size: int
) -> dict[str, float]:
    """Zero-shot top-1 accuracy on images 0..n_images-1 of dataset `seed`.

    `color`: the top colour word among the 8 is a colour the image shows, all images
    (aim ≥ 0.8; chance `color_chance`).
    `shape`: the shape among the 6 bare shape words, images holding one shape (aim ≥ 0.6).
    `pattern_color`: `white` or `black`, whichever scores higher, is the pattern's colour,
    patterned images showing only one of the two (aim ≥ 0.8; chance 0.5): pattern
    colours cover a third of such images, the units that detect them most.
    `shape_color`: that shape's colour among "a {colour} shape"; not an aim, it measures
    colour-to-shape binding, which the default recipe learns only partly.
    """
    images, specs = render_images(seed, n_images, image_size)
    features = F.normalize(model.encode_image(clip_normalize(images)), dim=-1)

    def predict(rows: list[int], texts: list[str]) -> np.ndarray:
        text_features = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        return (features[rows] @ text_features.T).argmax(dim=1).numpy()

    every = list(range(n_images))
    single = [i for i, spec in enumerate(specs) if len(spec.shapes) == 1]
    colors = list(WORLD.color_names)
    present = [{colors.index(c) for c in colors_present(specs[i])} for i in every]
    shape = np.array([WORLD.shapes.index(specs[i].shapes[0].kind) for i in single])
    shape_color = np.array([colors.index(specs[i].shapes[0].color) for i in single])
    pattern_colors = list(WORLD.pattern_colors)
    pattern_indices = {colors.index(c) for c in pattern_colors}
    patterned = [
        i for i in every
        if specs[i].texture.kind != "plain" and len(pattern_indices & present[i]) == 1
    ]
    pattern_color = np.array([pattern_colors.index(specs[i].pattern_color) for i in patterned])
    return {
        "color": float(
            np.mean([p in s for p, s in zip(predict(every, colors), present, strict=True)])
        ),
        "shape": float((predict(single, list(WORLD.shapes)) == shape).mean()),
        "pattern_color": float((predict(patterned, pattern_colors) == pattern_color).mean()),
        "shape_color": float(
            (predict(single, [f"a {c} shape" for c in colors]) == shape_color).mean()
        ),
    }


def color_chance(seed: int, n_images: int) -> float:
    """The `color` accuracy of a uniform guess: mean fraction of the 8 colours an image shows."""
    specs = (sample_spec(seed, i) for i in range(n_images))  # no need to draw the images
    return float(np.mean([len(colors_present(s)) / len(WORLD.colors) for s in specs]))


class _TokenCache:
    """Tokenizes each distinct phrase once: list of T phrases -> (T, context) int64."""

    def __init__(self, tokenizer: SimpleTokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.tokenizer(missing), strict=True))
        return torch.stack([self.cache[t] for t in texts])
