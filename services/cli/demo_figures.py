"""The demo's figures as a Markdown block: printed by `neurodissect demo`, kept in the README.

`figures_block` renders a finished job's per-layer figures (NetDissect detectors and
their labels, simulation ρ per method, occlusion and ablation when they ran) between
two marker lines. The demo prints it;
`neurodissect demo --readme README.md` (`make readme-figures`) writes it into the README
in place of the previous block, and a test checks that the README's block equals what
the demo prints, so the README's figures are always those of the shipped toy models.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from neurodissect.v1 import common_pb2

from services.gateway.results import dropping

BEGIN = "<!-- demo-figures: made by `make readme-figures` from what `make run` prints -->"
END = "<!-- /demo-figures -->"
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)


def detector_labels(units: Sequence[common_pb2.UnitResult]) -> str:
    """'`a` ×3, `b`, …': the labels of a layer's NetDissect detectors, most frequent first."""
    counts = Counter(u.netdissect.label for u in units if u.netdissect.detector)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"`{label}` ×{n}" if n > 1 else f"`{label}`" for label, n in ranked)


def figures_block(
    job: common_pb2.Job, units: Mapping[str, Sequence[common_pb2.UnitResult]]
) -> str:
    """The Markdown block of `job`'s figures; `units` maps each layer to its unit results."""
    summaries = {summary.layer: summary for summary in job.summary}
    layers = [layer for layer in job.spec.layers if layer in summaries]
    lines = [BEGIN, ""]
    if any("netdissect" in summaries[layer].methods for layer in layers):
        lines += [
            "| layer | units | NetDissect detectors (IoU ≥ 0.04) | unique labels "
            "| detector labels |",
            "|---|---|---|---|---|",
        ]
        for layer in layers:
            summary = summaries[layer]
            lines.append(
                f"| {layer} | {summary.units} | {summary.detectors} | {summary.unique_labels} "
                f"| {detector_labels(units.get(layer, ())) or '—'} |"
            )
        lines.append("")
    methods = sorted(
        {m for layer in layers for m in summaries[layer].simulation_mean},
        key=lambda m: -max(summaries[layer].simulation_mean.get(m, -1.0) for layer in layers),
    )
    if methods:
        dead = ", ".join(f"{layer} {summaries[layer].dead_units}" for layer in layers)
        lines += [
            f"Simulation scoring (mean ρ ± standard error over a layer's units; dead units: "
            f"{dead}):",
            "",
            "| method | " + " | ".join(layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for method in methods:
            cells = [
                f"{summaries[layer].simulation_mean[method]:.3f} ± "
                f"{summaries[layer].simulation_sem[method]:.3f}"
                if method in summaries[layer].simulation_mean
                else "—"
                for layer in layers
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += netdissect_check_lines([summaries[layer] for layer in layers])
    lines += verification_lines(job)
    lines.append(END)
    return "\n".join(lines)


def netdissect_check_lines(summaries: Sequence[common_pb2.LayerSummary]) -> list[str]:
    """Significance's and the threshold sweep's per-layer figures (none if neither ran)."""
    lines: list[str] = []
    tested = [s for s in summaries if "significance" in s.methods]
    if tested:
        lines += [
            "Detector significance (each unit's label against its masks placed at random "
            "within each image; Benjamini–Hochberg at q = 0.05):",
            "",
            "| layer | detectors (IoU ≥ 0.04) | significant detectors |",
            "|---|---|---|",
            *(f"| {s.layer} | {s.detectors} | {s.significant_detectors} |" for s in tested),
            "",
        ]
    swept = [s for s in summaries if "threshold_sweep" in s.methods and s.sweep]
    if swept:
        lines += [
            "Threshold sweep (detectors / unique labels / units whose label is unchanged "
            "from the default top quantile):",
            "",
            "| top quantile | " + " | ".join(s.layer for s in swept) + " |",
            "|---|" + "---|" * len(swept),
        ]
        thresholds = sorted({p.threshold for s in swept for p in s.sweep})
        for threshold in thresholds:
            cells = [
                next((f"{p.detectors} / {p.unique_labels} / {p.unchanged_fraction:.0%}"
                      for p in s.sweep if p.threshold == threshold), "—")
                for s in swept
            ]
            lines.append(f"| {threshold:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def verification_lines(job: common_pb2.Job) -> list[str]:
    """Occlusion's and ablation's per-layer figures as Markdown tables (none if neither ran)."""
    summaries = [s for layer in job.spec.layers for s in job.summary if s.layer == layer]
    lines: list[str] = []
    occluded = [s for s in summaries if "occlusion" in s.methods]
    if occluded:
        lines += [
            "Occlusion verification (NetDissect's IoU against the drop when a concept's "
            "regions are hidden):",
            "",
            "| layer | fill | regions | mean ρ(drop, IoU) over concepts "
            "| detectors dropping ≥ 10% for their label | forward passes |",
            "|---|---|---|---|---|---|",
        ]
        # Seconds are left out: the block must read the same on every machine.
        for s in occluded:
            o = s.occlusion
            lines.append(
                f"| {s.layer} | {o.fill} | {o.regions} | {o.mean_correlation:.3f} "
                f"| {dropping(o)} | {o.forward_passes} |"
            )
        lines.append("")
    ablated = [s for s in summaries if "ablation" in s.methods]
    methods = sorted({m for s in ablated for m in s.ablation_mean})
    if ablated:
        lines += [
            "Ablation scoring (α = 1 − Δ/base over a layer's units, mean ± standard error; "
            "1: the explanation replaces the unit perfectly, 0: as mean-ablation):",
            "",
            "| method | " + " | ".join(s.layer for s in ablated) + " |",
            "|---|" + "---|" * len(ablated),
        ]
        for method in methods:
            cells = [
                f"{s.ablation_mean[method]:.3f} ± {s.ablation_sem[method]:.3f}"
                if method in s.ablation_mean
                else "—"
                for s in ablated
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        notes = [f"{s.layer}: {s.ablation_note}" for s in ablated if s.ablation_note]
        if notes:
            lines += [*notes, ""]
    return lines


def block_in(text: str) -> str:
    """The figures block inside `text` (a README or the demo's output); '' if none."""
    found = _BLOCK.search(text)
    return found.group(0) if found else ""


def write_into(readme: Path, block: str) -> None:
    """Replace the figures block of `readme` with `block` (ValueError if it has none)."""
    text = readme.read_text()
    if not block_in(text):
        raise ValueError(f"{readme} has no block between {BEGIN!r} and {END!r}")
    readme.write_text(_BLOCK.sub(lambda _: block, text, count=1))
