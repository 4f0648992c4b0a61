"""fsync on the event loop without a thread: Linux AIO (`IOCB_CMD_FSYNC`).

Why: a leader cannot fsync on its loop thread (a stalled disk would stall its heartbeats),
and handing the fsync to an executor thread costs more than the fsync's own CPU: the
thread's wake-up, and its GIL hand-offs with the loop thread, which is busy sending the same
entries to the followers meanwhile (leader CPU per one-at-a-time Produce 1000 -> 850 us).
`io_submit` hands the fsync to the kernel, which runs it in a kernel worker and signals
completion on an eventfd the loop watches: no Python thread takes part.

The kernel copies the request block during `io_submit` and holds its own reference to the
file until completion, so neither the block nor the descriptor must outlive the call.

Linux on x86_64 and aarch64 with a 64-bit Python only (the syscall numbers); `AioFsync.open`
returns None elsewhere, and where the kernel or a seccomp filter refuses, and callers fall
back to an executor. A kernel older than 4.18 refuses the fsync itself: `AioRefused`.

An fsync error is sticky: the kernel reports a write-back error once per open file, so an
error nobody awaited any more must still fail every later fsync (`AioFsync.failed`).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import platform
import struct
import sys

#: (io_setup, io_destroy, io_getevents, io_submit) by machine.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FSYNC = 2
_IOCB_FLAG_RESFD = 1
#: struct iocb, little-endian: aio_data, aio_key, aio_rw_flags, aio_lio_opcode,
#: aio_reqprio, aio_fildes, aio_buf, aio_nbytes, aio_offset, aio_reserved2, aio_flags,
#: aio_resfd.
_IOCB = struct.Struct("<QIIHhIQQqQII")
#: struct io_event: data, obj, res, res2.
_EVENT = struct.Struct("<QQqq")


def available() -> bool:
    """Whether this platform has the syscalls `AioFsync` uses (the kernel may still refuse)."""
    return (sys.platform.startswith("linux") and platform.machine() in _SYSCALLS
            and sys.byteorder == "little" and ctypes.sizeof(ctypes.c_void_p) == 8)


class AioRefused(OSError):
    """io_submit refused the fsync; nothing was started (the caller may fsync otherwise)."""


class AioFsync:
    """Asynchronous fsyncs of any descriptors, completed on the loop that opened it."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, libc: ctypes.CDLL, calls: tuple[int, ...],
        ctx: ctypes.c_ulong, depth: int,
    ) -> None:
        self._loop = loop
        self._syscall = libc.syscall
        self._io_destroy, self._io_getevents, self._io_submit = calls[1:]
        self._ctx = ctx
        self._depth = depth
        self._events = ctypes.create_string_buffer(_EVENT.size * depth)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        #: The first fsync error or reaping failure: every later fsync fails with it.
        self.failed: OSError | None = None
        loop.add_reader(self._efd, self._reap)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, depth: int = 16) -> AioFsync | None:
        """An AIO context for up to `depth` fsyncs in flight, or None where unavailable."""
        if not available():
            return None
        calls = _SYSCALLS[platform.machine()]
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if libc.syscall(calls[0], ctypes.c_int(depth), ctypes.byref(ctx)) != 0:
            return None  # EINVAL, ENOSYS, EPERM (seccomp), EAGAIN (system-wide aio-max-nr)
        return cls(loop, libc, calls, ctx, depth)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def fsync(self, fd: int) -> asyncio.Future[None]:
        """Start an fsync of `fd`; the future resolves when it is done, or fails with the
        kernel's error. Raises `AioRefused` at once if the kernel refuses the request (a
        closed descriptor, a file without fsync such as a pipe, the ring full, a kernel
        without AIO fsync), and the sticky error if an earlier fsync failed."""
        if self.failed is not None:
            raise self.failed
        if self._ctx.value == 0:
            raise AioRefused(errno.EBADF, "AioFsync is closed")
        self._next_id += 1
        request = self._next_id
        block = ctypes.create_string_buffer(
            _IOCB.pack(request, 0, 0, _IOCB_CMD_FSYNC, 0, fd, 0, 0, 0, 0, _IOCB_FLAG_RESFD,
                       self._efd),
            _IOCB.size,
        )
        blocks = (ctypes.c_void_p * 1)(ctypes.addressof(block))
        if self._syscall(self._io_submit, self._ctx, ctypes.c_long(1), blocks) != 1:
            err = ctypes.get_errno()
            raise AioRefused(err, f"io_submit(fsync fd {fd}): {os.strerror(err)}")
        future = self._loop.create_future()
        self._pending[request] = future
        return future

    def _reap(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        try:
            while self._collect(0) == self._depth:
                pass
        except OSError as exc:  # the context is unusable: nothing pending may wait forever
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if self.failed is None:
            self.failed = exc
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    def _collect(self, at_least: int) -> int:
        """Resolve the futures of completed fsyncs, waiting for `at_least` of them; the
        number of completions read (`depth` at most: call again while it is `depth`)."""
        while True:
            got = self._syscall(self._io_getevents, self._ctx, ctypes.c_long(at_least),
                                ctypes.c_long(self._depth), self._events, None)
            if got >= 0:
                break
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"io_getevents: {os.strerror(err)}")
        for i in range(got):
            request, _, res, _ = _EVENT.unpack_from(self._events, i * _EVENT.size)
            future = self._pending.pop(request, None)
            if res < 0:
                error = OSError(-res, f"fsync: {os.strerror(-res)}")
                if self.failed is None:
                    self.failed = error
                if future is not None and not future.done():
                    future.set_exception(error)
            elif future is not None and not future.done():  # else its awaiter gave up
                future.set_result(None)
        return int(got)

    def close(self) -> None:
        """Wait for the fsyncs in flight, resolve their futures, release the context.
        Idempotent. It blocks for as long as a pending fsync takes: call it with none in
        flight (io_destroy would wait for them too, but discard their results)."""
        if self._ctx.value == 0:
            return
        try:
            while self._pending:
                self._collect(1)
        except OSError as exc:
            self._fail(exc)
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
        self._syscall(self._io_destroy, self._ctx)
        self._ctx.value = 0
