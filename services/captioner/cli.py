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

`toy_captioner(cache_dir)` writes the toy world's MILANNOTATIONS annotations and
trains the tiny captioner on them over the trained toynet, cached under a content
key of the annotations, the backbone weights and the recipe, so a second call costs
nothing. The Caption RPC finds it as checkpoint "toy". This module is the only
captioner code that imports the toy world (which lives in the extractor package);
the service never does.

The command line builds its parser from this module for every command, so torch
and the training code are imported inside the handlers that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from services.common.settings import Settings

if TYPE_CHECKING:
    from services.captioner.training import ModelDimensions, TrainingConfig, TrainingReport

# Bump when the toy recipe's code changes what it produces.
TOY_VERSION = 1


@dataclass(frozen=True)
class ToyRecipe:
    """How the toy captioner is trained: small models, few epochs (about a minute on 2 cores)."""

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
) -> TrainingReport:
    """Train a captioner on a MILANNOTATIONS directory and write its checkpoint to `out`."""
    from services.captioner.backbones import build_encoder
    from services.captioner.checkpoint import save_checkpoint
    from services.captioner.milannotations import load_milannotations
    from services.captioner.training import train_captioner

    data = load_milannotations(annotations)
    encoder = build_encoder(backbone, backbone_weights)
    captioner, report = train_captioner(encoder, data, config, dimensions)
    _atomic_write(out, lambda handle: save_checkpoint(captioner, handle))
    return report


def annotations_digest(root: Path) -> str:
    """Content digest of a MILANNOTATIONS directory (every file, by relative path)."""
    from services.common.keys import content_key, file_digest

    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return content_key([(str(p.relative_to(root)), file_digest(str(p))) for p in files])


def toy_captioner(cache_dir: Path, show_progress: bool = False) -> Path:
    """The toy captioner's checkpoint (`checkpoint.toy_checkpoint_path`), trained if not cached.

    Writes the toy world's annotations under `cache_dir` (the toy world caches them),
    then trains on them over the trained toynet unless the checkpoint beside
    `toy.json` was made from the same annotations, backbone weights and recipe.
    """
    import torch

    from services.captioner.backbones import TOYNET
    from services.captioner.checkpoint import toy_checkpoint_path
    from services.common.keys import content_key, file_digest
    from services.extractor.toyworld.annotations import write_toy_annotations
    from services.extractor.toyworld.toynet import load_toynet, toynet_path

    recipe = ToyRecipe()
    annotations = write_toy_annotations(cache_dir)
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
    report = train_from_annotations(
        annotations, TOYNET, weights, path, recipe.config(show_progress), recipe.dimensions()
    )
    text = json.dumps({"key": key, "report": report.to_json()}, indent=2) + "\n"
    _atomic_write(record, lambda handle: handle.write(text.encode()))
    return path


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """`captioner train`: fit on MILANNOTATIONS, write the checkpoint (and the report)."""
    from services.captioner.training import TrainingConfig

    config = TrainingConfig(
        max_epochs=args.epochs, device=args.device or settings.device, seed=args.seed
    )
    report = train_from_annotations(
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
    print(toy_captioner(Path(settings.cache_dir), show_progress=True))
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
