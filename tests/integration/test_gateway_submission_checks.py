"""What can be checked before work starts is checked at submission, by a real gateway:
CLIP concept files, open_clip architectures and their weights, toy world placement and
size. Each is refused with the user's field named, nothing is stored, and the CLI exits 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import open_clip
import pytest
import torch
from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.cli import main as cli
from tests.integration.gateway_fakes import FakeWorld, fake_spec

Spec = common_pb2.DissectionSpec
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny open_clip architectures with patch 8 and 16, weights of the first, concept files."""
    root = tmp_path_factory.mktemp("clip")
    for name, patch in (("nd-gw-p8", 8), ("nd-gw-p16", 16)):
        (root / f"{name}.json").write_text(json.dumps({
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": patch},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                         "layers": 2},
        }))
    open_clip.add_model_config(root)
    torch.save(open_clip.create_model("nd-gw-p8").state_dict(), root / "p8.pt")
    (root / "empty.txt").write_text("\n\n")
    (root / "concepts.txt").write_text("dog\ncat\n")
    return {"weights": root / "p8.pt", "empty": root / "empty.txt",
            "concepts": root / "concepts.txt", "missing": root / "missing.txt"}


def _clip(arch: str, weights: Path, concepts: Path | None = None) -> Callable[[Spec], None]:
    def spoil(spec: Spec) -> None:
        spec.clip_dissect.clip.arch = arch
        spec.clip_dissect.clip.weights_uri = str(weights)
        spec.clip_dissect.concept_set_uri = str(concepts) if concepts else ""
        spec.ClearField("linear")
        spec.simulation.simulator.arch = "toy"

    return spoil


def _toy(uri: str = "", n_images: int = 0, image_size: int = 0) -> Callable[[Spec], None]:
    def spoil(spec: Spec) -> None:
        spec.dataset.uri = uri
        spec.dataset.toyworld.n_images = n_images
        spec.dataset.toyworld.image_size = image_size

    return spoil


def _cases(files: dict[str, Path], tmp: Path) -> list[tuple[Callable[[Spec], None],
                                                            grpc.StatusCode, str]]:
    weights = files["weights"]
    return [
        (_clip("ViT-B-3", weights), INVALID, "clip_dissect.clip.arch"),
        (_clip("nd-gw-p16", weights), INVALID, "clip_dissect.clip.weights_uri"),
        (_clip("nd-gw-p8", weights, files["empty"]), INVALID, "clip_dissect.concept_set_uri"),
        (_clip("nd-gw-p8", weights, files["missing"]), grpc.StatusCode.NOT_FOUND,
         "clip_dissect.concept_set_uri"),
        (_toy(uri=str(tmp / "here")), INVALID, "dataset.uri"),
        (_toy(n_images=200_000, image_size=1024), INVALID, "dataset.toyworld.n_images"),
        (_toy(n_images=100, image_size=1024), INVALID, "dataset.toyworld.image_size"),
        (_toy(n_images=20_000, image_size=256), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "dataset.toyworld.n_images"),
    ]


def test_mistakes_are_refused_at_submission_and_store_nothing(
    world: FakeWorld, clip_files: dict[str, Path], tmp_path: Path
) -> None:
    world.start_gateway()
    with world.client() as client:
        for spoil, code, field in _cases(clip_files, tmp_path):
            spec = fake_spec()
            spoil(spec)
            with pytest.raises(grpc.RpcError) as caught:
                client.submit(spec)
            assert caught.value.code() == code, (field, caught.value.details())
            assert caught.value.details().startswith(f"{field}: "), caught.value.details()
        assert list(world.store.list("")) == []
        assert not (tmp_path / "here").exists()
        good = fake_spec()
        _clip("nd-gw-p8", clip_files["weights"], clip_files["concepts"])(good)
        job = client.wait(client.submit(good).id)
    assert job.state == common_pb2.SUCCEEDED, job.error


def test_the_cli_exits_2_on_a_mismatched_clip(
    world: FakeWorld, clip_files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    world.start_gateway()
    spec = fake_spec()
    _clip("nd-gw-p16", clip_files["weights"])(spec)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(json_format.MessageToDict(spec)))
    argv = ["--gateway-addr", world.settings.gateway_addr, "submit", str(path)]
    assert cli.main(argv) == cli.EXIT_REJECTED
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT: clip_dissect.clip.weights_uri: p8.pt is not a checkpoint" in err
