"""Streaming extraction on a small toy world: layout, values, cache hits, resume, bad images."""

from __future__ import annotations

import shutil
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from neurodissect.v1 import common_pb2, extractor_pb2
from torch import nn

from services.common import keys
from services.common.activations import STORED_UNIT_BLOCK, iter_units, read_manifest, read_pooled
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.probe_format import read_concepts, read_label_chunk
from services.common.settings import Settings
from services.common.store import LocalStore
from services.extractor import extraction
from services.extractor.broden import read_broden
from services.extractor.extraction import ComputeConfig, Extraction, ExtractionResult, Shard
from services.extractor.models import ModelSource, resolve_model
from services.extractor.preprocessing import preprocessing
from services.extractor.probe_dataset import ProbeDataset
from services.extractor.servicer import compute_config, shard_of
from services.toyworld.planted import planted_units

N_IMAGES = 64  # the `toy_root` fixture: 64 images at 32 px
SIZE = 32


def tiny_cnn(seed: int = 0) -> nn.Module:
    """(B, 3, 32, 32) -> conv1 (8, 16, 16) -> conv2 (16, 8, 8) -> fc (5,)."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1)),
        ("relu1", nn.ReLU(inplace=True)),
        ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1)),
        ("relu2", nn.ReLU(inplace=True)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(16, 5)),
    ])).eval()


class CountingSource:
    """A ModelSource over `tiny_cnn` that counts loads and images forwarded."""

    def __init__(self, fail_after_batches: int | None = None) -> None:
        self.loads = 0
        self.images = 0
        self.batches = 0
        self.fail_after_batches = fail_after_batches

    def source(self) -> ModelSource:
        return ModelSource("test", "tiny", "tiny-identity", "imagenet", SIZE, self._build)

    def _build(self) -> nn.Module:
        self.loads += 1
        model = tiny_cnn()
        model.register_forward_pre_hook(self._count)
        return model

    def _count(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if inputs[0].shape[0] == 1:
            return  # the dry run
        if self.fail_after_batches is not None and self.batches == self.fail_after_batches:
            raise RuntimeError("simulated crash")
        self.batches += 1
        self.images += inputs[0].shape[0]


def run(extraction: Extraction) -> ExtractionResult:
    events = list(extraction.run())
    assert isinstance(events[-1], ExtractionResult)
    return events[-1]


def extract(
    store: LocalStore,
    dataset: ProbeDataset,
    counter: CountingSource,
    layers: list[str],
    **compute: object,
) -> Extraction:
    config = ComputeConfig(**{"batch_size": 10, "image_chunk": 24, "unit_block": 5, **compute})
    return Extraction(store, dataset, counter.source(), layers, config)


def direct(dataset: ProbeDataset, layer: str, rows: list[int] | None = None) -> np.ndarray:
    """(N, U, h, w) float32 outputs of `layer` by a plain forward pass, no extractor code."""
    model = tiny_cnn()
    prep = preprocessing("imagenet", SIZE)
    chosen = [dataset.rows[i] for i in (rows if rows is not None else range(len(dataset.rows)))]
    inputs = torch.stack([prep(dataset.load_image(row)) for row in chosen])
    captured: dict[str, torch.Tensor] = {}
    module = dict(model.named_modules())[layer]
    module.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o.clone()))
    with torch.no_grad():
        model(inputs)
    out = captured["out"]
    return (out[:, :, None, None] if out.dim() == 2 else out).numpy()


def stored(store: LocalStore, acts_key: str, layer: str) -> np.ndarray:
    manifest = read_manifest(store, acts_key, layer)
    return np.concatenate([a for _, a in iter_units(store, manifest, 0, manifest.n_units)])


def test_chunks_manifest_and_values(tmp_path: Path, toy_root: Path) -> None:
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root)
    result = run(extract(store, dataset, CountingSource(), ["conv2", "fc"]))
    assert not result.cached and result.n_images == N_IMAGES and result.bad_images == 0
    acts_key = result.acts_keys["conv2"]
    manifest = read_manifest(store, acts_key, "conv2")
    assert manifest.shape == (N_IMAGES, 16, 8, 8)
    assert (manifest.dtype, manifest.unit_block, manifest.image_chunk) == ("float16", 5, 24)
    assert manifest.dataset_key == result.dataset_key
    chunks = store.list(keys.acts_layer_prefix(acts_key, "conv2"))
    expected = {
        keys.acts_chunk(acts_key, "conv2", u0, u1, i0, i1)
        for u0, u1 in [(0, 5), (5, 10), (10, 15), (15, 16)]
        for i0, i1 in [(0, 24), (24, 48), (48, 64)]
    }
    assert expected <= set(chunks)
    assert store.get_array(keys.acts_chunk(acts_key, "conv2", 15, 16, 48, 64)).dtype == np.float16
    reference = direct(dataset, "conv2")
    np.testing.assert_allclose(stored(store, acts_key, "conv2"), reference, rtol=2e-3, atol=2e-3)
    mean, peak = read_pooled(store, acts_key, "conv2")
    np.testing.assert_allclose(mean, reference.mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(peak, reference.max(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    assert read_manifest(store, acts_key, "fc").shape == (N_IMAGES, 5, 1, 1)
    np.testing.assert_allclose(stored(store, acts_key, "fc"), direct(dataset, "fc"), atol=2e-3)


def test_labels_and_concepts_are_stored(tmp_path: Path, toy_root: Path) -> None:
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root)
    result = run(extract(store, dataset, CountingSource(), ["conv1"]))
    table = read_concepts(store, result.dataset_key)
    assert table.n_images == N_IMAGES and table.chunk_size == 24
    assert table.image_names == [row.name for row in dataset.rows]
    assert table.mask_size == (SIZE // 2, SIZE // 2)
    assert table.plane_categories == dataset.plane_categories
    assert table.chunk_ranges() == [(0, 24), (24, 48), (48, 64)]
    chunk = read_label_chunk(store, result.dataset_key, 24, 48)
    assert chunk.pixel.shape == (24, len(dataset.plane_categories), SIZE // 2, SIZE // 2)
    pixel, image = dataset.load_labels(dataset.rows[30])
    np.testing.assert_array_equal(chunk.pixel[6], pixel)
    np.testing.assert_array_equal(chunk.image[6], image)


def test_float32_on_request(tmp_path: Path, toy_root: Path) -> None:
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root)
    result = run(extract(store, dataset, CountingSource(), ["conv1"], dtype="float32"))
    acts_key = result.acts_keys["conv1"]
    assert read_manifest(store, acts_key, "conv1").dtype == "float32"
    # conv1 is followed by an in-place ReLU: the stored values are still the conv outputs.
    values = stored(store, acts_key, "conv1")
    assert (values < 0).any()
    np.testing.assert_allclose(values, direct(dataset, "conv1"), rtol=1e-5, atol=1e-5)


def test_second_job_is_a_cache_hit_without_forward_pass(tmp_path: Path, toy_root: Path) -> None:
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root)
    first = CountingSource()
    assert run(extract(store, dataset, first, ["conv2", "fc"])).images_forwarded == N_IMAGES
    assert first.images == N_IMAGES
    second = CountingSource()
    result = run(extract(store, read_broden(toy_root), second, ["fc", "conv2"]))
    assert result.cached and result.images_forwarded == 0
    assert second.loads == 0 and second.images == 0  # the model was not even loaded
    # Another layer of the same model: only it is computed; cached layers keep their objects.
    chunk = keys.acts_chunk(result.acts_keys["conv2"], "conv2", 0, 5, 0, 24)
    before = (tmp_path / "store" / chunk).stat().st_mtime_ns
    third = CountingSource()
    result = run(extract(store, dataset, third, ["conv2", "conv1"]))
    assert not result.cached and third.images == N_IMAGES
    assert (tmp_path / "store" / chunk).stat().st_mtime_ns == before
    # A different chunking is a different cache entry.
    fourth = CountingSource()
    assert not run(extract(store, dataset, fourth, ["conv2"], unit_block=8)).cached


def test_another_unit_block_size_reuses_the_stored_activations(
    tmp_path: Path, toy_root: Path
) -> None:
    dataset = read_broden(toy_root)
    store = LocalStore(tmp_path / "store")
    results, counters = [], []
    for block in (64, 8, 3):
        spec = common_pb2.ComputeSpec(unit_block_size=block, batch_size=10, image_chunk_size=24)
        counter = CountingSource()
        config = compute_config(spec, Settings())
        results.append(run(Extraction(store, dataset, counter.source(), ["conv2"], config)))
        counters.append(counter)
    assert counters[0].images == N_IMAGES and not results[0].cached
    # the explain blocks are no part of the stored chunking: no model load, no forward pass
    assert all(c.loads == 0 and c.images == 0 for c in counters[1:])
    assert all(r.cached and r.acts_keys == results[0].acts_keys for r in results[1:])
    manifest = read_manifest(store, results[0].acts_keys["conv2"], "conv2")
    assert manifest.unit_block == STORED_UNIT_BLOCK


def test_resume_after_interrupt_computes_only_the_missing_chunks(
    tmp_path: Path, toy_root: Path
) -> None:
    dataset = read_broden(toy_root)
    store = LocalStore(tmp_path / "store")
    layers = ["conv1", "conv2"]
    crashing = CountingSource(fail_after_batches=5)  # batches of 8, ranges of 16 images
    with pytest.raises(RuntimeError, match=r"simulated crash"):
        run(extract(store, dataset, crashing, layers, batch_size=8, image_chunk=16))
    extraction = extract(store, dataset, CountingSource(), layers, batch_size=8, image_chunk=16)
    pooled = store.list(keys.acts_layer_prefix(extraction.acts_key, "conv2") + "pooled/")
    assert [keys.parse_span(k) for k in pooled] == [(0, 16), (16, 32)]
    assert not store.exists(keys.manifest(extraction.acts_key, "conv2"))
    resumed = CountingSource()
    result = run(extract(store, dataset, resumed, layers, batch_size=8, image_chunk=16))
    assert resumed.images == N_IMAGES - 32 == result.images_forwarded
    clean_store = LocalStore(tmp_path / "clean")
    clean = run(extract(clean_store, dataset, CountingSource(), layers, batch_size=8,
                        image_chunk=16))
    assert clean.acts_keys == result.acts_keys and clean.dataset_key == result.dataset_key
    for key in clean_store.list("acts/") + clean_store.list("probe/"):
        assert store.get(key) == clean_store.get(key), key


def test_shard_owns_every_count_th_range() -> None:
    assert [n for n in range(7) if Shard(1, 3).owns(n)] == [1, 4]
    assert all(Shard(0, 1).owns(n) for n in range(5))
    with pytest.raises(InvalidArgument, match="outside") as info:
        Shard(2, 2)
    assert info.value.field == "shard_index"
    with pytest.raises(InvalidArgument) as info:
        Shard(0, 0)
    assert info.value.field == "shard_count"


def test_a_request_names_its_shard_or_the_field_it_gets_wrong() -> None:
    request = extractor_pb2.ExtractRequest
    assert shard_of(request()) is None
    assert shard_of(request(shard_index=1, shard_count=3)) == Shard(1, 3)
    for wrong, field in (({"shard_index": 1}, "shard_count"),
                         ({"shard_index": -1, "shard_count": 2}, "shard_index"),
                         ({"shard_count": -2}, "shard_count")):
        with pytest.raises(InvalidArgument) as info:
            shard_of(request(**wrong))
        assert info.value.field == field, wrong


def test_index_then_shards_then_finish_equal_one_pass(tmp_path: Path, toy_root: Path) -> None:
    dataset = read_broden(toy_root)
    store = LocalStore(tmp_path / "store")
    layers = ["conv1", "conv2"]
    config = ComputeConfig(batch_size=8, image_chunk=16, unit_block=5)

    def part(counter: CountingSource, **mode: object) -> Extraction:
        return Extraction(
            store, dataset, counter.source(), layers, config, **mode  # type: ignore[arg-type]
        )

    with pytest.raises(FailedPrecondition, match="index_only Extract first"):
        run(part(CountingSource(), shard=Shard(0, 2)))
    with pytest.raises(InvalidArgument) as info:
        part(CountingSource(), shard=Shard(0, 2), index_only=True)
    assert info.value.field == "index_only"
    indexer = CountingSource()
    indexed = run(part(indexer, index_only=True))
    assert indexer.loads == 0 and not indexed.cached and indexed.n_images == N_IMAGES
    assert read_concepts(store, indexed.dataset_key).chunk_ranges() == [
        (0, 16), (16, 32), (32, 48), (48, 64)]
    assert store.list("acts/") == []
    again = CountingSource()
    assert run(part(again, index_only=True)).cached and again.loads == 0
    spans = {}
    for index in (0, 1):
        counter = CountingSource()
        events = list(part(counter, shard=Shard(index, 2)).run())
        result = events[-1]
        assert isinstance(result, ExtractionResult) and not result.cached
        assert counter.images == result.images_forwarded == 32
        assert events[-2].images_done == events[-2].images_total == 32  # type: ignore[union-attr]
        assert not store.exists(keys.manifest(indexed.acts_keys["conv2"], "conv2"))
        spans[index] = [keys.parse_span(k) for k in store.list(
            keys.acts_layer_prefix(indexed.acts_keys["conv2"], "conv2") + "pooled/")]
    assert spans[0] == [(0, 16), (32, 48)]
    assert spans[1] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    idle = CountingSource()
    assert run(part(idle, shard=Shard(1, 2))).cached and idle.loads == 0
    finisher = CountingSource()
    finished = run(part(finisher))
    assert finisher.images == 0 and not finished.cached
    assert finished.acts_keys == indexed.acts_keys
    clean_store = LocalStore(tmp_path / "clean")
    clean = run(Extraction(clean_store, dataset, CountingSource().source(), layers, config))
    assert clean.acts_keys == finished.acts_keys
    for key in clean_store.list("acts/") + clean_store.list("probe/"):
        assert store.get(key) == clean_store.get(key), key


def _corrupt(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "corrupt"
    shutil.copytree(root, copy)
    (copy / "images" / "toy_000005.png").write_bytes(b"not a png at all")
    data = (copy / "images" / "toy_000009.png").read_bytes()
    (copy / "images" / "toy_000009.png").write_bytes(data[: len(data) // 2])
    return copy


def test_bad_images_are_excluded_counted_and_aligned(tmp_path: Path, toy_root: Path) -> None:
    dataset = read_broden(_corrupt(toy_root, tmp_path))
    store = LocalStore(tmp_path / "store")
    config = ComputeConfig(batch_size=10, image_chunk=24, unit_block=5)
    extraction = Extraction(store, dataset, CountingSource().source(), ["conv2"], config,
                            max_bad_fraction=0.05)
    result = run(extraction)
    assert result.bad_images == 2
    assert result.bad_image_examples == ["toy_000005.png", "toy_000009.png"]
    assert result.n_images == N_IMAGES - 2
    table = read_concepts(store, result.dataset_key)
    assert table.bad_images == ["toy_000005.png", "toy_000009.png"]
    assert "toy_000005.png" not in table.image_names and len(table.image_names) == N_IMAGES - 2
    good = [i for i in range(N_IMAGES) if i not in (5, 9)]
    values = stored(store, result.acts_keys["conv2"], "conv2")
    np.testing.assert_allclose(values, direct(dataset, "conv2", good), rtol=2e-3, atol=2e-3)
    mean, _ = read_pooled(store, result.acts_keys["conv2"], "conv2")
    assert mean.shape == (N_IMAGES - 2, 16)
    labels = read_label_chunk(store, result.dataset_key, 0, 24)
    np.testing.assert_array_equal(labels.pixel[5], dataset.load_labels(dataset.rows[6])[0])
    # A second model on the stored dataset reuses its indices and bad-image report.
    again = Extraction(store, dataset, CountingSource().source(), ["conv1"], config,
                       max_bad_fraction=0.05)
    assert run(again).bad_image_examples == ["toy_000005.png", "toy_000009.png"]


def test_too_many_bad_images_fail_naming_the_first(tmp_path: Path, toy_root: Path) -> None:
    dataset = read_broden(_corrupt(toy_root, tmp_path))
    store = LocalStore(tmp_path / "store")
    extraction = Extraction(store, dataset, CountingSource().source(), ["conv2"],
                            ComputeConfig(batch_size=10, image_chunk=24))
    with pytest.raises(FailedPrecondition, match=r"max_bad_fraction.*toy_000005.png"):
        run(extraction)
    assert not store.exists(keys.concepts(extraction.dataset_key))


@pytest.mark.parametrize(
    ("layers", "message"),
    [(["conv9"], "close matches: .*'conv1'"), (["flatten", "nope"], "no module 'nope'")],
)
def test_bad_layers(tmp_path: Path, toy_root: Path, layers: list[str], message: str) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(InvalidArgument, match=message):
        run(extract(store, read_broden(toy_root), CountingSource(), layers))


def test_layer_without_feature_map_is_refused(tmp_path: Path, toy_root: Path) -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.conv(x), x

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pair(x)[0]

    source = ModelSource("test", "pair", "pair", "imagenet", SIZE, Wrapper)
    extraction = Extraction(LocalStore(tmp_path / "s"), read_broden(toy_root), source, ["pair"],
                            ComputeConfig())
    with pytest.raises(InvalidArgument, match=r"does not output a feature map"):
        run(extraction)


def test_planted_colour_units_line_up_with_the_colour_labels(
    tmp_path: Path, toy_root: Path
) -> None:
    """Known answer: unit k of the planted model fires exactly where colour k is labelled."""
    store = LocalStore(tmp_path / "store")
    source = resolve_model("toy", "planted", "", 0, Settings(cache_dir=str(tmp_path)))
    result = run(Extraction(store, read_broden(toy_root), source, ["colors"], ComputeConfig()))
    table = read_concepts(store, result.dataset_key)
    labels = read_label_chunk(store, result.dataset_key, 0, N_IMAGES)
    colour = labels.pixel[:, table.plane_categories.index("color")]  # (N, 16, 16)
    acts = stored(store, result.acts_keys["colors"], "colors")  # (N, 9, 16, 16), same grid
    assert acts.shape == (N_IMAGES, 9, SIZE // 2, SIZE // 2)
    _, peak = read_pooled(store, result.acts_keys["colors"], "colors")
    for unit, name in planted_units().items():
        number = next(c.number for c in table.labels if c.name == name)
        # Per image: the unit fires iff the colour is labelled somewhere.
        np.testing.assert_array_equal(peak[:, unit] > 0.1, (colour == number).any(axis=(1, 2)))
        # Per pixel: the maps overlap (edges differ: a 2×2 block pooled at the mask grid).
        fired, truth = acts[:, unit] > 0.5, colour == number
        assert (fired & truth).sum() / (fired | truth).sum() > 0.7, name
    assert peak[:, 8].max() == 0.0  # the dead unit


def test_slow_setup_keeps_reporting_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading may train a toy model for minutes: progress must keep the stream alive."""
    monkeypatch.setattr(extraction, "HEARTBEAT_S", 0.02)

    def slow() -> str:
        time.sleep(0.3)
        return "loaded"

    beats = extraction._heartbeat(slow, "loading toy/toynet", 10)
    messages = []
    with pytest.raises(StopIteration) as stop:
        while True:
            messages.append(next(beats))
    assert stop.value.value == "loaded"
    assert len(messages) >= 5 and {m.message for m in messages} == {"loading toy/toynet"}


def test_float16_saturates_instead_of_overflowing(tmp_path: Path, toy_root: Path) -> None:
    def huge() -> nn.Module:
        conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1e6, 0, 0]).view(1, 3, 1, 1).repeat(2, 1, 1, 1))
            conv.weight[1] *= -1
            conv.bias.zero_()
        return nn.Sequential(conv).eval()

    source = ModelSource("test", "huge", "huge", "imagenet", SIZE, huge)
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root, limit=8)
    result = run(Extraction(store, dataset, source, ["0"], ComputeConfig()))
    values = stored(store, result.acts_keys["0"], "0")
    assert np.isfinite(values).all()
    assert values.max() == 65504.0 and values.min() == -65504.0
    _, peak = read_pooled(store, result.acts_keys["0"], "0")
    assert peak[:, 0].max() > 1e5  # pooled statistics keep the float32 values
