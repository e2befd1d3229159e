"""The HTML pages: jobs, job, layer, unit, search and login.

The pages of one job live side by side under one folder, linked by relative names
(`index.html`, `layer-{layer}.html`, `unit-{layer}-{unit}.html`, `search.html`,
pictures as `img/{digest}.png`), so the server (`/jobs/{id}/...`) and a static copy
serve the very same bytes; only the live server adds the jobs list, the login page
and a refresh while a job runs. Tables, filters and search run in the browser over
JSON embedded in the page, so a 2,048-unit layer is one request.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.common.errors import NotFound
from services.gateway import results
from services.gateway.jobs import TERMINAL, state_name
from services.gateway.webui import assets, figures
from services.gateway.webui.data import JobReader
from services.gateway.webui.render import OUTLINES, Renders

METHOD_TITLES = {
    "netdissect": "NetDissect",
    "significance": "significance",
    "compositional": "compositional",
    "clip_dissect": "CLIP-Dissect",
    "linear": "linear",
    "milan": "MILAN",
    "occlusion": "occlusion",
}


@dataclass
class Page:
    """One page of a job: its file name in the job's folder, HTML and pictures it shows."""

    name: str
    html: str
    images: list[str] = field(default_factory=list)


def layer_file(layer: str) -> str:
    """File name of a layer's page."""
    return f"layer-{layer}.html"


def unit_file(layer: str, unit: int) -> str:
    """File name of a unit's page."""
    return f"unit-{layer}-{unit}.html"


def table_file(layer: str) -> str:
    """File name of a layer's table (the layer page's JSON) in a finished job's copy."""
    return f"tables/{layer}.json"


def image_file(digest: str) -> str:
    """File name of a stored picture, relative to the job's folder."""
    return f"img/{digest}.png"


def _e(value: object) -> str:
    return html.escape(str(value))


def _href(name: str) -> str:
    return _e(quote(name))


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "–"


def _json_script(element_id: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def shell(
    title: str, body: str, nav: Sequence[tuple[str, str]] = (), script: str = "",
    refresh_s: int = 0,
) -> str:
    """A whole page: head with the inlined style, a navigation bar, `body`, then `script`."""
    links = "".join(f'<a href="{_href(href)}">{_e(text)}</a>' for href, text in nav)
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    tail = f"<script>{script}</script>" if script else ""
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8>{refresh}"
        "<link rel=icon href='data:,'>"
        f"<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{assets.STYLE}</style></head><body>"
        f"<header><b>neurodissect</b> &nbsp; {links}</header><main>{body}</main>{tail}"
        f"</body></html>"
    )


def stage_rows(job: common_pb2.Job) -> list[dict[str, Any]]:
    """Each stage's progress as JSON-ready rows: stage, done, total, fraction, unit, ETA."""
    return [
        {
            "stage": s.stage, "done": s.done, "total": s.total, "unit": s.unit,
            "fraction": min(1.0, s.done / s.total) if s.total else 0.0,
            "eta": f"{s.eta_seconds:.0f} s" if s.eta_seconds > 0 and s.done < s.total else "",
            "rate": s.rate, "message": s.message,
        }
        for s in job.stages
    ]


def _eta(job: common_pb2.Job) -> str:
    if job.state in TERMINAL:
        return ""
    etas = [s.eta_seconds for s in job.stages if s.eta_seconds > 0 and s.done < s.total]
    return f"{max(etas):.0f} s" if etas else ""


def jobs_json(jobs: Iterable[common_pb2.Job]) -> list[dict[str, Any]]:
    """The jobs list as the live jobs page refreshes it."""
    return [
        {
            "id": job.id, "name": job.spec.name, "state": state_name(job.state),
            "href": f"jobs/{job.id}/index.html", "stages": stage_rows(job), "eta": _eta(job),
            "created": job.created_at.ToJsonString(),
        }
        for job in jobs
    ]


def jobs_page(jobs: Sequence[common_pb2.Job]) -> str:
    """The live list of jobs with state, progress and ETA, refreshed every two seconds."""
    rows = []
    for job in jobs_json(jobs):
        stages = "".join(
            f"<div>{_e(s['stage'])} <span class=bar><span style='width:"
            f"{100 * s['fraction']:.1f}%'></span></span> {s['done']}/{s['total']} "
            f"{_e(s['unit'])}</div>"
            for s in job["stages"]
        )
        rows.append(
            f"<tr><td><a href='{_href(job['href'])}'>{_e(job['id'])}</a></td>"
            f"<td>{_e(job['name'])}</td><td class=state>{_e(job['state'])}</td>"
            f"<td>{stages}</td><td>{_e(job['eta'])}</td><td>{_e(job['created'])}</td></tr>"
        )
    body = (
        "<h1>jobs</h1><table><thead><tr><th>job</th><th>name</th><th>state</th>"
        "<th>progress</th><th>ETA</th><th>created</th></tr></thead>"
        f"<tbody id=jobs>{''.join(rows)}</tbody></table>"
    )
    return shell("neurodissect jobs", body, [("", "jobs")], assets.JOBS_SCRIPT)


def login_page(next_path: str, failed: bool) -> str:
    """The token form; a right token sets the session cookie and goes on to `next_path`."""
    note = "<p style='color:#b00'>wrong token</p>" if failed else ""
    body = (
        f"<h1>sign in</h1>{note}<form method=post action='/login'>"
        f"<input type=hidden name=next value='{_e(next_path)}'>"
        "<label>token <input type=password name=token id=token autofocus></label> "
        "<button type=submit>sign in</button></form>"
        "<p class=muted>the stack's NEURODISSECT_AUTH_TOKEN</p>"
    )
    return shell("neurodissect sign in", body)


def _answer_cells(unit: common_pb2.UnitResult) -> list[tuple[str, str, str, str, str]]:
    """(method, answer HTML, score HTML, simulation ρ, ablation α) of every method."""
    cells = []
    rho, alpha = unit.simulation, unit.ablation
    if unit.HasField("netdissect"):
        nd = unit.netdissect
        others = ", ".join(f"{c.category}: {c.label} {c.iou:.3f}" for c in nd.per_category)
        cells.append((
            "netdissect",
            f"{_e(nd.label)} <span class=muted>({_e(nd.category)})</span>"
            + (" <b>detector</b>" if nd.detector else "")
            + f"<br><small class=muted>best per category: {_e(others)}; "
            f"threshold {nd.threshold:.4g}</small>",
            f"IoU {nd.iou:.3f}",
            "netdissect",
        ))
    if unit.HasField("significance"):
        sig = unit.significance
        cells.append((
            "significance",
            f"{_e(sig.label)}: z {sig.z:.2f}, p {sig.p_value:.2e}"
            + (" <b>passes Benjamini–Hochberg</b>" if sig.significant else "")
            + f"<br><small class=muted>grid IoU {sig.iou:.3f}, expected under random"
            f" placement {sig.expected_iou:.3f}</small>",
            f"IoU {sig.iou:.3f}",
            "significance",
        ))
    if unit.HasField("compositional"):
        comp = unit.compositional
        cells.append(("compositional", _e(comp.formula), f"IoU {comp.iou:.3f}", "compositional"))
    if unit.HasField("clip_dissect"):
        cd = unit.clip_dissect
        top = ", ".join(f"{c.concept} {c.score:.3f}" for c in cd.top5)
        cells.append((
            "clip_dissect", f"{_e(cd.label)}<br><small class=muted>top 5: {_e(top)}</small>",
            f"similarity {cd.score:.3f}", "clip_dissect",
        ))
    if unit.HasField("linear"):
        lin = unit.linear
        cells.append(("linear", _e(lin.explanation), f"val ρ {lin.val_corr:.3f}", "linear"))
    if unit.HasField("milan"):
        milan = unit.milan
        cells.append(("milan", _e(milan.caption), f"log p {milan.logp_caption:.2f}", "milan"))
    if unit.HasField("occlusion"):
        occ = unit.occlusion
        drops = ", ".join(f"{c.concept} {c.score:.2f}" for c in occ.drops)
        own = f"; its NetDissect label's {occ.own_drop:.2f}" if math.isfinite(occ.own_drop) else ""
        cells.append((
            "occlusion",
            f"hiding {_e(occ.top_concept)} drops it most"
            + (" <b>= its NetDissect label</b>" if occ.matches_netdissect else "")
            + f"<br><small class=muted>largest drops −δ: {_e(drops)}{_e(own)}</small>",
            f"−δ {occ.top_drop:.3f}",
            "occlusion",
        ))
    return [
        (METHOD_TITLES[m], answer, score, _num(rho[key]) if key in rho else "",
         _num(alpha[key]) if key in alpha else "")
        for m, answer, score, key in cells
    ]


# The layer table's fields, in the order each row of its JSON holds them.
LAYER_FIELDS = (
    "unit", "label", "category", "iou", "detector", "formula", "formula_iou", "clip",
    "clip_score", "linear", "linear_corr", "caption", "sig_p", "significant", "methods", "sim",
)


def _rounded(value: float, present: bool) -> float | None:
    return round(value, 4) if present else None


def _layer_row(unit: common_pb2.UnitResult, simulated: Sequence[str]) -> list[Any]:
    """One unit as a row of LAYER_FIELDS; `sim` holds ρ per method of `simulated` (or None)."""
    has = {m: unit.HasField(m) for m in results.UNIT_METHODS}
    nd, comp, cd, lin = unit.netdissect, unit.compositional, unit.clip_dissect, unit.linear
    rho = unit.simulation
    return [
        unit.unit,
        nd.label if has["netdissect"] else "",
        nd.category if has["netdissect"] else "",
        _rounded(nd.iou, has["netdissect"]),
        bool(has["netdissect"] and nd.detector),
        comp.formula if has["compositional"] else "",
        _rounded(comp.iou, has["compositional"]),
        cd.label if has["clip_dissect"] else "",
        _rounded(cd.score, has["clip_dissect"]),
        lin.explanation if has["linear"] else "",
        _rounded(lin.val_corr, has["linear"]),
        unit.milan.caption if has["milan"] else "",
        float(f"{unit.significance.p_value:.3g}") if has["significance"] else None,
        bool(has["significance"] and unit.significance.significant),
        [m for m, present in has.items() if present],
        [round(rho[m], 4) if m in rho and math.isfinite(rho[m]) else None for m in simulated],
    ]


class PageBuilder:
    """Builds the pages of jobs from a reader, drawing their pictures into `renders`.

    `live`: pages for the server (a link to the jobs list, refresh while a job runs).
    """

    def __init__(self, reader: JobReader, renders: Renders, live: bool) -> None:
        self.reader = reader
        self.renders = renders
        self.live = live

    def _nav(self, job: common_pb2.Job, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        nav = [("../../", "jobs")] if self.live else []
        return [*nav, ("index.html", f"job {job.spec.name or job.id}"),
                ("search.html", "search"), *extra]

    def _refresh(self, job: common_pb2.Job) -> int:
        return 3 if self.live and job.state not in TERMINAL else 0

    def job_page(self, job: common_pb2.Job) -> Page:
        """Spec, stages, per-layer summaries and plots."""
        images = []
        spec = json_format.MessageToJson(job.spec, preserving_proto_field_name=True, indent=1)
        stages = "".join(
            f"<tr><td>{_e(s['stage'])}</td><td><span class=bar><span style='width:"
            f"{100 * s['fraction']:.1f}%'></span></span></td><td class=num>{s['done']}/"
            f"{s['total']} {_e(s['unit'])}</td><td class=num>{s['rate']:.1f}/s</td>"
            f"<td class=num>{_e(s['eta'])}</td><td>{_e(s['message'])}</td></tr>"
            for s in stage_rows(job)
        )
        parts = [
            f"<h1>{_e(job.spec.name or job.id)}</h1>",
            f"<p>job <code>{_e(job.id)}</code> · state <span class=state id=state>"
            f"{_e(state_name(job.state))}</span> · model <code>{_e(job.spec.model.source)}/"
            f"{_e(job.spec.model.name)}</code> · dataset <code>{_e(job.spec.dataset.kind)}"
            f"</code> · created {_e(job.created_at.ToJsonString())} · updated "
            f"{_e(job.updated_at.ToJsonString())} · {job.bad_images} unreadable images</p>",
        ]
        if job.error:
            parts.append(f"<p style='color:#b00'>error: {_e(job.error)}</p>")
        if stages:
            parts.append(
                "<table id=stages><tr><th>stage</th><th>progress</th><th>done</th><th>rate</th>"
                f"<th>ETA</th><th>message</th></tr>{stages}</table>"
            )
        summaries = {s.layer: s for s in job.summary}
        for layer in job.spec.layers:
            parts.append(f"<h2>layer <a href='{_href(layer_file(layer))}'>{_e(layer)}</a></h2>")
            if layer in summaries:
                parts.append(_summary_table(summaries[layer]))
            units = self.reader.units(job, layer)
            if units:
                digest = figures.layer_plot(self.renders, job, units)
                images.append(digest)
                parts.append(
                    f"<img class=plot alt='plots of layer {_e(layer)}' "
                    f"src='{_href(image_file(digest))}'>"
                )
            else:
                parts.append("<p class=muted>no unit results yet</p>")
        parts.append(f"<details><summary>spec</summary><pre>{_e(spec)}</pre></details>")
        title = f"{job.spec.name or job.id} — neurodissect"
        html_text = shell(title, "".join(parts), self._nav(job), refresh_s=self._refresh(job))
        return Page("index.html", html_text, images)

    def layer_table(self, job: common_pb2.Job, layer: str) -> dict[str, Any]:
        """The layer's units as the layer page's JSON: fields, rows, simulated methods.

        A finished job's table is read from its stored copy (`table_file`), written
        once by the REPORTING stage; otherwise it is built from the unit results.
        """
        stored = self.reader.store_key(job, table_file(layer))
        if job.state in TERMINAL and self.reader.store.exists(stored):
            table: dict[str, Any] = json.loads(self.reader.store.get(stored))
            return table
        units = self.reader.units(job, layer)
        simulated = sorted({m for u in units for m in u.simulation})
        return {"layer": layer, "fields": LAYER_FIELDS, "simulation": simulated,
                "rows": [_layer_row(u, simulated) for u in units]}

    def layer_page(self, job: common_pb2.Job, layer: str) -> Page:
        """Every unit of a layer in one sortable, filterable, paginated table."""
        table = self.layer_table(job, layer)
        rows, simulated = table["rows"], table["simulation"]
        column = {name: i for i, name in enumerate(table["fields"])}
        categories = sorted({row[column["category"]] for row in rows if row[column["category"]]})
        answered = {m for row in rows for m in row[column["methods"]]}
        methods = [m for m in results.UNIT_METHODS if m in answered]
        columns = [
            ("unit", "unit", True), ("label", "NetDissect", False),
            ("category", "category", False), ("iou", "IoU", True),
            ("detector", "detector", True), ("formula", "formula", False),
            ("formula_iou", "formula IoU", True), ("clip", "CLIP-Dissect", False),
            ("clip_score", "similarity", True), ("linear", "linear", False),
            ("linear_corr", "val ρ", True), ("caption", "MILAN caption", False),
            ("sig_p", "significance p", True),
            *[(f"sim:{m}", f"ρ {m}", True) for m in simulated],
        ]
        header = "".join(
            f"<th class='sortable{' numeric' if numeric else ''}' data-key='{_e(key)}'>"
            f"{_e(title)}</th>"
            for key, title, numeric in columns
        )
        options = "".join(f"<option>{_e(c)}</option>" for c in categories)
        method_options = "".join(
            f"<option value='{_e(m)}'>{_e(METHOD_TITLES[m])}</option>" for m in methods
        )
        body = (
            f"<h1>layer {_e(layer)}</h1>"
            "<div class=filters>"
            "<label>text <input id=text type=search placeholder='label, formula, caption'>"
            "</label>"
            f"<label>category <select id=category><option value=''>any</option>{options}"
            "</select></label>"
            f"<label>answered by <select id=method><option value=''>any method</option>"
            f"{method_options}</select></label>"
            "<label><input id=detectors type=checkbox> detectors only</label>"
            "<label><input id=significant type=checkbox> significant only "
            "(Benjamini–Hochberg)</label>"
            "<label>IoU ≥ <input id=min-iou type=number min=0 max=1 step=0.01 value=0 "
            "style='width:5em'></label><span id=count></span></div>"
            "<div class=pager><button id=prev>previous</button><button id=next>next</button>"
            "<span id=page></span></div>"
            f"<table id=units-table><thead><tr>{header}</tr></thead><tbody id=rows></tbody>"
            "</table>"
            + _json_script("units", table)
        )
        html_text = shell(
            f"layer {layer} — {job.spec.name or job.id}", body,
            self._nav(job, (layer_file(layer), f"layer {layer}")),
            assets.LAYER_SCRIPT,
        )
        return Page(layer_file(layer), html_text)

    def unit_page(self, job: common_pb2.Job, unit: common_pb2.UnitResult) -> Page:
        """Every method's answer side by side, and the top exemplars with their masks."""
        layer = unit.layer
        exemplars = figures.unit_exemplars(self.reader, self.renders, job, unit)
        cells = _answer_cells(unit)
        ablated = any(alpha for *_, alpha in cells)
        answers = "".join(
            f"<tr><td>{_e(m)}</td><td>{a}</td><td class=num>{_e(s)}</td>"
            f"<td class=num>{_e(r)}</td>"
            + (f"<td class=num>{_e(alpha)}</td>" if ablated else "") + "</tr>"
            for m, a, s, r, alpha in cells
        )
        try:
            n_units = self.reader.manifest(job, layer).n_units
        except NotFound:
            n_units = unit.unit + 1  # no stored activations: no link beyond this unit
        steps = [
            f"<a href='{_href(unit_file(layer, u))}'>{text}</a>"
            for u, text in ((unit.unit - 1, "← previous unit"), (unit.unit + 1, "next unit →"))
            if 0 <= u < n_units
        ]
        legend = "".join(
            f"<span style='border-color:rgb{OUTLINES[k]}'>{_e(text)}</span>"
            for k, text in (
                ("unit", "unit's mask (above its NetDissect threshold)"),
                ("concept", f"NetDissect label: {unit.netdissect.label}"),
                ("formula", f"formula: {unit.compositional.formula}"),
            )
            if k == "unit" or (k == "concept" and unit.netdissect.label)
            or (k == "formula" and unit.compositional.formula)
        )
        tiles = []
        for ex in exemplars:
            pictures = "".join(
                f"<img class='overlay {kind}' alt='{_e(kind)} mask on image {ex.image_id}' "
                f"src='{_href(image_file(digest))}'>"
                for kind, digest in (("unit", ex.unit), ("concept", ex.concept),
                                     ("formula", ex.formula))
                if digest
            )
            tiles.append(
                f"<figure class=exemplar data-image='{ex.image_id}'>{pictures}"
                f"<figcaption>image {ex.image_id}</figcaption></figure>"
            )
        shown = (
            f"<div class=exemplars>{''.join(tiles)}</div>" if tiles
            else "<p class=muted>no exemplars (NetDissect did not run, or no thumbnails)</p>"
        )
        scatter = figures.unit_scatter(self.reader, self.renders, job, unit)
        simulated = (
            "<h2>simulation</h2><p class=muted>each method's prediction of the unit against"
            " its pooled activation, on sampled test images</p><img class=plot id=scatter "
            f"alt='simulation scatter of unit {unit.unit}' src='{_href(image_file(scatter))}'>"
            if scatter else ""
        )
        body = (
            f"<h1>layer {_e(layer)} · unit {unit.unit}</h1><p>{' · '.join(steps)}</p>"
            "<table id=answers><tr><th>method</th><th>answer</th><th>score</th>"
            "<th>simulation ρ</th>" + ("<th>ablation α</th>" if ablated else "")
            + f"</tr>{answers}</table>"
            f"<h2>top exemplars</h2><p class=legend>{legend}</p>{shown}{simulated}"
        )
        images = [d for ex in exemplars for d in (ex.unit, ex.concept, ex.formula) if d]
        images += [scatter] if scatter else []
        html_text = shell(
            f"{layer} unit {unit.unit} — {job.spec.name or job.id}", body,
            self._nav(job, (layer_file(layer), f"layer {layer}")),
        )
        return Page(unit_file(layer, unit.unit), html_text, images)

    def search_page(self, job: common_pb2.Job) -> Page:
        """Units of every layer found by the words of their labels, formulas and captions."""
        index = []
        for layer in job.spec.layers:
            table = self.layer_table(job, layer)
            column = {name: i for i, name in enumerate(table["fields"])}
            for row in table["rows"]:
                answers = [
                    f"{METHOD_TITLES[method]}: {row[column[name]]}"
                    for method, name in (
                        ("netdissect", "label"), ("compositional", "formula"),
                        ("clip_dissect", "clip"), ("linear", "linear"), ("milan", "caption"),
                    )
                    if row[column[name]]
                ]
                index.append([layer, row[column["unit"]], answers])
        body = (
            "<h1>search units</h1><p><input id=query type=search size=50 autofocus "
            "placeholder='a concept, or words of a caption or formula'> <span id=found></span>"
            "</p><table><thead><tr><th>layer</th><th>unit</th><th>answers</th></tr></thead>"
            "<tbody id=hits></tbody></table>" + _json_script("index", index)
        )
        html_text = shell(
            f"search — {job.spec.name or job.id}", body, self._nav(job), assets.SEARCH_SCRIPT
        )
        return Page("search.html", html_text)


def _summary_table(summary: common_pb2.LayerSummary) -> str:
    body = "".join(
        f"<tr><th>{_e(k)}</th><td class=num>{_e(v)}</td></tr>"
        for k, v in results.summary_rows(summary)
    )
    return f"<table class=summary>{body}</table>"
