import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    EXTRACTING: _ClassVar[JobState]
    EXPLAINING: _ClassVar[JobState]
    CAPTIONING: _ClassVar[JobState]
    REPORTING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
EXTRACTING: JobState
EXPLAINING: JobState
CAPTIONING: JobState
REPORTING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState

class ModelSpec(_message.Message):
    __slots__ = ("source", "name", "weights_uri", "preprocessing", "input_size", "num_classes")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_URI_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    source: str
    name: str
    weights_uri: str
    preprocessing: str
    input_size: int
    num_classes: int
    def __init__(self, source: _Optional[str] = ..., name: _Optional[str] = ..., weights_uri: _Optional[str] = ..., preprocessing: _Optional[str] = ..., input_size: _Optional[int] = ..., num_classes: _Optional[int] = ...) -> None: ...

class ToyWorldParams(_message.Message):
    __slots__ = ("n_images", "image_size", "seed")
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    n_images: int
    image_size: int
    seed: int
    def __init__(self, n_images: _Optional[int] = ..., image_size: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class DatasetSpec(_message.Message):
    __slots__ = ("kind", "uri", "split", "limit", "categories", "toyworld", "max_bad_fraction")
    KIND_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    TOYWORLD_FIELD_NUMBER: _ClassVar[int]
    MAX_BAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    uri: str
    split: str
    limit: int
    categories: _containers.RepeatedScalarFieldContainer[str]
    toyworld: ToyWorldParams
    max_bad_fraction: float
    def __init__(self, kind: _Optional[str] = ..., uri: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ..., categories: _Optional[_Iterable[str]] = ..., toyworld: _Optional[_Union[ToyWorldParams, _Mapping]] = ..., max_bad_fraction: _Optional[float] = ...) -> None: ...

class ComputeSpec(_message.Message):
    __slots__ = ("device", "batch_size", "unit_block_size", "image_chunk_size", "activation_dtype")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    UNIT_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_DTYPE_FIELD_NUMBER: _ClassVar[int]
    device: str
    batch_size: int
    unit_block_size: int
    image_chunk_size: int
    activation_dtype: str
    def __init__(self, device: _Optional[str] = ..., batch_size: _Optional[int] = ..., unit_block_size: _Optional[int] = ..., image_chunk_size: _Optional[int] = ..., activation_dtype: _Optional[str] = ...) -> None: ...

class NetDissectParams(_message.Message):
    __slots__ = ("top_quantile", "iou_mode", "detector_threshold", "exemplars", "image_percentile")
    TOP_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    IOU_MODE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    top_quantile: float
    iou_mode: str
    detector_threshold: float
    exemplars: int
    image_percentile: float
    def __init__(self, top_quantile: _Optional[float] = ..., iou_mode: _Optional[str] = ..., detector_threshold: _Optional[float] = ..., exemplars: _Optional[int] = ..., image_percentile: _Optional[float] = ...) -> None: ...

class CompositionalParams(_message.Message):
    __slots__ = ("beam", "max_length", "top_k_primitives", "length_penalty", "top_quantile", "preset", "mode", "grid_downsampling", "manual_fraction", "score", "imrou_r", "operators", "expansion_neighbours", "linear_length_penalty", "min_coverage", "abort_images", "abort_fraction")
    BEAM_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOP_K_PRIMITIVES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    TOP_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GRID_DOWNSAMPLING_FIELD_NUMBER: _ClassVar[int]
    MANUAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IMROU_R_FIELD_NUMBER: _ClassVar[int]
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    LINEAR_LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    ABORT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ABORT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    beam: int
    max_length: int
    top_k_primitives: int
    length_penalty: float
    top_quantile: float
    preset: str
    mode: str
    grid_downsampling: str
    manual_fraction: float
    score: str
    imrou_r: float
    operators: str
    expansion_neighbours: int
    linear_length_penalty: float
    min_coverage: float
    abort_images: int
    abort_fraction: float
    def __init__(self, beam: _Optional[int] = ..., max_length: _Optional[int] = ..., top_k_primitives: _Optional[int] = ..., length_penalty: _Optional[float] = ..., top_quantile: _Optional[float] = ..., preset: _Optional[str] = ..., mode: _Optional[str] = ..., grid_downsampling: _Optional[str] = ..., manual_fraction: _Optional[float] = ..., score: _Optional[str] = ..., imrou_r: _Optional[float] = ..., operators: _Optional[str] = ..., expansion_neighbours: _Optional[int] = ..., linear_length_penalty: _Optional[float] = ..., min_coverage: _Optional[float] = ..., abort_images: _Optional[int] = ..., abort_fraction: _Optional[float] = ...) -> None: ...

class ClipModelSpec(_message.Message):
    __slots__ = ("arch", "weights_uri")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_URI_FIELD_NUMBER: _ClassVar[int]
    arch: str
    weights_uri: str
    def __init__(self, arch: _Optional[str] = ..., weights_uri: _Optional[str] = ...) -> None: ...

class ClipDissectParams(_message.Message):
    __slots__ = ("clip", "concept_set_uri", "similarity", "pooling")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_SET_URI_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    clip: ClipModelSpec
    concept_set_uri: str
    similarity: str
    pooling: str
    def __init__(self, clip: _Optional[_Union[ClipModelSpec, _Mapping]] = ..., concept_set_uri: _Optional[str] = ..., similarity: _Optional[str] = ..., pooling: _Optional[str] = ...) -> None: ...

class LinearParams(_message.Message):
    __slots__ = ("concepts", "clip", "a", "b", "max_concepts", "seed")
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    concepts: str
    clip: ClipModelSpec
    a: float
    b: float
    max_concepts: int
    seed: int
    def __init__(self, concepts: _Optional[str] = ..., clip: _Optional[_Union[ClipModelSpec, _Mapping]] = ..., a: _Optional[float] = ..., b: _Optional[float] = ..., max_concepts: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class MilanParams(_message.Message):
    __slots__ = ("checkpoint_uri", "beam", "max_tokens", "pmi_lambda", "exemplars", "mask_quantile")
    CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    BEAM_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PMI_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    MASK_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    checkpoint_uri: str
    beam: int
    max_tokens: int
    pmi_lambda: float
    exemplars: int
    mask_quantile: float
    def __init__(self, checkpoint_uri: _Optional[str] = ..., beam: _Optional[int] = ..., max_tokens: _Optional[int] = ..., pmi_lambda: _Optional[float] = ..., exemplars: _Optional[int] = ..., mask_quantile: _Optional[float] = ...) -> None: ...

class SimulationParams(_message.Message):
    __slots__ = ("simulator",)
    SIMULATOR_FIELD_NUMBER: _ClassVar[int]
    simulator: ClipModelSpec
    def __init__(self, simulator: _Optional[_Union[ClipModelSpec, _Mapping]] = ...) -> None: ...

class OcclusionParams(_message.Message):
    __slots__ = ("fill", "max_regions", "seed", "drop_threshold")
    FILL_FIELD_NUMBER: _ClassVar[int]
    MAX_REGIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DROP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    fill: str
    max_regions: int
    seed: int
    drop_threshold: float
    def __init__(self, fill: _Optional[str] = ..., max_regions: _Optional[int] = ..., seed: _Optional[int] = ..., drop_threshold: _Optional[float] = ...) -> None: ...

class AblationParams(_message.Message):
    __slots__ = ("variant", "temperature", "labels_uri", "seed")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LABELS_URI_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    variant: str
    temperature: float
    labels_uri: str
    seed: int
    def __init__(self, variant: _Optional[str] = ..., temperature: _Optional[float] = ..., labels_uri: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class ThresholdSweepParams(_message.Message):
    __slots__ = ("quantiles", "percentiles")
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    PERCENTILES_FIELD_NUMBER: _ClassVar[int]
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    percentiles: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, quantiles: _Optional[_Iterable[float]] = ..., percentiles: _Optional[_Iterable[float]] = ...) -> None: ...

class SignificanceParams(_message.Message):
    __slots__ = ("q", "permutations")
    Q_FIELD_NUMBER: _ClassVar[int]
    PERMUTATIONS_FIELD_NUMBER: _ClassVar[int]
    q: float
    permutations: int
    def __init__(self, q: _Optional[float] = ..., permutations: _Optional[int] = ...) -> None: ...

class DissectionSpec(_message.Message):
    __slots__ = ("model", "layers", "dataset", "netdissect", "compositional", "clip_dissect", "linear", "milan", "simulation", "compute", "idempotency_key", "name", "occlusion", "ablation", "threshold_sweep", "significance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    NETDISSECT_FIELD_NUMBER: _ClassVar[int]
    COMPOSITIONAL_FIELD_NUMBER: _ClassVar[int]
    CLIP_DISSECT_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    MILAN_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    ABLATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SWEEP_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANCE_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    layers: _containers.RepeatedScalarFieldContainer[str]
    dataset: DatasetSpec
    netdissect: NetDissectParams
    compositional: CompositionalParams
    clip_dissect: ClipDissectParams
    linear: LinearParams
    milan: MilanParams
    simulation: SimulationParams
    compute: ComputeSpec
    idempotency_key: str
    name: str
    occlusion: OcclusionParams
    ablation: AblationParams
    threshold_sweep: ThresholdSweepParams
    significance: SignificanceParams
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., dataset: _Optional[_Union[DatasetSpec, _Mapping]] = ..., netdissect: _Optional[_Union[NetDissectParams, _Mapping]] = ..., compositional: _Optional[_Union[CompositionalParams, _Mapping]] = ..., clip_dissect: _Optional[_Union[ClipDissectParams, _Mapping]] = ..., linear: _Optional[_Union[LinearParams, _Mapping]] = ..., milan: _Optional[_Union[MilanParams, _Mapping]] = ..., simulation: _Optional[_Union[SimulationParams, _Mapping]] = ..., compute: _Optional[_Union[ComputeSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., name: _Optional[str] = ..., occlusion: _Optional[_Union[OcclusionParams, _Mapping]] = ..., ablation: _Optional[_Union[AblationParams, _Mapping]] = ..., threshold_sweep: _Optional[_Union[ThresholdSweepParams, _Mapping]] = ..., significance: _Optional[_Union[SignificanceParams, _Mapping]] = ...) -> None: ...

class StageProgress(_message.Message):
    __slots__ = ("stage", "done", "total", "rate", "eta_seconds", "unit", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    rate: float
    eta_seconds: float
    unit: str
    message: str
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., rate: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., unit: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class LayerSummary(_message.Message):
    __slots__ = ("layer", "units", "detectors", "unique_labels", "detectors_per_category", "simulation_mean", "simulation_sem", "dead_units", "methods", "ablation_mean", "ablation_sem", "ablation_note", "significant_detectors", "sweep", "occlusion")
    class DetectorsPerCategoryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SimulationMeanEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SimulationSemEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class AblationMeanEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class AblationSemEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LAYER_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_LABELS_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_MEAN_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_SEM_FIELD_NUMBER: _ClassVar[int]
    DEAD_UNITS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    ABLATION_MEAN_FIELD_NUMBER: _ClassVar[int]
    ABLATION_SEM_FIELD_NUMBER: _ClassVar[int]
    ABLATION_NOTE_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANT_DETECTORS_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    layer: str
    units: int
    detectors: int
    unique_labels: int
    detectors_per_category: _containers.ScalarMap[str, int]
    simulation_mean: _containers.ScalarMap[str, float]
    simulation_sem: _containers.ScalarMap[str, float]
    dead_units: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    ablation_mean: _containers.ScalarMap[str, float]
    ablation_sem: _containers.ScalarMap[str, float]
    ablation_note: str
    significant_detectors: int
    sweep: _containers.RepeatedCompositeFieldContainer[SweepPoint]
    occlusion: OcclusionSummary
    def __init__(self, layer: _Optional[str] = ..., units: _Optional[int] = ..., detectors: _Optional[int] = ..., unique_labels: _Optional[int] = ..., detectors_per_category: _Optional[_Mapping[str, int]] = ..., simulation_mean: _Optional[_Mapping[str, float]] = ..., simulation_sem: _Optional[_Mapping[str, float]] = ..., dead_units: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ..., ablation_mean: _Optional[_Mapping[str, float]] = ..., ablation_sem: _Optional[_Mapping[str, float]] = ..., ablation_note: _Optional[str] = ..., significant_detectors: _Optional[int] = ..., sweep: _Optional[_Iterable[_Union[SweepPoint, _Mapping]]] = ..., occlusion: _Optional[_Union[OcclusionSummary, _Mapping]] = ...) -> None: ...

class SweepPoint(_message.Message):
    __slots__ = ("threshold", "detectors", "unique_labels", "unchanged_fraction")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_LABELS_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    detectors: int
    unique_labels: int
    unchanged_fraction: float
    def __init__(self, threshold: _Optional[float] = ..., detectors: _Optional[int] = ..., unique_labels: _Optional[int] = ..., unchanged_fraction: _Optional[float] = ...) -> None: ...

class OcclusionSummary(_message.Message):
    __slots__ = ("fill", "concepts", "regions", "mean_correlation", "correlation", "concept_regions", "detectors_tested", "detectors_dropping", "forward_passes", "seconds", "note")
    class CorrelationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ConceptRegionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FILL_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    MEAN_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_REGIONS_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_TESTED_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_DROPPING_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    fill: str
    concepts: int
    regions: int
    mean_correlation: float
    correlation: _containers.ScalarMap[str, float]
    concept_regions: _containers.ScalarMap[str, int]
    detectors_tested: int
    detectors_dropping: float
    forward_passes: int
    seconds: float
    note: str
    def __init__(self, fill: _Optional[str] = ..., concepts: _Optional[int] = ..., regions: _Optional[int] = ..., mean_correlation: _Optional[float] = ..., correlation: _Optional[_Mapping[str, float]] = ..., concept_regions: _Optional[_Mapping[str, int]] = ..., detectors_tested: _Optional[int] = ..., detectors_dropping: _Optional[float] = ..., forward_passes: _Optional[int] = ..., seconds: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "created_at", "updated_at", "stages", "error", "bad_images", "bad_image_examples", "summary", "report_key", "dataset_key", "acts_keys", "attempt", "previous_error")
    class ActsKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BAD_IMAGES_FIELD_NUMBER: _ClassVar[int]
    BAD_IMAGE_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REPORT_KEY_FIELD_NUMBER: _ClassVar[int]
    DATASET_KEY_FIELD_NUMBER: _ClassVar[int]
    ACTS_KEYS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: DissectionSpec
    state: JobState
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    stages: _containers.RepeatedCompositeFieldContainer[StageProgress]
    error: str
    bad_images: int
    bad_image_examples: _containers.RepeatedScalarFieldContainer[str]
    summary: _containers.RepeatedCompositeFieldContainer[LayerSummary]
    report_key: str
    dataset_key: str
    acts_keys: _containers.ScalarMap[str, str]
    attempt: int
    previous_error: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[DissectionSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[StageProgress, _Mapping]]] = ..., error: _Optional[str] = ..., bad_images: _Optional[int] = ..., bad_image_examples: _Optional[_Iterable[str]] = ..., summary: _Optional[_Iterable[_Union[LayerSummary, _Mapping]]] = ..., report_key: _Optional[str] = ..., dataset_key: _Optional[str] = ..., acts_keys: _Optional[_Mapping[str, str]] = ..., attempt: _Optional[int] = ..., previous_error: _Optional[str] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "shape", "module_type", "raw_shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MODULE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RAW_SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    module_type: str
    raw_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., module_type: _Optional[str] = ..., raw_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class CategoryBest(_message.Message):
    __slots__ = ("category", "label", "iou")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    category: str
    label: str
    iou: float
    def __init__(self, category: _Optional[str] = ..., label: _Optional[str] = ..., iou: _Optional[float] = ...) -> None: ...

class NetDissectResult(_message.Message):
    __slots__ = ("label", "category", "iou", "per_category", "threshold", "detector", "exemplars", "top_concepts")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    TOP_CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    label: str
    category: str
    iou: float
    per_category: _containers.RepeatedCompositeFieldContainer[CategoryBest]
    threshold: float
    detector: bool
    exemplars: _containers.RepeatedScalarFieldContainer[int]
    top_concepts: _containers.RepeatedCompositeFieldContainer[CategoryBest]
    def __init__(self, label: _Optional[str] = ..., category: _Optional[str] = ..., iou: _Optional[float] = ..., per_category: _Optional[_Iterable[_Union[CategoryBest, _Mapping]]] = ..., threshold: _Optional[float] = ..., detector: _Optional[bool] = ..., exemplars: _Optional[_Iterable[int]] = ..., top_concepts: _Optional[_Iterable[_Union[CategoryBest, _Mapping]]] = ...) -> None: ...

class CompositionalResult(_message.Message):
    __slots__ = ("formula", "iou", "length", "imrou", "imroun", "category", "threshold")
    FORMULA_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    IMROU_FIELD_NUMBER: _ClassVar[int]
    IMROUN_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    formula: str
    iou: float
    length: int
    imrou: float
    imroun: float
    category: str
    threshold: float
    def __init__(self, formula: _Optional[str] = ..., iou: _Optional[float] = ..., length: _Optional[int] = ..., imrou: _Optional[float] = ..., imroun: _Optional[float] = ..., category: _Optional[str] = ..., threshold: _Optional[float] = ...) -> None: ...

class ConceptScore(_message.Message):
    __slots__ = ("concept", "score")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    concept: str
    score: float
    def __init__(self, concept: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClipDissectResult(_message.Message):
    __slots__ = ("label", "score", "top5")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOP5_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    top5: _containers.RepeatedCompositeFieldContainer[ConceptScore]
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., top5: _Optional[_Iterable[_Union[ConceptScore, _Mapping]]] = ...) -> None: ...

class LinearTerm(_message.Message):
    __slots__ = ("concept", "weight")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    concept: str
    weight: float
    def __init__(self, concept: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class LinearResult(_message.Message):
    __slots__ = ("explanation", "terms", "bias", "val_corr", "concepts")
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    VAL_CORR_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    explanation: str
    terms: _containers.RepeatedCompositeFieldContainer[LinearTerm]
    bias: float
    val_corr: float
    concepts: str
    def __init__(self, explanation: _Optional[str] = ..., terms: _Optional[_Iterable[_Union[LinearTerm, _Mapping]]] = ..., bias: _Optional[float] = ..., val_corr: _Optional[float] = ..., concepts: _Optional[str] = ...) -> None: ...

class MilanResult(_message.Message):
    __slots__ = ("caption", "logp_caption", "logp_lm")
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    LOGP_CAPTION_FIELD_NUMBER: _ClassVar[int]
    LOGP_LM_FIELD_NUMBER: _ClassVar[int]
    caption: str
    logp_caption: float
    logp_lm: float
    def __init__(self, caption: _Optional[str] = ..., logp_caption: _Optional[float] = ..., logp_lm: _Optional[float] = ...) -> None: ...

class UnitResult(_message.Message):
    __slots__ = ("layer", "unit", "netdissect", "compositional", "clip_dissect", "linear", "milan", "simulation", "occlusion", "ablation", "significance")
    class SimulationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class AblationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LAYER_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    NETDISSECT_FIELD_NUMBER: _ClassVar[int]
    COMPOSITIONAL_FIELD_NUMBER: _ClassVar[int]
    CLIP_DISSECT_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    MILAN_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    ABLATION_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANCE_FIELD_NUMBER: _ClassVar[int]
    layer: str
    unit: int
    netdissect: NetDissectResult
    compositional: CompositionalResult
    clip_dissect: ClipDissectResult
    linear: LinearResult
    milan: MilanResult
    simulation: _containers.ScalarMap[str, float]
    occlusion: OcclusionResult
    ablation: _containers.ScalarMap[str, float]
    significance: SignificanceResult
    def __init__(self, layer: _Optional[str] = ..., unit: _Optional[int] = ..., netdissect: _Optional[_Union[NetDissectResult, _Mapping]] = ..., compositional: _Optional[_Union[CompositionalResult, _Mapping]] = ..., clip_dissect: _Optional[_Union[ClipDissectResult, _Mapping]] = ..., linear: _Optional[_Union[LinearResult, _Mapping]] = ..., milan: _Optional[_Union[MilanResult, _Mapping]] = ..., simulation: _Optional[_Mapping[str, float]] = ..., occlusion: _Optional[_Union[OcclusionResult, _Mapping]] = ..., ablation: _Optional[_Mapping[str, float]] = ..., significance: _Optional[_Union[SignificanceResult, _Mapping]] = ...) -> None: ...

class OcclusionResult(_message.Message):
    __slots__ = ("top_concept", "top_drop", "matches_netdissect", "own_drop", "drops")
    TOP_CONCEPT_FIELD_NUMBER: _ClassVar[int]
    TOP_DROP_FIELD_NUMBER: _ClassVar[int]
    MATCHES_NETDISSECT_FIELD_NUMBER: _ClassVar[int]
    OWN_DROP_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    top_concept: str
    top_drop: float
    matches_netdissect: bool
    own_drop: float
    drops: _containers.RepeatedCompositeFieldContainer[ConceptScore]
    def __init__(self, top_concept: _Optional[str] = ..., top_drop: _Optional[float] = ..., matches_netdissect: _Optional[bool] = ..., own_drop: _Optional[float] = ..., drops: _Optional[_Iterable[_Union[ConceptScore, _Mapping]]] = ...) -> None: ...

class SignificanceResult(_message.Message):
    __slots__ = ("label", "iou", "expected_iou", "z", "p_value", "significant", "permutation_p")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_IOU_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANT_FIELD_NUMBER: _ClassVar[int]
    PERMUTATION_P_FIELD_NUMBER: _ClassVar[int]
    label: str
    iou: float
    expected_iou: float
    z: float
    p_value: float
    significant: bool
    permutation_p: float
    def __init__(self, label: _Optional[str] = ..., iou: _Optional[float] = ..., expected_iou: _Optional[float] = ..., z: _Optional[float] = ..., p_value: _Optional[float] = ..., significant: _Optional[bool] = ..., permutation_p: _Optional[float] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("layers", "input_size")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    input_size: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., input_size: _Optional[int] = ...) -> None: ...
