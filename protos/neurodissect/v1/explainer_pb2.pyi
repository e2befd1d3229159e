from neurodissect.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExplainRequest(_message.Message):
    __slots__ = ("job_id", "layer", "methods", "spec", "dataset_key", "acts_key", "clip_dissect", "linear", "simulation", "unit_start", "unit_end", "occlusion_key", "ablation")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DATASET_KEY_FIELD_NUMBER: _ClassVar[int]
    ACTS_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIP_DISSECT_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    SIMULATION_FIELD_NUMBER: _ClassVar[int]
    UNIT_START_FIELD_NUMBER: _ClassVar[int]
    UNIT_END_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_KEY_FIELD_NUMBER: _ClassVar[int]
    ABLATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    layer: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    spec: _common_pb2.DissectionSpec
    dataset_key: str
    acts_key: str
    clip_dissect: ConceptEmbeddings
    linear: ConceptEmbeddings
    simulation: ConceptEmbeddings
    unit_start: int
    unit_end: int
    occlusion_key: str
    ablation: AblationInputs
    def __init__(self, job_id: _Optional[str] = ..., layer: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., spec: _Optional[_Union[_common_pb2.DissectionSpec, _Mapping]] = ..., dataset_key: _Optional[str] = ..., acts_key: _Optional[str] = ..., clip_dissect: _Optional[_Union[ConceptEmbeddings, _Mapping]] = ..., linear: _Optional[_Union[ConceptEmbeddings, _Mapping]] = ..., simulation: _Optional[_Union[ConceptEmbeddings, _Mapping]] = ..., unit_start: _Optional[int] = ..., unit_end: _Optional[int] = ..., occlusion_key: _Optional[str] = ..., ablation: _Optional[_Union[AblationInputs, _Mapping]] = ...) -> None: ...

class AblationInputs(_message.Message):
    __slots__ = ("head_key", "labels_key", "note")
    HEAD_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_KEY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    head_key: str
    labels_key: str
    note: str
    def __init__(self, head_key: _Optional[str] = ..., labels_key: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ConceptEmbeddings(_message.Message):
    __slots__ = ("image_key", "text_key")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    TEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    text_key: str
    def __init__(self, image_key: _Optional[str] = ..., text_key: _Optional[str] = ...) -> None: ...

class ExplainProgress(_message.Message):
    __slots__ = ("method", "units_done", "units_total", "message", "finished")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    UNITS_DONE_FIELD_NUMBER: _ClassVar[int]
    UNITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    method: str
    units_done: int
    units_total: int
    message: str
    finished: bool
    def __init__(self, method: _Optional[str] = ..., units_done: _Optional[int] = ..., units_total: _Optional[int] = ..., message: _Optional[str] = ..., finished: _Optional[bool] = ...) -> None: ...
