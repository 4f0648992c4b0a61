"""The asyncio driver: runs the sans-I/O core against a clock, a disk and a network.

One task owns the core's Ready loop; everything else (gRPC handlers delivering peer messages,
proposals from clients) calls into the core on the same event loop thread and wakes the loop.

Contract with the core (see dcl.raft.core): for each Ready the driver persists the snapshot,
the entries and the hard state, fsyncs, and only then sends messages (except a steady leader's
`send_before_persist` Ready, whose messages acknowledge nothing and go out first so
replication overlaps the leader's own fsync, or after the apply when nothing is persisted,
one loop turn late if that apply answered proposers, so their replies are written first);
then it applies committed entries and calls `advance`. Group commit falls out of this:
while one fsync runs in the executor, new proposals and acknowledgements accumulate in the
core and the next Ready covers all of them with one fsync.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

from dcl.batching import runs_within
from dcl.errors import (
    CommitTimeout,
    CorruptRecord,
    InsufficientStorage,
    NotLeader,
    Unavailable,
)
from dcl.metrics import Histogram
from dcl.raft.core import RaftNode
from dcl.raft.storage import RaftStorage
from dcl.raft.types import (
    AppendEntries,
    ConfChange,
    Config,
    Entry,
    EntryType,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    Ready,
    Role,
    Snapshot,
    Status,
    TimeoutNow,
)
from dcl.storage.aio import AioFsync, AioRefused
from dcl.storage.space import DiskSpace

__all__ = ["Fsm", "RaftDriver", "Transport"]

log = logging.getLogger(__name__)


class Fsm(Protocol):
    """The replicated state machine the driver applies committed entries to."""

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        """Apply committed entries in order; one result per entry (handed to proposers)."""
        ...

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole state with the snapshot's (durably)."""
        ...

    def restore_steps(self, snapshot: Snapshot) -> Generator[None, None, None]:
        """`restore` a step of work at a time, durable only after `checkpoint()`. Readers of
        the state may run between steps; applies and snapshot builds may not."""
        ...

    def snapshot_steps(self) -> Generator[bytes | memoryview | None, None, None]:
        """The state as of the last applied entry, as snapshot bytes: captured at the call,
        built while the iterator is advanced (None for each step of work, the bytes last).
        Later applies may run between steps; a restore may not."""
        ...

    def checkpoint(self) -> None:
        """Make the applied state durable (called off the loop, before compaction)."""
        ...

    def state_bytes(self) -> int:
        """About how large a snapshot of the state is (to check the disk has room for one)."""
        ...


class Transport(Protocol):
    """Best-effort delivery of messages to peers: Raft tolerates loss, so never blocks."""

    def send(self, messages: Sequence[Message]) -> None: ...


#: How a proposal's outcome is delivered: (error, None) or (None, the FSM's result).
_Settle = Callable[[BaseException | None, Any], None]

#: A follower fsyncs an append up to this size on the loop thread instead of in the
#: executor. Such an fsync costs about 0.13 ms here, less than the hand-off to a thread and
#: back (futex wake-ups and GIL ping-pong): follower CPU per one-at-a-time Produce 600 ->
#: 470 us, p50 1.83 -> 1.65 ms. A follower waits for the fsync before it acknowledges
#: anyway, and data arriving meanwhile queues in the socket and joins the next group
#: commit. (Linux AIO, `RaftDriver._start_sync`, costs no thread either, but completes in
#: 0.17-0.18 ms.) Larger appends are fsynced off the loop so that reads are not stalled for
#: their fsync, and so is any append while a snapshot is checkpointed or written in the
#: background (its flushes can hold a small fsync back by a millisecond or more).
#:
#: A leader always fsyncs off the loop: a disk that stalled would otherwise stall its
#: heartbeats too, and the followers would elect another leader, where now they keep
#: committing without the stalled one's fsync.
INLINE_SYNC_BYTES = 64 << 10

#: Committed entries are applied in runs of about this many payload bytes, with a loop turn
#: between runs, so readers, the proposers' replies and gossip are served while a follower
#: catching up (or any node after a burst) applies many MiB at once: applying 8 MiB of
#: 100 B records takes about 130 ms on these machines, 1 MiB about 16.
APPLY_STEP_BYTES = 1 << 20


def _entry_bytes(entry: Entry) -> int:
    return len(entry.data)


def _resolver(fut: asyncio.Future[Any]) -> _Settle:
    """Settle `fut` (unless its awaiter already gave up on it)."""

    def settle(exc: BaseException | None, result: Any) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    return settle


#: How often a leader whose disk takes no records tries to hand leadership to a voter with
#: room (a transfer that does not happen within an election timeout is abandoned).
_HANDOFF_SECONDS = 0.5


class RaftDriver:
    """Drives one RaftNode. Proposals resolve once their entry is applied locally."""

    def __init__(
        self,
        node_id: str,
        storage: RaftStorage,
        fsm: Fsm,
        transport: Transport,
        *,
        config: Config,
        applied: int = 0,
        bootstrap: bool = False,
        tick_seconds: float = 0.05,
        commit_timeout: float = 10.0,
        snapshot_threshold_entries: int = 0,
        snapshot_max_log_bytes: int = 1 << 30,
        max_log_memory_bytes: int | None = None,
        commit_announce_delay: float = 0.002,
        rng: random.Random | None = None,
        async_fsync: bool = True,
        disk: DiskSpace | None = None,
    ) -> None:
        hard_state, snapshot, entries = storage.load()
        if snapshot is not None and snapshot.meta.index > applied:
            # Crashed after persisting an installed snapshot but before the FSM recorded it.
            fsm.restore(snapshot)
            applied = snapshot.meta.index
        self.node_id = node_id
        self.core = RaftNode(
            node_id, config, rng or random.Random(), hard_state=hard_state, snapshot=snapshot,
            entries=entries, bootstrap_voters=[node_id] if bootstrap else None, applied=applied,
            spool=storage.snapshot_spool, retained=storage.retained,
        )
        self._storage = storage
        self._fsm = fsm
        self._transport = transport
        self._tick = tick_seconds
        self._commit_timeout = commit_timeout
        self._snapshot_every = snapshot_threshold_entries
        self._snapshot_max_log_bytes = snapshot_max_log_bytes
        #: See `log_memory_full`; twice the snapshot cap unless given.
        self._max_log_memory = (
            2 * snapshot_max_log_bytes if max_log_memory_bytes is None else max_log_memory_bytes
        )
        #: Appends refused since the log filled (`log_memory_full`), for the log line.
        self._refused_appends = 0
        #: The data directory's free space against its reserve (see dcl.storage.space): a
        #: follower whose disk is low drops entries and snapshot chunks, as lost messages.
        self.disk = disk
        #: Entries and snapshot chunks dropped, and client appends refused, for lack of
        #: disk (metrics; appends are counted by the refuser, ReplicatedBackend).
        self.dropped_for_disk = 0
        self.refused_for_disk = 0
        #: What waits for disk space ("snapshot": our own; "install": the leader's), each
        #: logged once until it has room (`_room`).
        self._waiting_for_space: set[str] = set()
        #: The size of the leader's snapshot that found no room here (0: none waiting).
        self._install_wanted = 0
        #: On a leader: the peers whose last heartbeat answer said their disk is low.
        self._peers_disk_low: set[str] = set()
        #: When a leader whose disk is full may next try to hand leadership over.
        self._handoff_at = 0.0
        self._wake = asyncio.Event()
        #: index -> (term, settle(error, result), commit-timeout timer), one per proposal.
        self._waiters: dict[int, tuple[int, _Settle, asyncio.TimerHandle]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failed: BaseException | None = None
        self.on_applied: Callable[[], None] = lambda: None
        self.on_role_change: Callable[[Role], None] = lambda role: None
        #: Called once if the loop stops on an error (the node can no longer take part).
        self.on_failed: Callable[[BaseException], None] = lambda exc: None
        self._snapshot_after = 0
        #: A snapshot being built in the background: the task, then (index, data) to compact,
        #: then (snapshot, its write in the executor) until the storage adopts it.
        self._snapshot_task: asyncio.Task[None] | None = None
        self._built: tuple[int, bytes | memoryview] | None = None
        self._writing: tuple[Snapshot, asyncio.Future[None]] | None = None
        #: A snapshot's storage failure (built, written or received), raised by the loop.
        self._snapshot_error: Exception | None = None
        self._next_tick = 0.0
        self._ticker: asyncio.TimerHandle | None = None
        self._last_role = self.core.role
        #: How long a deferred commit announcement (`Config.defer_commit_announcement`) may
        #: wait for the next append to carry it; a follower's readers wait as long at most.
        #: Only while writes are steady: once the delay passed with no append to carry the
        #: announcement, they are sparse, and it goes out at once (in the next loop turn,
        #: after the proposer's reply) until a write follows one within the delay again.
        #: Sparse writes, one every 20 ms: a follower's tail reader got each record 0.7 ms
        #: after the ack, 2.8 ms with a fixed delay.
        self._announce_delay = commit_announce_delay
        self._announcer: asyncio.TimerHandle | None = None
        self._announce_now = False
        self._steady_writes = True
        self._announced_at = 0.0
        self._owed_commit = 0  # the commit index last seen owed, since `_owed_at`
        self._owed_at = 0.0
        #: Off-loop fsyncs by Linux AIO (dcl.storage.aio) once started, where available;
        #: otherwise, or with `async_fsync=False`, in the default executor.
        self._want_aio = async_fsync
        self._aio: AioFsync | None = None
        #: For the metrics endpoint: from a group commit's start to its entries being durable
        #: (a leader's includes the AIO completion's wake-up), and snapshot counts.
        self.fsync_seconds = Histogram(
            "dcl_raft_fsync_duration_seconds",
            "Time to fsync one group commit of Raft entries (a leader: until its loop sees it).")
        self.snapshots_taken = 0
        self.snapshots_installed = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._want_aio and self._aio is None:
            self._aio = AioFsync.open(loop)
        self._task = loop.create_task(self._run(), name="raft-driver")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._drop_snapshot_in_progress()
        except Exception:  # the write failed; the storage is closed next anyway
            log.exception("snapshot write failed node=%s", self.node_id)
        if self._aio is not None:
            self._aio.close()
            self._aio = None
        self._fail_waiters(Unavailable("node is shutting down"))

    # ------------------------------------------------------------------ inputs

    def receive(self, m: Message) -> None:
        """A message from a peer (called by the transport service)."""
        if m.dst != self.node_id:
            return
        if self.disk is not None:
            if isinstance(m, HeartbeatResponse):
                if m.term == self.core.term:  # not a stale answer to an older leader
                    if m.disk_low:
                        self._peers_disk_low.add(m.src)
                    else:
                        self._peers_disk_low.discard(m.src)
            elif (isinstance(m, TimeoutNow | InstallSnapshot)
                  or (isinstance(m, AppendEntries) and m.entries)
                  ) and m.term >= self.core.term and self._refused_for_disk(m):
                # Dropped, not answered, as below: writing it could fill the disk, which
                # stops the node. The leader resends entries and chunks once space is freed;
                # a dropped TimeoutNow lets the transfer lapse. (A message of an older term
                # goes to the core, which ignores it.)
                self.dropped_for_disk += 1
                return
        if type(m) is AppendEntries and m.entries:
            if self.log_memory_full:
                # Dropped, not answered: the leader resends what this node lacks once it
                # answers again (a lost message to Raft), probing at the heartbeat's pace.
                if not self._refused_appends:
                    log.warning("raft log over its memory limit while a snapshot is built: "
                                "refusing appends node=%s log_bytes=%d limit=%d",
                                self.node_id, self.core.log_bytes, self._max_log_memory)
                self._refused_appends += 1
                self._wake.set()  # the loop starts the snapshot if none is under way
                return
            if self._refused_appends:
                log.info("taking appends again node=%s refused=%d log_bytes=%d",
                         self.node_id, self._refused_appends, self.core.log_bytes)
                self._refused_appends = 0
        try:
            self.core.step(m)
        except OSError as exc:
            # The snapshot spool failed to write a chunk (disk full, I/O error): a storage
            # failure like any other, so the node stops rather than fail every resend.
            if self._snapshot_error is None:
                self._snapshot_error = exc
        self._wake.set()

    async def propose(self, data: bytes) -> Any:
        """Replicate `data`; returns the FSM's result once it is applied here.

        NotLeader when this node cannot take it (nothing was proposed, a retry elsewhere is
        safe); CommitTimeout when it was proposed but not seen committed in time (unknown).
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.propose_hook(data, _resolver(fut))
        return await fut

    def propose_hook(self, data: bytes, done: _Settle) -> None:
        """Propose `data`; `done(error, result)` runs synchronously inside the apply (or the
        failure, or the commit timeout) that settles it.

        For callers that resolve their own futures: they then wake in the very next loop
        turn, ahead of the messages the same Ready sends, instead of one task hop later.
        Raises like `propose` (NotLeader: nothing was proposed).
        """
        self._check_running()
        self._watch(*self.core.propose(data), done)

    async def propose_conf_change(self, cc: ConfChange) -> None:
        self._check_running()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._watch(*self.core.propose_conf_change(cc), _resolver(fut))
        await fut

    def transfer_leadership(self, to: str) -> None:
        self.core.transfer_leadership(to)
        self._wake.set()

    def status(self) -> Status:
        return self.core.status()

    @property
    def log_memory_full(self) -> bool:
        """The Raft log this node holds in memory has reached `max_log_memory_bytes` while a
        snapshot that will free it is being built: take no new entries until it is done.

        The snapshot cap alone does not bound memory: entries keep arriving while a snapshot
        builds, which takes as long as copying the commit log (seconds per GiB), so a node
        under a steady write (or catching up) held several times the cap. A follower drops
        appends meanwhile; a leader's ReplicatedBackend holds new appends back (or refuses
        them, when the snapshot has no room on the disk: `disk_full`). Under way
        includes the write of the last snapshot: the next one, which frees what came in
        meanwhile, starts after it. Between two snapshots, the driver's loop starts the next
        one as soon as the log is over the limit (`_run`) rather than at the next apply, and
        entries wait for it. Where none can be taken (snapshots off, one skipped on damage,
        nothing of this log committed yet) there is nothing to wait for, and entries are
        taken as before.
        """
        log_bytes = self.core.log_bytes
        if log_bytes < self._max_log_memory or self._failed is not None or self._stopping:
            return False  # (a stopped driver frees nothing)
        # Under way, or one can start (due by the cap) now or once what is committed is
        # applied: the loop starts it next, after that Ready if need be.
        return self.snapshot_in_progress or (
            log_bytes >= self._snapshot_max_log_bytes
            and self._snapshot_allowed(self.core.commit_index))

    @property
    def disk_full(self) -> bool:
        """This node takes no new records for lack of disk: free space is below its reserve;
        or its Raft log is at its memory limit (`log_memory_full`) while the snapshot that
        would free it has no room on the disk (`_room_for_snapshot`), which holding appends
        for would hold them until freed space lets the snapshot start; or, on a follower,
        the leader's snapshot it must install before any entry has no room
        (`_room_for_install`). Its heartbeat answers say so."""
        disk = self.disk
        if disk is None:
            return False
        if self._install_wanted and self.core.role is not Role.LEADER and not (
                self._room_for_install(self._install_wanted)):
            return True  # the snapshot it must take before any entry has no room
        return disk.low or (self.log_memory_full and not self.snapshot_in_progress
                            and not self._room_for_snapshot())

    def write_refusal(self) -> InsufficientStorage | None:
        """Why a leader takes no new records now, if it does not: its own disk (`disk_full`),
        or fewer than a quorum of voters with room (a follower's heartbeat answers say when
        its disk is low): entries no quorum can write would time out with their outcome
        unknown, and commit later, once space is freed, behind a client that gave up."""
        disk = self.disk
        if disk is None:
            return None
        if self.disk_full:
            free = disk.free_bytes()
            if disk.low:
                return InsufficientStorage(self.node_id, free, disk.reserve_bytes)
            return InsufficientStorage(self.node_id, free, disk.reserve_bytes,
                                       snapshot_bytes=2 * self._fsm.state_bytes())
        if not self._peers_disk_low:
            return None
        voters = self.core.voters
        low = sorted(self._peers_disk_low & voters - {self.node_id})
        if len(voters) - len(low) > len(voters) // 2:
            return None
        return InsufficientStorage.of_peers(low, len(voters))

    @property
    def snapshot_in_progress(self) -> bool:
        """A snapshot is being built or written in the background."""
        return self._snapshot_task is not None or self._built is not None or (
            self._writing is not None)

    # ------------------------------------------------------------------ internals

    def _check_running(self) -> None:
        if self._failed is not None or self._stopping:
            raise Unavailable("raft driver is not running")
        if self.core.role is not Role.LEADER:
            raise NotLeader(self.core.leader_id)

    def _watch(self, term: int, index: int, done: _Settle) -> None:
        loop = asyncio.get_running_loop()
        if (
            not self._steady_writes
            and loop.time() - self._announced_at < self._announce_delay
        ):
            self._steady_writes = True  # this append would have carried the announcement
        timer = loop.call_later(
            self._commit_timeout, self._settle, index,
            CommitTimeout(f"entry {index} (term {term}) not applied within "
                          f"{self._commit_timeout}s"), None)
        self._waiters[index] = (term, done, timer)
        self._wake.set()

    def _settle(self, index: int, exc: BaseException | None, result: Any) -> None:
        waiter = self._waiters.pop(index, None)
        if waiter is not None:
            waiter[2].cancel()
            waiter[1](exc, result)

    def _fail_waiters(self, exc: BaseException) -> None:
        for index in list(self._waiters):
            self._settle(index, exc, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_tick = loop.time() + self._tick
        # One timer per tick wakes the loop; a busy loop (woken by messages and proposals)
        # then pays nothing per turn for the clock.
        self._arm_ticker(loop)
        try:
            while not self._stopping:
                if not self._wake.is_set():
                    await self._wake.wait()
                self._wake.clear()
                self._tick_if_due(loop)
                if self._announce_now:
                    self._announce_now = False
                    self._announce_if_late(loop)
                while self.core.has_ready() and not self._stopping:
                    await self._handle(self.core.ready())
                if self.core.commit_announcement_due:
                    self._arm_announcer(loop)
                # Between Readies: no fsync in flight, so the log may lose segments.
                if self._snapshot_error is not None:
                    raise self._snapshot_error
                if self._built is not None:
                    self._compact_built()
                if self._writing is not None and self._writing[1].done():
                    self._adopt_written()
                if self.core.log_bytes >= self._max_log_memory:
                    self._maybe_snapshot()  # see `log_memory_full`
                role = self.core.role
                if role is not self._last_role:
                    self._last_role = role
                    self._peers_disk_low.clear()  # heard as leader of an earlier term
                    self._install_wanted = 0  # offered by an earlier leader
                    self.on_role_change(role)
                if (role is Role.LEADER and self.disk is not None
                        and loop.time() >= self._handoff_at and self.disk_full):
                    self._handoff_at = loop.time() + _HANDOFF_SECONDS
                    self._hand_off_for_disk()
        except Exception as exc:  # a storage failure: stop rather than diverge
            log.exception("raft driver failed node=%s", self.node_id)
            self._failed = exc
            self._fail_waiters(Unavailable(f"raft driver failed: {exc}"))
            self.on_failed(exc)
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            if self._announcer is not None:
                self._announcer.cancel()

    def _arm_ticker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._ticker = loop.call_at(self._next_tick, self._on_ticker)

    def _arm_announcer(self, loop: asyncio.AbstractEventLoop) -> None:
        commit = self.core.commit_index
        if commit != self._owed_commit:  # the delay runs from when each index is owed
            self._owed_commit = commit
            self._owed_at = loop.time()
        if self._announcer is None and not self._announce_now:
            delay = self._announce_delay if self._steady_writes else 0.0
            self._announcer = loop.call_at(self._owed_at + delay, self._on_announcer)

    def _announce_if_late(self, loop: asyncio.AbstractEventLoop) -> None:
        """The announcer fired: announce what no append carried within the delay."""
        if not self.core.commit_announcement_due:
            return  # carried by appends (or heartbeats)
        if self._steady_writes and loop.time() < self._owed_at + self._announce_delay:
            self._arm_announcer(loop)  # armed for an earlier index, which was carried
            return
        self._steady_writes = False
        self._announced_at = loop.time()
        self.core.announce_commit()

    def _on_announcer(self) -> None:
        self._announcer = None
        self._announce_now = True
        self._wake.set()

    def _on_ticker(self) -> None:
        self._ticker = None
        self._wake.set()

    def _tick_if_due(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if now < self._next_tick:
            # A timer may fire a little before its deadline (uvloop rounds to whole
            # milliseconds): the clock must never stop for want of a timer.
            if self._ticker is None:
                self._arm_ticker(loop)
            return
        self.core.tick()
        self._next_tick += self._tick
        if self._next_tick <= now:  # after a long stall tick once, not in a burst
            self._next_tick = now + self._tick
        self._arm_ticker(loop)

    def _start_sync(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """The group commit's fsync, off the loop thread. By Linux AIO where the kernel
        takes it: an executor thread costs more than the fsync's own CPU (its wake-up, and
        GIL hand-offs with this thread, which sends the entries to the followers meanwhile).
        Leader process CPU per one-at-a-time Produce 1000 -> 850 us (scratch probe, 3
        pairs), 60-70 us of it the fsync's own, now spent by a kernel worker."""
        if self._aio is not None:
            try:
                started = self._storage.sync_submit(self._aio.fsync)
            except AioRefused as exc:
                log.warning("asynchronous fsync refused (%s); fsyncing in a thread from now "
                            "on node=%s", exc, self.node_id)
                self._aio.close()  # nothing in flight: each Ready awaits its fsync
                self._aio = None
            else:
                if started is not None:
                    return started
        return loop.run_in_executor(None, self._storage.sync)

    async def _persisting(self, work: asyncio.Future[None]) -> None:
        """Await a disk write in the executor without a leader going silent.

        While it runs, a leader keeps its clock and sends its heartbeats (see
        `RaftNode.take_heartbeats`), and a follower answers the heartbeats it gets (saving a
        GiB snapshot takes seconds); everything else waits for the Ready to complete.
        """
        loop = asyncio.get_running_loop()
        while not work.done():
            await asyncio.wait((work,), timeout=max(self._next_tick - loop.time(), 0.001))
            if work.done():
                break
            if self.core.role is Role.LEADER:
                self._tick_if_due(loop)
                beats = self.core.take_heartbeats()
                if beats:
                    self._send(beats)
            else:
                self._answer_heartbeats()
        work.result()

    def _send(self, messages: Sequence[Message]) -> None:
        """To the transport; a follower's heartbeat answers say whether its disk is full
        (the leader counts such voters out of its write quorum: `write_refusal`, sends
        them no records and hands leadership to one with room when its own is full)."""
        if self.disk_full:
            for m in messages:
                if type(m) is HeartbeatResponse:
                    m.disk_low = True
        if self._peers_disk_low:
            # What such a peer would drop (`_refused_for_disk`) is not sent: it would be
            # resent at every heartbeat answer, 256 KiB a time, until space is freed.
            low = self._peers_disk_low
            messages = [m for m in messages if m.dst not in low or not (
                type(m) is InstallSnapshot or (type(m) is AppendEntries and any(
                    e.type is EntryType.NORMAL for e in m.entries)))]
        self._transport.send(messages)

    def _answer_heartbeats(self) -> None:
        """In a long Ready, answer the leader's heartbeats now; other answers wait for it."""
        answers = self.core.take_heartbeat_responses(self._storage.durable_term)
        if answers:
            self._send(answers)

    async def _handle(self, rd: Ready) -> None:
        loop = asyncio.get_running_loop()
        # Early sending only pays off when there is something to persist meanwhile; otherwise
        # apply first, so waiting proposers are answered before the commit broadcast is sent.
        send_early = rd.send_before_persist and bool(rd.entries or rd.snapshot)
        if send_early and rd.messages:
            self._send(rd.messages)
            # Let the transport put them on the wire before this node's own fsync is handed
            # to a thread: that thread would compete for the GIL with the sends, and the
            # followers' acknowledgements, not our fsync, are what a commit waits for.
            # One-at-a-time Produce p50 1.85 -> 1.74 ms (bench/cluster.py, 4 runs each).
            await asyncio.sleep(0)
        if rd.snapshot is not None:
            # The leader's snapshot replaces our state: our own one in progress is moot (and
            # its build must not read the commit log the restore below resets).
            await self._drop_snapshot_in_progress()
            await self._persisting(
                loop.run_in_executor(None, self._storage.save_snapshot, rd.snapshot))
            self._hold_saved_snapshot()
        if rd.entries:
            self._storage.append(rd.entries)
        if rd.hard_state is not None:
            self._storage.set_hard_state(rd.hard_state)
        if rd.entries:
            started = time.perf_counter()
            if (
                self.core.role is not Role.LEADER
                and not self.snapshot_in_progress
                and sum(len(e.data) for e in rd.entries) <= INLINE_SYNC_BYTES
            ):
                self._storage.sync()
            else:
                await self._persisting(self._start_sync(loop))
            self.fsync_seconds.observe(time.perf_counter() - started)
        if not rd.send_before_persist and rd.messages:
            self._send(rd.messages)
        if rd.snapshot is not None:
            # On the loop (readers share the commit log with the FSM, which is single-threaded),
            # but a step at a time: a restore takes seconds per GiB, and a node that serves
            # nothing for that long can be declared failed by gossip. Readers and gossip run
            # between steps, and so do heartbeat answers; other Raft answers wait for the next
            # Ready. bench/catchup.py, 300 MiB: the longest call to the catching-up follower
            # 1.1 s -> 26-40 ms (max_stall_ms).
            for _ in self._fsm.restore_steps(rd.snapshot):
                if self._stopping:
                    # Consistent at every step (not yet vouched for): the next start
                    # restores the stored snapshot instead of this stop waiting for it.
                    return
                await asyncio.sleep(0)
                self._answer_heartbeats()
            await self._persisting(loop.run_in_executor(None, self._fsm.checkpoint))
            self.snapshots_installed += 1
            self.on_applied()  # readers waiting at the tail: the log grew
        answered = await self._apply_in_steps(rd.committed_entries)
        if rd.send_before_persist and not send_early and rd.messages:
            if answered and not any(
                isinstance(m, AppendEntries) and m.entries for m in rd.messages
            ):
                # The proposers just answered write their replies in the next loop turn,
                # and the server flushes them one turn later; messages sent now would have
                # the peers' tasks write ahead of that flush and wake every follower to
                # apply first, competing with the reply for the CPU. One turn's wait puts
                # the reply on the wire first. This covers every message without entries,
                # not only bare commit announcements: the follower still owing an ack (one
                # always does with one-at-a-time writes) gets an empty append that asks for
                # an answer. One-at-a-time Produce p50 1.74 -> 1.55 ms (probe, 3 pairs of
                # runs). Replication (entries) never waits.
                await asyncio.sleep(0)
            self._send(rd.messages)
        self.core.advance(rd)
        if rd.committed_entries:
            self._maybe_snapshot()

    def _hold_saved_snapshot(self) -> None:
        """Keep the storage's file-mapped copy of the snapshot just saved, not its bytes."""
        saved = self._storage.snapshot
        if saved is not None:
            self.core.use_snapshot_copy(saved)

    async def _apply_in_steps(self, entries: Sequence[Entry]) -> bool:
        """`_apply` in runs of `APPLY_STEP_BYTES`, yielding to the loop between runs."""
        if len(entries) <= 1:
            return self._apply(entries) if entries else False
        answered = False
        for i, run in enumerate(runs_within(entries, _entry_bytes, APPLY_STEP_BYTES)):
            if i:
                await asyncio.sleep(0)
                self._answer_heartbeats()  # as between restore steps
            answered = self._apply(run) or answered
        return answered

    def _apply(self, entries: Sequence[Entry]) -> bool:
        """Apply and settle the proposers waiting on these entries; True if there were any."""
        results = self._fsm.apply(entries)
        answered = False
        if self._waiters:
            for entry, result in zip(entries, results, strict=True):
                waiter = self._waiters.get(entry.index)
                if waiter is None:
                    continue
                answered = True
                if waiter[0] == entry.term:
                    self._settle(entry.index, None, result)
                else:  # our entry was overwritten by a later leader: it never committed
                    self._settle(entry.index, NotLeader(self.core.leader_id), None)
        self.on_applied()
        return answered

    def _snapshot_allowed(self, upto: int) -> bool:
        """Snapshots are on, and one may be taken once `upto` is applied (not before the
        log's first entry, nor again before the threshold after one skipped on damage)."""
        return (self._snapshot_every > 0 and not self._stopping
                and upto >= self._snapshot_after and upto >= self.core.first_index)

    def _hand_off_for_disk(self) -> None:
        """A leader that takes no records for lack of disk hands leadership to the voter
        with room that is furthest along, as Kafka moves leadership off a broker whose log
        directory failed: the cluster goes on taking writes while a quorum has room. Only to
        a voter heard from recently, holding every committed entry (a transfer stops this
        leader taking proposals, configuration changes included, until it happens or an
        election timeout passes: one that must catch up first would keep it from them), and
        whose heartbeat answers do not say its disk is low (so leadership never moves to a
        node that would refuse too; such a node also drops TimeoutNow); none: keep leading,
        and refusing."""
        progress = self.core.progress()
        commit = self.core.commit_index
        candidates = [p for p in self.core.voters - self._peers_disk_low - {self.node_id}
                      if (pr := progress.get(p)) is not None and pr.heard_recently
                      and pr.match >= commit]
        if not candidates:
            return
        target = max(candidates, key=lambda p: (progress[p].match, p))
        log.warning("disk takes no new records: handing leadership to node=%s (match %d of "
                    "%d) node=%s", target, progress[target].match, self.core.last_index,
                    self.node_id)
        self.core.transfer_leadership(target)

    def _refused_for_disk(self, m: AppendEntries | InstallSnapshot | TimeoutNow) -> bool:
        """Whether a follower must drop m for lack of disk (see `disk_full`).

        Appends of configuration changes and no-ops alone are taken: they are tiny, and a
        new leader's no-op or a change of members (adding a node with room) must be able to
        commit on nodes that take no records. A snapshot needs room for all of it before
        its first chunk: the spool it is received into, the snapshot file saved from it and
        the records the restore adds to the commit log (`_room_for_install`); a chunk
        dropped partway drops the spool too (its disk comes back; the transfer restarts)."""
        if type(m) is AppendEntries:
            return self.disk_full and any(e.type is EntryType.NORMAL for e in m.entries)
        if type(m) is TimeoutNow:
            return self.disk_full  # it would lead a cluster while refusing every write
        assert type(m) is InstallSnapshot
        if not m.offset:
            self._install_wanted = 0  # each offer is judged by its own size
        if not self.disk_full and (m.offset or self._room_for_install(m.size)):
            return False
        self.core.drop_incoming_snapshot()
        return True

    def _room_for_install(self, size: int) -> bool:
        """Room for the leader's snapshot of `size` bytes: the spool it is received into,
        the file saved from it and the records the restore adds to the commit log."""
        room = self._room("install", 2 * size + max(size - self._fsm.state_bytes(), 0))
        self._install_wanted = 0 if room else size
        return room

    def _room_for_snapshot(self) -> bool:
        """Whether the disk holds a snapshot above its reserve: the build's scratch file and
        the new snapshot file are each about as large as the state (the old file stays until
        the new one replaces it). Without that room the snapshot waits, and the Raft log it
        would have cut is kept (on disk and in memory) instead: the node stops taking entries
        at the reserve rather than fill the disk with a copy, which would stop it."""
        return self._room("snapshot", 2 * self._fsm.state_bytes())

    def _room(self, what: str, need: int) -> bool:
        """Whether `need` bytes fit above the reserve; a lack is logged once per wait."""
        disk = self.disk
        if disk is None or disk.room_for(need):
            self._waiting_for_space.discard(what)
            return True
        if what not in self._waiting_for_space:
            self._waiting_for_space.add(what)
            log.warning("%s waits for disk space node=%s needs_bytes=%d free_bytes=%d "
                        "reserve_bytes=%d", what, self.node_id, need, disk.free_bytes(),
                        disk.reserve_bytes)
        return False

    def _maybe_snapshot(self) -> None:
        """Start a snapshot in the background once the Raft log holds
        `snapshot_threshold_entries` entries AND at least as many bytes as the last snapshot,
        or in any case once it holds `snapshot_max_log_bytes`.

        A snapshot copies the whole state, which only grows for a commit log: by entries
        alone, the cost of each snapshot would grow with the log while the interval stayed
        fixed (quadratic work over time). Waiting for as many new bytes as the last snapshot
        held doubles the size from one to the next, so each byte appended is copied about
        twice over the log's life. But the
        core holds the Raft log since the snapshot in memory, so the byte cap bounds that
        first: past it, memory wins over snapshot work.

        Background, because a snapshot is as large as the commit log (seconds per GiB):
        replication, commits and reads go on meanwhile. The build runs on the loop in steps
        (the FSM is single-threaded) from state captured here; the write runs in the
        executor, flushed as it goes so this node's own log fsyncs never wait for all of it
        (see dcl.storage.files.replace_atomically).
        One snapshot at a time.
        """
        applied = self.core.applied_index
        if self.snapshot_in_progress or not self._snapshot_allowed(applied):
            return
        held = self.core.snapshot
        log_bytes = self.core.log_bytes
        due = applied - self.core.first_index + 1 >= self._snapshot_every and (
            held is None or log_bytes >= len(held.data)
        )
        if not due and log_bytes < self._snapshot_max_log_bytes:
            return
        if not self._room_for_snapshot():
            return
        steps = self._fsm.snapshot_steps()  # the state as of `applied`, captured now
        self._snapshot_task = asyncio.get_running_loop().create_task(
            self._build_snapshot(applied, steps), name="raft-snapshot")

    async def _build_snapshot(
        self, applied: int, steps: Generator[bytes | memoryview | None, None, None]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            # The FSM must be durable up to `applied` before the raft log behind it is dropped.
            await loop.run_in_executor(None, self._fsm.checkpoint)
            data: bytes | memoryview | None = None
            for data in steps:
                if data is None:
                    await asyncio.sleep(0)
        except CorruptRecord:
            # Damaged state cannot be snapshotted (reads of it answer DATA_LOSS). Keep the
            # Raft log, which still holds those entries, and keep serving; try again after
            # another threshold's worth of entries rather than on every apply.
            log.exception("snapshot skipped node=%s index=%d", self.node_id, applied)
            self._snapshot_after = applied + self._snapshot_every
            return
        except Exception as exc:  # a storage failure: the driver task stops on it
            self._snapshot_error = exc
            self._wake.set()
            return
        finally:
            self._snapshot_task = None
            steps.close()  # cancelled mid-build: the FSM drops its scratch file
        assert data is not None
        self._built = (applied, data)
        self._wake.set()

    def _compact_built(self) -> None:
        """Hand the built snapshot to the core and start writing it to disk."""
        assert self._built is not None
        applied, data = self._built
        self._built = None
        held = self.core.snapshot
        if held is not None and applied <= held.meta.index:
            return  # a newer snapshot was installed meanwhile
        self.core.compact(applied, data)
        snap = self.core.snapshot
        assert snap is not None and snap.meta.index == applied
        work = asyncio.get_running_loop().run_in_executor(
            None, self._storage.write_snapshot, snap)
        work.add_done_callback(lambda _: self._wake.set())
        self._writing = (snap, work)

    def _adopt_written(self) -> None:
        """The snapshot file is durable: cut the Raft log on disk to it and hold the file."""
        assert self._writing is not None
        snap, work = self._writing
        self._writing = None
        work.result()  # a failed write stops the driver, as any storage failure does
        self._storage.adopt_snapshot(snap)
        self._hold_saved_snapshot()
        self.snapshots_taken += 1
        log.info("snapshot node=%s index=%d bytes=%d", self.node_id, snap.meta.index,
                 len(snap.data))

    async def _drop_snapshot_in_progress(self) -> None:
        """Stop a background snapshot: cancel its build; let its write finish and adopt it
        (it is of this node's own applied state, so still valid, and older than anything
        installed after it)."""
        task = self._snapshot_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._snapshot_task = None  # also when cancelled before it ever ran
        self._built = None
        if self._writing is not None:
            await asyncio.gather(self._writing[1], return_exceptions=True)
            self._adopt_written()
