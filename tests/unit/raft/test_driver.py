"""The asyncio driver on real files: how proposals settle (results, timeouts, shutdown).

A single bootstrapped voter commits on its own fsync, so no network is involved; the
transport only has to accept (and here, drop) messages, of which a lone node sends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import shutil
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, TypeVarTuple, cast

import pytest

from dcl.api.log.v1 import log_pb2
from dcl.errors import CommitTimeout, NotLeader, Unavailable
from dcl.raft.driver import INLINE_SYNC_BYTES, RaftDriver, Transport
from dcl.raft.storage import RaftStorage
from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    Config,
    Entry,
    EntryType,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    Role,
    Snapshot,
    SnapshotMeta,
)
from dcl.server.replicated import LogFsm, ReplicatedBackend, encode_records_cmd
from dcl.server.services import _discard
from dcl.storage.aio import available as aio_available

pytestmark = pytest.mark.timeout(30)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

#: What the driver hands `RaftStorage.sync_submit`: `AioFsync.fsync`.
AioSubmit = Callable[[int], "asyncio.Future[None]"]


class SyncSubmit(Protocol):
    """`RaftStorage.sync_submit`'s (generic) type. The fakes put in its place below only
    take the driver's `AioSubmit` and return a future, so they are cast to it."""

    def __call__(self, submit: Callable[[int], _T]) -> _T | None: ...


class NoPeers:
    def send(self, messages: Sequence[Message]) -> None:
        assert not messages, "a lone voter has nobody to talk to"


@contextlib.asynccontextmanager
async def leader(
    tmp_path: Path, transport: Transport | None = None, election_tick: int = 2,
    defer: bool = False, **kwargs: Any
) -> AsyncIterator[RaftDriver]:
    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")
    config = Config(election_tick=election_tick, defer_commit_announcement=defer)
    driver = RaftDriver("solo", storage, fsm, transport or NoPeers(), config=config,
                        bootstrap=True, tick_seconds=0.01, **kwargs)
    driver.start()
    try:
        for _ in range(500):
            if driver.core.role is Role.LEADER:
                break
            await asyncio.sleep(0.01)
        yield driver
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


@pytest.fixture
async def solo(tmp_path: Path) -> AsyncIterator[RaftDriver]:
    async with leader(tmp_path) as driver:
        yield driver


def hold_snapshots(fsm: LogFsm, hold: Callable[[int], bool], pause: float) -> None:
    """Make each of `fsm`'s snapshot builds take steps of `pause` seconds (on the loop, as a
    real build's steps do) while `hold(steps taken so far)` is true, then build for real."""
    real_steps = fsm.snapshot_steps

    def held_steps() -> Generator[memoryview | None, None, None]:
        inner = real_steps()
        try:
            step = 0
            while hold(step):
                time.sleep(pause)
                step += 1
                yield None
            yield from inner
        finally:
            inner.close()

    fsm.snapshot_steps = held_steps  # type: ignore[method-assign]


async def snapshot_settled(driver: RaftDriver) -> None:
    """Until the background snapshot (if any) is built, compacted and written."""
    for _ in range(500):
        if not driver.snapshot_in_progress:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("snapshot still in progress after 5 s")


async def until_applied(driver: RaftDriver) -> None:
    for _ in range(500):  # the no-op of the new term commits first
        if driver.core.applied_index >= driver.core.last_index:
            return
        await asyncio.sleep(0.01)


async def test_hooks_settle_once_in_proposal_order_with_the_fsm_results(
    solo: RaftDriver,
) -> None:
    await until_applied(solo)
    calls: list[tuple[str, BaseException | None, Any]] = []
    for name, values in (("a", [b"1", b"2"]), ("b", [b"3"]), ("c", [b"4", b"5", b"6"])):
        def hook(exc: BaseException | None, result: Any, name: str = name) -> None:
            calls.append((name, exc, result))

        solo.propose_hook(encode_records_cmd(values), hook)
    assert calls == []  # nothing settles before the entries are durable and applied
    first = await solo.propose(encode_records_cmd([b"7"]))  # after a, b, c in the log
    assert calls == [("a", None, 0), ("b", None, 2), ("c", None, 3)]
    assert first == 6


async def test_a_hook_whose_entry_is_not_applied_in_time_gets_commit_timeout_once(
    tmp_path: Path,
) -> None:
    calls: list[BaseException | None] = []
    async with leader(tmp_path, commit_timeout=0.0) as driver:
        driver.propose_hook(encode_records_cmd([b"late"]), lambda exc, _: calls.append(exc))
        await asyncio.sleep(0.2)  # the timer fires, then the entry applies anyway
        assert len(calls) == 1 and isinstance(calls[0], CommitTimeout)
        assert driver.core.applied_index == driver.core.last_index


async def test_pending_hooks_fail_unavailable_when_the_driver_stops(tmp_path: Path) -> None:
    calls: list[BaseException | None] = []
    async with leader(tmp_path) as driver:
        driver.propose_hook(encode_records_cmd([b"x"]), lambda exc, _: calls.append(exc))
        await driver.stop()  # before the loop gets to persist it
    assert len(calls) == 1 and isinstance(calls[0], Unavailable)


async def test_a_follower_refuses_hooks_without_proposing(tmp_path: Path) -> None:
    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")
    driver = RaftDriver("f", storage, fsm, NoPeers(), config=Config())  # not bootstrapped
    try:
        with pytest.raises(NotLeader):
            driver.propose_hook(encode_records_cmd([b"x"]), lambda exc, _: None)
        assert driver.core.last_index == 0
    finally:
        storage.close()
        fsm.close()


class Recording:
    def __init__(self) -> None:
        self.sent: list[tuple[float, Message]] = []

    def send(self, messages: Sequence[Message]) -> None:
        now = time.monotonic()
        self.sent += [(now, m) for m in messages]


def _follower(tmp_path: Path, **options: Any) -> tuple[LogFsm, RaftStorage, RaftDriver]:
    """A node "f" not yet in any configuration, its messages recorded, fast ticks."""
    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")
    driver = RaftDriver("f", storage, fsm, Recording(), config=Config(election_tick=50),
                        tick_seconds=0.01, **options)
    return fsm, storage, driver


def _founding_conf() -> tuple[Entry, ...]:
    """Entries 1 and 2 of term 1: "L" and "f" made voters (what "L" sends "f" first)."""
    return tuple(Entry(1, i + 1, EntryType.CONF_CHANGE,
                       ConfChange(ConfChangeType.ADD_VOTER, node).encode())
                 for i, node in enumerate(("L", "f")))


async def _joined(driver: RaftDriver) -> None:
    """Until follower "f" applied the founding configuration sent by "L"."""
    driver.receive(AppendEntries(1, "L", "f", 0, 0, _founding_conf(), 2))
    for _ in range(200):
        if driver.core.applied_index == 2:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the founding configuration was not applied in 2 s")


@pytest.mark.parametrize("async_fsync", [True, False], ids=["aio", "thread"])
async def test_a_leader_keeps_heartbeating_through_a_slow_fsync(
    tmp_path: Path, async_fsync: bool
) -> None:
    """Injected fault: every fsync takes 0.6 s (more than the election timeout here, 0.2 s).
    Followers that hear nothing for that long elect someone else; the leader must keep
    sending heartbeats while its own write is stuck, whether the kernel runs the fsync
    (Linux AIO) or an executor thread does."""
    transport = Recording()
    async with leader(tmp_path, transport, election_tick=20, async_fsync=async_fsync) as driver:
        if async_fsync and not aio_available():
            pytest.skip("no Linux AIO on this platform")
        assert (driver._aio is not None) is async_fsync
        storage = driver._storage
        await until_applied(driver)
        await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "b"))
        stalls: list[tuple[str, float, float]] = []
        real_sync, real_submit = storage.sync, storage.sync_submit

        def slow_sync() -> None:
            start = time.monotonic()
            time.sleep(0.6)
            real_sync()
            stalls.append(("thread", start, time.monotonic()))

        async def slow_aio(submit: AioSubmit) -> None:
            start = time.monotonic()
            await asyncio.sleep(0.6)
            await cast("asyncio.Future[None]", real_submit(submit))  # open storage: not None
            stalls.append(("aio", start, time.monotonic()))

        storage.sync = slow_sync  # type: ignore[method-assign]
        storage.sync_submit = cast(  # type: ignore[method-assign]
            SyncSubmit, lambda submit: asyncio.ensure_future(slow_aio(submit)))
        await driver.propose(encode_records_cmd([b"slow"]))
        assert [path for path, _, _ in stalls] == ["aio" if async_fsync else "thread"]
        _, start, end = stalls[0]
        beats = [t for t, m in transport.sent
                 if isinstance(m, Heartbeat) and m.dst == "b" and start < t < end]
        assert len(beats) >= 20, f"{len(beats)} heartbeats during a 0.6 s stall"


async def test_a_refused_asynchronous_fsync_falls_back_to_a_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If io_submit refuses (here: its context is gone), writes still commit, by fsyncs in
    the executor, and the operator is told once."""
    async with leader(tmp_path) as driver:
        await until_applied(driver)
        if not aio_available():
            pytest.skip("no Linux AIO on this platform")
        assert driver._aio is not None
        driver._aio.close()
        threads = []
        real_sync = driver._storage.sync

        def sync() -> None:
            threads.append(threading.current_thread())
            real_sync()

        driver._storage.sync = sync  # type: ignore[method-assign]
        for i in range(3):
            await driver.propose(encode_records_cmd([b"after %d" % i]))
        assert driver._aio is None
        assert len(threads) == 3 and threading.main_thread() not in threads
        assert [r.message for r in caplog.records].count(
            next(r.message for r in caplog.records if "asynchronous fsync refused" in r.message)
        ) == 1


async def test_snapshots_wait_for_as_many_new_bytes_as_the_last_one_held(
    tmp_path: Path,
) -> None:
    """A snapshot copies the whole log; taking one every N entries regardless of its size
    would make the work per entry grow with the log."""
    async with leader(tmp_path, snapshot_threshold_entries=10) as driver:
        await until_applied(driver)

        async def append(count: int, size: int) -> None:
            for i in range(count):
                await driver.propose(encode_records_cmd([bytes([i % 256]) * size]))
                await snapshot_settled(driver)  # one entry at a time: a deterministic cadence

        await append(20, 10_000)  # 200 KB: a first snapshot, of about that size
        first = driver.core.snapshot
        assert first is not None and len(first.data) > 100_000
        await append(30, 10)  # 30 entries but few bytes: no new snapshot
        assert driver.core.snapshot is first
        await append(int(len(first.data) / 10_000) + 2, 10_000)
        second = driver.core.snapshot
        assert second is not None and second.meta.index > first.meta.index
        assert len(second.data) > len(first.data)


async def test_the_raft_log_held_in_memory_is_capped_whatever_the_entry_count(
    tmp_path: Path,
) -> None:
    async with leader(tmp_path, snapshot_threshold_entries=1000,
                      snapshot_max_log_bytes=100_000) as driver:
        await until_applied(driver)
        for i in range(15):  # 150 KB in 15 entries: far below the count, over the cap
            await driver.propose(encode_records_cmd([bytes([i]) * 10_000]))
            await snapshot_settled(driver)
        snap = driver.core.snapshot
        assert snap is not None and snap.meta.index >= 11
        held = sum(len(cast(Entry, driver.core.entry(i)).data)
                   for i in range(driver.core.first_index, driver.core.last_index + 1))
        assert held < 100_000


class AckingVoter:
    """Plays voter "b" for a driver: acknowledges every append and heartbeat at once (in the
    next loop turn, as a network would) and logs what it was sent."""

    def __init__(self, log: list[str]) -> None:
        self.driver: RaftDriver | None = None
        self.log = log

    def send(self, messages: Sequence[Message]) -> None:
        driver = self.driver
        assert driver is not None
        loop = asyncio.get_running_loop()
        for m in messages:
            if isinstance(m, AppendEntries):
                if m.announces_commit_only:
                    self.log.append(f"commit announced {m.commit}")
                else:
                    reply = AppendResponse(m.term, "b", m.src, m.prev_index + len(m.entries))
                    loop.call_soon(driver.receive, reply)
            elif isinstance(m, Heartbeat):
                loop.call_soon(driver.receive, HeartbeatResponse(m.term, "b", m.src, m.context))


async def test_a_proposer_is_answered_before_the_commit_is_announced(tmp_path: Path) -> None:
    """With two voters, an entry commits on b's acknowledgement; the leader then applies it
    and announces the new commit index to b. The proposer's task must run (and write its
    reply) before the announcement goes out: the announcement wakes followers to apply, and
    they would compete with the reply for the CPU."""
    log: list[str] = []
    voter = AckingVoter(log)
    async with leader(tmp_path, voter, election_tick=20) as driver:
        voter.driver = driver
        await until_applied(driver)
        await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "b"))
        assert driver.core.voters == {"solo", "b"}
        await asyncio.sleep(0.05)  # the change's own commit announcement
        log.clear()
        first = driver.core.last_index + 1
        for index in (first, first + 1):
            await driver.propose(encode_records_cmd([b"x"]))
            log.append(f"answered {index}")
            for _ in range(100):  # until the announcement went out
                if len(log) % 2 == 0:
                    break
                await asyncio.sleep(0.01)
        assert log == [f"answered {first}", f"commit announced {first}",
                       f"answered {first + 1}", f"commit announced {first + 1}"]


async def test_the_proposer_is_answered_first_also_while_a_follower_lags(
    tmp_path: Path,
) -> None:
    """Three voters; "c" acknowledges 30 ms late, so the entry commits on b's ack while c
    still owes one. The new commit index then reaches c in an empty append that asks for an
    answer, not a bare announcement: the proposer must still be answered first. This is
    the usual case with one-at-a-time writes (one follower is always the slower)."""
    log: list[str] = []
    voter = AckingVoter(log)
    acking_send = voter.send

    def send(messages: Sequence[Message]) -> None:
        loop = asyncio.get_running_loop()
        for m in messages:
            if not isinstance(m, AppendEntries) or m.dst != "c":
                continue
            if not m.entries and m.commit:
                log.append(f"commit {m.commit} sent to c")
            if m.want_response and voter.driver is not None:
                ack = AppendResponse(m.term, "c", m.src, m.prev_index + len(m.entries))
                loop.call_later(0.03, voter.driver.receive, ack)
        acking_send([m for m in messages if m.dst == "b"])

    voter.send = send  # type: ignore[method-assign]
    async with leader(tmp_path, voter, election_tick=20) as driver:
        voter.driver = driver
        await until_applied(driver)
        await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "b"))
        await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "c"))
        assert driver.core.voters == {"solo", "b", "c"}
        await asyncio.sleep(0.1)  # c caught up
        log.clear()
        index = driver.core.last_index + 1
        await driver.propose(encode_records_cmd([b"x"]))
        log.append(f"answered {index}")
        for _ in range(100):
            if f"commit {index} sent to c" in log:
                break
            await asyncio.sleep(0.01)
        assert [e for e in log if "answered" in e or "to c" in e] == [
            f"answered {index}", f"commit {index} sent to c"]


async def test_a_deferred_commit_rides_on_the_next_append_or_goes_out_after_the_delay(
    tmp_path: Path,
) -> None:
    """With `defer_commit_announcement`, the commit of a write answered just before the next
    one is proposed reaches b inside that next append, and no announcement of its own is
    sent; the last write's commit goes out once the announcer's delay has passed. Writes
    are then sparse: the next one, made after a pause longer than the delay, has its commit
    announced at once, not a delay later (a follower's readers would wait for it)."""
    log: list[str] = []
    voter = AckingVoter(log)
    acking_send = voter.send

    def send(messages: Sequence[Message]) -> None:
        for m in messages:
            if isinstance(m, AppendEntries) and m.entries and m.commit >= first:
                log.append(f"append carries commit {m.commit}")
        acking_send(messages)

    voter.send = send  # type: ignore[method-assign]
    first = 1 << 62  # set below, once the cluster is formed
    delay = 1.0
    async with leader(tmp_path, voter, election_tick=20, defer=True,
                      commit_announce_delay=delay) as driver:
        voter.driver = driver
        await until_applied(driver)
        await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "b"))
        assert driver.core.voters == {"solo", "b"}
        await asyncio.sleep(0.1)
        driver._tick = 3600.0  # no more heartbeats after the next: only the announcer tells b
        await asyncio.sleep(0.05)
        first = driver.core.last_index + 1
        log.clear()
        await driver.propose(encode_records_cmd([b"x"]))
        log.append(f"answered {first}")
        await driver.propose(encode_records_cmd([b"y"]))
        log.append(f"answered {first + 1}")
        for _ in range(300):
            if len(log) == 4:
                break
            await asyncio.sleep(0.01)
        assert log == [f"answered {first}", f"append carries commit {first}",
                       f"answered {first + 1}", f"commit announced {first + 1}"]

        await asyncio.sleep(delay * 1.2)
        log.clear()
        await driver.propose(encode_records_cmd([b"z"]))
        answered = time.monotonic()
        announced: list[str] = []
        for _ in range(300):
            announced = [e for e in log if e.startswith("commit announced")]
            if announced:
                break
            await asyncio.sleep(0.01)
        assert announced == [f"commit announced {first + 2}"]
        assert time.monotonic() - answered < delay / 2

        # Steady again: for longer than the delay each write's append carries the last
        # commit, and the announcer (re-armed as each index becomes owed) sends nothing.
        log.clear()
        start = time.monotonic()
        writes = 0
        while time.monotonic() - start < delay * 1.5:
            await driver.propose(encode_records_cmd([b"w"]))
            writes += 1
            await asyncio.sleep(0.02)
        assert not [e for e in log if e.startswith("commit announced")]
        last = first + 2 + writes
        for _ in range(300):
            if f"commit announced {last}" in log:
                break
            await asyncio.sleep(0.01)
        assert [e for e in log if e.startswith("commit announced")] == [
            f"commit announced {last}"]


class EarlyTimerLoop(asyncio.SelectorEventLoop):
    """Fires every timer 2 ms before its deadline, as uvloop can (it rounds to milliseconds)."""

    def call_at(
        self, when: float, callback: Callable[[*_Ts], object], *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return super().call_at(when - 0.002, callback, *args, context=context)


def test_the_clock_keeps_ticking_when_timers_fire_early(tmp_path: Path) -> None:
    """A tick timer that fires before the tick is due must be re-armed, or the node's clock
    stops for good: a lone voter would then never even elect itself."""

    async def scenario() -> tuple[Role, int]:
        async with leader(tmp_path) as driver:
            term = driver.core.term
            return driver.core.role, term

    loop = EarlyTimerLoop()
    try:
        role, term = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert role is Role.LEADER and term >= 1


async def test_proposals_commit_while_a_snapshot_is_written(tmp_path: Path) -> None:
    """Injected fault: writing the snapshot file takes 1 s. A snapshot is as large as the
    commit log, so it is written in the background: proposals made meanwhile commit at
    the usual pace, and the Raft log on disk is cut to the snapshot only once it is
    durable."""
    async with leader(tmp_path, snapshot_threshold_entries=5) as driver:
        storage = driver._storage
        await until_applied(driver)
        real_write = storage.write_snapshot
        writes: list[tuple[float, float]] = []

        def slow_write(snapshot: Snapshot) -> None:
            start = time.monotonic()
            time.sleep(1.0)
            real_write(snapshot)
            writes.append((start, time.monotonic()))

        storage.write_snapshot = slow_write  # type: ignore[method-assign]
        for i in range(6):
            await driver.propose(encode_records_cmd([bytes([i]) * 100]))
        for _ in range(100):
            if driver.snapshot_in_progress and driver.core.snapshot is not None:
                break
            await asyncio.sleep(0.01)
        snap = driver.core.snapshot
        assert snap is not None and driver.snapshot_in_progress
        assert storage.snapshot_index < snap.meta.index  # not durable yet: log kept whole
        assert storage.first_index == 1

        latencies = []
        for _ in range(20):
            start = time.monotonic()
            await driver.propose(encode_records_cmd([b"during"]))
            latencies.append(time.monotonic() - start)
        assert driver.snapshot_in_progress, "the write was supposed to take a second"
        assert max(latencies) < 0.5, latencies

        await snapshot_settled(driver)
        assert writes and storage.snapshot_index == snap.meta.index
        assert storage.first_index > 1  # cut to the snapshot once it was durable
        assert driver.core.applied_index == driver.core.last_index


async def test_stopping_waits_for_a_snapshot_being_written(tmp_path: Path) -> None:
    async with leader(tmp_path, snapshot_threshold_entries=5) as driver:
        storage = driver._storage
        await until_applied(driver)
        real_write = storage.write_snapshot

        def slow_write(snapshot: Snapshot) -> None:
            time.sleep(0.5)
            real_write(snapshot)

        storage.write_snapshot = slow_write  # type: ignore[method-assign]
        for i in range(6):
            await driver.propose(encode_records_cmd([bytes([i]) * 100]))
        for _ in range(100):
            if driver.core.snapshot is not None:
                break
            await asyncio.sleep(0.01)
        index = driver.core.snapshot.meta.index  # type: ignore[union-attr]
    # Stopped: the write finished and the storage adopted it before the store closed.
    assert not driver.snapshot_in_progress
    reopened = RaftStorage(tmp_path / "raft")
    try:
        assert reopened.snapshot_index == index
    finally:
        reopened.close()


async def test_a_snapshot_from_the_leader_cancels_the_local_one_being_built(
    tmp_path: Path,
) -> None:
    """A follower is building its own snapshot when the leader's arrives (it fell behind
    the leader's log start). The build is cancelled before the restore resets the commit
    log under it; the node ends up exactly on the leader's state and keeps going."""
    # The leader's state at index 100: records 0..29 in another node's commit log.
    source = LogFsm(tmp_path / "source")
    values = [bytes([i]) * 50 for i in range(30)]
    source.apply([Entry(1, 100, EntryType.NORMAL, encode_records_cmd(values))])
    leaders_state = bytes(source.snapshot_data())
    expected = [source.log.read(o) for o in range(source.log.next_offset)]
    source.close()

    fsm, storage, driver = _follower(tmp_path, snapshot_threshold_entries=5)
    build = {"steps": 0, "closed": False}
    real_steps = fsm.snapshot_steps

    def slow_steps() -> Generator[memoryview | None, None, None]:
        inner = real_steps()
        try:
            for _ in range(100):  # about a second of building, in steps
                time.sleep(0.01)
                build["steps"] += 1
                yield None
            yield from inner
        finally:
            build["closed"] = True
            inner.close()

    fsm.snapshot_steps = slow_steps  # type: ignore[method-assign]
    driver.start()
    try:
        records = [Entry(1, i, EntryType.NORMAL, encode_records_cmd([b"old"]))
                   for i in range(3, 11)]
        driver.receive(AppendEntries(1, "L", "f", 0, 0, (*_founding_conf(), *records), 10))
        for _ in range(200):
            if build["steps"] >= 5:
                break
            await asyncio.sleep(0.01)
        assert build["steps"] >= 5 and driver.snapshot_in_progress, "no local build started"

        meta = SnapshotMeta(100, 1, frozenset({"L", "f"}))
        driver.receive(InstallSnapshot(1, "L", "f", meta, 0, leaders_state, True))
        for _ in range(200):
            if fsm.applied_index == 100 and not driver.snapshot_in_progress:
                break
            await asyncio.sleep(0.01)
        assert build["closed"] and build["steps"] < 100, "the local build was not cancelled"
        assert fsm.applied_index == 100 and storage.snapshot_index == 100
        assert [fsm.log.read(o) for o in range(fsm.log.next_offset)] == expected

        driver.receive(AppendEntries(1, "L", "f", 100, 1, (
            Entry(1, 101, EntryType.NORMAL, encode_records_cmd([b"new"])),), 101))
        for _ in range(200):
            if fsm.applied_index == 101:
                break
            await asyncio.sleep(0.01)
        assert fsm.log.next_offset == 31
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


def _leaders_state(tmp_path: Path, mib: int) -> tuple[bytes, int]:
    """Snapshot data of a commit log of `mib` MiB of 1 KiB records, and its next offset."""
    source = LogFsm(tmp_path / "source")
    for b in range(mib):
        values = [bytes([b]) * 1024] * 1024
        source.apply([Entry(1, 2 + b, EntryType.NORMAL, encode_records_cmd(values))])
    state = bytes(source.snapshot_data())
    end = source.log.next_offset
    source.close()
    return state, end


async def test_a_follower_restoring_a_snapshot_gives_the_loop_back_between_steps(
    tmp_path: Path,
) -> None:
    """A restore takes seconds per GiB; the node's other work (readers, gossip probes)
    shares its event loop and must run between the restore's steps, or the node looks dead
    for that long. A task counting loop turns must advance between every two steps, and
    the restored records are fsynced behind in a thread (not all by the final checkpoint).
    Once done, readers waiting at the tail are woken, and the restored state is durable (a
    copy of the directory taken then reopens on it). A heartbeat from the leader that
    arrives meanwhile is answered between steps, not after the restore (a leader with
    check-quorum that needs this follower would step down)."""
    leaders_state, end = _leaders_state(tmp_path, 24)  # 24 MiB: several steps
    fsm, storage, driver = _follower(tmp_path)
    turns = 0
    seen: list[int] = []
    real_steps = fsm.restore_steps
    background: list[str] = []  # fsyncs off the loop thread during the restore
    real_sync = fsm.log.sync
    sent = cast(Recording, driver._transport).sent
    answered_at: list[int] = []  # the restore step by which the heartbeat was answered

    def counted_steps(snapshot: Snapshot) -> Generator[None, None, None]:
        for step in real_steps(snapshot):
            seen.append(turns)
            if len(seen) == 5:
                driver.receive(Heartbeat(1, "L", "f", 100, 42))
            if not answered_at and any(
                isinstance(m, HeartbeatResponse) and m.context == 42 for _, m in sent
            ):
                answered_at.append(len(seen))
            yield step

    def recorded_sync() -> None:
        if threading.current_thread() is not threading.main_thread() and len(seen) < 27:
            background.append(threading.current_thread().name)
        real_sync()

    fsm.log.sync = recorded_sync  # type: ignore[method-assign]

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    fsm.restore_steps = counted_steps  # type: ignore[method-assign]
    woken: list[int] = []
    driver.on_applied = lambda: woken.append(fsm.log.next_offset)
    counter = asyncio.get_running_loop().create_task(count_turns())
    driver.start()
    try:
        meta = SnapshotMeta(100, 1, frozenset({"L", "f"}))
        driver.receive(InstallSnapshot(1, "L", "f", meta, 0, leaders_state, True))
        for _ in range(500):
            if woken:
                break
            await asyncio.sleep(0.01)
        assert woken == [end], "readers at the tail were not woken by the restore"
        shutil.copytree(tmp_path / "fsm", tmp_path / "copy")
        copy = LogFsm(tmp_path / "copy")
        assert (copy.applied_index, copy.log.next_offset) == (100, end), "not durable"
        copy.close()
        assert len(seen) == 27, f"{len(seen)} restore steps for 24 MiB, expected 3 + 24"
        assert answered_at and answered_at[0] <= 7, f"heartbeat answered at {answered_at}"
        assert background, "the restored records were not written behind"
        stalls = [i for i in range(1, len(seen)) if seen[i] == seen[i - 1]]
        assert not stalls, f"no other task ran between restore steps {stalls}"
    finally:
        counter.cancel()
        await driver.stop()
        storage.close()
        fsm.close()


async def test_stopping_a_node_abandons_its_restore_and_the_next_start_finishes_it(
    tmp_path: Path,
) -> None:
    """A node told to stop mid-restore stops at the next step instead of restoring seconds
    per GiB more first. Its state is consistent at every step: reopened, the FSM is where it
    was before the restore, and the next driver restores the stored snapshot at start."""
    leaders_state, end = _leaders_state(tmp_path, 24)
    fsm, storage, driver = _follower(tmp_path)
    seen = 0
    real_steps = fsm.restore_steps

    def counted_steps(snapshot: Snapshot) -> Generator[None, None, None]:
        nonlocal seen
        for step in real_steps(snapshot):
            seen += 1
            yield step

    fsm.restore_steps = counted_steps  # type: ignore[method-assign]
    driver.start()
    try:
        meta = SnapshotMeta(100, 1, frozenset({"L", "f"}))
        driver.receive(InstallSnapshot(1, "L", "f", meta, 0, leaders_state, True))
        for _ in range(500):
            if seen >= 6:
                break
            await asyncio.sleep(0)
        await driver.stop()
        assert seen < 10, f"stop waited for {seen} restore steps"
        assert fsm.applied_index == 0
    finally:
        await driver.stop()
        storage.close()
        fsm.close()

    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")
    assert fsm.applied_index == 0 and fsm.log.next_offset == 0
    restarted = RaftDriver("f", storage, fsm, Recording(), config=Config(election_tick=50))
    try:
        assert storage.snapshot_index == 100
        assert (fsm.applied_index, fsm.log.next_offset) == (100, end)
    finally:
        await restarted.stop()
        storage.close()
        fsm.close()


async def test_a_leader_puts_appends_on_the_wire_before_its_own_fsync(tmp_path: Path) -> None:
    """The transport gets a loop turn to send a new entry to the followers before the
    leader starts persisting it (commits wait for the followers' acks, not for our fsync)."""
    log: list[str] = []
    voter = AckingVoter(log)
    real_send = voter.send

    def send(messages: Sequence[Message]) -> None:
        loop = asyncio.get_running_loop()
        for m in messages:
            if isinstance(m, AppendEntries) and m.entries:
                loop.call_soon(log.append, f"on the wire {m.entries[-1].index}")
        real_send(messages)

    voter.send = send  # type: ignore[method-assign]
    async with leader(tmp_path, voter, election_tick=20) as driver:
        voter.driver = driver
        storage = driver._storage
        await until_applied(driver)
        await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "b"))
        real_append = storage.append

        def append(entries: Sequence[Entry]) -> None:
            log.append(f"persisting {entries[-1].index}")
            real_append(entries)

        storage.append = append  # type: ignore[method-assign]
        log.clear()
        index = driver.core.last_index + 1
        await driver.propose(encode_records_cmd([b"x"]))
        mine = [e for e in log if e.endswith(f" {index}") and not e.startswith("commit")]
        assert mine == [f"on the wire {index}", f"persisting {index}"]


async def test_a_snapshot_write_that_fails_stops_the_driver_cleanly(tmp_path: Path) -> None:
    """Injected fault: the disk is full when the background snapshot is written. As for any
    storage failure the node stops taking part (it cannot promise durability), and says so:
    on_failed fires once and proposals get Unavailable instead of hanging."""
    failures: list[BaseException] = []
    async with leader(tmp_path, snapshot_threshold_entries=5) as driver:
        driver.on_failed = failures.append
        await until_applied(driver)

        def full_disk(snapshot: Snapshot) -> None:
            raise OSError(28, "No space left on device")

        driver._storage.write_snapshot = full_disk  # type: ignore[method-assign]
        with contextlib.suppress(Unavailable):
            for i in range(10):
                await driver.propose(encode_records_cmd([bytes([i])]))
        for _ in range(200):
            if failures:
                break
            await asyncio.sleep(0.01)
        assert len(failures) == 1 and isinstance(failures[0], OSError)
        with pytest.raises(Unavailable):
            await driver.propose(encode_records_cmd([b"after"]))


@pytest.mark.parametrize(("size", "snapshotting", "where"), [
    (100, False, "loop"),
    (INLINE_SYNC_BYTES + 1, False, "off the loop"),
    (100, True, "off the loop"),
])
async def test_a_follower_acknowledges_an_append_only_after_its_fsync(
    tmp_path: Path, size: int, snapshotting: bool, where: str
) -> None:
    """Wherever it runs (on the loop for a small append; off it, by Linux AIO or in the
    executor, for a large one or while a snapshot is being built and written), a
    follower's fsync finishes before its acknowledgement goes out."""
    log: list[str] = []
    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")

    class Acks:
        def send(self, messages: Sequence[Message]) -> None:
            log.extend(f"ack {m.index}" for m in messages if isinstance(m, AppendResponse))

    real_sync = storage.sync

    def sync() -> None:
        on_loop = threading.get_ident() == loop_thread
        real_sync()
        log.append(f"synced {storage.last_index} on {'loop' if on_loop else 'executor'}")

    real_submit = storage.sync_submit

    async def aio(submit: AioSubmit) -> None:
        await cast("asyncio.Future[None]", real_submit(submit))  # open storage: not None
        log.append(f"synced {storage.last_index} by aio")

    storage.sync = sync  # type: ignore[method-assign]
    storage.sync_submit = cast(  # type: ignore[method-assign]
        SyncSubmit, lambda submit: asyncio.ensure_future(aio(submit)))
    loop_thread = threading.get_ident()
    hold_snapshots(fsm, lambda step: step < 100, 0.01)  # about a second of building
    driver = RaftDriver("f", storage, fsm, Acks(), config=Config(election_tick=50),
                        tick_seconds=0.01, snapshot_threshold_entries=2 if snapshotting else 0)
    driver.start()
    try:
        await _joined(driver)  # its ack goes out before it applies
        assert driver.snapshot_in_progress is snapshotting
        driver.receive(AppendEntries(1, "L", "f", 2, 1, (
            Entry(1, 3, EntryType.NORMAL, encode_records_cmd([b"v" * size])),), 2))
        for _ in range(200):
            if "ack 3" in log:
                break
            await asyncio.sleep(0.01)
        off_loop = "by aio" if aio_available() else "on executor"
        synced = "synced 3 on loop" if where == "loop" else f"synced 3 {off_loop}"
        assert log == ["synced 2 on loop", "ack 2", synced, "ack 3"]
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


async def test_a_snapshot_being_received_is_spooled_to_disk_not_held_on_the_heap(
    tmp_path: Path,
) -> None:
    """A follower receives the leader's 48 MiB snapshot in 256 KiB chunks (as the agent
    sends them) and installs it. Its heap must not grow by the snapshot's size on the way:
    the snapshot is as large as the commit log, and a node catching up on a big log would
    otherwise need that much memory. The state it ends with is the leader's."""
    source = LogFsm(tmp_path / "source")
    for batch in range(48):
        values = [bytes([batch, i % 256]) * 512 for i in range(1024)]
        source.apply([Entry(1, 10 + batch, EntryType.NORMAL, encode_records_cmd(values))])
    *_, state = source.snapshot_steps()
    assert state is not None and len(state) > 48 << 20
    sample = {o: source.log.read(o) for o in range(0, source.log.next_offset, 997)}
    count = source.log.next_offset
    source.close()

    fsm, storage, driver = _follower(tmp_path)
    driver.start()
    try:
        meta = SnapshotMeta(100, 1, frozenset({"L", "f"}))
        chunk = 256 << 10
        tracemalloc.start()
        for offset in range(0, len(state), chunk):
            data = bytes(state[offset : offset + chunk])
            done = offset + chunk >= len(state)
            driver.receive(InstallSnapshot(1, "L", "f", meta, offset, data, done))
            del data
        for _ in range(500):
            if fsm.applied_index == 100:
                break
            await asyncio.sleep(0.01)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert fsm.applied_index == 100 and storage.snapshot_index == 100
        assert peak < 20 << 20, f"heap peaked {peak >> 20} MiB receiving a 48 MiB snapshot"
        assert fsm.log.next_offset == count
        assert {o: fsm.log.read(o) for o in sample} == sample
        assert not list((tmp_path / "raft" / "snapshot").glob("*.tmp")), "spool file left"
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await driver.stop()
        storage.close()
        fsm.close()


async def test_a_disk_error_while_receiving_a_snapshot_stops_the_driver_cleanly(
    tmp_path: Path,
) -> None:
    """Injected fault: the disk is full when a follower spools the leader's snapshot. As for
    any storage failure the node stops (a supervisor restarts it) instead of failing the
    same chunk again on every resend: on_failed fires once, proposals get Unavailable."""
    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")
    failures: list[BaseException] = []
    driver = RaftDriver("f", storage, fsm, Recording(), config=Config(election_tick=50),
                        tick_seconds=0.01)
    driver.on_failed = failures.append

    def full_disk(chunk: bytes) -> None:
        raise OSError(28, "No space left on device")

    storage.snapshot_spool.extend = full_disk  # type: ignore[method-assign]
    driver.start()
    try:
        meta = SnapshotMeta(100, 1, frozenset({"L", "f"}))
        driver.receive(InstallSnapshot(1, "L", "f", meta, 0, b"x" * 1000, False))
        driver.receive(InstallSnapshot(1, "L", "f", meta, 1000, b"y" * 1000, False))
        for _ in range(200):
            if failures:
                break
            await asyncio.sleep(0.01)
        driver.receive(InstallSnapshot(1, "L", "f", meta, 1000, b"y" * 1000, False))
        await asyncio.sleep(0.05)
        assert len(failures) == 1 and isinstance(failures[0], OSError)
        with pytest.raises(Unavailable):
            await driver.propose(b"x")
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


@pytest.mark.parametrize("async_fsync", [True, False], ids=["aio", "thread"])
async def test_a_follower_answers_heartbeats_while_a_slow_fsync_runs(
    tmp_path: Path, async_fsync: bool
) -> None:
    """Injected fault: the fsync of a large append takes 0.5 s. The follower's answer to a
    heartbeat that arrives meanwhile goes out before the fsync ends (a leader needing this
    follower for its quorum would otherwise step down); its ack waits for the fsync."""
    fsm, storage, driver = _follower(tmp_path, async_fsync=async_fsync)
    sent = cast(Recording, driver._transport).sent
    log: list[str] = []
    real_sync, real_submit = storage.sync, storage.sync_submit

    def sync() -> None:
        if storage.last_index >= 3:
            time.sleep(0.5)
        real_sync()
        log.append(f"synced {storage.last_index}")

    async def aio(submit: AioSubmit) -> None:
        await asyncio.sleep(0.5)
        await cast("asyncio.Future[None]", real_submit(submit))  # open storage: not None
        log.append(f"synced {storage.last_index} by aio")

    storage.sync = sync  # type: ignore[method-assign]
    storage.sync_submit = cast(  # type: ignore[method-assign]
        SyncSubmit, lambda submit: asyncio.ensure_future(aio(submit)))
    driver.start()
    try:
        if async_fsync and not aio_available():
            pytest.skip("no Linux AIO on this platform")
        assert (driver._aio is not None) is async_fsync
        await _joined(driver)
        big = encode_records_cmd([b"v" * (INLINE_SYNC_BYTES + 1)])
        driver.receive(AppendEntries(1, "L", "f", 2, 1, (Entry(1, 3, EntryType.NORMAL, big),), 2))
        await asyncio.sleep(0.1)  # the fsync is under way
        driver.receive(Heartbeat(1, "L", "f", 2, 9))
        for _ in range(100):
            if any(isinstance(m, HeartbeatResponse) for _, m in sent):
                break
            await asyncio.sleep(0.01)
        assert any(isinstance(m, HeartbeatResponse) and m.context == 9 for _, m in sent)
        synced = "synced 3 by aio" if async_fsync else "synced 3"
        assert synced not in log, "answered only after the fsync"
        for _ in range(200):
            if any(isinstance(m, AppendResponse) and m.index == 3 for _, m in sent):
                break
            await asyncio.sleep(0.01)
        assert synced in log
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


def gate_snapshots(fsm: LogFsm) -> threading.Event:
    """Hold every snapshot of `fsm` in its build until the returned event is set, as a
    commit log of many GiB would (the build copies it)."""
    gate = threading.Event()
    hold_snapshots(fsm, lambda step: not gate.is_set(), 0.002)
    return gate


def record_value(fsm: LogFsm, offset: int) -> bytes:
    return log_pb2.Record.FromString(fsm.log.read(offset)).value


def record_entry(index: int) -> Entry:
    return Entry(1, index, EntryType.NORMAL, encode_records_cmd([bytes([index % 256]) * 1024]))


async def test_a_follower_takes_no_appends_past_its_memory_limit_while_a_snapshot_builds(
    tmp_path: Path,
) -> None:
    """A follower gets 1 KiB entries while its snapshot takes long to build. Its in-memory
    Raft log stops at the limit: later appends are dropped unanswered (the leader resends
    them), and it takes them again once the snapshot is built. Every entry ends up applied,
    in order, exactly once."""
    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")
    answers: list[AppendResponse] = []

    class Answers:
        def send(self, messages: Sequence[Message]) -> None:
            answers.extend(m for m in messages if isinstance(m, AppendResponse))

    gate = gate_snapshots(fsm)
    driver = RaftDriver("f", storage, fsm, Answers(), config=Config(election_tick=50),
                        tick_seconds=0.01, snapshot_threshold_entries=1,
                        snapshot_max_log_bytes=4096)  # the limit: twice that, by default
    driver.start()

    def send(index: int) -> bool:
        """Append entry `index` (committed with it); whether the node took it (the core
        appends to its log as it steps the message, the answer follows the fsync)."""
        driver.receive(AppendEntries(1, "L", "f", index - 1, 1, (record_entry(index),), index))
        return driver.core.last_index == index

    async def answered(index: int) -> None:
        for _ in range(500):
            if any(a.index == index and not a.reject for a in answers):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"entry {index} was never acknowledged")

    try:
        await _joined(driver)  # entries 1-2; the first snapshot starts building, held
        assert driver.snapshot_in_progress
        index = 3
        while send(index):
            index += 1
            assert index < 40, "the follower never stopped taking entries"
            await asyncio.sleep(0)
        last = index - 1
        await answered(last)
        assert driver.log_memory_full
        assert 8192 <= driver.core.log_bytes < 8192 + 1100
        assert not send(index + 1)  # still refused
        await asyncio.sleep(0.2)
        assert driver.core.last_index == last
        assert max(a.index for a in answers) == last  # the refused ones were not answered

        gate.set()
        for _ in range(500):
            if not driver.log_memory_full:
                break
            await asyncio.sleep(0.01)
        for resent in range(index, index + 5):
            assert send(resent)
            await answered(resent)
        for _ in range(500):
            if driver.core.applied_index == index + 4 and not driver.snapshot_in_progress:
                break
            await asyncio.sleep(0.01)
        assert driver.core.log_bytes < 4096  # compacted behind a snapshot again
        assert fsm.log.next_offset == index + 2  # one record per entry from index 3 on
        assert [record_value(fsm, i - 3) for i in range(3, index + 5)] == [
            bytes([i % 256]) * 1024 for i in range(3, index + 5)]
    finally:
        gate.set()
        await driver.stop()
        storage.close()
        fsm.close()


async def test_a_leader_holds_appends_back_past_its_memory_limit_while_a_snapshot_builds(
    tmp_path: Path,
) -> None:
    """On a leader whose snapshot takes long to build, appends past the memory limit wait
    (nothing is proposed: its Raft log does not grow) and complete once it is built, in
    order. One whose caller gave up meanwhile is never appended, and neither is any of a
    ProduceStream that ended while they were held (it cancels what it still had queued),
    so the stream's records cannot land out of order (a later one without an earlier)."""
    async with leader(tmp_path, snapshot_threshold_entries=1, snapshot_max_log_bytes=4096,
                      max_log_memory_bytes=8192) as driver:
        fsm = cast(LogFsm, driver._fsm)
        gate = gate_snapshots(fsm)
        backend = ReplicatedBackend(driver, fsm, "127.0.0.1:1")
        await until_applied(driver)
        offsets = []
        while not driver.log_memory_full:
            offsets.append(await asyncio.wait_for(backend.append([b"a" * 1024]), 2))
            assert len(offsets) < 40, "the leader never held appends back"
        assert offsets == list(range(len(offsets)))
        last = driver.core.last_index
        given_up = asyncio.ensure_future(backend.append([b"gone"]))
        stream = [asyncio.ensure_future(backend.append([b"s%d" % i])) for i in range(3)]
        held = [asyncio.ensure_future(backend.append([v])) for v in (b"b", b"c")]
        await asyncio.sleep(0.2)
        assert not any(f.done() for f in (given_up, *stream, *held))
        assert driver.core.last_index == last  # nothing proposed
        given_up.cancel()
        # The stream's handler is cancelled while it awaits its first ack: that ack is
        # cancelled with it, and the handler discards the rest of its queue.
        stream[0].cancel()
        queued: asyncio.Queue[Awaitable[int] | None] = asyncio.Queue()
        for ack in stream[1:]:
            queued.put_nowait(ack)
        _discard(queued)
        assert all(ack.cancelled() for ack in stream)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*held), 5) == [
            len(offsets), len(offsets) + 1]
        assert [record_value(fsm, o) for o in (len(offsets), len(offsets) + 1)] == [b"b", b"c"]
        assert fsm.log.next_offset == len(offsets) + 2


async def test_a_large_commit_is_applied_in_steps_that_let_readers_in(tmp_path: Path) -> None:
    """A follower learns of 8 MiB of committed entries at once (as one catching up does):
    applying them all in one go kept every reader of the node waiting (130 ms for 100 B
    records here). A reader polling the log meanwhile must see it grow MiB by MiB."""
    fsm = LogFsm(tmp_path / "fsm")
    storage = RaftStorage(tmp_path / "raft")
    driver = RaftDriver("f", storage, fsm, Recording(), config=Config(election_tick=50),
                        tick_seconds=0.01)
    driver.start()
    seen: list[int] = []

    async def reader() -> None:
        while True:
            if not seen or seen[-1] != fsm.log.next_offset:
                seen.append(fsm.log.next_offset)
            await asyncio.sleep(0)

    polling = asyncio.ensure_future(reader())
    try:
        await _joined(driver)
        per_entry = (1 << 20) // 110  # about 1 MiB of 100 B records each
        entries = tuple(
            Entry(1, 3 + i, EntryType.NORMAL, encode_records_cmd([bytes([i]) * 100] * per_entry))
            for i in range(8))
        driver.receive(AppendEntries(1, "L", "f", 2, 1, entries, 10))
        for _ in range(500):
            if driver.core.applied_index == 10:
                break
            await asyncio.sleep(0.01)
        assert fsm.log.next_offset == 8 * per_entry
        assert seen[-1] == 8 * per_entry
        steps = [n for n in seen if 0 < n < 8 * per_entry]
        assert len(steps) >= 6, f"the reader saw the log at {seen} only"
        assert all(n % per_entry == 0 for n in steps)  # whole entries, in order
    finally:
        polling.cancel()
        await driver.stop()
        storage.close()
        fsm.close()
