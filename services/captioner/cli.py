"""`neurodissect captioner …`: train a MILAN captioner, build the toy world's one.

```
neurodissect captioner train --annotations DIR --backbone NAME [--backbone-weights FILE]
                             --out FILE [--epochs N] [--report FILE] [--device D] [--seed S]
neurodissect captioner toy   find (shipped or cached) or build the toy captioner; print its path
```

`train` reads a MILANNOTATIONS directory (`milannotations.py`), encodes its
exemplars with the frozen backbone, fits decoder and language model with early
stopping (a progress bar per epoch), writes a self-describing checkpoint and, with
`--report`, the training report (loss curves, validation BLEU, time) as JSON.
`toy` is `toy_captioner.toy_captioner`.

The command line builds its parser from this module for every command, so torch
and the training code are imported inside the handlers that need them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.common.settings import Settings


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """`captioner train`: fit on MILANNOTATIONS, write the checkpoint (and the report)."""
    from services.captioner.annotation_training import train_from_annotations
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
    from services.captioner.toy_captioner import toy_captioner

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
