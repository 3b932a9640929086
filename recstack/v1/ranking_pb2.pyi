from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BehaviourKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BEHAVIOUR_KIND_CLICK: _ClassVar[BehaviourKind]
    BEHAVIOUR_KIND_PURCHASE: _ClassVar[BehaviourKind]
    BEHAVIOUR_KIND_VIEW: _ClassVar[BehaviourKind]
    BEHAVIOUR_KIND_FAVOURITE: _ClassVar[BehaviourKind]
    BEHAVIOUR_KIND_CART: _ClassVar[BehaviourKind]
BEHAVIOUR_KIND_CLICK: BehaviourKind
BEHAVIOUR_KIND_PURCHASE: BehaviourKind
BEHAVIOUR_KIND_VIEW: BehaviourKind
BEHAVIOUR_KIND_FAVOURITE: BehaviourKind
BEHAVIOUR_KIND_CART: BehaviourKind

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "kind", "timestamp", "dwell_seconds", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DWELL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    item_id: int
    kind: BehaviourKind
    timestamp: float
    dwell_seconds: float
    request_id: str
    def __init__(self, user_id: _Optional[int] = ..., item_id: _Optional[int] = ..., kind: _Optional[_Union[BehaviourKind, str]] = ..., timestamp: _Optional[float] = ..., dwell_seconds: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class LogEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class LogEventsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class Behaviour(_message.Message):
    __slots__ = ("item_id", "seconds_ago", "kind", "dwell_seconds", "item_key")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DWELL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEY_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    seconds_ago: float
    kind: BehaviourKind
    dwell_seconds: float
    item_key: str
    def __init__(self, item_id: _Optional[int] = ..., seconds_ago: _Optional[float] = ..., kind: _Optional[_Union[BehaviourKind, str]] = ..., dwell_seconds: _Optional[float] = ..., item_key: _Optional[str] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user_id", "recent_behaviours", "num_results", "retrieval_size", "coarse_size", "debug", "user_key")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    RECENT_BEHAVIOURS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    COARSE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    recent_behaviours: _containers.RepeatedCompositeFieldContainer[Behaviour]
    num_results: int
    retrieval_size: int
    coarse_size: int
    debug: bool
    user_key: str
    def __init__(self, user_id: _Optional[int] = ..., recent_behaviours: _Optional[_Iterable[_Union[Behaviour, _Mapping]]] = ..., num_results: _Optional[int] = ..., retrieval_size: _Optional[int] = ..., coarse_size: _Optional[int] = ..., debug: _Optional[bool] = ..., user_key: _Optional[str] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "pctr", "pcvr", "price", "coarse_score", "source", "item_key")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PCTR_FIELD_NUMBER: _ClassVar[int]
    PCVR_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    COARSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEY_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    pctr: float
    pcvr: float
    price: float
    coarse_score: float
    source: str
    item_key: str
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ..., pctr: _Optional[float] = ..., pcvr: _Optional[float] = ..., price: _Optional[float] = ..., coarse_score: _Optional[float] = ..., source: _Optional[str] = ..., item_key: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("features_ms", "retrieval_ms", "coarse_ms", "fine_ms", "total_ms")
    FEATURES_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    COARSE_MS_FIELD_NUMBER: _ClassVar[int]
    FINE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    features_ms: float
    retrieval_ms: float
    coarse_ms: float
    fine_ms: float
    total_ms: float
    def __init__(self, features_ms: _Optional[float] = ..., retrieval_ms: _Optional[float] = ..., coarse_ms: _Optional[float] = ..., fine_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class StageCounts(_message.Message):
    __slots__ = ("retrieved", "coarse", "returned", "sequence_length")
    RETRIEVED_FIELD_NUMBER: _ClassVar[int]
    COARSE_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    retrieved: int
    coarse: int
    returned: int
    sequence_length: int
    def __init__(self, retrieved: _Optional[int] = ..., coarse: _Optional[int] = ..., returned: _Optional[int] = ..., sequence_length: _Optional[int] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("items", "model_version", "cold_start", "timings", "stage_counts", "degraded_features", "degraded_retrieval")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    STAGE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    model_version: str
    cold_start: bool
    timings: StageTimings
    stage_counts: StageCounts
    degraded_features: bool
    degraded_retrieval: bool
    def __init__(self, items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., cold_start: _Optional[bool] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., stage_counts: _Optional[_Union[StageCounts, _Mapping]] = ..., degraded_features: _Optional[bool] = ..., degraded_retrieval: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "user_key", "item_ids", "item_keys", "recent_behaviours", "debug")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEYS_FIELD_NUMBER: _ClassVar[int]
    RECENT_BEHAVIOURS_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    user_key: str
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    item_keys: _containers.RepeatedScalarFieldContainer[str]
    recent_behaviours: _containers.RepeatedCompositeFieldContainer[Behaviour]
    debug: bool
    def __init__(self, user_id: _Optional[int] = ..., user_key: _Optional[str] = ..., item_ids: _Optional[_Iterable[int]] = ..., item_keys: _Optional[_Iterable[str]] = ..., recent_behaviours: _Optional[_Iterable[_Union[Behaviour, _Mapping]]] = ..., debug: _Optional[bool] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "item_key", "score", "pctr", "pcvr", "price")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PCTR_FIELD_NUMBER: _ClassVar[int]
    PCVR_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    item_key: str
    score: float
    pctr: float
    pcvr: float
    price: float
    def __init__(self, item_id: _Optional[int] = ..., item_key: _Optional[str] = ..., score: _Optional[float] = ..., pctr: _Optional[float] = ..., pcvr: _Optional[float] = ..., price: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("items", "model_version", "cold_start", "timings")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    cold_start: bool
    timings: StageTimings
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., cold_start: _Optional[bool] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageLimits(_message.Message):
    __slots__ = ("num_results_default", "num_results_max", "retrieval_size_default", "retrieval_size_max", "coarse_size_default", "coarse_size_max", "behaviours_max", "seconds_ago_max", "dwell_seconds_max")
    NUM_RESULTS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    NUM_RESULTS_MAX_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SIZE_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SIZE_MAX_FIELD_NUMBER: _ClassVar[int]
    COARSE_SIZE_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    COARSE_SIZE_MAX_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOURS_MAX_FIELD_NUMBER: _ClassVar[int]
    SECONDS_AGO_MAX_FIELD_NUMBER: _ClassVar[int]
    DWELL_SECONDS_MAX_FIELD_NUMBER: _ClassVar[int]
    num_results_default: int
    num_results_max: int
    retrieval_size_default: int
    retrieval_size_max: int
    coarse_size_default: int
    coarse_size_max: int
    behaviours_max: int
    seconds_ago_max: float
    dwell_seconds_max: float
    def __init__(self, num_results_default: _Optional[int] = ..., num_results_max: _Optional[int] = ..., retrieval_size_default: _Optional[int] = ..., retrieval_size_max: _Optional[int] = ..., coarse_size_default: _Optional[int] = ..., coarse_size_max: _Optional[int] = ..., behaviours_max: _Optional[int] = ..., seconds_ago_max: _Optional[float] = ..., dwell_seconds_max: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "bundle_path", "created", "loaded_at", "n_items", "n_users", "limits", "manifest_json", "pid", "worker", "last_load_error")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    N_ITEMS_FIELD_NUMBER: _ClassVar[int]
    N_USERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LAST_LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    bundle_path: str
    created: str
    loaded_at: str
    n_items: int
    n_users: int
    limits: StageLimits
    manifest_json: str
    pid: int
    worker: int
    last_load_error: str
    def __init__(self, model_version: _Optional[str] = ..., bundle_path: _Optional[str] = ..., created: _Optional[str] = ..., loaded_at: _Optional[str] = ..., n_items: _Optional[int] = ..., n_users: _Optional[int] = ..., limits: _Optional[_Union[StageLimits, _Mapping]] = ..., manifest_json: _Optional[str] = ..., pid: _Optional[int] = ..., worker: _Optional[int] = ..., last_load_error: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...
