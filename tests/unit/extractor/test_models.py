"""The model zoo: local weights, torch's cache, TorchScript, hooks and request errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.settings import Settings
from services.extractor.hooks import HookTap, ScriptTap, check_layers, describe
from services.extractor.models import resolve_model
from services.toyworld.toynet import ToyNet


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"))


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
    with pytest.raises(NotFound, match=r"model.name.*'resnet18'"):
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




def test_toy_models(settings: Settings, tmp_path: Path) -> None:
    planted = resolve_model("toy", "planted", "", 0, settings)
    assert planted.identity == resolve_model("toy", "planted", "", 0, settings).identity
    assert planted.default_input_size == 64
    shapes = {s.name: s for s in describe(planted.load(), torch.zeros(1, 3, 64, 64))}
    assert shapes["colors"].shape == (9, 32, 32) and shapes["pool"].shape == (9, 1, 1)
    with pytest.raises(InvalidArgument, match="no weights"):
        resolve_model("toy", "planted", str(tmp_path), 0, settings)
    with pytest.raises(NotFound, match=r"'toynet', 'planted'"):
        resolve_model("toy", "resnet18", "", 0, settings)
    # Without a file, toynet is named by its training recipe (resolving trains nothing).
    trained = resolve_model("toy", "toynet", "", 0, settings)
    assert not (tmp_path / "cache" / "toyworld").exists()
    path = tmp_path / "toynet.pth"
    torch.save(ToyNet().state_dict(), path)
    from_file = resolve_model("toy", "toynet", str(path), 0, settings)
    assert from_file.identity != trained.identity
    shapes = {s.name: s for s in describe(from_file.load(), torch.zeros(1, 3, 64, 64))}
    assert shapes["layer3"].shape == (64, 8, 8) and shapes["fc"].shape == (18, 1, 1)
