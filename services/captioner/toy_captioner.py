"""The toy world's captioner: its recipe, annotations, figures and (shipped) checkpoint.

`toy_captioner(cache_dir)` returns the checkpoint that ships with the toy world
(`services.toyworld.shipped`, trained by `neurodissect toyworld train`) when it was
made from the same annotations, backbone weights and recipe; otherwise it writes the
toy world's MILANNOTATIONS annotations (one concept-detector unit per colour, shape and
texture, for several seeded datasets) and trains the tiny captioner on them over the
trained toynet, cached under that content key, so a second call costs nothing. The
Caption RPC resolves checkpoint "toy" through it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.captioner.annotation_training import train_from_annotations
from services.common.atomic_file import atomic_write

if TYPE_CHECKING:
    from services.captioner.captioner import Captioner
    from services.captioner.milannotations import AnnotatedUnit, Milannotations
    from services.captioner.training import ModelDimensions, TrainingConfig

SHIPPED_NAME = "toy_captioner"

# Bump when the toy recipe's code changes what it produces.
TOY_VERSION = 1


@dataclass(frozen=True)
class ToyRecipe:
    """How the toy captioner is made (under a minute of training on 2 cores).

    The toy world writes one concept-detector unit per colour, shape and texture;
    its annotations for `annotation_seeds` differently seeded datasets, merged, give
    every concept many units, so that held-out units have concepts seen in training.
    """

    annotation_seeds: int = 32
    n_images: int = 400
    image_size: int = 64
    exemplars: int = 15
    embedding_dim: int = 64
    hidden_dim: int = 128
    attention_dim: int = 64
    dropout: float = 0.3
    max_epochs: int = 30
    patience: int = 4
    batch_size: int = 64
    learning_rate: float = 3e-3
    validation_fraction: float = 0.2
    seed: int = 0

    def annotation_params(self) -> dict[str, int]:
        """The fields that determine the annotations (not the training)."""
        return {
            "annotation_seeds": self.annotation_seeds,
            "n_images": self.n_images,
            "image_size": self.image_size,
            "exemplars": self.exemplars,
        }

    def dimensions(self) -> ModelDimensions:
        """The decoder's and language model's sizes."""
        from services.captioner.training import ModelDimensions

        return ModelDimensions(
            self.embedding_dim, self.hidden_dim, self.attention_dim, self.dropout
        )

    def config(self, show_progress: bool = False) -> TrainingConfig:
        """The optimisation and early-stopping settings."""
        from services.captioner.training import TrainingConfig

        return TrainingConfig(
            max_epochs=self.max_epochs,
            patience=self.patience,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            validation_fraction=self.validation_fraction,
            seed=self.seed,
            show_progress=show_progress,
        )


@dataclass(frozen=True)
class ConceptFigures:
    """How well captions name their units' known concepts."""

    units: int
    concept_accuracy: float  # fraction of captions holding a word for the unit's concept
    concept_words: float  # mean words per caption that name some toy concept
    other_words: float  # mean words per caption that name none (generic words)



def _read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))[1:]


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)



def toy_annotations(cache_dir: Path, recipe: ToyRecipe) -> Path:
    """The toy world's annotations for `recipe.annotation_seeds` datasets, merged and cached.

    Layer `L` of the dataset with seed `s` becomes layer `L-s`; `concepts.csv`
    (`layer,unit,label`) is merged the same way. Cached under a key of the recipe's
    annotation parameters and the toy world's format version; built in a staging
    folder that is renamed when complete.
    """
    from services.captioner.milannotations import ANNOTATIONS_FILE
    from services.common.keys import content_key
    from services.toyworld.annotations import write_annotations
    from services.toyworld.generator import FORMAT_VERSION

    key = content_key("toy-annotations", TOY_VERSION, FORMAT_VERSION, recipe.annotation_params())
    root = cache_dir / "captioner" / f"toy-annotations-{key}"
    if (root / ANNOTATIONS_FILE).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".toy-annotations-"))
    try:
        rows: list[list[str]] = []
        concepts: list[list[str]] = []
        for seed in range(recipe.annotation_seeds):
            written = write_annotations(
                staging / f"seed{seed}", recipe.n_images, recipe.image_size, seed, recipe.exemplars
            )
            seed_rows = _read_rows(written / ANNOTATIONS_FILE)
            for layer in sorted({layer for layer, _, _ in seed_rows}):
                os.replace(written / layer, staging / f"{layer}-{seed}")
            rows += [[f"{layer}-{seed}", unit, text] for layer, unit, text in seed_rows]
            concepts += [
                [f"{layer}-{seed}", unit, label]
                for layer, unit, label in _read_rows(written / "concepts.csv")
            ]
            shutil.rmtree(written)
        _write_rows(staging / "concepts.csv", ["layer", "unit", "label"], concepts)
        _write_rows(staging / ANNOTATIONS_FILE, ["layer", "unit", "summary"], rows)
        try:
            os.replace(staging, root)
        except OSError:  # a concurrent build renamed its identical folder first
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root



def concept_figures(
    captioner: Captioner,
    data: Milannotations,
    units: Sequence[AnnotatedUnit],
    concepts: dict[tuple[str, int], str],
    pmi_lambda: float,
) -> ConceptFigures:
    """Caption `units` (beam 50, 15 tokens) and count how their captions name their concepts.

    A concept is named by its label, its plural (`circles`, `crosses`) or, for a
    texture, its adjective (`dotted`). `concepts` maps (layer, unit) to the label.
    """
    import torch

    from services.toyworld.world import WORLD

    def forms(label: str) -> set[str]:
        adjective = {WORLD.adjective(label)} if label in WORLD.textures else set()
        return {label, f"{label}s", f"{label}es", *adjective}

    vocabulary = set().union(*(forms(label) for label in set(concepts.values())))
    images = torch.from_numpy(data.images_of(list(units))).float().div_(255.0)
    masks = torch.from_numpy(data.masks_of(list(units))).float()
    results = captioner.caption(images, masks, pmi_lambda=pmi_lambda)
    named = concept_words = other_words = 0
    for unit, result in zip(units, results, strict=True):
        words = [t for t in result.tokens if t.isalnum()]
        named += bool(forms(concepts[(unit.layer, unit.unit)]) & set(words))
        concept_words += sum(w in vocabulary for w in words)
        other_words += sum(w not in vocabulary for w in words)
    n = len(units)
    return ConceptFigures(n, named / n, concept_words / n, other_words / n)



def toy_captioner_key(recipe: ToyRecipe) -> str:
    """The content key of the checkpoint `recipe` makes over the default toynet.

    The annotations are a function of the recipe's annotation parameters and the toy
    world's format version, the backbone of toynet's own key, so the key is known
    without writing the annotations.
    """
    import torch

    from services.common.keys import content_key
    from services.toyworld.generator import FORMAT_VERSION
    from services.toyworld.toynet import ToyNetRecipe, toynet_key

    return content_key(
        "toy-captioner",
        TOY_VERSION,
        FORMAT_VERSION,
        toynet_key(ToyNetRecipe()),
        asdict(recipe),
        torch.__version__,
    )


def toy_captioner(cache_dir: Path, show_progress: bool = False) -> Path:
    """The toy captioner's checkpoint: shipped, else cached, else trained first.

    Training writes `toy_annotations` and trains over the default toynet into
    `checkpoint.toy_checkpoint_path`, with `toy.json` beside it recording the key, the
    training report and the held-out figures (`concept_figures` of the validation units
    with PMI, λ = 0.2, and greedy, λ = 0). Concurrent callers wait on a lock file for
    one build.
    """
    from services.toyworld.shipped import shipped_path

    shipped = shipped_path(SHIPPED_NAME, toy_captioner_key(ToyRecipe()))
    if shipped is not None:
        return shipped

    from services.captioner.checkpoint import toy_checkpoint_path
    from services.common.file_lock import file_lock

    with file_lock(toy_checkpoint_path(cache_dir).with_suffix(".lock")):
        return build_toy_captioner(cache_dir, show_progress)


def toy_captioner_metrics(cache_dir: Path) -> dict[str, Any]:
    """The toy captioner's training report and held-out figures (`held_out`, `report`)."""
    from services.toyworld.shipped import WEIGHTS_DIR, shipped_record

    path = toy_captioner(cache_dir)
    shipped = shipped_record(SHIPPED_NAME)
    if shipped is not None and path == WEIGHTS_DIR / shipped["file"]:
        metrics: dict[str, Any] = shipped["metrics"]
        return metrics
    return cached_toy_captioner_metrics(path)


def cached_toy_captioner_metrics(path: Path) -> dict[str, Any]:
    """`held_out` and `report` from the record beside a cached checkpoint at `path`."""
    record = json.loads(path.with_suffix(".json").read_text())
    return {"held_out": record["held_out"], "report": record["report"]}


def build_toy_captioner(
    cache_dir: Path, show_progress: bool = False, recipe: ToyRecipe | None = None
) -> Path:
    """Train the toy captioner of `recipe` into `cache_dir` (or find it there); its path."""
    from services.captioner.backbones import TOYNET
    from services.captioner.checkpoint import toy_checkpoint_path
    from services.captioner.decoding import DEFAULT_PMI_LAMBDA
    from services.captioner.milannotations import load_milannotations
    from services.toyworld.model_cache import training_threads
    from services.toyworld.toynet import load_toynet, toynet_path

    recipe = recipe or ToyRecipe()
    key = toy_captioner_key(recipe)
    path = toy_checkpoint_path(cache_dir)
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file() and json.loads(record.read_text())["key"] == key:
        return path
    annotations = toy_annotations(cache_dir, recipe)
    load_toynet(cache_dir)  # shipped, else cached or trained
    weights = toynet_path(cache_dir)
    with training_threads():  # one key, one set of weights, whatever the caller's threads
        captioner, report = train_from_annotations(
            annotations, TOYNET, weights, path, recipe.config(show_progress), recipe.dimensions()
        )
    data = load_milannotations(annotations)
    _, held_out = data.split(recipe.validation_fraction, recipe.seed)
    concepts = {
        (layer, int(unit)): label for layer, unit, label in _read_rows(annotations / "concepts.csv")
    }
    figures = {
        name: asdict(concept_figures(captioner, data, held_out, concepts, pmi_lambda))
        for name, pmi_lambda in (("pmi", DEFAULT_PMI_LAMBDA), ("greedy", 0.0))
    }
    text = json.dumps({"key": key, "held_out": figures, "report": report.to_json()}, indent=2)
    atomic_write(record, lambda handle: handle.write(f"{text}\n".encode()))
    return path
