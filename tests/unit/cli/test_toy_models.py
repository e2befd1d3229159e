"""`neurodissect toyworld train` ships what it trains, with a record that loads it back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.cli import toy_models
from services.toyworld import toynet
from services.toyworld.shipped import shipped_path, shipped_record
from services.toyworld.toynet import ToyNetRecipe, toynet_key

TINY = ToyNetRecipe(n_images=64, eval_images=16, epochs=1, widths=(4, 4, 4, 4))


def test_trained_toynet_is_shipped_with_its_key_hash_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toy_models, "train_toynet", lambda _recipe: toynet.train_toynet(TINY))
    said: list[str] = []
    (path,) = toy_models.train_toy_models(tmp_path, ("toynet",), say=said.append)
    assert path == tmp_path / "toynet.pt"
    assert shipped_path("toynet", toynet_key(ToyNetRecipe()), tmp_path) == path
    record = shipped_record("toynet", tmp_path)
    assert record is not None and set(record["metrics"]) >= {"accuracy", "chance"}
    state = torch.load(path, weights_only=True)
    assert set(state) == set(toynet.ToyNet(TINY.widths).state_dict())
    assert said and said[0].startswith("toynet: held-out scene accuracy")
