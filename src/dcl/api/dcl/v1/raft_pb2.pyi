from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RaftEntry(_message.Message):
    __slots__ = ("term", "index", "type", "data")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    term: int
    index: int
    type: int
    data: bytes
    def __init__(self, term: _Optional[int] = ..., index: _Optional[int] = ..., type: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RaftSnapshotMeta(_message.Message):
    __slots__ = ("index", "term", "voters", "learners")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    voters: _containers.RepeatedScalarFieldContainer[str]
    learners: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., voters: _Optional[_Iterable[str]] = ..., learners: _Optional[_Iterable[str]] = ...) -> None: ...

class AppendEntriesMsg(_message.Message):
    __slots__ = ("prev_index", "prev_term", "entries", "commit", "want_response")
    PREV_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_TERM_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    WANT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prev_index: int
    prev_term: int
    entries: _containers.RepeatedCompositeFieldContainer[RaftEntry]
    commit: int
    want_response: bool
    def __init__(self, prev_index: _Optional[int] = ..., prev_term: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[RaftEntry, _Mapping]]] = ..., commit: _Optional[int] = ..., want_response: _Optional[bool] = ...) -> None: ...

class AppendResponseMsg(_message.Message):
    __slots__ = ("index", "reject", "hint_index", "hint_term")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    HINT_INDEX_FIELD_NUMBER: _ClassVar[int]
    HINT_TERM_FIELD_NUMBER: _ClassVar[int]
    index: int
    reject: bool
    hint_index: int
    hint_term: int
    def __init__(self, index: _Optional[int] = ..., reject: _Optional[bool] = ..., hint_index: _Optional[int] = ..., hint_term: _Optional[int] = ...) -> None: ...

class RequestVoteMsg(_message.Message):
    __slots__ = ("last_index", "last_term", "pre_vote", "transfer")
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_TERM_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    last_index: int
    last_term: int
    pre_vote: bool
    transfer: bool
    def __init__(self, last_index: _Optional[int] = ..., last_term: _Optional[int] = ..., pre_vote: _Optional[bool] = ..., transfer: _Optional[bool] = ...) -> None: ...

class VoteResponseMsg(_message.Message):
    __slots__ = ("granted", "pre_vote")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    pre_vote: bool
    def __init__(self, granted: _Optional[bool] = ..., pre_vote: _Optional[bool] = ...) -> None: ...

class HeartbeatMsg(_message.Message):
    __slots__ = ("commit", "context")
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    commit: int
    context: int
    def __init__(self, commit: _Optional[int] = ..., context: _Optional[int] = ...) -> None: ...

class HeartbeatResponseMsg(_message.Message):
    __slots__ = ("context", "disk_low")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DISK_LOW_FIELD_NUMBER: _ClassVar[int]
    context: int
    disk_low: bool
    def __init__(self, context: _Optional[int] = ..., disk_low: _Optional[bool] = ...) -> None: ...

class InstallSnapshotMsg(_message.Message):
    __slots__ = ("meta", "offset", "data", "done", "size")
    META_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    meta: RaftSnapshotMeta
    offset: int
    data: bytes
    done: bool
    size: int
    def __init__(self, meta: _Optional[_Union[RaftSnapshotMeta, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., size: _Optional[int] = ...) -> None: ...

class SnapshotResponseMsg(_message.Message):
    __slots__ = ("index", "offset", "done")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    done: bool
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class TimeoutNowMsg(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RaftMessage(_message.Message):
    __slots__ = ("term", "src", "dst", "append", "append_response", "vote", "vote_response", "heartbeat", "heartbeat_response", "snapshot", "snapshot_response", "timeout_now", "src_addr")
    TERM_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    APPEND_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    VOTE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_NOW_FIELD_NUMBER: _ClassVar[int]
    SRC_ADDR_FIELD_NUMBER: _ClassVar[int]
    term: int
    src: str
    dst: str
    append: AppendEntriesMsg
    append_response: AppendResponseMsg
    vote: RequestVoteMsg
    vote_response: VoteResponseMsg
    heartbeat: HeartbeatMsg
    heartbeat_response: HeartbeatResponseMsg
    snapshot: InstallSnapshotMsg
    snapshot_response: SnapshotResponseMsg
    timeout_now: TimeoutNowMsg
    src_addr: str
    def __init__(self, term: _Optional[int] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., append: _Optional[_Union[AppendEntriesMsg, _Mapping]] = ..., append_response: _Optional[_Union[AppendResponseMsg, _Mapping]] = ..., vote: _Optional[_Union[RequestVoteMsg, _Mapping]] = ..., vote_response: _Optional[_Union[VoteResponseMsg, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatMsg, _Mapping]] = ..., heartbeat_response: _Optional[_Union[HeartbeatResponseMsg, _Mapping]] = ..., snapshot: _Optional[_Union[InstallSnapshotMsg, _Mapping]] = ..., snapshot_response: _Optional[_Union[SnapshotResponseMsg, _Mapping]] = ..., timeout_now: _Optional[_Union[TimeoutNowMsg, _Mapping]] = ..., src_addr: _Optional[str] = ...) -> None: ...

class RaftBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[RaftMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[RaftMessage, _Mapping]]] = ...) -> None: ...

class RaftSendSummary(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class RecordBatchCommand(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PeerAddressCommand(_message.Message):
    __slots__ = ("id", "rpc_addr")
    ID_FIELD_NUMBER: _ClassVar[int]
    RPC_ADDR_FIELD_NUMBER: _ClassVar[int]
    id: str
    rpc_addr: str
    def __init__(self, id: _Optional[str] = ..., rpc_addr: _Optional[str] = ...) -> None: ...
