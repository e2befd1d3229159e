"""CLIP image embeddings during extraction, and EmbedText (open_clip with local weights).

The CLIP model is an open_clip architecture registered from a tiny config (2 layers of
width 64 per tower), so the real open_clip loading path runs in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from neurodissect.v1 import common_pb2, extractor_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.settings import Settings
from services.common.store import LocalStore
from services.extractor.broden import read_broden
from services.extractor.clip_models import ClipEncoder, ClipSource, resolve_clip
from services.extractor.extraction import ComputeConfig, Extraction, ExtractionResult
from services.extractor.models import ModelSource
from services.extractor.servicer import ExtractorServicer
from services.extractor.text_embeddings import read_concept_set
from services.toyworld.clip import ClipRecipe, build_toy_clip

ARCH = "nd-tiny-test"
DIM = 32
TINY_CONFIG = {
    "embed_dim": DIM,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ClipEncoder:
    """A random-weight tiny CLIP, built directly with open_clip (no project code)."""
    configs = tmp_path_factory.mktemp("clip-configs")
    (configs / f"{ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(configs)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    return ClipEncoder(model.eval(), preprocess, open_clip.get_tokenizer(ARCH))


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory, reference: ClipEncoder) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(reference.model.state_dict(), path)
    return path


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"))


def _run(extraction: Extraction) -> ExtractionResult:
    result = list(extraction.run())[-1]
    assert isinstance(result, ExtractionResult)
    return result


def test_image_embeddings_match_the_clip_model(
    tmp_path: Path, toy_root: Path, clip_weights: Path, settings: Settings,
    conv_source: ModelSource, reference: ClipEncoder,
) -> None:
    dataset = read_broden(toy_root, limit=12)
    store = LocalStore(tmp_path / "store")
    clip = resolve_clip(ARCH, str(clip_weights), settings, "clip_models[0]")
    config = ComputeConfig(batch_size=5, image_chunk=8)
    result = _run(Extraction(store, dataset, conv_source, ["0"], config, clips=[clip]))
    key = result.image_embedding_keys[f"{ARCH}|{clip_weights}"]
    embeddings = store.get_array(key)
    assert embeddings.shape == (12, DIM) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    images = torch.stack([reference.preprocess(dataset.load_image(r)) for r in dataset.rows[:3]])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.model.encode_image(images), dim=-1)
    np.testing.assert_allclose(embeddings[:3], expected.numpy(), atol=1e-4)
    # Cached the second time; a cached layer with a new CLIP model needs no forward pass.
    again = Extraction(store, dataset, conv_source, ["0"], config, clips=[clip])
    assert _run(again).cached
    other = ClipSource(ARCH, "another", "another-key", lambda: reference)
    added = _run(Extraction(store, dataset, conv_source, ["0"], config, clips=[clip, other]))
    assert not added.cached and added.images_forwarded == 0
    assert set(added.image_embedding_keys) == {clip.label, other.label}


def test_clip_request_errors(settings: Settings, tmp_path: Path, reference: ClipEncoder) -> None:
    with pytest.raises(InvalidArgument, match=r"clip_models\[1\].arch.*'ViT-B-32'"):
        resolve_clip("ViT-B-33", "x", settings, "clip_models[1]")
    with pytest.raises(FailedPrecondition, match=r"clip.weights_uri"):
        resolve_clip(ARCH, "", settings, "clip")
    with pytest.raises(FailedPrecondition, match=r"clip.arch.*Hugging Face"):
        resolve_clip("ViT-B-16-SigLIP", str(tmp_path), settings, "clip")
    with pytest.raises(NotFound, match=r"clip.weights_uri"):
        resolve_clip(ARCH, str(tmp_path / "missing.pt"), settings, "clip")


def test_concept_set_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "concepts.txt"
    path.write_bytes(b"\xef\xbb\xbfdog\r\ncat\r\rbird\n\n  fish  \rtree")
    assert read_concept_set(path) == ["dog", "cat", "bird", "fish", "tree"]
    path.write_bytes(b"\n \r\n")
    with pytest.raises(InvalidArgument, match=r"no concepts"):
        read_concept_set(path)


def test_embed_text_stores_named_normalised_embeddings_once(
    tmp_path: Path, toy_root: Path, clip_weights: Path, settings: Settings,
    conv_source: ModelSource, reference: ClipEncoder, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = LocalStore(tmp_path / "store")
    servicer = ExtractorServicer(settings, store)
    clip = common_pb2.ClipModelSpec(arch=ARCH, weights_uri=str(clip_weights))
    request = extractor_pb2.EmbedTextRequest(clip=clip, texts=["red", "a blue square"])
    response = servicer.EmbedText(request, None)  # type: ignore[arg-type]
    assert response.count == 2
    stored = store.get_arrays(response.key)
    assert stored["names"].tolist() == ["red", "a blue square"]
    np.testing.assert_allclose(np.linalg.norm(stored["embeddings"], axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        tokens = reference.tokenizer(["a blue square"])
        expected = torch.nn.functional.normalize(reference.model.encode_text(tokens), dim=-1)
    np.testing.assert_allclose(stored["embeddings"][1], expected[0].numpy(), atol=1e-4)
    # Later calls reuse the loaded encoder; the same texts again are not even embedded.
    monkeypatch.setattr(ClipSource, "load", lambda self: pytest.fail("CLIP loaded again"))
    monkeypatch.setattr(ClipEncoder, "encode_texts", lambda *a: pytest.fail("embedded again"))
    assert servicer.EmbedText(request, None).key == response.key  # type: ignore[arg-type]
    monkeypatch.undo()
    monkeypatch.setattr(ClipSource, "load", lambda self: pytest.fail("CLIP loaded again"))
    # A concept set file, and a dataset's label names.
    concepts = tmp_path / "set.txt"
    concepts.write_text("red\r\rcircle\n")
    by_file = servicer.EmbedText(  # type: ignore[arg-type]
        extractor_pb2.EmbedTextRequest(clip=clip, concept_set_uri=str(concepts)), None)
    assert store.get_arrays(by_file.key)["names"].tolist() == ["red", "circle"]
    dataset = read_broden(toy_root, limit=4)
    result = _run(Extraction(store, dataset, conv_source, ["0"], ComputeConfig()))
    by_labels = servicer.EmbedText(  # type: ignore[arg-type]
        extractor_pb2.EmbedTextRequest(clip=clip, dataset_key=result.dataset_key), None)
    assert by_labels.count == len(dataset.concepts)
    assert store.get_arrays(by_labels.key)["names"].tolist()[:2] == ["red", "orange"]
    with pytest.raises(InvalidArgument, match=r"texts"):
        servicer.EmbedText(extractor_pb2.EmbedTextRequest(clip=clip), None)  # type: ignore[arg-type]


def test_toy_clip_from_a_local_file(
    tmp_path: Path, toy_root: Path, settings: Settings, conv_source: ModelSource
) -> None:
    recipe = ClipRecipe()
    untrained = resolve_clip("toy", "", settings, "clip")  # named by its recipe; trains nothing
    assert not (tmp_path / "cache" / "toyworld").exists()
    torch.manual_seed(0)
    path = tmp_path / "toy_clip.pt"
    torch.save(build_toy_clip(recipe).state_dict(), path)
    clip = resolve_clip("toy", str(path), settings, "clip")
    assert clip.key != untrained.key and clip.label == f"toy|{path}"
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root, limit=6)
    result = _run(Extraction(store, dataset, conv_source, ["0"], ComputeConfig(), clips=[clip]))
    embeddings = store.get_array(result.image_embedding_keys[clip.label])
    assert embeddings.shape == (6, recipe.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(2)}, wrong)
    with pytest.raises(InvalidArgument, match=r"clip\.weights_uri.*does not fit the toy CLIP"):
        resolve_clip("toy", str(wrong), settings, "clip").load()
