"""The Explainer gRPC servicer: validate, run each method's stage on Ray, stream progress.

`Explain` checks the request (`explain_plan.plan_request`, errors name the field),
makes sure Ray is up (`sharding.connect`: local or the cluster at RAY_ADDRESS),
then runs the requested methods (`methods.EXPLAINER_METHODS`) in order through the
generic `stage_runner`, streaming one `ExplainProgress` per slow step and finished
unit block and a last one with `finished=True`. Blocks already stored are skipped,
so a repeated or resumed call only does what is missing. When the client cancels,
outstanding Ray tasks are cancelled and the call ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc
from neurodissect.v1 import explainer_pb2, explainer_pb2_grpc

from services.common.errors import Cancelled
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.explainer import sharding
from services.explainer.explain_plan import ExplainPlan, plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.shared_inputs import SharedInputs
from services.explainer.stage_runner import Stage, run_method

log = logging.getLogger(__name__)


def explain(
    settings: Settings,
    store: ObjectStore,
    plan: ExplainPlan,
    is_active: Callable[[], bool] = lambda: True,
) -> Iterator[explainer_pb2.ExplainProgress]:
    """Run every method of `plan` on Ray; yield progress, then a `finished` message.

    Raises `Cancelled` once `is_active()` turns false (outstanding tasks are cancelled).
    """
    sharding.connect(settings)
    stage = Stage(
        sharding.task_settings(settings), store, plan, is_active, SharedInputs(store, plan)
    )
    for method in plan.methods:
        yield from run_method(stage, EXPLAINER_METHODS[method])
    yield explainer_pb2.ExplainProgress(
        units_done=plan.units_total, units_total=plan.units_total, message="done", finished=True
    )


class ExplainerServicer(explainer_pb2_grpc.ExplainerServicer):
    """Serves Explain over one object store and one Ray (local or a cluster)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = settings.open_store()

    def Explain(  # noqa: N802 (gRPC method name)
        self, request: explainer_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> Iterator[explainer_pb2.ExplainProgress]:
        """Explain units [unit_start, unit_end) of one layer by the requested methods."""
        plan = plan_request(self.store, request, EXPLAINER_METHODS)
        log.info(
            "explain job %s layer %s units %d-%d by %s",
            plan.job_id, plan.layer, plan.unit_start, plan.unit_end, ",".join(plan.methods),
        )
        try:
            yield from explain(self.settings, self.store, plan, context.is_active)
        except GeneratorExit:
            # gRPC drops the stream when a send fails on a cancelled call; closing it
            # cancels the outstanding Ray tasks (see `sharding.gather`).
            log.info("explain job %s layer %s cancelled by the client", plan.job_id, plan.layer)
            raise
        except Cancelled:
            log.info("explain job %s layer %s cancelled by the client", plan.job_id, plan.layer)
            if context.is_active():
                raise
