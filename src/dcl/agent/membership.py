"""Gossip membership drives the Raft configuration: the leader reconciles one to the other.

The reconciler is level-triggered rather than edge-triggered: a gossip event only wakes it,
and each round compares the current gossip view with the current Raft configuration (`plan`,
a pure function). So duplicate events are no-ops by construction, events missed while this
node was not leader are caught up on the first round after it becomes leader, and a round
that failed half-way (leadership lost, change pending) is simply planned again.

Rules (see `plan`): a member gossip declares DEAD (unless Raft still hears from it) or LEFT
is removed from Raft; an ALIVE member with an `rpc_addr` tag that Raft does not know is
added as a learner (its address recorded in the replicated book first, so the leader can
reach it), and promoted to voter once it holds the log up to the commit index. A Raft
member gossip has never heard of is left alone (it may have joined through Admin.Join), and
a node never removes itself.

Changes go through AdminService.join/leave, the same code path as the Admin RPCs, which
serialise conf changes (one at a time in Raft) and retry while one is pending.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from dcl.errors import DclError
from dcl.membership import Member, MemberEvent, MemberState
from dcl.raft.driver import RaftDriver
from dcl.raft.types import Role
from dcl.server.raft_transport import AdminService

__all__ = ["Action", "ActionKind", "MembershipReconciler", "RaftView", "plan"]

log = logging.getLogger(__name__)

RPC_ADDR_TAG = "rpc_addr"
_GONE = frozenset({MemberState.DEAD, MemberState.LEFT})


class ActionKind(enum.Enum):
    REMOVE = "remove"
    RECORD_ADDRESS = "record_address"
    PROMOTE = "promote"
    ADD_LEARNER = "add_learner"


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    node_id: str
    rpc_addr: str = ""


@dataclass(frozen=True, slots=True)
class RaftView:
    """What the leader knows of the Raft side: configuration, catch-up, address book."""

    voters: frozenset[str]
    learners: frozenset[str]
    #: Learners whose log reaches the leader's commit index (safe to promote).
    caught_up: frozenset[str]
    addresses: Mapping[str, str]
    #: Peers the leader heard from within the last election timeout (Raft's own liveness).
    responsive: frozenset[str] = frozenset()


def plan(raft: RaftView, members: Iterable[Member], self_id: str) -> list[Action]:
    """The changes that bring Raft in line with gossip, most urgent first.

    Removals come first (a dead voter counts against the quorum), then address fixes, then
    promotions, then additions. Only ALIVE members are promoted or added: a SUSPECT one may
    be about to fail, and the next round decides.
    """
    in_raft = raft.voters | raft.learners
    removals: list[Action] = []
    addresses: list[Action] = []
    promotions: list[Action] = []
    additions: list[Action] = []
    for m in sorted(members, key=lambda m: m.name):
        if m.name == self_id:
            continue
        rpc_addr = m.tags.get(RPC_ADDR_TAG, "")
        if m.state in _GONE:
            # A DEAD verdict that Raft contradicts (the peer still answers the leader) is a
            # gossip-only failure, e.g. UDP blocked: removing healthy voters one by one would
            # quietly shrink the cluster to a single copy of the data. A LEFT is deliberate.
            contradicted = m.state is MemberState.DEAD and m.name in raft.responsive
            if m.name in in_raft and not contradicted:
                removals.append(Action(ActionKind.REMOVE, m.name))
            continue
        if m.state is not MemberState.ALIVE or not rpc_addr:
            continue
        if m.name not in in_raft:
            additions.append(Action(ActionKind.ADD_LEARNER, m.name, rpc_addr))
            continue
        if raft.addresses.get(m.name) != rpc_addr:
            addresses.append(Action(ActionKind.RECORD_ADDRESS, m.name, rpc_addr))
        if m.name in raft.learners and m.name in raft.caught_up:
            promotions.append(Action(ActionKind.PROMOTE, m.name, rpc_addr))
    return removals + addresses + promotions + additions


class MembershipReconciler:
    """Runs `plan` on the Raft leader whenever woken (gossip event, leadership) and every
    `interval` seconds, executing one change at a time."""

    def __init__(
        self,
        node_id: str,
        driver: RaftDriver,
        admin: AdminService,
        addresses: Mapping[str, str],
        members: Callable[[], Sequence[Member]],
        *,
        interval: float = 1.0,
    ) -> None:
        self._id = node_id
        self._driver = driver
        self._admin = admin
        self._addresses = addresses
        self._members = members
        self._interval = interval
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def on_event(self, event: MemberEvent) -> None:
        self._wake.set()

    def raft_view(self) -> RaftView:
        core = self._driver.core
        progress = core.progress()
        commit = core.commit_index
        caught_up = frozenset(
            n for n in core.learners if (pr := progress.get(n)) is not None and pr.match >= commit
        )
        responsive = frozenset(n for n, pr in progress.items() if pr.heard_recently)
        return RaftView(core.voters, core.learners, caught_up, dict(self._addresses),
                        responsive)

    async def run(self) -> None:
        while True:
            busy = False
            if self._driver.core.role is Role.LEADER:
                try:
                    busy = await self.reconcile()
                except Exception:  # a bug here must not end self-healing for good
                    log.exception("membership reconciliation failed")
            # While a learner catches up, look again soon so promotion does not lag a second.
            delay = 0.1 if busy else self._interval
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def reconcile(self, max_steps: int = 16) -> bool:
        """One round: apply planned actions one by one, re-planning after each (the state
        moved). Returns True if work remains (so the caller polls again soon)."""
        for _ in range(max_steps):
            if self._driver.core.role is not Role.LEADER:
                return False
            actions = plan(self.raft_view(), self._members(), self._id)
            if not actions:
                return self._learner_pending()
            action = actions[0]
            try:
                await self._execute(action)
            except DclError as exc:
                log.info("membership change deferred action=%s node=%s error=%r",
                         action.kind.value, action.node_id, exc)
                return True
            log.info("membership change done action=%s node=%s addr=%s",
                     action.kind.value, action.node_id, action.rpc_addr)
        return True

    def _learner_pending(self) -> bool:
        """An alive learner not yet caught up: promotion is due soon."""
        core = self._driver.core
        alive = {m.name for m in self._members() if m.state is MemberState.ALIVE}
        return bool(core.learners & alive)

    async def _execute(self, action: Action) -> None:
        kind = action.kind
        if kind is ActionKind.REMOVE:
            await self._admin.leave(action.node_id)
        elif kind is ActionKind.ADD_LEARNER:
            await self._admin.join(action.node_id, action.rpc_addr, voter=False)
        elif kind is ActionKind.PROMOTE:
            await self._admin.join(action.node_id, action.rpc_addr, voter=True)
        else:  # RECORD_ADDRESS: join() records it; membership is already what it should be
            voter = action.node_id in self._driver.core.voters
            await self._admin.join(action.node_id, action.rpc_addr, voter=voter)
