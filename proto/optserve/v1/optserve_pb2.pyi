from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]

class Part(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_UNSPECIFIED: _ClassVar[Part]
    PARAM: _ClassVar[Part]
    GRAD: _ClassVar[Part]
    EXP_AVG: _ClassVar[Part]
    EXP_AVG_SQ: _ClassVar[Part]
    MAX_EXP_AVG_SQ: _ClassVar[Part]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
PART_UNSPECIFIED: Part
PARAM: Part
GRAD: Part
EXP_AVG: Part
EXP_AVG_SQ: Part
MAX_EXP_AVG_SQ: Part

class Segment(_message.Message):
    __slots__ = ("entry", "part", "offset", "count")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    entry: int
    part: Part
    offset: int
    count: int
    def __init__(self, entry: _Optional[int] = ..., part: _Optional[_Union[Part, str]] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class HyperParams(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay", "weight_decouple", "absolute", "optimized_update", "amsgrad")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECOUPLE_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZED_UPDATE_FIELD_NUMBER: _ClassVar[int]
    AMSGRAD_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    weight_decouple: bool
    absolute: bool
    optimized_update: bool
    amsgrad: bool
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., weight_decouple: _Optional[bool] = ..., absolute: _Optional[bool] = ..., optimized_update: _Optional[bool] = ..., amsgrad: _Optional[bool] = ...) -> None: ...

class KeySpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "param", "param_shape", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    PARAM_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    param: str
    param_shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., param: _Optional[str] = ..., param_shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "chunk_bytes", "max_keys", "max_tensor_elements")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    chunk_bytes: int
    max_keys: int
    max_tensor_elements: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_keys: _Optional[int] = ..., max_tensor_elements: _Optional[int] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("server_version", "protocol", "shard_index", "num_shards", "policy", "device", "limits", "num_keys", "data_port", "replication")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    protocol: str
    shard_index: int
    num_shards: int
    policy: str
    device: str
    limits: Limits
    num_keys: int
    data_port: int
    replication: Replication
    def __init__(self, server_version: _Optional[str] = ..., protocol: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., policy: _Optional[str] = ..., device: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., num_keys: _Optional[int] = ..., data_port: _Optional[int] = ..., replication: _Optional[_Union[Replication, _Mapping]] = ...) -> None: ...

class Replication(_message.Message):
    __slots__ = ("role", "epoch", "index", "replicas", "replica_index", "primary", "solo", "peers")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    SOLO_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    role: str
    epoch: int
    index: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    replica_index: int
    primary: str
    solo: bool
    peers: _containers.RepeatedCompositeFieldContainer[ReplicaPeer]
    def __init__(self, role: _Optional[str] = ..., epoch: _Optional[int] = ..., index: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ..., replica_index: _Optional[int] = ..., primary: _Optional[str] = ..., solo: _Optional[bool] = ..., peers: _Optional[_Iterable[_Union[ReplicaPeer, _Mapping]]] = ...) -> None: ...

class ReplicaPeer(_message.Message):
    __slots__ = ("address", "in_sync", "lag", "error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    in_sync: bool
    lag: int
    error: str
    def __init__(self, address: _Optional[str] = ..., in_sync: _Optional[bool] = ..., lag: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class RegisterHead(_message.Message):
    __slots__ = ("keys", "with_values", "shard_index", "num_shards")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    WITH_VALUES_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeySpec]
    with_values: bool
    shard_index: int
    num_shards: int
    def __init__(self, keys: _Optional[_Iterable[_Union[KeySpec, _Mapping]]] = ..., with_values: _Optional[bool] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("head", "segments", "pad", "data")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    head: RegisterHead
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    pad: bytes
    data: bytes
    def __init__(self, head: _Optional[_Union[RegisterHead, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., pad: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class KeyStatus(_message.Message):
    __slots__ = ("name", "exists", "created", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    exists: bool
    created: bool
    version: int
    def __init__(self, name: _Optional[str] = ..., exists: _Optional[bool] = ..., created: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyStatus]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyStatus, _Mapping]]] = ...) -> None: ...

class PushEntry(_message.Message):
    __slots__ = ("key", "version_read", "hyper")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_READ_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    key: str
    version_read: int
    hyper: int
    def __init__(self, key: _Optional[str] = ..., version_read: _Optional[int] = ..., hyper: _Optional[int] = ...) -> None: ...

class PushHead(_message.Message):
    __slots__ = ("client_id", "seq", "wire_dtype", "entries", "hyper", "pull_keys", "pull_dtype")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    PULL_KEYS_FIELD_NUMBER: _ClassVar[int]
    PULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    seq: int
    wire_dtype: DType
    entries: _containers.RepeatedCompositeFieldContainer[PushEntry]
    hyper: _containers.RepeatedCompositeFieldContainer[HyperParams]
    pull_keys: _containers.RepeatedScalarFieldContainer[str]
    pull_dtype: DType
    def __init__(self, client_id: _Optional[str] = ..., seq: _Optional[int] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., entries: _Optional[_Iterable[_Union[PushEntry, _Mapping]]] = ..., hyper: _Optional[_Iterable[_Union[HyperParams, _Mapping]]] = ..., pull_keys: _Optional[_Iterable[str]] = ..., pull_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("head", "segments", "pad", "data")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    head: PushHead
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    pad: bytes
    data: bytes
    def __init__(self, head: _Optional[_Union[PushHead, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., pad: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("versions", "staleness", "duplicate", "dropped")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[int]
    staleness: _containers.RepeatedScalarFieldContainer[int]
    duplicate: bool
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, versions: _Optional[_Iterable[int]] = ..., staleness: _Optional[_Iterable[int]] = ..., duplicate: _Optional[bool] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("keys", "parts", "dtype", "chunk_bytes", "min_versions")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    parts: _containers.RepeatedScalarFieldContainer[Part]
    dtype: DType
    chunk_bytes: int
    min_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., parts: _Optional[_Iterable[_Union[Part, str]]] = ..., dtype: _Optional[_Union[DType, str]] = ..., chunk_bytes: _Optional[int] = ..., min_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key", "shape", "version", "step", "hyper", "param", "param_shape", "offset")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    PARAM_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    key: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    version: int
    step: int
    hyper: HyperParams
    param: str
    param_shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, key: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., hyper: _Optional[_Union[HyperParams, _Mapping]] = ..., param: _Optional[str] = ..., param_shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class PullHead(_message.Message):
    __slots__ = ("entries", "dtype", "push")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    dtype: DType
    push: PushReply
    def __init__(self, entries: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ..., dtype: _Optional[_Union[DType, str]] = ..., push: _Optional[_Union[PushReply, _Mapping]] = ...) -> None: ...

class PullReply(_message.Message):
    __slots__ = ("head", "segments", "pad", "data")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    head: PullHead
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    pad: bytes
    data: bytes
    def __init__(self, head: _Optional[_Union[PullHead, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., pad: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class StateEntry(_message.Message):
    __slots__ = ("key", "step", "hyper", "max_version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    step: int
    hyper: HyperParams
    max_version: int
    def __init__(self, key: _Optional[str] = ..., step: _Optional[int] = ..., hyper: _Optional[_Union[HyperParams, _Mapping]] = ..., max_version: _Optional[int] = ...) -> None: ...

class SetStateHead(_message.Message):
    __slots__ = ("entries", "parts")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[StateEntry]
    parts: _containers.RepeatedScalarFieldContainer[Part]
    def __init__(self, entries: _Optional[_Iterable[_Union[StateEntry, _Mapping]]] = ..., parts: _Optional[_Iterable[_Union[Part, str]]] = ...) -> None: ...

class SetStateRequest(_message.Message):
    __slots__ = ("head", "segments", "pad", "data")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    head: SetStateHead
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    pad: bytes
    data: bytes
    def __init__(self, head: _Optional[_Union[SetStateHead, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., pad: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class SetStateReply(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, versions: _Optional[_Iterable[int]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StalenessStats(_message.Message):
    __slots__ = ("count", "mean", "max", "histogram")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    count: int
    mean: float
    max: int
    histogram: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, count: _Optional[int] = ..., mean: _Optional[float] = ..., max: _Optional[int] = ..., histogram: _Optional[_Iterable[int]] = ...) -> None: ...

class KeyStats(_message.Message):
    __slots__ = ("key", "shape", "version", "pushes", "staleness", "dropped")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    key: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    version: int
    pushes: int
    staleness: StalenessStats
    dropped: int
    def __init__(self, key: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., pushes: _Optional[int] = ..., staleness: _Optional[_Union[StalenessStats, _Mapping]] = ..., dropped: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("shard", "keys", "pushes", "pulls", "bytes_in", "bytes_out", "rejected", "duplicates", "staleness", "dropped", "checkpoint", "checkpoint_age", "data_calls")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_AGE_FIELD_NUMBER: _ClassVar[int]
    DATA_CALLS_FIELD_NUMBER: _ClassVar[int]
    shard: HelloReply
    keys: _containers.RepeatedCompositeFieldContainer[KeyStats]
    pushes: int
    pulls: int
    bytes_in: int
    bytes_out: int
    rejected: int
    duplicates: int
    staleness: StalenessStats
    dropped: int
    checkpoint: str
    checkpoint_age: float
    data_calls: int
    def __init__(self, shard: _Optional[_Union[HelloReply, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[KeyStats, _Mapping]]] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., rejected: _Optional[int] = ..., duplicates: _Optional[int] = ..., staleness: _Optional[_Union[StalenessStats, _Mapping]] = ..., dropped: _Optional[int] = ..., checkpoint: _Optional[str] = ..., checkpoint_age: _Optional[float] = ..., data_calls: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("path", "keys", "seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    keys: int
    seconds: float
    def __init__(self, path: _Optional[str] = ..., keys: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
