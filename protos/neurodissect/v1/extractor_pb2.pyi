from neurodissect.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractRequest(_message.Message):
    __slots__ = ("job_id", "model", "layers", "dataset", "compute", "clip_models", "shard_index", "shard_count", "index_only")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    CLIP_MODELS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_ONLY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: _common_pb2.ModelSpec
    layers: _containers.RepeatedScalarFieldContainer[str]
    dataset: _common_pb2.DatasetSpec
    compute: _common_pb2.ComputeSpec
    clip_models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ClipModelSpec]
    shard_index: int
    shard_count: int
    index_only: bool
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSpec, _Mapping]] = ..., compute: _Optional[_Union[_common_pb2.ComputeSpec, _Mapping]] = ..., clip_models: _Optional[_Iterable[_Union[_common_pb2.ClipModelSpec, _Mapping]]] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., index_only: _Optional[bool] = ...) -> None: ...

class ExtractProgress(_message.Message):
    __slots__ = ("images_done", "images_total", "message", "finished", "dataset_key", "acts_keys", "image_embedding_keys", "bad_images", "bad_image_examples", "cached")
    class ActsKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ImageEmbeddingKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    DATASET_KEY_FIELD_NUMBER: _ClassVar[int]
    ACTS_KEYS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EMBEDDING_KEYS_FIELD_NUMBER: _ClassVar[int]
    BAD_IMAGES_FIELD_NUMBER: _ClassVar[int]
    BAD_IMAGE_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    images_done: int
    images_total: int
    message: str
    finished: bool
    dataset_key: str
    acts_keys: _containers.ScalarMap[str, str]
    image_embedding_keys: _containers.ScalarMap[str, str]
    bad_images: int
    bad_image_examples: _containers.RepeatedScalarFieldContainer[str]
    cached: bool
    def __init__(self, images_done: _Optional[int] = ..., images_total: _Optional[int] = ..., message: _Optional[str] = ..., finished: _Optional[bool] = ..., dataset_key: _Optional[str] = ..., acts_keys: _Optional[_Mapping[str, str]] = ..., image_embedding_keys: _Optional[_Mapping[str, str]] = ..., bad_images: _Optional[int] = ..., bad_image_examples: _Optional[_Iterable[str]] = ..., cached: _Optional[bool] = ...) -> None: ...

class MaterializeRequest(_message.Message):
    __slots__ = ("dataset", "dataset_key", "image_ids", "size")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.DatasetSpec
    dataset_key: str
    image_ids: _containers.RepeatedScalarFieldContainer[int]
    size: int
    def __init__(self, dataset: _Optional[_Union[_common_pb2.DatasetSpec, _Mapping]] = ..., dataset_key: _Optional[str] = ..., image_ids: _Optional[_Iterable[int]] = ..., size: _Optional[int] = ...) -> None: ...

class MaterializeResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("clip", "texts", "concept_set_uri", "dataset_key")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_SET_URI_FIELD_NUMBER: _ClassVar[int]
    DATASET_KEY_FIELD_NUMBER: _ClassVar[int]
    clip: _common_pb2.ClipModelSpec
    texts: _containers.RepeatedScalarFieldContainer[str]
    concept_set_uri: str
    dataset_key: str
    def __init__(self, clip: _Optional[_Union[_common_pb2.ClipModelSpec, _Mapping]] = ..., texts: _Optional[_Iterable[str]] = ..., concept_set_uri: _Optional[str] = ..., dataset_key: _Optional[str] = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("key", "count")
    KEY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    key: str
    count: int
    def __init__(self, key: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class OccludeRequest(_message.Message):
    __slots__ = ("job_id", "model", "layers", "dataset", "compute", "params")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: _common_pb2.ModelSpec
    layers: _containers.RepeatedScalarFieldContainer[str]
    dataset: _common_pb2.DatasetSpec
    compute: _common_pb2.ComputeSpec
    params: _common_pb2.OcclusionParams
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSpec, _Mapping]] = ..., compute: _Optional[_Union[_common_pb2.ComputeSpec, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.OcclusionParams, _Mapping]] = ...) -> None: ...

class OccludeProgress(_message.Message):
    __slots__ = ("regions_done", "regions_total", "message", "finished", "occlusion_keys", "cached")
    class OcclusionKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REGIONS_DONE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_KEYS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    regions_done: int
    regions_total: int
    message: str
    finished: bool
    occlusion_keys: _containers.ScalarMap[str, str]
    cached: bool
    def __init__(self, regions_done: _Optional[int] = ..., regions_total: _Optional[int] = ..., message: _Optional[str] = ..., finished: _Optional[bool] = ..., occlusion_keys: _Optional[_Mapping[str, str]] = ..., cached: _Optional[bool] = ...) -> None: ...

class ClassifierHeadRequest(_message.Message):
    __slots__ = ("model", "layers", "dataset", "compute", "labels_uri")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    LABELS_URI_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelSpec
    layers: _containers.RepeatedScalarFieldContainer[str]
    dataset: _common_pb2.DatasetSpec
    compute: _common_pb2.ComputeSpec
    labels_uri: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSpec, _Mapping]] = ..., compute: _Optional[_Union[_common_pb2.ComputeSpec, _Mapping]] = ..., labels_uri: _Optional[str] = ...) -> None: ...

class ClassifierHeadResponse(_message.Message):
    __slots__ = ("head_keys", "notes", "labels_key", "classes")
    class HeadKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class NotesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HEAD_KEYS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    LABELS_KEY_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    head_keys: _containers.ScalarMap[str, str]
    notes: _containers.ScalarMap[str, str]
    labels_key: str
    classes: int
    def __init__(self, head_keys: _Optional[_Mapping[str, str]] = ..., notes: _Optional[_Mapping[str, str]] = ..., labels_key: _Optional[str] = ..., classes: _Optional[int] = ...) -> None: ...
