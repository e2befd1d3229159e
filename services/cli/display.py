"""How the command line shows things: live progress bars, the stack, and the result tables.

The commands (`services/cli/main.py`) fetch and decide; this module only formats
and prints, on `console` (stdout) and `errors` (stderr).
"""

from __future__ import annotations

from collections.abc import Sequence

from neurodissect.v1 import common_pb2
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
)
from rich.table import Table

from services.cli.footprint import ProcessMemory
from services.cli.stack import LocalStack
from services.gateway import results
from services.gateway.jobs import state_name

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


class JobProgress:
    """A rich progress bar per stage with the gateway's ETA, fed by WatchJob."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[message]}", style="dim"),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}
        self.state = ""

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, job: common_pb2.Job) -> None:
        """Show the job's state change (a line) and its stages' progress (bars)."""
        name = state_name(job.state)
        if name != self.state:
            self.state = name
            self.progress.console.print(f"state: {name}")
        for stage in job.stages:
            total = max(stage.total, 1)
            if stage.stage not in self.tasks:
                self.tasks[stage.stage] = self.progress.add_task(
                    stage.stage, total=total, unit="", eta="", message=""
                )
            eta = stage.eta_seconds if stage.done < stage.total else 0.0
            self.progress.update(
                self.tasks[stage.stage],
                completed=stage.done,
                total=total,
                unit=stage.unit,
                eta=f"eta {eta:.0f}s" if eta > 0 else "",
                message=stage.message[:60],
            )


def print_stack(stack: LocalStack) -> None:
    """The addresses of a started local stack and how often each process was restarted."""
    table = Table("service", "address", "metrics", "restarts", title="neurodissect local stack")
    for name in stack.services:
        table.add_row(name, stack.address(name), f"http://{stack.settings.host}:"
                      f"{stack.metrics_ports[name]}/metrics", str(stack.restarts(name)))
    if stack.ray_address:
        table.add_row("ray", stack.ray_address, "", str(stack.restarts("ray")))
    console.print(table)
    console.print(f"store: {stack.settings.store_url}", markup=False)
    console.print(f"logs:  {stack.log_dir}", markup=False)


def print_footprint(rows: Sequence[ProcessMemory]) -> None:
    """Memory (PSS) of each process of the stack, and their total."""
    table = Table("process", "pid", "PSS MiB", "command", title="memory (proportional set size)")
    for row in rows:
        table.add_row(row.owner, str(row.pid), f"{row.pss_bytes / 2**20:.0f}", row.command[:60])
    console.print(table)
    total = sum(row.pss_bytes for row in rows)
    console.print(f"total PSS: {total / 2**20:.0f} MiB in {len(rows)} processes", markup=False)


def print_summary(job: common_pb2.Job) -> None:
    """The per-layer summaries of a job, as tables."""
    for summary in job.summary:
        table = Table("figure", "value", title=f"layer {summary.layer}")
        for figure, value in results.summary_rows(summary):
            table.add_row(figure, value)
        console.print(table)
    if job.report_key:
        console.print(f"report: {job.report_key}", markup=False)


def stages_table(job: common_pb2.Job) -> Table:
    """A job's stages: done, total, rate, ETA and last message."""
    table = Table("stage", "done", "total", "unit", "rate/s", "eta s", "message")
    for stage in job.stages:
        table.add_row(stage.stage, str(stage.done), str(stage.total), stage.unit,
                      f"{stage.rate:.1f}", f"{stage.eta_seconds:.0f}", stage.message)
    return table


def jobs_table(jobs: Sequence[common_pb2.Job]) -> Table:
    """One row per job: id, state, name, model, layers, creation time."""
    table = Table("job", "state", "name", "model", "layers", "created")
    for job in jobs:
        table.add_row(job.id, state_name(job.state), job.spec.name,
                      f"{job.spec.model.source}/{job.spec.model.name}",
                      ",".join(job.spec.layers), job.created_at.ToJsonString())
    return table


def layers_table(title: str, rows: Sequence[tuple[str, str, str]]) -> Table:
    """A model's layers: (name, shape, module type) rows; long names wrap, never end in "…"."""
    table = Table(title=title)
    for header in ("layer", "shape (U, h, w)", "module"):
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def results_table(layer: str, units: Sequence[common_pb2.UnitResult], limit: int = 0) -> Table:
    """A long table: one row per (unit, method) with the answer, its score, ρ and α.

    Scores: IoU for netdissect and compositional, the similarity for clip_dissect, the
    validation correlation for linear, log p(caption) for milan; for significance the
    grid IoU of the NetDissect label, with its z, p and whether it passes
    Benjamini–Hochberg (`✓`). `*` marks a detector. ρ is simulation's correlation and
    α ablation's score of the answer; an occlusion row names the concept whose
    occlusion drops the unit most (`✓` when it is the NetDissect label), scored by the
    drop for the unit's own label.
    """
    shown = list(units)[: limit or None]
    methods = [m for m in results.UNIT_METHODS if any(u.HasField(m) for u in shown)]
    table = Table("unit", "method", "explanation", "score", "ρ", "α", title=f"layer {layer}")
    for unit in shown:
        rows: list[tuple[str, str, str, str, str]] = []
        for method in (m for m in methods if unit.HasField(m)):
            answer = getattr(unit, method)
            if method == "netdissect":
                mark = "*" if answer.detector else ""
                text, score = f"{answer.label}{mark} ({answer.category})", answer.iou
            elif method == "compositional":  # no formula: no label overlaps the unit's mask
                text, score = answer.formula or "(none)", answer.iou
            elif method == "clip_dissect":
                text, score = answer.label, answer.score
            elif method == "linear":
                text, score = answer.explanation, answer.val_corr
            elif method == "significance":
                mark = " ✓" if answer.significant else ""
                text = f"{answer.label} z={answer.z:.1f} p={answer.p_value:.1e}{mark}"
                score = answer.iou
            else:
                text, score = answer.caption, answer.logp_caption
            rho = f"{unit.simulation[method]:.3f}" if method in unit.simulation else ""
            alpha = f"{unit.ablation[method]:.3f}" if method in unit.ablation else ""
            rows.append((method, text, f"{score:.3f}", rho, alpha))
        if unit.HasField("occlusion"):
            occ = unit.occlusion
            mark = " ✓" if occ.matches_netdissect else ""
            text = f"drops most for {occ.top_concept or '(none)'} ({occ.top_drop:.0%}){mark}"
            rows.append(("occlusion", text, f"{occ.own_drop:.3f}", "", ""))
        for i, row in enumerate(rows):
            table.add_row(str(unit.unit) if i == 0 else "", *row, end_section=i == len(rows) - 1)
    return table
