"""`neurodissect captioner …`: train a MILAN captioner, build the toy world's one.

```
neurodissect captioner train --annotations DIR --backbone NAME [--backbone-weights FILE]
                             --out FILE [--epochs N] [--report FILE] [--device D] [--seed S]
neurodissect captioner toy   build (or find cached) the toy captioner; print its path
```

`train` reads a MILANNOTATIONS directory (`milannotations.py`), encodes its
exemplars with the frozen backbone, fits decoder and language model with early
stopping (a progress bar per epoch), writes a self-describing checkpoint and, with
`--report`, the training report (loss curves, validation BLEU, time) as JSON.

`toy_captioner(cache_dir)` writes the toy world's MILANNOTATIONS annotations (one
concept-detector unit per colour, shape and texture, for several seeded datasets)
and trains the tiny captioner on them over the trained toynet, cached under a
content key of the annotations, the backbone weights and the recipe, so a second
call costs nothing. The Caption RPC finds it as checkpoint "toy" in the same cache
directory and builds it here on first use. This module is the only captioner code that
imports the toy world (which lives in the extractor package).

The command line builds its parser from this module for every command, so torch
and the training code are imported inside the handlers that need them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from services.common.settings import Settings

if TYPE_CHECKING:
    from services.captioner.captioner import Captioner
    from services.captioner.milannotations import AnnotatedUnit, Milannotations
    from services.captioner.training import ModelDimensions, TrainingConfig, TrainingReport

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


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_from_annotations(
    annotations: Path,
    backbone: str,
    backbone_weights: Path | None,
    out: Path,
    config: TrainingConfig,
    dimensions: ModelDimensions | None = None,
) -> tuple[Captioner, TrainingReport]:
    """Train a captioner on a MILANNOTATIONS directory and write its checkpoint to `out`."""
    from services.captioner.backbones import build_encoder
    from services.captioner.checkpoint import save_checkpoint
    from services.captioner.milannotations import load_milannotations
    from services.captioner.training import train_captioner

    data = load_milannotations(annotations)
    encoder = build_encoder(backbone, backbone_weights)
    captioner, report = train_captioner(encoder, data, config, dimensions)
    _atomic_write(out, lambda handle: save_checkpoint(captioner, handle))
    return captioner, report


def annotations_digest(root: Path) -> str:
    """Content digest of a MILANNOTATIONS directory (every file, by relative path)."""
    from services.common.keys import content_key, file_digest

    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return content_key([(str(p.relative_to(root)), file_digest(str(p))) for p in files])


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
    from services.toyworld import write_annotations
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

    from services.toyworld import WORLD

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


def toy_captioner(cache_dir: Path, show_progress: bool = False) -> Path:
    """The toy captioner's checkpoint (`checkpoint.toy_checkpoint_path`), trained if not cached.

    Trains on `toy_annotations` over the trained toynet unless `toy.json` beside the
    checkpoint says it was made from the same annotations, backbone weights and
    recipe. `toy.json` also records the training report and the held-out figures
    (`concept_figures` of the validation units with PMI, λ = 0.2, and greedy, λ = 0).
    Concurrent callers wait on a lock file for one build.
    """
    from services.captioner.checkpoint import toy_checkpoint_path
    from services.common.file_lock import file_lock

    with file_lock(toy_checkpoint_path(cache_dir).with_suffix(".lock")):
        return _build_toy_captioner(cache_dir, show_progress)


def _build_toy_captioner(cache_dir: Path, show_progress: bool) -> Path:
    import torch

    from services.captioner.backbones import TOYNET
    from services.captioner.checkpoint import toy_checkpoint_path
    from services.captioner.decoding import DEFAULT_PMI_LAMBDA
    from services.captioner.milannotations import load_milannotations
    from services.common.keys import content_key, file_digest
    from services.toyworld import load_toynet, toynet_path
    from services.toyworld.model_cache import training_threads

    recipe = ToyRecipe()
    annotations = toy_annotations(cache_dir, recipe)
    load_toynet(cache_dir)  # trains and caches toynet if needed
    weights = toynet_path(cache_dir)
    key = content_key(
        "toy-captioner",
        TOY_VERSION,
        annotations_digest(annotations),
        file_digest(str(weights)),
        asdict(recipe),
        torch.__version__,
    )
    path = toy_checkpoint_path(cache_dir)
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file() and json.loads(record.read_text())["key"] == key:
        return path
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
    _atomic_write(record, lambda handle: handle.write(f"{text}\n".encode()))
    return path


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """`captioner train`: fit on MILANNOTATIONS, write the checkpoint (and the report)."""
    from services.captioner.training import TrainingConfig

    config = TrainingConfig(
        max_epochs=args.epochs, device=args.device or settings.device, seed=args.seed
    )
    _, report = train_from_annotations(
        Path(args.annotations),
        args.backbone,
        Path(args.backbone_weights) if args.backbone_weights else None,
        Path(args.out),
        config,
    )
    if args.report:
        report.write_json(Path(args.report))
    best = report.decoder.epochs[report.decoder.best_epoch - 1]
    print(
        f"captioner: {report.train_units} training / {report.val_units} validation units, "
        f"vocabulary {report.vocabulary_size}, best decoder epoch {report.decoder.best_epoch} "
        f"(val BLEU {best.val_bleu:.4f}), {report.train_seconds:.1f}s -> {args.out}"
    )
    return 0


def cmd_toy(args: argparse.Namespace, settings: Settings) -> int:
    """`captioner toy`: build (or find) the toy captioner in the cache; print its path."""
    path = toy_captioner(Path(settings.cache_dir), show_progress=True)
    record = json.loads(path.with_suffix(".json").read_text())
    for name, figures in record["held_out"].items():
        print(
            f"held-out units ({name}): {figures['units']} units, concept named in "
            f"{figures['concept_accuracy']:.0%}, {figures['concept_words']:.2f} concept and "
            f"{figures['other_words']:.2f} other words per caption"
        )
    print(f"trained in {record['report']['train_seconds']:.1f}s: {path}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add `captioner train` and `captioner toy` to the `neurodissect` command line."""
    captioner = subparsers.add_parser(
        "captioner", help="MILAN captioners", description="train MILAN captioners"
    )
    commands = captioner.add_subparsers(dest="captioner_command", required=True)
    train = commands.add_parser(
        "train", help="train on MILANNOTATIONS data", description=cmd_train.__doc__
    )
    train.set_defaults(handler=cmd_train)
    train.add_argument("--annotations", required=True, help="MILANNOTATIONS directory")
    train.add_argument(
        "--backbone",
        required=True,
        help="resnet18, resnet50, … (the torchvision ResNet family) or toynet",
    )
    train.add_argument("--backbone-weights", help="local state-dict file of the backbone")
    train.add_argument("--out", required=True, help="checkpoint file to write")
    train.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    train.add_argument("--report", help="training report JSON to write")
    train.add_argument("--device", help="cpu | cuda | cuda:N (default: the settings')")
    train.add_argument("--seed", type=int, default=0)
    toy = commands.add_parser("toy", help="build the toy captioner", description=cmd_toy.__doc__)
    toy.set_defaults(handler=cmd_toy)
