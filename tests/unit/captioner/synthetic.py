"""Synthetic models and MILANNOTATIONS data with known answers for the captioner tests."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from services.captioner.decoder import CaptionDecoder
from services.captioner.encoder import BackboneDescription, MaskedPoolingEncoder
from services.captioner.language_model import LanguageModel
from services.captioner.vocabulary import Vocabulary

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TEMPLATES = ("{} things", "the colour {}", "{} regions")


class TinyNet(nn.Module):
    """A toynet-like CNN with named stages conv1, layer1, layer2 (8, 16, 16 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


TINY_STAGES = ("conv1", "layer1", "layer2")


def tiny_encoder(seed: int = 0) -> MaskedPoolingEncoder:
    torch.manual_seed(seed)
    return MaskedPoolingEncoder(TinyNet(), BackboneDescription("custom", "tinynet", TINY_STAGES))


def small_models(
    vocabulary: Vocabulary, feature_dim: int = 24, seed: int = 0, stop_bias: float = -3.0
) -> tuple[CaptionDecoder, LanguageModel]:
    """Random small decoder and LM; a negative stop bias makes captions a few words long."""
    torch.manual_seed(seed)
    decoder = CaptionDecoder(
        vocabulary, feature_dim, embedding_dim=16, hidden_dim=32, attention_dim=16
    )
    language_model = LanguageModel(vocabulary, embedding_dim=16, hidden_dim=32)
    with torch.no_grad():
        decoder.output.bias[vocabulary.stop] += stop_bias
    return decoder.eval(), language_model.eval()


def write_milannotations(
    root: Path,
    layers: dict[str, int],
    k: int,
    size: int,
    descriptions: dict[tuple[str, int], Sequence[str]],
    unit_colours: dict[tuple[str, int], str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a MILANNOTATIONS directory in the layout `milannotations.py` documents.

    Exemplar images are noise, or a unit's colour plus noise when `unit_colours`
    names it; each mask covers a random rectangle.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for layer, n_units in layers.items():
        folder = root / layer
        folder.mkdir()
        images = rng.integers(0, 40, size=(n_units, k, 3, size, size)).astype(np.uint8)
        masks = np.zeros((n_units, k, 1, size, size), dtype=np.uint8)
        for unit in range(n_units):
            colour = (unit_colours or {}).get((layer, unit))
            if colour is not None:
                images[unit] += np.array(COLOURS[colour], dtype=np.uint8)[None, :, None, None]
            for i in range(k):
                y, x = rng.integers(0, size // 2, size=2)
                masks[unit, i, 0, y : y + size // 2, x : x + size // 2] = 1
        np.save(folder / "images.npy", images)
        np.save(folder / "masks.npy", masks)
        ids = rng.integers(0, 1000, size=(n_units, k))
        np.savetxt(folder / "ids.csv", ids, delimiter=",", fmt="%d")
        np.savetxt(folder / "activations.csv", rng.random((n_units, k)), delimiter=",")
    with (root / "annotations.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "unit", "summary"])
        for (layer, unit), texts in descriptions.items():
            writer.writerows([layer, unit, text] for text in texts)
    return root


def colour_world(root: Path, units_per_colour: int = 6, k: int = 4, size: int = 16) -> Path:
    """A learnable dataset: each unit's exemplars are one colour, described by that colour."""
    n_units = units_per_colour * len(COLOURS)
    colours = {("layer1", u): list(COLOURS)[u % len(COLOURS)] for u in range(n_units)}
    descriptions = {key: [t.format(c) for t in TEMPLATES] for key, c in colours.items()}
    return write_milannotations(root, {"layer1": n_units}, k, size, descriptions, colours)
