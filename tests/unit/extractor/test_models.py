"""The model zoo and DescribeModel: local weights, torch's cache, TorchScript, timm, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from neurodissect.v1 import common_pb2
from torch import nn

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.settings import Settings
from services.common.store import LocalStore
from services.extractor.hooks import HookTap, ScriptTap, check_layers, describe, unit_map
from services.extractor.models import resolve_model
from services.extractor.servicer import ExtractorServicer


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"), store_url=f"file://{tmp_path / 'store'}")


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


def test_missing_torch_cache_file_names_where_to_put_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FailedPrecondition) as caught:
        resolve_model("torchvision", "resnet18", "", 0, settings)
    assert str(tmp_path / "hub" / "checkpoints") in str(caught.value)
    assert "resnet18-f37072fd.pth" in str(caught.value)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    model = resolve_model("torchvision", "resnet18", "", 0, settings).load()
    assert not model.training


def test_request_errors_name_the_field(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"model.weights_uri"):
        resolve_model("torchvision", "resnet18", str(tmp_path / "nope.pth"), 0, settings)
    with pytest.raises(InvalidArgument, match=r"model.name.*'resnet18'"):
        resolve_model("torchvision", "resnet181", "", 0, settings)
    with pytest.raises(InvalidArgument, match=r"model.source"):
        resolve_model("keras", "resnet18", "", 0, settings)
    with pytest.raises(FailedPrecondition, match=r"model.weights_uri"):
        resolve_model("timm", "resnet18", "", 0, settings)
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), wrong)
    with pytest.raises(InvalidArgument, match=r"does not fit torchvision/resnet18"):
        resolve_model("torchvision", "resnet18", str(wrong), 0, settings).load()
    assert resolve_model("torchvision", "resnet18", str(wrong), 10, settings).load()
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(InvalidArgument, match=r"not a loadable PyTorch checkpoint"):
        resolve_model("torchvision", "resnet18", str(text), 0, settings).load()
    roots = settings.replace(data_roots=str(tmp_path / "models"))
    with pytest.raises(InvalidArgument, match=r"outside the allowed data roots"):
        resolve_model("torchvision", "resnet18", str(wrong), 10, roots)


def test_identity_follows_weight_content(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "r.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    first = resolve_model("torchvision", "resnet18", str(path), 0, settings).identity
    assert resolve_model("torchvision", "resnet18", str(path), 0, settings).identity == first
    torch.save(torchvision.models.resnet18().state_dict(), path)  # new random weights
    assert resolve_model("torchvision", "resnet18", str(path), 0, settings).identity != first


def test_unknown_layer_lists_close_matches() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(InvalidArgument, match=r"layers.*'layer4'") as caught:
        check_layers(model, ["layer5"], "torchvision/resnet18")
    assert "close matches" in str(caught.value)


def test_hook_tap_stops_after_the_last_requested_layer() -> None:
    model = torchvision.models.resnet18().eval()
    ran: list[str] = []
    model.layer4.register_forward_hook(lambda *_: ran.append("layer4"))
    outputs: dict[str, torch.Tensor] = {}
    tap = HookTap(model, ["layer1", "layer2"], lambda name, out: outputs.__setitem__(name, out))
    with torch.inference_mode():
        tap.calibrate(torch.zeros(1, 3, 32, 32))
        assert ran == ["layer4"]
        tap(torch.zeros(2, 3, 32, 32))
    tap.close()
    assert ran == ["layer4"]  # the second pass stopped after layer2
    assert outputs["layer2"].shape == (2, 128, 4, 4)


def _scripted(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def test_torchscript_capture_equals_eager_hooks(settings: Settings, tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = torchvision.models.resnet18().eval()
    twin = torchvision.models.resnet18().eval()
    twin.load_state_dict(eager.state_dict())
    path = _scripted(twin, tmp_path / "r18.pt")
    layers = ["layer1.0.bn1", "layer1.1.bn1", "layer4.1.relu", "fc"]
    source = resolve_model("torchscript", "", str(path), 0, settings)
    assert source.name == "r18.pt"
    scripted = source.load()
    expected: dict[str, torch.Tensor] = {}
    got: dict[str, torch.Tensor] = {}
    eager_tap = HookTap(eager, layers, lambda n, o: expected.__setitem__(n, o.clone()))
    script_tap = ScriptTap(scripted, layers, lambda n, o: got.__setitem__(n, o))
    inputs = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        eager_tap(inputs)
        script_tap(inputs)
    assert set(got) == set(layers)
    for layer in layers:
        # bn1 is followed by an in-place ReLU: the clone keeps its negative values.
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-5, rtol=1e-5)
    assert (got["layer1.0.bn1"] < 0).any()
    shapes = {s.name: s for s in describe(_load_fresh(source), torch.zeros(1, 3, 64, 64))}
    assert shapes["layer4"].shape == (512, 2, 2)
    assert shapes["layer4"].module_type == "Sequential"


def _load_fresh(source: object) -> nn.Module:
    return source.load()  # type: ignore[attr-defined, no-any-return]


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
