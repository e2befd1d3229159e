"""The `neurodissect` command line against the running local stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.cli.stack import LocalStack

# Jobs of the toy world end to end on real processes (the toy models ship: nothing trains).
pytestmark = pytest.mark.timeout(1800)

def cli(
    *args: str, gateway: str = "127.0.0.1:1", timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--gateway-addr", gateway, *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_submit_wait_results_export_through_the_cli(
    platform: LocalStack, toy_spec: common_pb2.DissectionSpec, tmp_path: Path
) -> None:
    gateway = platform.address("gateway")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json_format.MessageToJson(toy_spec))
    submitted = cli("submit", str(spec_file), "--name", "from the cli", "--wait", gateway=gateway)
    assert submitted.returncode == 0, submitted.stderr
    job_id = next(line.split()[1] for line in submitted.stdout.splitlines()
                  if line.startswith("job: "))
    assert "state: SUCCEEDED" in submitted.stdout

    layer = toy_spec.layers[0]
    shown = cli("results", job_id, "--layer", layer, "--format", "json", gateway=gateway)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows[0]["unit"] == 0 and rows[0]["netdissect"]["label"]
    assert {"unit", "netdissect"} <= set(rows[0])

    table = cli("results", job_id, "--layer", layer, "--format", "csv", gateway=gateway)
    assert table.stdout.startswith("layer,unit,netdissect_label")
    tally = cli("export", job_id, "--layer", layer, "--format", "tally", gateway=gateway)
    assert tally.stdout.startswith("unit,category,label,score,")
    assert len(tally.stdout.splitlines()) == len(rows) + 1

    status = cli("status", job_id, "--format", "json", gateway=gateway)
    job = json.loads(status.stdout)
    assert job["state"] == "SUCCEEDED" and job["spec"]["name"] == "from the cli"
    listed = json.loads(cli("jobs", "--format", "json", gateway=gateway).stdout)
    assert job_id in [j["id"] for j in listed]
    assert cli("cancel", job_id, gateway=gateway).stdout.strip().endswith("SUCCEEDED")
    described = cli("describe-model", "--source", "toy", "--name", "toynet", "--format", "json",
                    gateway=gateway)
    assert layer in [entry["name"] for entry in json.loads(described.stdout)["layers"]]


@pytest.mark.parametrize(("content", "suffix", "field"), [
    ('{"compute": {"batch_size": "many"}}', ".json", "compute.batch_size"),
    ("layers: conv1\n", ".yaml", "layers"),
    ("model:\n  source: toy\n  nme: toynet\n", ".yaml", "model.nme"),
    ("- just\n- a list\n", ".yaml", "spec"),
    ("{not json", ".json", "spec"),
])
def test_malformed_spec_files_are_refused_naming_the_field(
    tmp_path: Path, content: str, suffix: str, field: str
) -> None:
    spec_file = tmp_path / f"spec{suffix}"
    spec_file.write_text(content)
    refused = cli("submit", str(spec_file))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: INVALID_ARGUMENT: {field}:"), refused.stderr


def test_an_unknown_method_flag_is_refused() -> None:
    refused = cli("submit", "--model", "toynet", "--methods", "netdissect,telepathy")
    assert refused.returncode == 2
    assert "INVALID_ARGUMENT: methods: unknown method 'telepathy'" in refused.stderr


def test_an_unreachable_gateway_is_reported() -> None:
    refused = cli("--timeout", "2", "jobs")
    assert refused.returncode == 3
    assert refused.stderr.startswith("error: UNAVAILABLE")


def test_toyworld_generate_writes_a_broden_directory(tmp_path: Path) -> None:
    made = cli("toyworld", "generate", "--out", str(tmp_path / "toy"), "--n", "12", "--size", "32",
               "--seed", "3")
    assert made.returncode == 0, made.stderr
    index = (tmp_path / "toy" / "index.csv").read_text()
    assert index.startswith("image,split,ih,iw,sh,sw,")
    assert len(index.strip().splitlines()) == 13
