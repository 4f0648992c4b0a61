"""Authorization: may this certificate CN perform this action?

Decisions come from a casbin model + policy (files given by the operator). Casbin evaluates a
matcher expression per call, which is slow next to our per-call budget, and the policy is
static for the life of the process, so decisions are cached per (subject, action).
Authorization is checked once per call or stream, never per record.
"""

from __future__ import annotations

import enum
import logging
import os

import casbin

from dcl.errors import PermissionDenied

__all__ = ["OBJECT", "Action", "Authorizer"]

log = logging.getLogger(__name__)

#: The single ACL object: DCL Store has one log, so policies grant actions on "*".
OBJECT = "*"


class Action(enum.StrEnum):
    """What a call does; every RPC method maps to exactly one (see dcl.server.server)."""

    PRODUCE = "produce"
    CONSUME = "consume"
    PEER = "peer"
    ADMIN = "admin"
    #: Scrape the metrics endpoint (dcl.server.metrics_http); ADMIN may too.
    METRICS = "metrics"


class Authorizer:
    """A casbin enforcer with a decision cache."""

    def __init__(self, model_file: str | os.PathLike[str], policy_file: str | os.PathLike[str]):
        self._enforcer = casbin.Enforcer(os.fspath(model_file), os.fspath(policy_file))
        self._decisions: dict[tuple[str, str], bool] = {}

    def allowed(self, subject: str, action: Action | str) -> bool:
        key = (subject, str(action))
        decision = self._decisions.get(key)
        if decision is None:
            decision = bool(self._enforcer.enforce(subject, OBJECT, key[1]))
            self._decisions[key] = decision
        return decision

    def authorize(self, subject: str, action: Action | str | tuple[Action, ...]) -> None:
        """Raise PermissionDenied unless the policy lets subject perform action (for a tuple:
        any one of them, e.g. discovery, which producers and consumers both need)."""
        actions = action if isinstance(action, tuple) else (action,)
        if not any(self.allowed(subject, a) for a in actions):
            names = " or ".join(str(a) for a in actions)
            log.info("permission denied subject=%s action=%s", subject, names)
            raise PermissionDenied(subject, names)
