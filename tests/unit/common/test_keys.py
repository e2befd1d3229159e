from __future__ import annotations

import pytest

from services.common import keys


def test_content_key_is_stable_and_sensitive() -> None:
    assert keys.content_key("resnet18", {"a": 1, "b": 2}) == keys.content_key(
        "resnet18", {"b": 2, "a": 1})
    assert keys.content_key("layer3") != keys.content_key("layer4")
    assert len(keys.content_key("x")) == 24


def test_spans_roundtrip() -> None:
    key = keys.acts_chunk("k", "layer4", 64, 128, 256, 512)
    assert key == "acts/k/layer4/u64-128/i256-512.npy"
    assert keys.parse_span(key) == (256, 512)
    assert keys.parse_span("u64-128") == (64, 128)
    with pytest.raises(ValueError):
        keys.parse_span("manifest.json")


def test_layers_never_share_cache_entries() -> None:
    assert keys.manifest("k", "layer3") != keys.manifest("k", "layer4")
    assert keys.result_block("j", "l", "netdissect", 0, 8).startswith(
        keys.results_prefix("j", "l", "netdissect"))


def test_thumbnails_of_different_sizes_never_share_a_key() -> None:
    """A report's large thumbnails must not replace the captioner's input-size ones."""
    assert keys.thumbnail("d", 3, 64) != keys.thumbnail("d", 3, 128)
    assert keys.thumbnail("d", 3, 64).startswith("probe/d/")
