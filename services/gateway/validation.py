"""Full validation of a DissectionSpec before anything runs or is written.

Every check raises one of the project's errors with the offending field path
(`netdissect.top_quantile`, `layers[1]`, `compute.batch_size`, `dataset.kind` …) and
the allowed values:

- INVALID_ARGUMENT: a value outside what is allowed, a misspelled layer (with close
  matches), a path containing `..` or outside the configured data roots, a toy world
  given a `dataset.uri` or outside `services.toyworld.limits`, an open_clip
  architecture it does not know, CLIP weights whose keys or shapes do not fit the
  architecture, a concept set file that is empty, unreadable or not UTF-8 (checked
  here, before any work starts);
- NOT_FOUND: a model the extractor does not know, a dataset, weight, concept-set or
  checkpoint path that does not exist;
- RESOURCE_EXHAUSTED: more layers or units than one job may hold.

Defaults: a spec that sets none of the explanation methods (netdissect,
compositional, clip_dissect, linear, milan) gets `netdissect` with its default
parameters. Simulation scoring runs when `simulation` is set. The checks of
NetDissect's labels (`threshold_sweep`, `significance`) need `netdissect`.

The static checks run first; then the model is described by the extractor (one
RPC, cached by the caller) and the layers are checked against it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from neurodissect.v1 import common_pb2

from services.common.clip_checkpoint import check_open_clip
from services.common.concept_set import read_concept_set
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.settings import Settings
from services.common.spec_vocabulary import (
    ABLATION_METHOD,
    ABLATION_TEMPERATURE,
    ABLATION_VARIANTS,
    ABORT_FRACTION,
    ABORT_IMAGES,
    ACTIVATION_DTYPES,
    BATCH_SIZE,
    BEAM,
    CATEGORIES,
    COMPOSITIONAL_MODES,
    COMPOSITIONAL_PRESETS,
    COMPOSITIONAL_SPATIAL_FIELDS,
    DATASET_KINDS,
    DEFAULT_COMPOSITIONAL_MODE,
    DETECTOR_IOU,
    DROP_THRESHOLD,
    EXPANSION_NEIGHBOURS,
    FORMULA_LENGTH,
    FORMULA_SCORES,
    GRID_DOWNSAMPLINGS,
    IMAGE_CHUNK,
    IMAGE_PERCENTILE,
    IMROU_R,
    IOU_MODES,
    LENGTH_PENALTY,
    LINEAR_CONCEPTS,
    LINEAR_LENGTH_PENALTY,
    LINEAR_MAX_CONCEPTS,
    MANUAL_FRACTION,
    MAX_BAD_FRACTION,
    MAX_LAYERS,
    MAX_REGIONS,
    MAX_SEED,
    MAX_SWEEP_POINTS,
    MAX_TEXT,
    MAX_TOP_K_PRIMITIVES,
    MAX_UNITS_PER_JOB,
    METHODS,
    MILAN_BEAM,
    MILAN_EXEMPLARS,
    MILAN_MAX_TOKENS,
    MIN_COVERAGE,
    MODEL_SOURCES,
    NAME,
    NETDISSECT_CHECKS,
    NETDISSECT_EXEMPLARS,
    OCCLUSION_FILLS,
    OCCLUSION_METHOD,
    OPERATOR_SETS,
    PERMUTATIONS,
    PMI_LAMBDA,
    POOLINGS,
    PREPROCESSING,
    SCORED_METHODS,
    SIMILARITIES,
    SWEEP_PERCENTILES,
    SWEEP_QUANTILES,
    UNIT_BLOCK,
    FloatField,
    IntField,
)
from services.toyworld.limits import check_toy_world

_DEVICE = re.compile(r"^(cpu|cuda(:\d{1,2})?)$")

Describe = Callable[[common_pb2.ModelSpec], common_pb2.DescribeModelResponse]


def requested_methods(spec: common_pb2.DissectionSpec) -> list[str]:
    """The methods a spec asks for, in running order."""
    return [m for m in METHODS if spec.HasField(m)]


def with_defaults(spec: common_pb2.DissectionSpec) -> common_pb2.DissectionSpec:
    """A copy of `spec` with `netdissect` added when it asks for no explanation method."""
    out = common_pb2.DissectionSpec()
    out.CopyFrom(spec)
    explaining = [m for m in METHODS if m != "simulation" and m not in NETDISSECT_CHECKS]
    if not any(out.HasField(m) for m in explaining):
        out.netdissect.SetInParent()
    return out


def _allowed(values: Sequence[str], empty_default: bool = True) -> str:
    listed = ", ".join(repr(v) for v in values)
    return f"one of {listed}" + (" (empty: the default)" if empty_default else "")


def _choice(value: str, values: Sequence[str], field: str, empty_ok: bool = True) -> None:
    if (value == "" and empty_ok) or value in values:
        return
    raise InvalidArgument(f"{value!r} is not allowed; use {_allowed(values, empty_ok)}", field)


def _int_range(value: int, low: int, high: int, field: str, zero_means: str = "") -> None:
    if low <= value <= high:
        return
    note = f" (0 = {zero_means})" if zero_means else ""
    raise InvalidArgument(f"{value} is outside [{low}, {high}]{note}", field)


def _count(value: int, spec_field: IntField, field: str) -> None:
    _int_range(value, 0, spec_field.high, field, str(spec_field.default))


def _open_unit(value: float, field: str) -> None:
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise InvalidArgument(f"{value} is not strictly between 0 and 1", field)


def _finite(value: float, field: str, low: float = -math.inf, high: float = math.inf) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{value} must be a finite number in [{low}, {high}]", field)


def _bounded(value: float, spec_field: FloatField, field: str) -> None:
    _finite(value, field, spec_field.low, spec_field.high)


def _text(value: str, field: str) -> None:
    if len(value) > MAX_TEXT or any(ord(c) < 32 for c in value):
        raise InvalidArgument(
            f"at most {MAX_TEXT} printable characters (got {len(value)})", field
        )


class SpecValidator:
    """Checks DissectionSpecs against the settings and the extractor's model description."""

    def __init__(self, settings: Settings, describe: Describe) -> None:
        self.settings = settings
        self.describe = describe
        self.roots = [
            Path(root).expanduser().resolve()
            for root in re.split(f"[,{os.pathsep}]", settings.data_roots)
            if root.strip()
        ]

    def validate(
        self, spec: common_pb2.DissectionSpec
    ) -> tuple[common_pb2.DissectionSpec, common_pb2.DescribeModelResponse]:
        """Return the spec with defaults applied and the model's description, or raise."""
        spec = with_defaults(spec)
        _text(spec.name, "name")
        _text(spec.idempotency_key, "idempotency_key")
        self.check_model(spec.model)
        self._layer_names(spec.layers)
        self._dataset(spec.dataset)
        self._compute(spec.compute)
        self._methods(spec)
        self._verification(spec)
        description = self.describe(spec.model)
        self._layers_exist(spec, description)
        return spec, description

    # -- paths -----------------------------------------------------------------------------

    def local_path(self, uri: str, field: str, must_exist: bool = True) -> Path:
        """Resolve a path or file:// URI a user gave, refusing `..` and paths outside the roots."""
        if not uri:
            raise InvalidArgument("a path is required here", field)
        if len(uri) > 4096:
            raise InvalidArgument(f"the path is {len(uri)} characters long (at most 4096)", field)
        raw = uri[len("file://") :] if uri.startswith("file://") else uri
        if "://" in raw:
            raise InvalidArgument(
                f"{uri!r}: only local paths or file:// URIs are supported", field
            )
        if "\x00" in raw:
            raise InvalidArgument("the path holds a NUL character", field)
        path = Path(raw).expanduser()
        if ".." in path.parts:
            raise InvalidArgument(f"{uri!r}: paths may not contain '..'", field)
        resolved = path.resolve()
        if self.roots and not any(resolved.is_relative_to(root) for root in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            raise InvalidArgument(f"{uri!r} is outside the allowed data roots ({roots})", field)
        if must_exist and not resolved.exists():
            raise NotFound(f"{uri!r} does not exist", field)
        return resolved

    # -- sections --------------------------------------------------------------------------

    def check_model(self, model: common_pb2.ModelSpec) -> None:
        """Check the fields of a ModelSpec (not yet whether the extractor knows the model)."""
        _choice(model.source, MODEL_SOURCES, "model.source", empty_ok=False)
        if model.source != "torchscript" and not model.name:
            raise InvalidArgument("the architecture name is required", "model.name")
        _text(model.name, "model.name")
        if model.source == "torchscript" and not model.weights_uri:
            raise InvalidArgument("a TorchScript model needs its file", "model.weights_uri")
        if model.weights_uri:
            self.local_path(model.weights_uri, "model.weights_uri")
        _choice(model.preprocessing, PREPROCESSING, "model.preprocessing")
        _int_range(model.input_size, 0, 4096, "model.input_size", "the dataset's image size")
        _int_range(model.num_classes, 0, 1_000_000, "model.num_classes", "the builder's default")

    def _layer_names(self, layers: Sequence[str]) -> None:
        if not layers:
            raise InvalidArgument(
                "at least one layer is required (DescribeModel lists a model's layers)", "layers"
            )
        if len(layers) > MAX_LAYERS:
            raise ResourceExhausted(
                f"{len(layers)} layers requested; one job holds at most {MAX_LAYERS}", "layers"
            )
        seen: set[str] = set()
        for i, name in enumerate(layers):
            if not NAME.match(name):
                raise InvalidArgument(
                    f"{name!r} is not a module path (letters, digits, '_', '.', '-')",
                    f"layers[{i}]",
                )
            if name in seen:
                raise InvalidArgument(f"{name!r} is listed twice", f"layers[{i}]")
            seen.add(name)

    def _dataset(self, dataset: common_pb2.DatasetSpec) -> None:
        _choice(dataset.kind, DATASET_KINDS, "dataset.kind", empty_ok=False)
        if dataset.kind == "toyworld":
            if dataset.uri:
                raise InvalidArgument(
                    "a toy world is generated into the server's cache and cannot be placed;"
                    " leave the uri empty (a toy world you generated with `neurodissect"
                    " toyworld generate --out DIR` is kind 'broden' at DIR)",
                    "dataset.uri",
                )
            toy = dataset.toyworld
            check_toy_world(toy.n_images, toy.image_size, toy.seed, "dataset.toyworld")
        else:
            self.local_path(dataset.uri, "dataset.uri")
        _text(dataset.split, "dataset.split")
        if dataset.limit < 0:
            raise InvalidArgument(f"{dataset.limit} is negative (0 = all images)", "dataset.limit")
        for i, category in enumerate(dataset.categories):
            _choice(category, CATEGORIES, f"dataset.categories[{i}]", empty_ok=False)
        if dataset.HasField("max_bad_fraction"):
            _bounded(dataset.max_bad_fraction, MAX_BAD_FRACTION, "dataset.max_bad_fraction")

    def _compute(self, compute: common_pb2.ComputeSpec) -> None:
        if compute.device and not _DEVICE.match(compute.device):
            raise InvalidArgument(
                f"{compute.device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'",
                "compute.device",
            )
        _count(compute.batch_size, BATCH_SIZE, "compute.batch_size")
        _count(compute.unit_block_size, UNIT_BLOCK, "compute.unit_block_size")
        _count(compute.image_chunk_size, IMAGE_CHUNK, "compute.image_chunk_size")
        _choice(compute.activation_dtype, ACTIVATION_DTYPES, "compute.activation_dtype")

    def _clip(self, clip: common_pb2.ClipModelSpec, field: str) -> None:
        if not clip.arch:
            raise InvalidArgument(
                "a CLIP model is required: an open_clip architecture name, or 'toy'",
                f"{field}.arch",
            )
        _text(clip.arch, f"{field}.arch")
        weights = (
            self.local_path(clip.weights_uri, f"{field}.weights_uri") if clip.weights_uri else None
        )
        if clip.arch != "toy":
            check_open_clip(clip.arch, weights, field)

    @staticmethod
    def _spatial(comp: common_pb2.CompositionalParams) -> None:
        """The spatial mode's fields (specs/compositional_spatial.md), refused outside it."""
        _choice(comp.preset, tuple(COMPOSITIONAL_PRESETS), "compositional.preset")
        _choice(comp.mode, COMPOSITIONAL_MODES, "compositional.mode")
        preset = COMPOSITIONAL_PRESETS.get(comp.preset, {})
        if (comp.mode or preset.get("mode", DEFAULT_COMPOSITIONAL_MODE)) != "spatial":
            for name in COMPOSITIONAL_SPATIAL_FIELDS:
                descriptor = comp.DESCRIPTOR.fields_by_name[name]
                if comp.HasField(name) if descriptor.has_presence else getattr(comp, name):
                    raise InvalidArgument(
                        "only the spatial mode reads it (set mode 'spatial')",
                        f"compositional.{name}",
                    )
        _choice(comp.grid_downsampling, GRID_DOWNSAMPLINGS, "compositional.grid_downsampling")
        _choice(comp.score, FORMULA_SCORES, "compositional.score")
        _choice(comp.operators, OPERATOR_SETS, "compositional.operators")
        _count(
            comp.expansion_neighbours, EXPANSION_NEIGHBOURS, "compositional.expansion_neighbours"
        )
        _count(comp.abort_images, ABORT_IMAGES, "compositional.abort_images")
        if comp.HasField("manual_fraction"):
            _bounded(comp.manual_fraction, MANUAL_FRACTION, "compositional.manual_fraction")
            if comp.manual_fraction <= 0:
                raise InvalidArgument(
                    f"{comp.manual_fraction} is not in (0, 1]", "compositional.manual_fraction"
                )
        for name, limits in (
            ("imrou_r", IMROU_R),
            ("linear_length_penalty", LINEAR_LENGTH_PENALTY),
            ("min_coverage", MIN_COVERAGE),
            ("abort_fraction", ABORT_FRACTION),
        ):
            if comp.HasField(name):
                _bounded(getattr(comp, name), limits, f"compositional.{name}")

    def _methods(self, spec: common_pb2.DissectionSpec) -> None:
        if spec.HasField("netdissect"):
            nd = spec.netdissect
            if nd.HasField("top_quantile"):
                _open_unit(nd.top_quantile, "netdissect.top_quantile")
            _choice(nd.iou_mode, IOU_MODES, "netdissect.iou_mode")
            if nd.HasField("image_percentile"):
                if nd.iou_mode != "per_image":
                    raise InvalidArgument(
                        "only the per_image mode reads it (set iou_mode 'per_image')",
                        "netdissect.image_percentile",
                    )
                _bounded(nd.image_percentile, IMAGE_PERCENTILE, "netdissect.image_percentile")
            if nd.HasField("detector_threshold"):
                _bounded(nd.detector_threshold, DETECTOR_IOU, "netdissect.detector_threshold")
            _count(nd.exemplars, NETDISSECT_EXEMPLARS, "netdissect.exemplars")
        if spec.HasField("compositional"):
            comp = spec.compositional
            _count(comp.beam, BEAM, "compositional.beam")
            _count(comp.max_length, FORMULA_LENGTH, "compositional.max_length")
            _int_range(
                comp.top_k_primitives,
                0,
                MAX_TOP_K_PRIMITIVES,
                "compositional.top_k_primitives",
                "all",
            )
            if comp.HasField("length_penalty"):
                _bounded(comp.length_penalty, LENGTH_PENALTY, "compositional.length_penalty")
            if comp.HasField("top_quantile"):
                _open_unit(comp.top_quantile, "compositional.top_quantile")
            self._spatial(comp)
        if spec.HasField("clip_dissect"):
            cd = spec.clip_dissect
            self._clip(cd.clip, "clip_dissect.clip")
            if cd.concept_set_uri:
                field = "clip_dissect.concept_set_uri"
                read_concept_set(self.local_path(cd.concept_set_uri, field), field)
            _choice(cd.similarity, SIMILARITIES, "clip_dissect.similarity")
            _choice(cd.pooling, POOLINGS, "clip_dissect.pooling")
        if spec.HasField("linear"):
            lin = spec.linear
            _choice(lin.concepts, LINEAR_CONCEPTS, "linear.concepts")
            if lin.concepts == "clip":
                if lin.HasField("clip"):
                    self._clip(lin.clip, "linear.clip")
                elif not spec.HasField("clip_dissect"):
                    raise InvalidArgument(
                        "LE(CLIP) needs a CLIP model: set linear.clip or clip_dissect.clip",
                        "linear.clip",
                    )
            if lin.HasField("a"):
                _finite(lin.a, "linear.a", 0.0)
            if lin.HasField("b"):
                _finite(lin.b, "linear.b")
            if lin.max_concepts not in (0, LINEAR_MAX_CONCEPTS):
                raise InvalidArgument(
                    f"{lin.max_concepts} is not supported; LE selects at most"
                    f" {LINEAR_MAX_CONCEPTS} concepts (0 = the default)",
                    "linear.max_concepts",
                )
            _int_range(lin.seed, 0, 2**31 - 1, "linear.seed")
        if spec.HasField("milan"):
            milan = spec.milan
            if milan.checkpoint_uri != "toy":
                if not milan.checkpoint_uri:
                    raise InvalidArgument(
                        "a captioner checkpoint is required ('toy' for the toy captioner)",
                        "milan.checkpoint_uri",
                    )
                self.local_path(milan.checkpoint_uri, "milan.checkpoint_uri")
            _count(milan.beam, MILAN_BEAM, "milan.beam")
            _count(milan.max_tokens, MILAN_MAX_TOKENS, "milan.max_tokens")
            if milan.HasField("pmi_lambda"):
                _bounded(milan.pmi_lambda, PMI_LAMBDA, "milan.pmi_lambda")
            _count(milan.exemplars, MILAN_EXEMPLARS, "milan.exemplars")
            if milan.HasField("mask_quantile"):
                _open_unit(milan.mask_quantile, "milan.mask_quantile")
        if spec.HasField("simulation") and spec.simulation.simulator.arch:
            self._clip(spec.simulation.simulator, "simulation.simulator")
        self._netdissect_checks(spec)

    @staticmethod
    def _netdissect_checks(spec: common_pb2.DissectionSpec) -> None:
        """The threshold sweep and significance (specs/verification.md): NetDissect's labels."""
        for check in NETDISSECT_CHECKS:
            if spec.HasField(check) and not spec.HasField("netdissect"):
                raise InvalidArgument("it checks NetDissect's labels: set netdissect as well",
                                      check)
        per_image = spec.netdissect.iou_mode == "per_image"
        if spec.HasField("threshold_sweep"):
            sweep = spec.threshold_sweep
            given, other = ("percentiles", "quantiles") if per_image else (
                "quantiles", "percentiles")
            if getattr(sweep, other):
                mode = spec.netdissect.iou_mode or "lite"
                raise InvalidArgument(
                    f"the {mode} mode sweeps {given} (set threshold_sweep.{given})",
                    f"threshold_sweep.{other}",
                )
            values = list(getattr(sweep, given))
            default = SWEEP_PERCENTILES if per_image else SWEEP_QUANTILES
            if len(values) > MAX_SWEEP_POINTS:
                raise InvalidArgument(f"{len(values)} thresholds; at most {MAX_SWEEP_POINTS}"
                                      f" (empty: {', '.join(f'{v:g}' for v in default)})",
                                      f"threshold_sweep.{given}")
            if len(set(values)) != len(values):
                raise InvalidArgument("a threshold is listed twice", f"threshold_sweep.{given}")
            for i, value in enumerate(values):
                field = f"threshold_sweep.{given}[{i}]"
                if per_image:
                    _finite(value, field, 0.0, 100.0)
                    if value >= 100.0:
                        raise InvalidArgument(f"{value} is not below 100", field)
                else:
                    _open_unit(value, field)
        if spec.HasField("significance"):
            sig = spec.significance
            if sig.HasField("q"):
                _open_unit(sig.q, "significance.q")
            _int_range(
                sig.permutations, 0, PERMUTATIONS.high, "significance.permutations", "none"
            )

    def _verification(self, spec: common_pb2.DissectionSpec) -> None:
        """Occlusion and ablation (specs/verification.md): what they check must run too."""
        if spec.HasField(OCCLUSION_METHOD):
            occ = spec.occlusion
            if not spec.HasField("netdissect"):
                raise InvalidArgument(
                    "it compares units' drops with NetDissect's labels: set netdissect as well",
                    OCCLUSION_METHOD,
                )
            if spec.dataset.kind == "imagefolder":
                raise InvalidArgument(
                    "occlusion hides annotated regions: an imagefolder dataset has none "
                    "(use broden or toyworld)", OCCLUSION_METHOD,
                )
            _choice(occ.fill, OCCLUSION_FILLS, "occlusion.fill")
            _count(occ.max_regions, MAX_REGIONS, "occlusion.max_regions")
            _int_range(occ.seed, 0, MAX_SEED, "occlusion.seed")
            if occ.HasField("drop_threshold"):
                _bounded(occ.drop_threshold, DROP_THRESHOLD, "occlusion.drop_threshold")
        if spec.HasField(ABLATION_METHOD):
            abl = spec.ablation
            if not any(spec.HasField(m) for m in SCORED_METHODS):
                raise InvalidArgument(
                    "it scores the methods' answers: set at least one of "
                    + ", ".join(SCORED_METHODS), ABLATION_METHOD,
                )
            _choice(abl.variant, ABLATION_VARIANTS, "ablation.variant")
            if abl.HasField("temperature"):
                _bounded(abl.temperature, ABLATION_TEMPERATURE, "ablation.temperature")
            if abl.labels_uri:
                self.local_path(abl.labels_uri, "ablation.labels_uri")
            _int_range(abl.seed, 0, MAX_SEED, "ablation.seed")

    def _layers_exist(
        self, spec: common_pb2.DissectionSpec, description: common_pb2.DescribeModelResponse
    ) -> None:
        shapes = {layer.name: list(layer.shape) for layer in description.layers}
        model = f"{spec.model.source}/{spec.model.name or spec.model.weights_uri}"
        total = 0
        for i, name in enumerate(spec.layers):
            if name not in shapes:
                close = difflib.get_close_matches(name, list(shapes), n=3, cutoff=0.6)
                hint = (
                    "; did you mean " + " or ".join(repr(c) for c in close) + "?"
                    if close
                    else f"; it has {len(shapes)} layers (see DescribeModel)"
                )
                raise InvalidArgument(f"{model} has no layer {name!r}{hint}", f"layers[{i}]")
            total += shapes[name][0] if shapes[name] else 0
        if total > MAX_UNITS_PER_JOB:
            raise ResourceExhausted(
                f"the layers hold {total} units; one job explains at most {MAX_UNITS_PER_JOB}",
                "layers",
            )
