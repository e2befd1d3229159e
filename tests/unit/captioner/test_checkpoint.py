import io
from pathlib import Path

import pytest
import torch

from services.captioner.captioner import Captioner
from services.captioner.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from services.captioner.encoder import MaskedPoolingEncoder
from services.captioner.vocabulary import Vocabulary
from services.common.errors import InvalidArgument
from tests.unit.captioner.synthetic import TinyNet, small_models, tiny_encoder


def _only_plain_types(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _only_plain_types(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_only_plain_types(v) for v in value)
    return isinstance(value, torch.Tensor | str | int | float | bool)


def test_checkpoint_round_trips_with_weights_only(tmp_path: Path, vocabulary: Vocabulary) -> None:
    encoder = tiny_encoder(seed=1)
    decoder, lm = small_models(vocabulary, feature_dim=encoder.feature_dim, seed=2)
    captioner = Captioner(encoder, decoder, lm)
    images, masks = torch.rand(3, 4, 3, 32, 32), (torch.rand(3, 4, 1, 32, 32) > 0.5).float()
    before = captioner.caption(images, masks, beam_size=6, max_tokens=6)

    path = tmp_path / "captioner.pt"
    save_checkpoint(captioner, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["vocabulary"] == vocabulary.to_list()
    assert _only_plain_types(raw)

    fresh = TinyNet()  # different random weights: the checkpoint's must replace them
    loaded = load_checkpoint(path, backbone=fresh)
    assert loaded.vocabulary == vocabulary
    assert loaded.encoder.description == encoder.description
    assert loaded.caption(images, masks, beam_size=6, max_tokens=6) == before


def test_torchvision_backbone_is_rebuilt_by_name(vocabulary: Vocabulary) -> None:
    torch.manual_seed(0)
    encoder = MaskedPoolingEncoder.from_torchvision("resnet18")
    decoder, lm = small_models(vocabulary, feature_dim=encoder.feature_dim)
    buffer = io.BytesIO()
    save_checkpoint(Captioner(encoder, decoder, lm), buffer)
    buffer.seek(0)
    loaded = load_checkpoint(buffer)
    images, masks = torch.rand(2, 3, 32, 32), torch.ones(2, 1, 32, 32)
    torch.testing.assert_close(loaded.encoder(images, masks), encoder(images, masks))
    for name, tensor in decoder.state_dict().items():
        assert torch.equal(loaded.decoder.state_dict()[name], tensor)


def test_custom_backbone_must_be_supplied(tmp_path: Path, vocabulary: Vocabulary) -> None:
    encoder = tiny_encoder()
    decoder, lm = small_models(vocabulary, feature_dim=encoder.feature_dim)
    path = tmp_path / "c.pt"
    save_checkpoint(Captioner(encoder, decoder, lm), path)
    with pytest.raises(InvalidArgument, match="backbone"):
        load_checkpoint(path)


def test_foreign_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(InvalidArgument, match="checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidArgument, match="checkpoint"):
        load_checkpoint(path)
