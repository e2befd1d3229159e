"""Self-describing captioner checkpoints.

A checkpoint is one `torch.save`d dict holding only tensors, dicts, lists, strings
and numbers, so it loads with `torch.load(weights_only=True)` (no pickled code):

    {"format": "neurodissect.captioner/1",
     "vocabulary": [token, ...],                      # shared by decoder and LM
     "backbone": {"description": {...}, "state_dict": {...}},
     "decoder": {"config": {...}, "state_dict": {...}},
     "language_model": {"config": {...}, "state_dict": {...}}}

`config` holds the constructor arguments besides the vocabulary. A torchvision
backbone is rebuilt by name; a custom one (e.g. the toy world's toynet) must be
passed to `load_checkpoint` as an instance of the right architecture.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import IO, Any

import torch
import torchvision
from torch import nn

from services.captioner.captioner import Captioner
from services.captioner.decoder import CaptionDecoder
from services.captioner.encoder import BackboneDescription, MaskedPoolingEncoder
from services.captioner.language_model import LanguageModel
from services.captioner.vocabulary import Vocabulary
from services.common.errors import InvalidArgument

FORMAT = "neurodissect.captioner/1"
# The checkpoint URI that names the toy world's captioner, built by
# `neurodissect captioner toy` (services.captioner.toy_captioner) into the cache.
TOY_CHECKPOINT = "toy"

CheckpointFile = str | os.PathLike[str] | IO[bytes]


def toy_checkpoint_path(cache_dir: Path) -> Path:
    """Where the toy captioner's checkpoint lives under a cache directory."""
    return cache_dir / "captioner" / "toy.pt"


def checkpoint_dict(captioner: Captioner) -> dict[str, Any]:
    """The checkpoint contents of `captioner` (tensors moved to CPU)."""

    def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu() for name, t in module.state_dict().items()}

    return {
        "format": FORMAT,
        "vocabulary": captioner.vocabulary.to_list(),
        "backbone": {
            "description": captioner.encoder.description.to_json(),
            "state_dict": cpu(captioner.encoder.backbone),
        },
        "decoder": {"config": captioner.decoder.config(), "state_dict": cpu(captioner.decoder)},
        "language_model": {
            "config": captioner.language_model.config(),
            "state_dict": cpu(captioner.language_model),
        },
    }


def save_checkpoint(captioner: Captioner, file: CheckpointFile) -> None:
    """Write `captioner` to a path or binary file object."""
    torch.save(checkpoint_dict(captioner), file)


def read_checkpoint(
    file: CheckpointFile, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The contents of a checkpoint written by `save_checkpoint`, loaded weights-only.

    Raises `InvalidArgument` for a file that is not a captioner checkpoint.
    """
    try:
        data = torch.load(file, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise InvalidArgument(f"is not a loadable checkpoint ({exc})", field="checkpoint") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidArgument(f"is not a {FORMAT} checkpoint", field="checkpoint")
    return data


def backbone_description(data: dict[str, Any]) -> BackboneDescription:
    """How the backbone of checkpoint contents `data` is rebuilt."""
    return BackboneDescription.from_json(data["backbone"]["description"])


def captioner_from_checkpoint(
    data: dict[str, Any],
    backbone: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> Captioner:
    """Rebuild a captioner from checkpoint contents (`read_checkpoint`).

    `backbone` is required for checkpoints with a custom backbone (an untrained
    instance of its architecture; its weights come from the checkpoint) and must be
    omitted for torchvision ones.
    """
    vocabulary = Vocabulary.from_list(data["vocabulary"])
    description = backbone_description(data)
    if description.source == "torchvision":
        if backbone is not None:
            raise InvalidArgument("must be omitted for a torchvision backbone", field="backbone")
        backbone = torchvision.models.get_model(description.architecture, weights=None)
    elif backbone is None:
        raise InvalidArgument(
            f"is required: the checkpoint's backbone is a custom {description.architecture!r}",
            field="backbone",
        )
    backbone.load_state_dict(data["backbone"]["state_dict"])
    decoder = CaptionDecoder(vocabulary, **data["decoder"]["config"])
    decoder.load_state_dict(data["decoder"]["state_dict"])
    language_model = LanguageModel(vocabulary, **data["language_model"]["config"])
    language_model.load_state_dict(data["language_model"]["state_dict"])
    encoder = MaskedPoolingEncoder(backbone, description)
    return Captioner(encoder, decoder, language_model).to(map_location)


def load_checkpoint(
    file: CheckpointFile,
    backbone: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> Captioner:
    """Rebuild a captioner from a checkpoint written by `save_checkpoint`.

    `backbone` as in `captioner_from_checkpoint`. Raises `InvalidArgument` for a file
    that is not a captioner checkpoint.
    """
    return captioner_from_checkpoint(read_checkpoint(file, map_location), backbone, map_location)
