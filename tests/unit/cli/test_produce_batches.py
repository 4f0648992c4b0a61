"""`dcl produce` sends batches the client sends whole: one atomic chunk each, so a failure
reports exactly what was appended before it."""

from __future__ import annotations

import ssl

import pytest

from dcl.cli.produce import _batches
from dcl.client import DclClient


@pytest.mark.parametrize("size", [0, 1, 2, 100, 4096, 600 * 1024])
def test_each_batch_is_one_client_chunk(size: int) -> None:
    values = [b"v" * size] * (2_000_000 // (size + 1) + 3)
    # Only its chunking is used: nothing is dialled.
    client = DclClient(["127.0.0.1:1"], ssl.create_default_context())
    batches = _batches(values)
    assert [v for batch in batches for v in batch] == values
    for batch in batches:
        assert len(client._chunks(batch)) == 1, (size, len(batch))
