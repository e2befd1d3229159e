"""Backbones built for training and rebuilt from checkpoints (toynet through a stand-in)."""

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from services.captioner.backbones import (
    TOY_ARCHITECTURES,
    build_encoder,
    load_captioner,
    map_stages,
)
from services.captioner.captioner import Captioner
from services.captioner.checkpoint import save_checkpoint
from services.captioner.encoder import RESNET_STAGES
from services.captioner.vocabulary import Vocabulary
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.unit.captioner.synthetic import TinyNet, small_models


class WideTinyNet(TinyNet):
    """Same stage names as TinyNet, other widths: TinyNet weights do not fit it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(4, 16, 3, stride=2, padding=1), nn.ReLU())


def toy_architectures(monkeypatch: pytest.MonkeyPatch, toynet: type[nn.Module]) -> None:
    """Stand in a small `toynet` class for the toy world's ToyNet (fast, same stage names)."""
    module = types.ModuleType(TOY_ARCHITECTURES)
    module.ToyNet = toynet  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, TOY_ARCHITECTURES, module)


def test_resnet_is_built_from_a_local_weight_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = build_encoder("resnet18").backbone.state_dict()
    torch.save(weights, tmp_path / "r18.pt")
    encoder = build_encoder("resnet18", tmp_path / "r18.pt")
    assert encoder.description.source == "torchvision"
    assert encoder.description.stages == RESNET_STAGES
    for name, tensor in encoder.backbone.state_dict().items():
        assert torch.equal(tensor, weights[name])
    with pytest.raises(NotFound):
        build_encoder("resnet18", tmp_path / "absent.pt")
    with pytest.raises(InvalidArgument, match="vgg16") as error:
        build_encoder("vgg16")
    assert error.value.field == "backbone.architecture"


def test_map_stages_are_the_top_level_children_that_output_maps() -> None:
    assert map_stages(TinyNet()) == ("conv1", "layer1", "layer2")  # not fc


def test_toynet_round_trips_through_a_checkpoint(
    tmp_path: Path, vocabulary: Vocabulary, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy_architectures(monkeypatch, TinyNet)
    torch.manual_seed(1)
    trained = TinyNet()
    torch.save(trained.state_dict(), tmp_path / "toynet.pt")
    encoder = build_encoder("toynet", tmp_path / "toynet.pt")
    assert (encoder.description.source, encoder.description.architecture) == ("custom", "toynet")
    decoder, lm = small_models(vocabulary, feature_dim=encoder.feature_dim)
    save_checkpoint(Captioner(encoder, decoder, lm), tmp_path / "c.pt")

    loaded = load_captioner(tmp_path / "c.pt")
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.encoder.backbone.state_dict()[name], tensor)
    images, masks = torch.rand(2, 3, 3, 32, 32), torch.ones(2, 3, 1, 32, 32)
    captioner = Captioner(encoder, decoder, lm)
    assert loaded.caption(images, masks, beam_size=4) == captioner.caption(images, masks, 4)


def test_toynet_checkpoints_need_a_fitting_installed_architecture(
    tmp_path: Path, vocabulary: Vocabulary, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy_architectures(monkeypatch, TinyNet)
    encoder = build_encoder("toynet")
    decoder, lm = small_models(vocabulary, feature_dim=encoder.feature_dim)
    save_checkpoint(Captioner(encoder, decoder, lm), tmp_path / "c.pt")

    toy_architectures(monkeypatch, WideTinyNet)
    with pytest.raises(FailedPrecondition, match="do not fit"):
        load_captioner(tmp_path / "c.pt")
    monkeypatch.setitem(sys.modules, TOY_ARCHITECTURES, None)  # not installed
    with pytest.raises(FailedPrecondition, match="toynet"):
        load_captioner(tmp_path / "c.pt")
