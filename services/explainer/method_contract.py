"""The contract every explanation method of the explainer fulfils, in the spirit of Captum.

A method is one module under `services/explainer/methods/` holding one subclass
of `ExplainMethod`:

- `params(spec)`: its parameters read from the DissectionSpec, defaults and limits
  from `services.common.spec_vocabulary` (the gateway validates with the same), an
  out-of-range value raising InvalidArgument naming the field;
- its plan over a layer: `reads_labels` (whether it reads the probe set's concept
  table and label maps), `embeddings(request)` (which stored CLIP embeddings of the
  request it needs) and `prepare(stage, params)`, which loads and shares (`ray.put`)
  the read-only inputs its blocks use, naming each step before it runs (progress);
- `block_rows(...)`: its computation of one unit block in a Ray task, calling the
  pure math module of the method, returning the block's result rows;
- `summary(...)` and `exports(...)`: once the blocks are stored, its layer summary
  (keys named as LayerSummary fields where they are figures of the layer) and its
  export files, both from every stored row of the layer.

The stage runner (`stage_runner`) blocks the units, skips stored blocks, runs
`block_rows` on Ray, stores rows through `result_store` and streams progress; it
knows no method by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.store import ObjectStore

if TYPE_CHECKING:
    from services.explainer.explain_plan import ExplainPlan
    from services.explainer.stage_runner import Stage

# What `prepare` hands every block: values or Ray object refs, passed to the block
# task as positional arguments (Ray resolves top-level refs without copies).
Shared = tuple[Any, ...]


class ExplainMethod(ABC):
    """One explanation method over one layer: parameters, plan, blocks, summary, exports."""

    # The DissectionSpec field and the name of its results in the store.
    name: ClassVar[str]
    # Whether the method reads the probe set's concept table and label maps.
    reads_labels: ClassVar[bool] = True

    @abstractmethod
    def params(self, spec: common_pb2.DissectionSpec) -> Any:
        """The method's parameters with defaults applied; InvalidArgument naming a bad field."""

    def embeddings(
        self, request: explainer_pb2.ExplainRequest
    ) -> list[tuple[str, explainer_pb2.ConceptEmbeddings, str]]:
        """The stored CLIP embeddings the request must give: (field, embeddings, why)."""
        return []

    @abstractmethod
    def prepare(self, stage: Stage, params: Any) -> Generator[str, None, Shared]:
        """Load and share the read-only inputs of the blocks; yield the name of each step first."""

    @abstractmethod
    def block_rows(
        self, store: ObjectStore, plan: ExplainPlan, params: Any, u0: int, u1: int, *shared: Any
    ) -> list[dict[str, Any]]:
        """The stored rows of units [u0, u1) (`result_store.message_row`), computed in a task."""

    def summary(
        self, stage: Stage, params: Any, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The layer summary from every stored row by unit: LayerSummary fields and more."""
        return {"units": len(rows)}

    def exports(
        self, stage: Stage, params: Any, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """The layer's export files from every stored row: export format -> text."""
        return {}
