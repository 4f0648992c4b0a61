"""Acknowledged records survive a restart of the node (LocalBackend over dcl.storage.Log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from tests.integration.conftest import NodeFactory

pytestmark = pytest.mark.timeout(30)


async def test_acknowledged_records_survive_a_restart(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    directory = tmp_path / "node"
    values = [b"v%05d" % i for i in range(3000)]
    async with node_factory(directory) as node:
        batch = batch_grpc.BatchStub(node.channel())
        stub = log_grpc.LogStub(node.channel())
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=chunk))
        last = await stub.Produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"last")))
        assert last.offset == len(values)

    async with node_factory(directory) as restarted:
        assert restarted.backend.next_offset == len(values) + 1
        batch = batch_grpc.BatchStub(restarted.channel())
        seen: list[bytes] = []
        offset = 0
        while offset < len(values) + 1:
            page = await batch.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=offset))
            offsets = [r.offset for r in page.records]
            assert offsets == list(range(offset, offset + len(offsets)))
            seen += [r.value for r in page.records]
            offset += len(page.records)
        assert seen == [*values, b"last"]
        stub = log_grpc.LogStub(restarted.channel())
        more = await stub.Produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"more")))
        assert more.offset == len(values) + 1
