"""Linux AIO fsync (dcl.storage.aio) on real files: completes on the loop, with no thread,
and refuses bad descriptors with a typed error at once."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dcl.storage.aio import AioFsync, AioRefused, available
from dcl.storage.store import Store

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not available(), reason="Linux AIO syscalls unknown on this platform"),
]


def _open(depth: int = 16) -> AioFsync:
    """A context; where the syscalls exist the kernel must grant one (Linux >= 2.6)."""
    opened = AioFsync.open(asyncio.get_running_loop(), depth)
    assert opened is not None, "io_setup refused (seccomp, or fs.aio-max-nr reached?)"
    return opened


@pytest.fixture
async def aio() -> AsyncIterator[AioFsync]:
    opened = _open()
    try:
        yield opened
    finally:
        opened.close()


async def test_fsyncs_of_several_files_complete_without_a_thread(
    aio: AioFsync, tmp_path: Path
) -> None:
    threads = threading.active_count()
    fds = [os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644) for i in range(3)]
    try:
        pending = []
        for round_ in range(5):
            for fd in fds:
                os.write(fd, b"record %d\n" % round_)
                pending.append(aio.fsync(fd))
        assert aio.in_flight == 15
        assert await asyncio.wait_for(asyncio.gather(*pending), 10) == [None] * 15
        assert aio.in_flight == 0
        assert threading.active_count() == threads
    finally:
        for fd in fds:
            os.close(fd)


async def test_more_fsyncs_than_the_depth_are_refused_not_lost(tmp_path: Path) -> None:
    """A context holds a bounded number of requests (`depth`, rounded up by the kernel to
    fill its ring); past it, one more is refused at once (EAGAIN), and every accepted one
    still completes."""
    aio = _open(depth=2)
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        accepted: list[asyncio.Future[None]] = []
        with pytest.raises(AioRefused) as refused:
            # The ring holds at least 8 requests per possible CPU, at most a page more.
            for _ in range(16 * (os.cpu_count() or 1) + 4096):
                os.write(fd, b"x")
                accepted.append(aio.fsync(fd))
        assert refused.value.errno == errno.EAGAIN
        assert len(accepted) >= 2
        await asyncio.wait_for(asyncio.gather(*accepted), 10)
    finally:
        aio.close()
        os.close(fd)


async def test_a_closed_descriptor_is_refused_at_once(aio: AioFsync, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    with pytest.raises(AioRefused) as refused:
        aio.fsync(fd)
    assert refused.value.errno == errno.EBADF
    assert aio.in_flight == 0


async def test_a_descriptor_that_cannot_be_fsynced_is_refused_at_once(aio: AioFsync) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(AioRefused) as refused:
            aio.fsync(write_end)
        assert refused.value.errno == errno.EINVAL
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_close_resolves_fsyncs_in_flight_then_refuses_new_ones(tmp_path: Path) -> None:
    aio = _open()
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 4096)
        started = [aio.fsync(fd) for _ in range(4)]
        aio.close()
        assert all(f.done() and f.result() is None for f in started)
        with pytest.raises(AioRefused) as refused:
            aio.fsync(fd)
        assert refused.value.errno == errno.EBADF
        aio.close()  # idempotent
    finally:
        os.close(fd)


async def test_open_returns_none_where_the_kernel_refuses_a_context() -> None:
    # More events than the kernel allows one context (2**23): io_setup fails (EINVAL).
    loop = asyncio.get_running_loop()
    assert AioFsync.open(loop, depth=1 << 24) is None
    _open().close()  # while a sane depth is granted


def _completions_fail_with_eio(aio: AioFsync) -> None:
    """Injected fault: every completion the kernel hands back reports EIO (a disk
    write-back failure), as a failing disk would; the fsyncs themselves are real."""
    real, getevents = aio._syscall, aio._io_getevents

    def failing(number: int, *args: object) -> int:
        got = int(real(number, *args))
        if number == getevents:
            for i in range(max(got, 0)):
                res = i * 32 + 16  # struct io_event: data, obj, res, res2
                struct.pack_into("<q", aio._events, res, -errno.EIO)
        return got

    aio._syscall = failing  # type: ignore[assignment]


async def test_an_fsync_error_reaches_its_awaiter(tmp_path: Path) -> None:
    aio = _open()
    _completions_fail_with_eio(aio)
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        with pytest.raises(OSError) as failed:
            await asyncio.wait_for(aio.fsync(fd), 10)
        assert failed.value.errno == errno.EIO
    finally:
        aio.close()
        os.close(fd)


async def test_an_fsync_error_nobody_awaits_fails_every_later_fsync(tmp_path: Path) -> None:
    """The kernel reports a write-back error once per open file: an error whose awaiter
    gave up (a stopping driver) must still stop the next fsync from reporting success."""
    aio = _open()
    _completions_fail_with_eio(aio)
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        aio.fsync(fd).cancel()
        for _ in range(200):
            if aio.failed is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(aio.failed, OSError) and aio.failed.errno == errno.EIO
        with pytest.raises(OSError) as later:
            aio.fsync(fd)
        assert later.value.errno == errno.EIO and not isinstance(later.value, AioRefused)
    finally:
        aio.close()
        os.close(fd)


async def test_a_store_flushes_its_buffer_before_the_fsync_starts(
    aio: AioFsync, tmp_path: Path
) -> None:
    store = Store(tmp_path / "s.store")
    try:
        store.append(b"buffered")
        assert os.path.getsize(store.path) == 0
        started = store.sync_submit(aio.fsync)
        assert started is not None
        assert os.path.getsize(store.path) == store.size > 0  # flushed before the fsync
        await asyncio.wait_for(started, 10)
    finally:
        store.close()
    assert store.sync_submit(aio.fsync) is None  # closed: nothing to start
