from neurodissect.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CaptionRequest(_message.Message):
    __slots__ = ("job_id", "layer", "params", "dataset", "dataset_key", "acts_key", "unit_start", "unit_end", "compute")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_KEY_FIELD_NUMBER: _ClassVar[int]
    ACTS_KEY_FIELD_NUMBER: _ClassVar[int]
    UNIT_START_FIELD_NUMBER: _ClassVar[int]
    UNIT_END_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    layer: str
    params: _common_pb2.MilanParams
    dataset: _common_pb2.DatasetSpec
    dataset_key: str
    acts_key: str
    unit_start: int
    unit_end: int
    compute: _common_pb2.ComputeSpec
    def __init__(self, job_id: _Optional[str] = ..., layer: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.MilanParams, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSpec, _Mapping]] = ..., dataset_key: _Optional[str] = ..., acts_key: _Optional[str] = ..., unit_start: _Optional[int] = ..., unit_end: _Optional[int] = ..., compute: _Optional[_Union[_common_pb2.ComputeSpec, _Mapping]] = ...) -> None: ...

class CaptionProgress(_message.Message):
    __slots__ = ("units_done", "units_total", "message", "finished")
    UNITS_DONE_FIELD_NUMBER: _ClassVar[int]
    UNITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    units_done: int
    units_total: int
    message: str
    finished: bool
    def __init__(self, units_done: _Optional[int] = ..., units_total: _Optional[int] = ..., message: _Optional[str] = ..., finished: _Optional[bool] = ...) -> None: ...
