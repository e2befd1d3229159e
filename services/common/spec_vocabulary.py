"""The spec vocabulary: method names, enum values, numeric limits and defaults, defined once.

Every service reads a DissectionSpec through these names: the gateway validates
against them, the explainer, captioner and extractor apply the same defaults, so
what the gateway accepts the services run. A proto field documented as
"default 15" has its 15 here and nowhere else.

`IntField(default, high)` describes an int32 field where 0 means the default and
the allowed values are [0, high]; `FloatField(default, low, high)` an optional
double field whose absence means the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args


@dataclass(frozen=True)
class IntField:
    """An int32 spec field: 0 takes `default`, the allowed values are [0, `high`]."""

    default: int
    high: int

    def value(self, given: int) -> int:
        """The given value, or the default for 0."""
        return given or self.default


@dataclass(frozen=True)
class FloatField:
    """An optional double spec field: unset takes `default`, the allowed values [low, high]."""

    default: float
    low: float
    high: float


# -- methods --------------------------------------------------------------------------------

# Every method is a field of DissectionSpec; this is the order they run and are shown in.
METHODS = (
    "netdissect",
    "threshold_sweep",
    "significance",
    "compositional",
    "clip_dissect",
    "linear",
    "milan",
    "simulation",
    "occlusion",
    "ablation",
)
# The methods the explainer runs in the EXPLAINING stage, in running order: compositional
# reuses netdissect's thresholds; the threshold sweep and significance check its labels.
EXPLAIN_METHODS = (
    "netdissect", "threshold_sweep", "significance", "compositional", "clip_dissect", "linear"
)
# The checks of NetDissect's labels (specs/verification.md): they need `netdissect` in the spec.
NETDISSECT_CHECKS = ("threshold_sweep", "significance")
# The check whose rows are a unit's labels across thresholds, not a result message.
SWEEP_METHOD = "threshold_sweep"
# The method the captioner runs in the CAPTIONING stage.
CAPTION_METHOD = "milan"
# The method that scores the others' stored answers, after them.
SCORING_METHOD = "simulation"
# The methods whose stored answers simulation (and ablation) scores.
SCORED_METHODS = ("netdissect", "compositional", "clip_dissect", "linear", "milan")
# Verification by intervention (specs/verification.md): occlusion runs after the
# extractor's Occlude step and NetDissect; ablation scores the stored answers after
# simulation, with the classifier head the extractor stored.
OCCLUSION_METHOD = "occlusion"
ABLATION_METHOD = "ablation"
VERIFICATION_METHODS = (OCCLUSION_METHOD, ABLATION_METHOD)

# -- enums ----------------------------------------------------------------------------------

MODEL_SOURCES = ("torchvision", "timm", "torchscript", "toy")
PREPROCESSING = ("imagenet", "netdissect", "clip")
DATASET_KINDS = ("broden", "imagefolder", "toyworld")
CATEGORIES = ("object", "part", "scene", "texture", "color", "material")
ActivationDtype = Literal["float16", "float32"]
ACTIVATION_DTYPES: tuple[ActivationDtype, ...] = get_args(ActivationDtype)
DEFAULT_ACTIVATION_DTYPE: ActivationDtype = "float16"

# The dataset-level IoU modes (one threshold per unit) and the per-image one (inner-detectors'
# variant, specs/verification.md: each image thresholded at its own percentile).
DatasetIoUMode = Literal["lite", "netdissect", "all"]
DATASET_IOU_MODES: tuple[DatasetIoUMode, ...] = get_args(DatasetIoUMode)
IoUMode = Literal[DatasetIoUMode, "per_image"]
IOU_MODES: tuple[IoUMode, ...] = (*DATASET_IOU_MODES, "per_image")
DEFAULT_IOU_MODE: IoUMode = "lite"

Similarity = Literal["soft_wpmi", "wpmi", "cos", "cos_cubed"]
SIMILARITIES: tuple[Similarity, ...] = get_args(Similarity)
DEFAULT_SIMILARITY: Similarity = "soft_wpmi"

Pooling = Literal["mean", "max"]
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
DEFAULT_POOLING: Pooling = "mean"

# Compositional: boolean formulas at mask resolution (specs/compositional.md) or spatial
# formulas on the activation grid (specs/compositional_spatial.md).
CompositionalMode = Literal["boolean", "spatial"]
COMPOSITIONAL_MODES: tuple[CompositionalMode, ...] = get_args(CompositionalMode)
DEFAULT_COMPOSITIONAL_MODE: CompositionalMode = "boolean"

GridDownsampling = Literal["manual", "nearest", "bilinear"]
GRID_DOWNSAMPLINGS: tuple[GridDownsampling, ...] = get_args(GridDownsampling)
DEFAULT_GRID_DOWNSAMPLING: GridDownsampling = "manual"

FormulaScore = Literal["imroun", "iou"]
FORMULA_SCORES: tuple[FormulaScore, ...] = get_args(FormulaScore)
DEFAULT_FORMULA_SCORE: FormulaScore = "imroun"

OperatorSet = Literal["close", "boolean"]
OPERATOR_SETS: tuple[OperatorSet, ...] = get_args(OperatorSet)
DEFAULT_OPERATOR_SET: OperatorSet = "close"

OcclusionFill = Literal["black", "mean", "blur"]
OCCLUSION_FILLS: tuple[OcclusionFill, ...] = get_args(OcclusionFill)
DEFAULT_OCCLUSION_FILL: OcclusionFill = "black"

AblationVariant = Literal["optim", "norm"]
ABLATION_VARIANTS: tuple[AblationVariant, ...] = get_args(AblationVariant)
DEFAULT_ABLATION_VARIANT: AblationVariant = "optim"

LinearConcepts = Literal["label", "clip"]
LINEAR_CONCEPTS: tuple[LinearConcepts, ...] = get_args(LinearConcepts)
DEFAULT_LINEAR_CONCEPTS: LinearConcepts = "label"

# -- job and compute limits -----------------------------------------------------------------

# Layer names, job ids and store key parts: letters, digits, '_', '.', '-' (at most 200).
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
MAX_LAYERS = 32
MAX_UNITS_PER_JOB = 200_000
MAX_TEXT = 256
BATCH_SIZE = IntField(default=32, high=4096)
UNIT_BLOCK = IntField(default=64, high=8192)
IMAGE_CHUNK = IntField(default=256, high=65_536)
MAX_BAD_FRACTION = FloatField(default=0.01, low=0.0, high=1.0)

# -- method parameters ----------------------------------------------------------------------

TOP_QUANTILE = FloatField(default=0.005, low=0.0, high=1.0)  # strictly inside (0, 1)
DETECTOR_IOU = FloatField(default=0.04, low=0.0, high=1.0)
NETDISSECT_EXEMPLARS = IntField(default=15, high=200)
# per_image mode: the percentile of each raw map that thresholds it; its top concepts.
IMAGE_PERCENTILE = FloatField(default=50.0, low=0.0, high=100.0)
TOP_CONCEPTS = 3
TOP_CONCEPT_IOU = 0.1
# Threshold sweep: dataset-wide quantiles, or per-image percentiles in the per_image mode.
SWEEP_QUANTILES = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
SWEEP_PERCENTILES = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)
MAX_SWEEP_POINTS = 20
# Significance: Benjamini–Hochberg rate (strictly inside (0, 1)), permutations of the check.
SIGNIFICANCE_Q = FloatField(default=0.05, low=0.0, high=1.0)
PERMUTATIONS = IntField(default=0, high=10_000)

BEAM = IntField(default=5, high=100)
FORMULA_LENGTH = IntField(default=3, high=10)
MAX_TOP_K_PRIMITIVES = 100_000  # 0: every label is a candidate
LENGTH_PENALTY = FloatField(default=1.0, low=0.0, high=10.0)
# Spatial mode (specs/compositional_spatial.md).
MANUAL_FRACTION = FloatField(default=100 / 256, low=0.0, high=1.0)  # in (0, 1]
IMROU_R = FloatField(default=0.75, low=0.0, high=1.0)
EXPANSION_NEIGHBOURS = IntField(default=3, high=8)
LINEAR_LENGTH_PENALTY = FloatField(default=0.0, low=0.0, high=0.5)  # 1 − c·(len − 1) > 0
MIN_COVERAGE = FloatField(default=1e-4, low=0.0, high=1.0)
ABORT_IMAGES = IntField(default=4000, high=10_000_000)
ABORT_FRACTION = FloatField(default=0.5, low=0.0, high=1.0)
# The CompositionalParams fields only the spatial mode reads (refused in the boolean mode).
COMPOSITIONAL_SPATIAL_FIELDS = (
    "grid_downsampling",
    "manual_fraction",
    "score",
    "imrou_r",
    "operators",
    "expansion_neighbours",
    "linear_length_penalty",
    "min_coverage",
    "abort_images",
    "abort_fraction",
)
# Presets: CompositionalParams field -> value, each used where the spec leaves the field unset.
COMPOSITIONAL_PRESETS: dict[str, dict[str, str | int | float]] = {
    "indres": {
        "mode": "spatial",
        "grid_downsampling": "manual",
        "manual_fraction": 100 / 256,
        "score": "imroun",
        "imrou_r": 0.75,
        "expansion_neighbours": 3,
        "operators": "close",
        "beam": 4,
        "top_k_primitives": 50,
        "max_length": 3,
        "linear_length_penalty": 0.001,
    },
}

# LE selects at most this many concepts; `max_concepts` may only say so (or 0).
LINEAR_MAX_CONCEPTS = 10

MILAN_BEAM = IntField(default=50, high=500)
MILAN_MAX_TOKENS = IntField(default=15, high=100)
PMI_LAMBDA = FloatField(default=0.2, low=0.0, high=10.0)
MILAN_EXEMPLARS = IntField(default=15, high=100)
MASK_QUANTILE = FloatField(default=0.99, low=0.0, high=1.0)  # strictly inside (0, 1)

# Verification (specs/verification.md).
MAX_REGIONS = IntField(default=2000, high=1_000_000)
DROP_THRESHOLD = FloatField(default=0.1, low=0.0, high=1.0)
ABLATION_TEMPERATURE = FloatField(default=1.1, low=0.01, high=100.0)
MAX_SEED = 2**31 - 1

# -- exports --------------------------------------------------------------------------------

# Export format -> (the method that writes it, its file name beside the method's results).
EXPORTS = {
    "tally": ("netdissect", "tally.csv"),
    "clip_dissect": ("clip_dissect", "descriptions.csv"),
    "milan": ("milan", "captions.csv"),
    "compositional": ("compositional", "formulas.csv"),
    "occlusion": ("occlusion", "occlusion.csv"),
    "ablation": ("ablation", "ablation.csv"),
    "sweep": ("threshold_sweep", "sweep.csv"),
    "significance": ("significance", "significance.csv"),
}
EXPORT_FORMATS = tuple(EXPORTS)
