"""Ablation's inputs: the head that reads a layer's pooled activations, and the classes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torchvision

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.probe_format import read_concepts
from services.common.settings import Settings
from services.common.store import LocalStore
from services.extractor.broden import read_broden
from services.extractor.classifier_head import (
    file_classes,
    find_heads,
    model_heads,
    store_classes,
)
from services.extractor.extraction import ComputeConfig, Extraction
from services.extractor.models import resolve_model
from services.toyworld.toynet import ToyNet
from services.toyworld.world import WORLD


def test_toynet_layer3_feeds_fc_and_the_other_layers_do_not(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    source = resolve_model("toy", "toynet", "", 0, Settings(cache_dir=str(tmp_path / "c")))
    outcome = model_heads(store, source, ["layer2", "layer3"], 0, 64)
    assert set(outcome.head_keys) == {"layer3"} and outcome.classes == len(WORLD.scenes)
    assert "do not feed the classifier head" in outcome.notes["layer2"]
    head = store.get_arrays(outcome.head_keys["layer3"])
    model = source.load()
    assert isinstance(model, ToyNet)
    np.testing.assert_array_equal(head["weight"], model.fc.weight.detach().numpy())
    np.testing.assert_array_equal(head["bias"], model.fc.bias.detach().numpy())


def test_planted_model_has_no_head(tmp_path: Path) -> None:
    source = resolve_model("toy", "planted", "", 0, Settings(cache_dir=str(tmp_path / "c")))
    outcome = model_heads(LocalStore(tmp_path / "s"), source, ["colors"], 0, 32)
    assert not outcome.head_keys and outcome.notes["colors"].startswith("not scored")


def test_toy_world_scenes_are_the_classes(tmp_path: Path, toy_root: Path) -> None:
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root)
    compute = ComputeConfig(image_chunk=24)
    source = resolve_model("toy", "planted", "", 0, Settings(cache_dir=str(tmp_path / "c")))
    list(Extraction(store, dataset, source, ["colors"], compute).run())
    table = read_concepts(store, dataset.key(24))
    classes = store.get_array(store_classes(store, table, None, len(WORLD.scenes)))
    scene_column = {row["image"]: row["scene"] for row in _index(toy_root)}
    for i, name in enumerate(table.image_names):
        number = int(scene_column[name])
        expected = WORLD.scenes.index(table.label_names()[number]) if number else -1
        assert classes[i] == expected, name
    assert (classes == -1).sum() >= 1  # the toy world withholds every 50th scene
    with pytest.raises(FailedPrecondition, match="beyond the head"):
        store_classes(store, table, None, 3)


def test_a_labels_file_names_probe_images_by_index(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image_id,label\n0,2\n3,1\n")
    np.testing.assert_array_equal(file_classes(path, 5), [2, -1, -1, 1, -1])
    path.write_text("image_id,label\n9,2\n")
    with pytest.raises(InvalidArgument, match="not a probe image"):
        file_classes(path, 5)


def _index(root: Path) -> list[dict[str, str]]:
    with (root / "index.csv").open() as handle:
        return list(csv.DictReader(handle))



def test_resnet_layer4_feeds_fc_and_a_vit_is_not_scored() -> None:
    resnet = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    heads, notes = find_heads(resnet, ["layer3", "layer4"], 64)
    assert heads == {"layer4": resnet.fc} and set(notes) == {"layer3"}
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    ).eval()
    heads, notes = find_heads(vit, ["encoder"], 32)
    assert not heads and "ViT" in notes["encoder"]
