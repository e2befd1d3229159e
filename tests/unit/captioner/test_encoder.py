import pytest
import torch

from services.captioner.encoder import (
    RESNET_STAGES,
    BackboneDescription,
    MaskedPoolingEncoder,
    masked_average,
)
from services.common.errors import InvalidArgument
from tests.unit.captioner.synthetic import TINY_STAGES, TinyNet, tiny_encoder


def test_all_ones_mask_equals_global_average_pooling() -> None:
    torch.manual_seed(0)
    features = torch.randn(3, 5, 7, 9)
    pooled = masked_average(features, torch.ones(3, 1, 64, 64))
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))


def test_empty_mask_gives_zeros_not_nan() -> None:
    features = torch.randn(2, 4, 7, 7)
    masks = torch.ones(2, 1, 32, 32)
    masks[1] = 0
    pooled = masked_average(features, masks)
    assert not pooled.isnan().any()
    assert torch.equal(pooled[1], torch.zeros(4))
    assert pooled[0].abs().sum() > 0


def test_mask_weights_select_the_masked_region() -> None:
    features = torch.zeros(1, 1, 4, 4)
    features[0, 0, :2, :2] = 3.0
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2, :2] = 1
    assert masked_average(features, masks).item() == pytest.approx(3.0)


def test_encoder_concatenates_stage_averages_of_a_custom_backbone() -> None:
    encoder = tiny_encoder()
    images = torch.rand(2, 3, 32, 32)
    out = encoder(images, torch.ones(2, 1, 32, 32))
    assert encoder.stage_dims == (8, 16, 16) and out.shape == (2, 40)
    net = encoder.backbone
    x = (images - encoder.mean) / encoder.std
    maps = [net.conv1(x)]
    maps.append(net.layer1(maps[-1]))
    maps.append(net.layer2(maps[-1]))
    torch.testing.assert_close(out, torch.cat([m.mean(dim=(2, 3)) for m in maps], 1))


def test_encoder_over_torchvision_resnet_matches_global_pooling_per_stage() -> None:
    torch.manual_seed(0)
    encoder = MaskedPoolingEncoder.from_torchvision("resnet18")
    assert encoder.description.stages == RESNET_STAGES
    assert encoder.feature_dim == 64 + 64 + 128 + 256 + 512
    images = torch.rand(2, 3, 64, 64)
    out = encoder(images, torch.ones(2, 1, 64, 64))
    net = encoder.backbone
    with torch.no_grad():
        maps = [net.relu(net.bn1(net.conv1((images - encoder.mean) / encoder.std)))]
        maps.append(net.layer1(net.maxpool(maps[-1])))
        for stage in (net.layer2, net.layer3, net.layer4):
            maps.append(stage(maps[-1]))
    torch.testing.assert_close(out, torch.cat([m.mean(dim=(2, 3)) for m in maps], 1))


def test_encode_units_shapes_and_frozen_backbone() -> None:
    encoder = tiny_encoder().train()
    assert not encoder.backbone.training
    assert not any(p.requires_grad for p in encoder.parameters())
    images, masks = torch.rand(3, 5, 3, 16, 16), torch.ones(3, 5, 1, 16, 16)
    out = encoder.encode_units(images, masks, batch_size=4)
    assert out.shape == (3, 5, 40)
    torch.testing.assert_close(out[1, 2], encoder(images[1, 2:3], masks[1, 2:3])[0])


def test_unknown_stage_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgument, match="layer9"):
        MaskedPoolingEncoder(
            TinyNet(), BackboneDescription("custom", "t", (*TINY_STAGES, "layer9"))
        )


def test_unknown_torchvision_architecture_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgument, match="not-a-net"):
        MaskedPoolingEncoder.from_torchvision("not-a-net")
