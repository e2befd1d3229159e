"""DescribeModel: every module with its stored (U, h, w) shape, from local weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from neurodissect.v1 import common_pb2

from services.common.settings import Settings
from services.common.store import LocalStore
from services.extractor.hooks import unit_map
from services.extractor.servicer import ExtractorServicer


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"))


def _describe(
    settings: Settings, tmp_path: Path, **model: object
) -> dict[str, common_pb2.LayerInfo]:
    servicer = ExtractorServicer(settings, LocalStore(tmp_path / "store"))
    request = common_pb2.DescribeModelRequest(model=common_pb2.ModelSpec(**model))
    response = servicer.DescribeModel(request, None)  # type: ignore[arg-type]
    return {layer.name: layer for layer in response.layers}


def test_describe_resnet18_from_local_checkpoint(settings: Settings, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    # A DataParallel checkpoint: wrapped and prefixed.
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    layers = _describe(settings, tmp_path, source="torchvision", name="resnet18",
                       weights_uri=f"file://{path}")
    assert list(layers["layer4"].shape) == [512, 7, 7]
    assert list(layers["layer4"].raw_shape) == [512, 7, 7]
    assert layers["layer4"].module_type == "Sequential"
    assert list(layers["fc"].shape) == [1000, 1, 1] and list(layers["fc"].raw_shape) == [1000]
    assert "layer3.1.conv2" in layers and "" not in layers


def test_describe_vit_b_16_token_maps(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save(torchvision.models.vit_b_16().state_dict(), path)
    layers = _describe(settings, tmp_path, source="torchvision", name="vit_b_16",
                       weights_uri=str(path))
    block = layers["encoder.layers.encoder_layer_9"]
    assert list(block.raw_shape) == [197, 768]
    assert list(block.shape) == [768, 14, 14]
    assert list(layers["encoder.layers.encoder_layer_9.mlp.0"].shape) == [3072, 14, 14]
    assert list(layers["conv_proj"].shape) == [768, 14, 14]
    # The attention module returns a tuple: listed, but not a feature map.
    assert list(layers["encoder.layers.encoder_layer_9.self_attention"].shape) == []


def test_unit_map_drops_the_class_token_in_order() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 + 2×2 tokens
    grid = unit_map(tokens)
    assert grid is not None and grid.shape == (2, 3, 2, 2)
    # Unit c at grid (i, j) is token 1 + 2i + j, channel c.
    assert grid[1, 2, 1, 0].item() == tokens[1, 1 + 2 * 1 + 0, 2].item()
    assert unit_map(tokens, prefix_tokens=0) is None  # 5 tokens: not a square grid
    flat = unit_map(torch.ones(2, 7))
    assert flat is not None and flat.shape == (2, 7, 1, 1)
    assert unit_map(torch.ones(2, 3, 4, 5, 6)) is None
    assert unit_map((torch.ones(2, 3),)) is None


def test_timm_model_from_local_safetensors(settings: Settings, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    layers = _describe(settings, tmp_path, source="timm", name="vit_tiny_patch16_224",
                       weights_uri=str(path))
    assert list(layers["blocks.9.mlp.fc1"].shape) == [768, 14, 14]
    assert list(layers["blocks.9.mlp.fc1"].raw_shape) == [197, 768]


def test_describe_toynet_without_training_it(settings: Settings, tmp_path: Path) -> None:
    layers = _describe(settings, tmp_path, source="toy", name="toynet")
    assert list(layers["layer3"].shape) == [64, 8, 8]
    assert list(layers["conv1"].shape) == [16, 64, 64]
    assert not (tmp_path / "cache").exists()  # shapes need no trained weights
