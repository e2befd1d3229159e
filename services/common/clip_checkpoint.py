"""Submission-time checks of an open_clip model request, without loading any weights.

`check_open_clip(arch, weights, field)` refuses, naming the user's field (`field` is
e.g. `clip_dissect.clip`):

- an architecture open_clip does not know (`<field>.arch`, with close matches);
- one that needs Hugging Face files, which are never downloaded (`<field>.arch`);
- a missing checkpoint (`<field>.weights_uri`);
- a checkpoint whose keys or tensor shapes do not fit the architecture, e.g. ViT-B-32
  weights named as ViT-B-16 (`<field>.weights_uri`).

The last check runs open_clip's own `load_checkpoint` (weights-only unpickling, its key
conversions and position-embedding resizes) into a skeleton of the architecture on
PyTorch's meta device, so nothing is allocated and no tensor data is copied: only the
keys and shapes are compared. The extractor loads the real weights later.
"""

from __future__ import annotations

import difflib
import pickle
import zipfile
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument

# How much of open_clip's mismatch report a message quotes.
MISMATCH_CHARS = 400


def check_open_clip(arch: str, weights: Path | None, field: str) -> None:
    """Raise unless `weights` is a checkpoint of the open_clip architecture `arch`."""
    check_arch(arch, field)
    if weights is None:
        raise FailedPrecondition(
            f"open_clip {arch} needs a local checkpoint (downloads are disabled)",
            field=f"{field}.weights_uri",
        )
    _check_fit(arch, weights, f"{field}.weights_uri")


def check_arch(arch: str, field: str) -> None:
    """Raise unless `arch` names an open_clip architecture usable offline (`field` names it)."""
    import open_clip

    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        shown = ", ".join(repr(c) for c in (close or ["ViT-B-32", "ViT-B-16", "RN50", "toy"]))
        raise InvalidArgument(
            f"{arch!r} is not an open_clip architecture; e.g. {shown}", field=f"{field}.arch"
        )
    text_config = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    if text_config.get("hf_model_name") or text_config.get("hf_tokenizer_name"):
        raise FailedPrecondition(
            f"open_clip {arch} needs Hugging Face files (text tower or tokenizer), which are "
            "never downloaded; use an architecture with open_clip's own text tower",
            field=f"{field}.arch",
        )


def _check_fit(arch: str, weights: Path, field: str) -> None:
    import open_clip
    import torch

    with torch.device("meta"):
        skeleton = open_clip.create_model(arch, device="meta")
    try:
        open_clip.load_checkpoint(skeleton, str(weights), device="meta")
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, EOFError,
            pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        detail = " ".join(str(exc).split())[:MISMATCH_CHARS]
        raise InvalidArgument(
            f"{weights.name} is not a checkpoint of open_clip {arch}: {detail}", field=field
        ) from None
    except IsADirectoryError:
        raise InvalidArgument(f"{weights} is a directory, not a checkpoint", field) from None
