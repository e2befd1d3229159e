"""Trained toy-model weights shipped inside the package, so every machine uses the same ones.

Training is deterministic on one CPU but not across CPUs (kernels round differently), so
the toy models are trained once by `neurodissect toyworld train` and their files ship in
`weights/`: `{name}.pt` beside `{name}.json`, which records the content key of the recipe
that made the file, the file's sha256, the training metrics and the machine it ran on.

A loader asks for `(name, key)`: the shipped file answers when it was trained for that
key (its hash is checked on every load); a recipe that differs from the shipped one (a
test's small recipe, an edited default) falls back to the training cache (`model_cache`).
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from services.common.atomic_file import atomic_write

WEIGHTS_DIR = Path(__file__).with_name("weights")


class ShippedWeightsError(RuntimeError):
    """A shipped weights file does not match the hash recorded beside it."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_record(name: str, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any] | None:
    """The record `{name}.json` of a shipped model, or None when none ships."""
    path = weights_dir / f"{name}.json"
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def shipped_path(name: str, key: str, weights_dir: Path = WEIGHTS_DIR) -> Path | None:
    """The shipped file of `name` if it was trained for `key`, its hash checked; else None.

    Raises ShippedWeightsError when the file is missing or its bytes differ from the
    recorded sha256 (a damaged checkout), naming both and how to mend it.
    """
    record = shipped_record(name, weights_dir)
    if record is None or record["key"] != key:
        return None
    path = weights_dir / record["file"]
    if not path.is_file():
        raise ShippedWeightsError(f"{path} is missing although {name}.json ships beside it")
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise ShippedWeightsError(
            f"{path} has sha256 {digest}, but {name}.json records {record['sha256']}: "
            "restore the file from git, or retrain with `neurodissect toyworld train`"
        )
    return path


def ship(
    name: str,
    key: str,
    source: Path,
    metrics: dict[str, Any],
    weights_dir: Path = WEIGHTS_DIR,
) -> Path:
    """Copy a trained file into `weights_dir` as `{name}{suffix}` and record it; return it."""
    target = weights_dir / f"{name}{source.suffix}"
    atomic_write(target, lambda handle: handle.write(source.read_bytes()))
    target.chmod(0o644)  # mkstemp's 0600 would keep a shared checkout from reading it
    record = {
        "name": name,
        "file": target.name,
        "key": key,
        "sha256": file_sha256(target),
        "metrics": metrics,
        "trained_on": {"machine": platform.machine(), "processor": _processor_name()},
    }
    (weights_dir / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return target


def _processor_name() -> str:
    """The CPU model as the kernel names it (what makes float rounding differ), if known."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
