"""The Caption servicer against a LocalStore holding synthetic activations and thumbnails."""

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from neurodissect.v1 import captioner_pb2, common_pb2

from services.captioner import servicer as servicer_module
from services.captioner.backbones import build_encoder, load_captioner
from services.captioner.caption_plan import CaptionPlan
from services.captioner.captioner import Captioner
from services.captioner.checkpoint import save_checkpoint
from services.captioner.exemplars import exemplar_masks, top_images, unit_thresholds
from services.captioner.milannotations import load_milannotations
from services.captioner.servicer import CaptionerServicer
from services.captioner.stored_exemplars import block_exemplars
from services.captioner.training import ModelDimensions, TrainingConfig, train_captioner
from services.common import keys, result_store
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.metrics import UNITS_CAPTIONED
from services.common.result_store import export_key
from services.common.settings import Settings
from services.common.store import LocalStore
from tests.unit.captioner.stored_layer import (
    ACTS_KEY,
    DATASET_KEY,
    LAYER,
    StoredLayer,
    colour_layer,
    png,
    store_layer,
    unit_colour,
)
from tests.unit.captioner.synthetic import colour_world, small_models, tiny_encoder

JOB = "job1"
TINY = ModelDimensions(embedding_dim=16, hidden_dim=32, attention_dim=16, dropout=0.1)


class Context:
    def is_active(self) -> bool:
        return True


class NoExtractor:
    """Thumbnail fetch that must not be called (every thumbnail is stored)."""

    def __call__(self, plan: CaptionPlan, image_ids: Sequence[int], size: int) -> None:
        raise AssertionError(f"Materialize called for {list(image_ids)}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A captioner over a random resnet18 that learned to name colour_world's colours."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("colour")
    weights = root / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(build_encoder("resnet18").backbone.state_dict(), weights)
    data = load_milannotations(colour_world(root / "milan", units_per_colour=4))
    config = TrainingConfig(max_epochs=40, patience=40, batch_size=8, show_progress=False)
    captioner, _ = train_captioner(build_encoder("resnet18", weights), data, config, TINY)
    save_checkpoint(captioner, root / "captioner.pt")
    return root / "captioner.pt"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def layer(store: LocalStore) -> StoredLayer:
    return colour_layer(store)


def request(checkpoint: Path | str, **changes: object) -> captioner_pb2.CaptionRequest:
    message = captioner_pb2.CaptionRequest(
        job_id=JOB,
        layer=LAYER,
        acts_key=ACTS_KEY,
        dataset_key=DATASET_KEY,
        params=common_pb2.MilanParams(checkpoint_uri=str(checkpoint), beam=5, exemplars=6),
    )
    for name, value in changes.items():
        if isinstance(value, dict):
            for field, inner in value.items():
                setattr(getattr(message, name), field, inner)
        else:
            setattr(message, name, value)
    return message


def run(
    store: LocalStore, message: captioner_pb2.CaptionRequest, fetch: object = None
) -> list[captioner_pb2.CaptionProgress]:
    settings = Settings(cache_dir=str(store.root.parent / "cache"))
    servicer = CaptionerServicer(settings, store, fetch or NoExtractor())
    return list(servicer.Caption(message, Context()))


def stored_rows(store: LocalStore) -> dict[int, dict[str, object]]:
    return result_store.read_rows(store, JOB, LAYER, "milan")


def test_caption_names_each_units_colour_and_stores_every_block(
    store: LocalStore, layer: StoredLayer, checkpoint: Path
) -> None:
    before = UNITS_CAPTIONED._value.get()
    progress = run(store, request(checkpoint))

    assert progress[-1].finished and progress[-1].units_done == progress[-1].units_total == 6
    assert not any(p.finished for p in progress[:-1])
    done = [p.units_done for p in progress]
    assert done == sorted(done) and done[0] == 0
    assert UNITS_CAPTIONED._value.get() - before == 6
    # the manifest's unit block (4) sets the result blocks
    assert store.list(keys.results_prefix(JOB, LAYER, "milan")) == [
        export_key(JOB, LAYER, "milan"),
        keys.result_summary(JOB, LAYER, "milan"),
        keys.result_block(JOB, LAYER, "milan", 0, 4),
        keys.result_block(JOB, LAYER, "milan", 4, 6),
    ]
    rows = stored_rows(store)
    assert sorted(rows) == list(range(6))
    for unit, row in rows.items():
        assert set(row) == {"unit", "caption", "logp_caption", "logp_lm"}
        assert unit_colour(unit) in str(row["caption"]).split()
        assert float(row["logp_caption"]) < 0 and float(row["logp_lm"]) < 0

    table = list(csv.reader(io.StringIO(store.get(export_key(JOB, LAYER, "milan")).decode())))
    assert table[0] == ["layer", "unit", "description"]
    assert table[1:] == [[LAYER, str(u), str(rows[u]["caption"])] for u in range(6)]


def test_stored_blocks_are_skipped(store: LocalStore, layer: StoredLayer, checkpoint: Path) -> None:
    run(store, request(checkpoint))
    first = keys.result_block(JOB, LAYER, "milan", 0, 4)
    store.put_json(first, {"units": [{"unit": u, "caption": "kept"} for u in range(4)]})
    store.delete(keys.result_block(JOB, LAYER, "milan", 4, 6))

    before = UNITS_CAPTIONED._value.get()
    progress = run(store, request(checkpoint))
    assert progress[0].units_done == 4 and progress[-1].units_done == 6
    assert UNITS_CAPTIONED._value.get() - before == 2
    rows = stored_rows(store)
    assert [rows[u]["caption"] for u in range(4)] == ["kept"] * 4
    assert all(unit_colour(u) in str(rows[u]["caption"]) for u in (4, 5))

    # everything stored: nothing is read or decoded, the call just finishes
    again = run(store, request(checkpoint))
    assert [(p.units_done, p.finished) for p in again] == [(6, False), (6, True)]


def test_a_unit_range_captions_only_its_units(
    store: LocalStore, layer: StoredLayer, checkpoint: Path
) -> None:
    progress = run(store, request(checkpoint, unit_start=2, unit_end=5))
    assert progress[-1].units_total == 3
    assert [(u0, u1) for u0, u1, _ in result_store.block_ranges(store, JOB, LAYER, "milan")] == [
        (2, 4),
        (4, 5),
    ]


def test_missing_thumbnails_are_materialized_at_the_captioners_input_size(
    store: LocalStore, layer: StoredLayer, checkpoint: Path
) -> None:
    for i in range(0, 30, 2):
        store.delete(keys.thumbnail(DATASET_KEY, i, 16))
    calls: list[tuple[list[int], int]] = []

    def materialize(plan: CaptionPlan, image_ids: Sequence[int], size: int) -> None:
        calls.append((list(image_ids), size))
        for i in image_ids:
            store.put(keys.thumbnail(plan.dataset_key, i, size), png(layer.images[i]))

    run(store, request(checkpoint, unit_end=2), materialize)
    exemplars = top_images(layer.acts.max(axis=(2, 3))[:, :2], 6)
    asked = sorted(i for ids, _ in calls for i in ids)
    assert asked == sorted({int(i) for i in exemplars.ravel() if i % 2 == 0})
    assert {size for _, size in calls} == {16}  # the checkpoint's input_size


def test_streamed_exemplars_equal_the_in_memory_computation(store: LocalStore) -> None:
    rng = np.random.default_rng(3)
    acts = rng.standard_normal((23, 5, 3, 3)).astype(np.float32)
    images = np.zeros((23, 3, 8, 8), dtype=np.uint8)
    stored = store_layer(store, acts, images, unit_block=2, image_chunk=4, dtype="float16")
    raw = acts.astype(np.float16).astype(np.float32)  # what the store holds
    unit_max = acts.max(axis=(2, 3))  # pooled before down-casting, as the extractor does

    exemplars = block_exemplars(store, stored.manifest, unit_max, 1, 4, 5, 0.9)
    top = top_images(unit_max, 5)[1:4]
    np.testing.assert_array_equal(exemplars.image_ids, top)
    thresholds = unit_thresholds(raw, 0.9)[1:4]
    np.testing.assert_array_equal(exemplars.thresholds, thresholds)
    maps = np.stack([raw[top[i], 1 + i] for i in range(3)])
    np.testing.assert_array_equal(exemplars.maps, maps)
    np.testing.assert_array_equal(exemplars.masks(12), exemplar_masks(maps, thresholds, (12, 12)))


def test_small_decode_batches_give_the_same_captions(
    store: LocalStore, layer: StoredLayer, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(store, request(checkpoint))
    together = stored_rows(store)
    for key in store.list(keys.results_prefix(JOB, LAYER, "milan")):
        store.delete(key)
    decoded: list[int] = []
    original = servicer_module.decode_units

    def spy(*args: object, **kwargs: object) -> object:
        decoded.append(args[2].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(servicer_module, "decode_units", spy)
    # room for 4 units of beam 5 over the vocabulary: one decode per block
    vocabulary_size = len(load_captioner(checkpoint).vocabulary)
    monkeypatch.setattr(servicer_module, "DECODE_ELEMENTS", 4 * 5 * vocabulary_size)
    run(store, request(checkpoint))
    assert decoded == [4, 2]
    assert stored_rows(store) == together


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"job_id": ""}, "job_id"),
        ({"layer": "../x"}, "layer"),
        ({"acts_key": ""}, "acts_key"),
        ({"params": {"beam": -1}}, "milan.beam"),
        ({"params": {"max_tokens": 101}}, "milan.max_tokens"),
        ({"params": {"pmi_lambda": float("nan")}}, "milan.pmi_lambda"),
        ({"params": {"pmi_lambda": -0.1}}, "milan.pmi_lambda"),
        ({"params": {"mask_quantile": 1.0}}, "milan.mask_quantile"),
        ({"params": {"exemplars": 31}}, "milan.exemplars"),
        ({"params": {"checkpoint_uri": ""}}, "milan.checkpoint_uri"),
        ({"params": {"checkpoint_uri": "s3://bucket/c.pt"}}, "milan.checkpoint_uri"),
        ({"unit_start": 6}, "unit_start"),
        ({"unit_start": 3, "unit_end": 2}, "unit_end"),
        ({"dataset_key": "other"}, "dataset_key"),
        ({"compute": {"unit_block_size": -1}}, "compute.unit_block_size"),
        ({"compute": {"device": "tpu"}}, "compute.device"),
    ],
)
def test_bad_requests_are_invalid_arguments_naming_the_field(
    store: LocalStore, layer: StoredLayer, checkpoint: Path, changes: dict, field: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        run(store, request(checkpoint, **changes))
    assert error.value.field == field


def test_missing_inputs_are_not_found(
    store: LocalStore, layer: StoredLayer, checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(NotFound) as error:
        run(store, request(tmp_path / "absent.pt"))
    assert error.value.field == "milan.checkpoint_uri"
    with pytest.raises(NotFound) as error:
        run(store, request(checkpoint, acts_key="elsewhere"))
    assert error.value.field == "acts_key"


def test_unbuildable_backbone_is_a_failed_precondition(
    store: LocalStore, layer: StoredLayer, tmp_path: Path, vocabulary: object
) -> None:
    encoder = tiny_encoder()  # a custom "tinynet" this service cannot build
    decoder, lm = small_models(vocabulary, feature_dim=encoder.feature_dim)
    save_checkpoint(Captioner(encoder, decoder, lm), tmp_path / "tiny.pt")
    with pytest.raises(FailedPrecondition, match="tinynet"):
        run(store, request(tmp_path / "tiny.pt"))


def test_missing_thumbnails_without_a_dataset_name_the_field(
    store: LocalStore, layer: StoredLayer, checkpoint: Path
) -> None:
    for i in range(30):
        store.delete(keys.thumbnail(DATASET_KEY, i, 16))
    settings = Settings(extractor_addr="127.0.0.1:1", cache_dir=str(store.root.parent / "cache"))
    servicer = CaptionerServicer(settings, store)
    with pytest.raises(InvalidArgument) as error:
        list(servicer.Caption(request(checkpoint), Context()))
    assert error.value.field == "dataset"
