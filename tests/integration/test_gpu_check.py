"""bench/gpu_check.sh in its CPU mode (CPU against CPU), tiny, and its row comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import ATOL, METHODS, Line, compare

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]


def test_the_cpu_mode_runs_every_model_and_method_and_finds_them_equal(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--images", "24",
         "--size", "32", "--out", str(out)],
        cwd=REPO, env={**os.environ, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=840,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    stages = {(line["model"], line["stage"]): line for line in report["lines"]}
    for model in ("toynet", "resnet18"):
        assert stages[(model, "extract")]["device_s"] > 0
        for method in METHODS:
            line = stages[(model, method)]
            assert line["rows"] > 0 and line["equal"] == line["rows"], line


def test_a_changed_label_fails_and_a_small_score_difference_passes() -> None:
    cpu = {0: {"unit": 0, "label": "red", "iou": 0.30}, 1: {"unit": 1, "label": "sky", "iou": 0.1}}
    device = {0: {"unit": 0, "label": "red", "iou": 0.30 + ATOL / 2},
              1: {"unit": 1, "label": "sea", "iou": 0.1}}
    line = Line("m", "netdissect", 0.0, 0.0)
    compare(line, device, cpu)
    assert (line.rows, line.equal) == (2, 1)
    assert "'sea' on the device, 'sky' on the CPU" in line.first_mismatch
