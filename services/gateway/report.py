"""The HTML report of a finished dissection: `reports/{job_id}/index.html`.

One page, with the units' exemplar thumbnails beside it under
`reports/{job_id}/images/` (relative links, so the folder reads the same from a
local store or copied out of S3): the job's spec and figures, then per layer the
summary table and one row per unit with every method's answer.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.gateway.jobs import state_name

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 48px; height: 48px; margin-right: 2px; image-rendering: pixelated; }
.detector { font-weight: bold; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _summary_table(summary: common_pb2.LayerSummary) -> str:
    rows = [
        ("units", summary.units),
        ("NetDissect detectors", summary.detectors),
        ("unique detector labels", summary.unique_labels),
        ("dead units", summary.dead_units),
    ]
    rows += [
        (f"detectors ({category})", count)
        for category, count in sorted(summary.detectors_per_category.items())
    ]
    rows += [
        (f"simulation ρ, {method}", f"{mean:.4f} ± {summary.simulation_sem[method]:.4f}")
        for method, mean in sorted(summary.simulation_mean.items())
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td class=num>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _answers(unit: common_pb2.UnitResult) -> list[str]:
    nd, comp, cd, lin = unit.netdissect, unit.compositional, unit.clip_dissect, unit.linear
    cells = [
        f"{_e(nd.label)} <small>({_e(nd.category)}, IoU {nd.iou:.3f})</small>"
        if unit.HasField("netdissect")
        else "",
        f"{_e(comp.formula)} <small>(IoU {comp.iou:.3f})</small>"
        if unit.HasField("compositional")
        else "",
        f"{_e(cd.label)} <small>({cd.score:.3f})</small>" if unit.HasField("clip_dissect") else "",
        f"{_e(lin.explanation)} <small>(val ρ {lin.val_corr:.3f})</small>"
        if unit.HasField("linear")
        else "",
        _e(unit.milan.caption) if unit.HasField("milan") else "",
        ", ".join(f"{_e(m)} {v:.3f}" for m, v in sorted(unit.simulation.items())),
    ]
    return cells


def _images(unit: common_pb2.UnitResult, images: Mapping[int, str]) -> str:
    return "".join(
        f'<img alt="image {image_id}" src="{_e(images[image_id])}">'
        for image_id in unit.netdissect.exemplars
        if image_id in images
    )


def render_report(
    job: common_pb2.Job,
    layers: Mapping[str, Sequence[common_pb2.UnitResult]],
    images: Mapping[int, str],
) -> str:
    """The report page of `job`, from its per-layer unit results and exemplar thumbnails.

    `images` maps probe image ids to thumbnail paths relative to the page;
    exemplars without one are left out.
    """
    title = f"neurodissect report — {job.spec.name or job.id}"
    spec = json_format.MessageToJson(job.spec, preserving_proto_field_name=True, indent=1)
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>",
        f"<p>job <code>{_e(job.id)}</code>, state {_e(state_name(job.state))}, model "
        f"<code>{_e(job.spec.model.source)}/{_e(job.spec.model.name)}</code>, dataset "
        f"<code>{_e(job.spec.dataset.kind)}</code>, {job.bad_images} unreadable images</p>",
        f"<details><summary>spec</summary><pre>{_e(spec)}</pre></details>",
    ]
    summaries = {s.layer: s for s in job.summary}
    for layer, units in layers.items():
        parts.append(f"<h2>layer <code>{_e(layer)}</code></h2>")
        if layer in summaries:
            parts.append(_summary_table(summaries[layer]))
        parts.append(
            "<table><tr><th>unit</th><th>exemplars</th><th>NetDissect</th><th>compositional</th>"
            "<th>CLIP-Dissect</th><th>linear</th><th>MILAN</th><th>simulation ρ</th></tr>"
        )
        for unit in units:
            marker = " class=detector" if unit.netdissect.detector else ""
            cells = "".join(f"<td>{cell}</td>" for cell in _answers(unit))
            parts.append(
                f"<tr{marker}><td class=num>{unit.unit}</td>"
                f"<td>{_images(unit, images)}</td>{cells}</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
