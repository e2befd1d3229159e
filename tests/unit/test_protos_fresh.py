"""The committed generated protobuf code equals what protoc makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted(PROTO_ROOT.glob("neurodissect/v1/*.proto"))
    assert len(protos) == 5
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, protos)],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert len(generated) == 15
    stale = [
        str(p) for p in generated if (tmp_path / p).read_bytes() != (PROTO_ROOT / p).read_bytes()
    ]
    assert not stale, f"stale generated code (run `make proto`): {stale}"
