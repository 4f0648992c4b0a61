from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("id", "rpc_addr", "voter")
    ID_FIELD_NUMBER: _ClassVar[int]
    RPC_ADDR_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    rpc_addr: str
    voter: bool
    def __init__(self, id: _Optional[str] = ..., rpc_addr: _Optional[str] = ..., voter: _Optional[bool] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("id", "rpc_addr", "role", "term", "last_index", "applied_index", "voter", "gossip_state", "first_offset", "next_offset", "log_bytes", "reloads_ok", "reloads_failed", "certificates_expire", "gossip_key", "disk_free_bytes", "disk_reserve_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    RPC_ADDR_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_STATE_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    RELOADS_OK_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_EXPIRE_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_KEY_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    rpc_addr: str
    role: str
    term: int
    last_index: int
    applied_index: int
    voter: bool
    gossip_state: str
    first_offset: int
    next_offset: int
    log_bytes: int
    reloads_ok: int
    reloads_failed: int
    certificates_expire: int
    gossip_key: str
    disk_free_bytes: int
    disk_reserve_bytes: int
    def __init__(self, id: _Optional[str] = ..., rpc_addr: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., last_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., voter: _Optional[bool] = ..., gossip_state: _Optional[str] = ..., first_offset: _Optional[int] = ..., next_offset: _Optional[int] = ..., log_bytes: _Optional[int] = ..., reloads_ok: _Optional[int] = ..., reloads_failed: _Optional[int] = ..., certificates_expire: _Optional[int] = ..., gossip_key: _Optional[str] = ..., disk_free_bytes: _Optional[int] = ..., disk_reserve_bytes: _Optional[int] = ...) -> None: ...

class ClusterResponse(_message.Message):
    __slots__ = ("servers", "leader_id")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[ServerStatus]
    leader_id: str
    def __init__(self, servers: _Optional[_Iterable[_Union[ServerStatus, _Mapping]]] = ..., leader_id: _Optional[str] = ...) -> None: ...
