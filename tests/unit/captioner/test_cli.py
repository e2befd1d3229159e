"""`neurodissect captioner train` through the real command line."""

import json
from pathlib import Path

import pytest
import torch

from services.captioner.backbones import build_encoder, load_captioner
from services.cli.main import main
from tests.unit.captioner.synthetic import colour_world


def test_train_writes_a_loadable_checkpoint_and_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations = colour_world(tmp_path / "milan", units_per_colour=2)
    torch.manual_seed(0)
    torch.save(build_encoder("resnet18").backbone.state_dict(), tmp_path / "r18.pt")
    out, report = tmp_path / "captioner.pt", tmp_path / "report.json"
    code = main(
        [
            "captioner", "train", "--annotations", str(annotations), "--backbone", "resnet18",
            "--backbone-weights", str(tmp_path / "r18.pt"), "--out", str(out),
            "--epochs", "2", "--report", str(report),
        ]
    )  # fmt: skip
    assert code == 0
    assert str(out) in capsys.readouterr().out

    written = json.loads(report.read_text())
    for model in ("decoder", "language_model"):
        epochs = written[model]["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        assert all(e["train_loss"] > 0 and e["val_loss"] > 0 for e in epochs)
    assert all(e["val_bleu"] is not None for e in written["decoder"]["epochs"])
    assert written["train_seconds"] > 0 and written["val_unit_ids"]
    assert written["backbone"]["input_size"] == 16  # colour_world's exemplars are 16 px

    captioner = load_captioner(out)
    assert captioner.encoder.description.architecture == "resnet18"
    assert captioner.encoder.description.input_size == 16


def test_bad_backbones_are_rejected_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations = colour_world(tmp_path / "milan", units_per_colour=1)
    argv = ["captioner", "train", "--annotations", str(annotations), "--out", str(tmp_path / "c")]
    assert main([*argv, "--backbone", "vgg16"]) == 2
    assert "backbone.architecture" in capsys.readouterr().err
    assert main([*argv, "--backbone", "resnet18", "--backbone-weights", "/absent.pt"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
