"""open_clip requests checked without loading weights: names, and keys and shapes of files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import pytest
import torch

from services.common.clip_checkpoint import check_open_clip
from services.common.errors import FailedPrecondition, InvalidArgument

FIELD = "clip_dissect.clip"


def tiny_config(patch: int) -> dict[str, object]:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                     "layers": 2},
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two registered tiny architectures (patch 8 and 16) and a checkpoint of the first."""
    configs = tmp_path_factory.mktemp("configs")
    for name, patch in (("nd-check-p8", 8), ("nd-check-p16", 16)):
        (configs / f"{name}.json").write_text(json.dumps(tiny_config(patch)))
    open_clip.add_model_config(configs)
    path = configs / "p8.pt"
    torch.save(open_clip.create_model("nd-check-p8").state_dict(), path)
    return path


def test_a_checkpoint_of_the_architecture_passes(weights: Path) -> None:
    check_open_clip("nd-check-p8", weights, FIELD)
    wrapped = weights.with_name("wrapped.pt")
    state = torch.load(weights, weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    check_open_clip("nd-check-p8", wrapped, FIELD)  # open_clip's own conversions apply


def test_weights_of_another_architecture_are_refused(weights: Path) -> None:
    with pytest.raises(InvalidArgument, match=rf"^{FIELD}.weights_uri: p8.pt is not a checkpoint"
                       r" of open_clip nd-check-p16: .*size mismatch for visual.conv1.weight"):
        check_open_clip("nd-check-p16", weights, FIELD)


def test_files_that_are_no_checkpoint_are_refused(weights: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.pt"
    state = torch.load(weights, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, partial)
    with pytest.raises(InvalidArgument, match=r"Missing key"):
        check_open_clip("nd-check-p8", partial, FIELD)
    for name, content in (("text.pt", b"not a checkpoint"),
                          ("evil.pt", pickle.dumps(print, protocol=2))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InvalidArgument, match=rf"^{FIELD}.weights_uri: {name} is not"):
            check_open_clip("nd-check-p8", tmp_path / name, FIELD)


def test_unknown_or_unusable_architectures_are_refused(weights: Path) -> None:
    with pytest.raises(InvalidArgument, match=rf"^{FIELD}.arch: 'ViT-B-3' is not .*'ViT-B-32'"):
        check_open_clip("ViT-B-3", weights, FIELD)
    with pytest.raises(FailedPrecondition, match=rf"^{FIELD}.weights_uri: .*local checkpoint"):
        check_open_clip("nd-check-p8", None, FIELD)
    hf = next(name for name in open_clip.list_models()
              if (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("hf_model_name"))
    with pytest.raises(FailedPrecondition, match=rf"^{FIELD}.arch: .*Hugging Face"):
        check_open_clip(hf, weights, FIELD)
