from dcl.api.log.v1 import log_pb2 as _log_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProduceBatchRequest(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ProduceBatchResponse(_message.Message):
    __slots__ = ("first_offset", "count")
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    first_offset: int
    count: int
    def __init__(self, first_offset: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class ConsumeBatchRequest(_message.Message):
    __slots__ = ("offset", "max_records", "max_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    max_records: int
    max_bytes: int
    def __init__(self, offset: _Optional[int] = ..., max_records: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class ConsumeBatchResponse(_message.Message):
    __slots__ = ("records", "next_offset")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_log_pb2.Record]
    next_offset: int
    def __init__(self, records: _Optional[_Iterable[_Union[_log_pb2.Record, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...
