"""Ablation scoring's inputs from the model and the probe set: the head and the classes.

A layer can be scored (specs/verification.md) when the model's logits are a linear
head of the layer's pooled (spatial mean) activations, as for torchvision ResNets
(`layer4` → `fc`) and toynet (`layer3` → `fc`). That is checked, not assumed: one
forward pass on two seeded random inputs must give logits equal to some `nn.Linear`
of the model applied to the layer's spatial mean. Its weight (K, U) and bias (K,)
are stored per (model, layer). Other layers get a note saying why they are not
scored; ViT token layers too (their head reads the class token of the final norm,
which the extractor does not store).

Classes of the probe images: a labels file (CSV `image_id,label`, image_id the probe
image index, label the class index) or, without one, the dataset's image-level class
category (`scene` for Broden and the toy world, whose scenes are numbered in the toy
model's class order; `class` for ImageFolder), classes ordered by label number.
Stored as (N,) int64, -1 where an image has none.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.probe_format import ConceptTable, read_label_chunk
from services.common.store import ObjectStore
from services.extractor.hooks import check_layers, layer_tap, prefix_tokens_of, unit_map
from services.extractor.models import ModelSource, fixed_input_size

LABELS_FIELD = "ablation.labels_uri"
CLASS_CATEGORIES = ("scene", "class")
MAX_LABELS_BYTES = 64 << 20


@dataclass
class HeadOutcome:
    """Per layer the stored head's key or a note saying why it is not scored."""

    head_keys: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    classes: int = 0


def find_heads(model: nn.Module, layers: list[str], size: int) -> tuple[dict[str, nn.Linear],
                                                                         dict[str, str]]:
    """Per layer the `nn.Linear` whose output on the pooled layer equals the logits, or a note."""
    check_layers(model, layers, type(model).__name__)
    prefix = prefix_tokens_of(model)
    pooled_of: dict[str, torch.Tensor | None] = {}
    tokens: set[str] = set()

    def record(layer: str, output: Any) -> None:
        # Pooled inside the hook, before a later in-place operation can change the output.
        if isinstance(output, torch.Tensor) and output.dim() == 3:
            tokens.add(layer)
        grid = unit_map(output, prefix)
        pooled_of[layer] = grid.float().mean(dim=(2, 3)) if grid is not None else None

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 3, size, size, generator=generator)
    with layer_tap(model, layers, record) as tap, torch.inference_mode():
        tap(inputs)
        logits = model(inputs)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    heads: dict[str, nn.Linear] = {}
    notes: dict[str, str] = {}
    for layer in layers:
        if layer in tokens:
            notes[layer] = ("not scored: a ViT's head reads the class token of its final norm, "
                            "which the extractor does not store")
            continue
        pooled = pooled_of.get(layer)
        head = None
        if pooled is not None and isinstance(logits, torch.Tensor) and logits.dim() == 2:
            with torch.inference_mode():
                head = next((
                    m for m in reversed(linears)
                    if m.in_features == pooled.shape[1] and m.out_features == logits.shape[1]
                    and torch.allclose(m(pooled), logits, rtol=1e-4, atol=1e-4)
                ), None)
        if head is None:
            notes[layer] = ("not scored: its pooled (spatial mean) activations do not feed the "
                            "classifier head directly")
        else:
            heads[layer] = head
    return heads, notes


def model_heads(
    store: ObjectStore, source: ModelSource, layers: list[str], input_size: int, image_size: int
) -> HeadOutcome:
    """Store the head of every layer that feeds it (weight (K, U), bias (K,) float32).

    The check runs at the extraction's input size: `input_size`, else the model's
    fixed size, else the probe images' `image_size`.
    """
    model = source.load()
    size = input_size or fixed_input_size(model) or image_size
    heads, notes = find_heads(model, layers, size)
    outcome = HeadOutcome(notes=notes)
    model_key = keys.content_key("head", source.identity)
    for layer, head in heads.items():
        key = keys.classifier_head(model_key, layer)
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features)
        store.put_arrays(key, {
            "weight": head.weight.detach().float().numpy(),
            "bias": bias.detach().float().numpy(),
        })
        outcome.head_keys[layer] = key
        outcome.classes = head.out_features
    return outcome


def dataset_classes(store: ObjectStore, table: ConceptTable) -> np.ndarray:
    """(N,) int64 class of each probe image from its image-level class label, -1 if none."""
    category = next((c for c in CLASS_CATEGORIES if c in table.categories), None)
    if category is None:
        raise FailedPrecondition(
            f"the probe dataset has no image class category ({', '.join(CLASS_CATEGORIES)}); "
            "give a labels file", field=LABELS_FIELD
        )
    numbers = sorted(c.number for c in table.labels if c.category == category)
    lookup = np.full(table.max_label() + 1, -1, dtype=np.int64)
    lookup[numbers] = np.arange(len(numbers))
    out = np.full(table.n_images, -1, dtype=np.int64)
    for i0, i1 in table.chunk_ranges():
        image = read_label_chunk(store, table.dataset_key, i0, i1).image  # (n, Q)
        classes = np.where(image > 0, lookup[np.clip(image, 0, len(lookup) - 1)], -1)
        out[i0:i1] = classes.max(axis=1, initial=-1)
    return out


def file_classes(path: Path, n_images: int) -> np.ndarray:
    """(N,) int64 classes from a CSV `image_id,label`; -1 for images it does not name."""
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise InvalidArgument(f"{path.name} is larger than {MAX_LABELS_BYTES} bytes",
                              LABELS_FIELD)
    out = np.full(n_images, -1, dtype=np.int64)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidArgument(f"{path.name} is not a UTF-8 CSV: {exc}", LABELS_FIELD) from None
    for line, row in enumerate(rows, start=2):
        try:
            image, label = int(row["image_id"]), int(row["label"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(
                f"{path.name} line {line}: want integer columns image_id,label", LABELS_FIELD
            ) from None
        if not 0 <= image < n_images or label < 0:
            raise InvalidArgument(
                f"{path.name} line {line}: image_id {image} is not a probe image "
                f"(0..{n_images - 1}) or label {label} is negative", LABELS_FIELD,
            )
        out[image] = label
    return out


def store_classes(
    store: ObjectStore, table: ConceptTable, labels_path: Path | None, classes: int
) -> str:
    """Store the probe images' classes; return the key. Labels beyond `classes` are refused."""
    if labels_path is None:
        labels = dataset_classes(store, table)
        labels_key = keys.content_key("own classes", CLASS_CATEGORIES)
    else:
        labels = file_classes(labels_path, table.n_images)
        labels_key = keys.content_key("labels file", keys.file_digest(str(labels_path)))
    if classes and labels.max(initial=-1) >= classes:
        raise FailedPrecondition(
            f"class {int(labels.max())} is beyond the head's {classes} classes", LABELS_FIELD
        )
    if (labels >= 0).sum() < 2:
        raise FailedPrecondition("fewer than two probe images have a class", LABELS_FIELD)
    key = keys.classes(table.dataset_key, labels_key)
    store.put_array(key, labels)
    return key
