"""The toy models ship with the package: every machine loads the same weights, untrained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from services.captioner import toy_captioner as toy_captioner_module
from services.captioner.toy_captioner import SHIPPED_NAME, ToyRecipe, toy_captioner_key
from services.toyworld import clip, shipped, toynet
from services.toyworld.clip import ClipRecipe, load_toy_clip, toy_clip_key, toy_clip_metrics
from services.toyworld.shipped import (
    WEIGHTS_DIR,
    ShippedWeightsError,
    file_sha256,
    ship,
    shipped_path,
)
from services.toyworld.toynet import ToyNetRecipe, load_toynet, toynet_key, toynet_metrics


def refuse_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("trained although the weights ship")

    monkeypatch.setattr(toynet, "train_toynet", fail)
    monkeypatch.setattr(clip, "train_toy_clip", fail)
    monkeypatch.setattr(toy_captioner_module, "build_toy_captioner", fail)


def test_every_default_recipe_has_its_shipped_weights() -> None:
    keys = {
        "toynet": toynet_key(ToyNetRecipe()),
        "toy_clip": toy_clip_key(ClipRecipe()),
        SHIPPED_NAME: toy_captioner_key(ToyRecipe()),
    }
    for name, key in keys.items():
        record = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        assert record["key"] == key, f"{name}: retrain with `make toy-models`"
        path = shipped_path(name, key)
        assert path is not None and file_sha256(path) == record["sha256"]


def test_the_default_models_load_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_training(monkeypatch)
    model = load_toynet(tmp_path)
    assert not model.training
    clip_model, _, _ = load_toy_clip(tmp_path)
    assert not clip_model.training
    assert toy_captioner_module.toy_captioner(tmp_path).parent == WEIGHTS_DIR
    assert not any(tmp_path.iterdir())  # nothing trained, nothing cached


def test_the_shipped_models_reach_their_aims() -> None:
    assert toynet_metrics()["accuracy"] >= 0.85
    zero_shot = toy_clip_metrics()["zero_shot"]
    assert zero_shot["color"] >= 0.8 and zero_shot["shape"] >= 0.6
    assert zero_shot["pattern_color"] >= 0.8
    metrics = toy_captioner_module.toy_captioner_metrics(Path("unused"))
    assert metrics["held_out"]["pmi"]["concept_accuracy"] >= 0.7


def test_ship_records_the_key_and_hash_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    source = tmp_path / "trained.pt"
    torch.save({"w": torch.arange(4.0)}, source)
    target = ship("model", "key-1", source, {"accuracy": 0.9}, weights_dir=tmp_path / "w")
    assert target == tmp_path / "w" / "model.pt"
    assert shipped_path("model", "key-1", tmp_path / "w") == target
    assert shipped_path("model", "another-recipe", tmp_path / "w") is None
    assert shipped_path("absent", "key-1", tmp_path / "w") is None
    record = shipped.shipped_record("model", tmp_path / "w")
    assert record is not None and record["metrics"] == {"accuracy": 0.9}
    damaged = bytearray(target.read_bytes())
    damaged[-1] ^= 0xFF
    target.write_bytes(bytes(damaged))
    with pytest.raises(ShippedWeightsError, match="sha256"):
        shipped_path("model", "key-1", tmp_path / "w")
