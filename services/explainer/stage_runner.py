"""The generic stage of one method over one layer: shared inputs, block tasks, summary, exports.

`run_method` asks the method for its shared inputs (`ExplainMethod.prepare`),
submits one Ray task (`method_block`) per requested unit block that is not stored
yet, yields an `ExplainProgress` for every slow step and every finished block,
then stores the method's layer summary and exports computed from every stored
row of the layer. It names no method: everything method-specific is behind
`method_contract.ExplainMethod`.

Tasks receive the `Settings` (never a store object) and reopen the object store
from them; a task first looks whether its block is stored already and writes it
whole at the end, so running it twice is harmless. Memory is bounded by the block:
the methods stream activations chunk by chunk or slice their block's columns out
of shared arrays that Ray maps without copying.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from neurodissect.v1.explainer_pb2 import ExplainProgress as Progress

from services.common import result_store
from services.common.metrics import UNITS_EXPLAINED
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.explainer.explain_plan import ExplainPlan
from services.explainer.method_contract import ExplainMethod
from services.explainer.sharding import BlockOutcome, attempt_number, block_task, gather
from services.explainer.shared_inputs import SharedInputs


@dataclass
class Stage:
    """What every method's stage needs: settings, the store, the plan, liveness, shared inputs."""

    settings: Settings
    store: ObjectStore
    plan: ExplainPlan
    is_active: Callable[[], bool]
    shared: SharedInputs

    def progress(self, method: str, done: int, message: str = "") -> Progress:
        """An ExplainProgress of `method` with `done` of the requested units finished."""
        return Progress(
            method=method, units_done=done, units_total=self.plan.units_total, message=message
        )

    def missing(self, method: str) -> list[tuple[int, int]]:
        """Requested blocks of `method` that are not stored yet."""
        p = self.plan
        return [
            (u0, u1)
            for u0, u1 in p.blocks()
            if not result_store.block_stored(self.store, p.job_id, p.layer, method, u0, u1)
        ]


@block_task
def method_block(
    settings: Settings,
    plan: ExplainPlan,
    method: ExplainMethod,
    params: Any,
    u0: int,
    u1: int,
    *shared: Any,
) -> BlockOutcome:
    """One unit block [u0, u1) of `method` in a Ray task: compute its rows unless stored, store."""
    store = settings.open_store()
    if result_store.block_stored(store, plan.job_id, plan.layer, method.name, u0, u1):
        return BlockOutcome(u0, u1, attempt_number(), computed=False)
    rows = method.block_rows(store, plan, params, u0, u1, *shared)
    result_store.write_block(store, plan.job_id, plan.layer, method.name, u0, u1, rows)
    return BlockOutcome(u0, u1, attempt_number(), computed=True)


def run_method(stage: Stage, method: ExplainMethod) -> Iterator[Progress]:
    """Run `method` over the plan's missing blocks; then store its layer summary and exports."""
    plan, name = stage.plan, method.name
    params = method.params(plan.spec)
    missing = stage.missing(name)
    done = plan.units_total - sum(u1 - u0 for u0, u1 in missing)
    if missing:
        steps = method.prepare(stage, params)
        try:
            while True:
                yield stage.progress(name, done, next(steps))
        except StopIteration as finished:
            shared = finished.value
        refs = [
            method_block.remote(stage.settings, plan, method, params, u0, u1, *shared)
            for u0, u1 in missing
        ]
        for outcome in gather(refs, stage.is_active):
            done += outcome.units
            if outcome.computed:
                UNITS_EXPLAINED.labels(name).inc(outcome.units)
            yield stage.progress(name, done, f"units {outcome.u0}-{outcome.u1}")
    else:
        yield stage.progress(name, done, "already stored")
    yield stage.progress(name, done, "layer summary and exports")
    rows = result_store.read_rows(stage.store, plan.job_id, plan.layer, name)
    summary = method.summary(stage, params, rows)
    result_store.write_summary(stage.store, plan.job_id, plan.layer, name, summary)
    for export_format, text in method.exports(stage, params, rows).items():
        result_store.write_export(stage.store, plan.job_id, plan.layer, export_format, text)
