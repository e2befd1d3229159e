"""The GPU path, checked in-process: extraction and the explainer's methods, device vs CPU.

`python -m bench.gpu_check [--device cuda|cpu|auto] [--images N] [--size PX]`
(`bench/gpu_check.sh` runs it with a Python it finds or prepares).

For toynet (shipped weights) and a torchvision resnet18 (random weights from seed 0,
written to a local file: nothing is downloaded) on the toy world's Broden-format
probe set, the shipped code runs twice, without the services: the extractor's
servicer (`Extract` with `compute.device`, the toy CLIP's image embeddings,
`EmbedText` of the labels) and the explainer's stage (`explain` over a local Ray)
with NetDissect, compositional explanations, CLIP-Dissect and linear explanations,
once with the chosen device and once with the CPU. Every stored result row of the
device run must match the CPU run's: every text field (labels, formulas, concepts)
equal, every number within `ATOL + RTOL·|cpu|`. Device arithmetic differs from the
CPU's in the last bits, which can move a quantile threshold by one activation and
an IoU by a few pixels, hence the tolerance; a different label is a failure.

Prints one line per model and stage (seconds on the device and on the CPU, rows
equal, largest difference), writes var/bench/gpu_check.json, and exits 1 when a
row differs. The methods run on the CPU in both runs (they read stored arrays);
their rows differ only through the activations. The CPU run goes first and pays
the Ray workers' start-up. With `--device cpu` (or `auto` without CUDA) both runs use the CPU:
the check itself is tested that way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import torchvision
from neurodissect.v1 import common_pb2, explainer_pb2, extractor_pb2

from services.common.result_store import read_rows
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.explainer import sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.servicer import explain
from services.extractor.datasets import toy_world_generation
from services.extractor.servicer import ExtractorServicer, dataset_request

RESULTS = Path("var/bench/gpu_check.json")
METHODS = ("netdissect", "compositional", "clip_dissect", "linear")
ATOL, RTOL = 0.02, 0.02
TOY_CLIP = common_pb2.ClipModelSpec(arch="toy")
SEED = 0


@dataclass(frozen=True)
class Model:
    """A model to dissect: its spec and the layers checked."""

    name: str
    spec: common_pb2.ModelSpec
    layers: tuple[str, ...]


@dataclass
class Line:
    """One model and stage: seconds on each side, rows compared, the largest difference."""

    model: str
    stage: str
    device_s: float
    cpu_s: float
    rows: int = 0
    equal: int = 0
    max_diff: float = 0.0
    first_mismatch: str = ""


class Context:
    """What the servicers ask of a gRPC context, for calls made in-process."""

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback: Any) -> bool:
        return True


def models(work: Path) -> list[Model]:
    """toynet, and a resnet18 with random weights from `SEED` saved under `work`."""
    torch.manual_seed(SEED)
    weights = work / "resnet18-seed0.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return [
        Model("toynet", common_pb2.ModelSpec(source="toy", name="toynet"), ("layer2", "layer3")),
        Model("resnet18", common_pb2.ModelSpec(
            source="torchvision", name="resnet18", weights_uri=str(weights), input_size=64,
        ), ("layer3", "layer4")),
    ]


def dissection(model: Model) -> common_pb2.DissectionSpec:
    """The spec the explainer reads: the four methods with CLIP ones on the toy CLIP."""
    spec = common_pb2.DissectionSpec(model=model.spec, layers=model.layers)
    for method in METHODS:
        getattr(spec, method).SetInParent()
    spec.clip_dissect.clip.CopyFrom(TOY_CLIP)
    spec.linear.concepts = "clip"
    return spec


def run_side(
    store: ObjectStore, settings: Settings, model: Model, device: str, images: int, size: int
) -> tuple[dict[str, float], dict[str, dict[int, dict[str, Any]]]]:
    """Extract on `device` and explain; seconds per stage and stored rows per layer/method."""
    extractor = ExtractorServicer(settings, store)
    dataset = common_pb2.DatasetSpec(
        kind="toyworld", toyworld=common_pb2.ToyWorldParams(n_images=images, image_size=size))
    request = extractor_pb2.ExtractRequest(
        job_id="gpu-check", model=model.spec, layers=model.layers, dataset=dataset,
        compute=common_pb2.ComputeSpec(device=device, batch_size=32), clip_models=[TOY_CLIP],
    )
    # Generated once into the cache, before the clock starts: extraction is timed alone.
    for _ in toy_world_generation(dataset_request(dataset), settings, threading.Event()):
        pass
    started = time.perf_counter()
    final = list(extractor.Extract(request, Context()))[-1]
    seconds = {"extract": time.perf_counter() - started}
    text_key = extractor.EmbedText(extractor_pb2.EmbedTextRequest(
        clip=TOY_CLIP, dataset_key=final.dataset_key), Context()).key
    embeddings = explainer_pb2.ConceptEmbeddings(
        image_key=final.image_embedding_keys["toy|"], text_key=text_key)
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for layer in model.layers:
        plan = plan_request(store, explainer_pb2.ExplainRequest(
            job_id="gpu-check", layer=layer, methods=METHODS, spec=dissection(model),
            dataset_key=final.dataset_key, acts_key=final.acts_keys[layer],
            clip_dissect=embeddings, linear=embeddings,
        ), EXPLAINER_METHODS)
        # Each message closes a step of its method (shared inputs: no method).
        last = time.perf_counter()
        for message in explain(settings, store, plan):
            now = time.perf_counter()
            step = message.method or "shared inputs"
            seconds[step] = seconds.get(step, 0.0) + now - last
            last = now
        for method in METHODS:
            rows[f"{layer}/{method}"] = read_rows(store, "gpu-check", layer, method)
    return seconds, rows


def differences(device: Any, cpu: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(where, how much) for each field of two result rows: inf for unequal text."""
    if isinstance(cpu, dict) and isinstance(device, dict):
        for key in sorted(set(cpu) | set(device)):
            yield from differences(device.get(key), cpu.get(key), f"{path}.{key}")
    elif isinstance(cpu, list) and isinstance(device, list) and len(cpu) == len(device):
        for i, (a, b) in enumerate(zip(device, cpu, strict=True)):
            yield from differences(a, b, f"{path}[{i}]")
    elif (isinstance(cpu, int | float) and isinstance(device, int | float)
          and not isinstance(cpu, bool) and not isinstance(device, bool)):
        both_nan = math.isnan(cpu) and math.isnan(device)
        diff = 0.0 if both_nan or cpu == device else abs(float(device) - float(cpu))
        yield path, diff / (ATOL + RTOL * abs(float(cpu))) * ATOL
    elif device != cpu:
        yield f"{path}: {device!r} on the device, {cpu!r} on the CPU", math.inf


def compare(line: Line, device: dict[int, dict[str, Any]], cpu: dict[int, dict[str, Any]]) -> None:
    """Fill `line` with how many rows of `device` match `cpu` within the tolerance."""
    for unit in sorted(set(cpu) | set(device)):
        line.rows += 1
        worst = max((d for d in differences(device.get(unit), cpu.get(unit))),
                    key=lambda d: d[1], default=("", 0.0))
        if worst[1] <= ATOL:
            line.equal += 1
        elif not line.first_mismatch:
            line.first_mismatch = f"unit {unit} {worst[0]}"
        if math.isfinite(worst[1]):
            line.max_diff = max(line.max_diff, worst[1])


def check(device: str, images: int, size: int, work: Path) -> list[Line]:
    """Run both sides for every model; one `Line` per model and stage."""
    lines: list[Line] = []
    cache = work / "cache"
    for model in models(work):
        sides = []
        for side, side_device in (("reference", "cpu"), ("checked", device)):
            root = work / f"{model.name}-{side}"
            settings = Settings(store_url=f"file://{root}/store", cache_dir=str(cache),
                                device=side_device)
            sides.append(run_side(settings.open_store(), settings, model, side_device, images,
                                  size))
        (cpu_seconds, cpu_rows), (device_seconds, device_rows) = sides
        for stage in ("extract", "shared inputs"):
            lines.append(Line(model.name, stage, device_seconds.get(stage, 0.0),
                              cpu_seconds.get(stage, 0.0)))
        for method in METHODS:
            line = Line(model.name, method, device_seconds.get(method, 0.0),
                        cpu_seconds.get(method, 0.0))
            for layer in model.layers:
                compare(line, device_rows[f"{layer}/{method}"], cpu_rows[f"{layer}/{method}"])
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--images", type=int, default=400, help="toy world probe images")
    parser.add_argument("--size", type=int, default=64, help="toy world image size (px)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none (cpu)"
    print(f"torch {torch.__version__}, device {device}, card {card}, "
          f"{args.images} images at {args.size}px", flush=True)
    ray.shutdown()
    sharding.connect(Settings())  # a local Ray with every core of the machine
    with tempfile.TemporaryDirectory(prefix="ndx-gpu-check-") as work:
        lines = check(device, args.images, args.size, Path(work))
    ray.shutdown()
    header = (f"{'model':<10}{'stage':<15}{device + ' s':>10}{'cpu s':>10}"
              f"{'rows equal':>14}{'max diff':>10}")
    print(header)
    print("-" * len(header))
    for line in lines:
        rows = f"{line.equal}/{line.rows}" if line.rows else ""
        diff = f"{line.max_diff:.2g}" if line.rows else ""
        print(f"{line.model:<10}{line.stage:<15}{line.device_s:>10.2f}{line.cpu_s:>10.2f}"
              f"{rows:>14}{diff:>10}")
        if line.first_mismatch:
            print(f"    first mismatch: {line.first_mismatch}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "torch": torch.__version__, "device": device, "card": card, "images": args.images,
        "size": args.size, "atol": ATOL, "rtol": RTOL, "lines": [asdict(x) for x in lines],
    }, indent=1))
    print(f"wrote {args.out}; tolerance |device - cpu| <= {ATOL} + {RTOL}·|cpu|, text equal")
    return 0 if all(line.equal == line.rows for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
