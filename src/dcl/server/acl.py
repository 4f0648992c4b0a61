"""Authorization: may this certificate CN perform this action?

Decisions come from a casbin model + policy (files given by the operator). Casbin evaluates a
matcher expression per call, which is slow next to our per-call budget, and the policy only
changes on a reload (SIGHUP), so decisions are cached per (subject, action) until then.
Authorization is checked once per call or stream, never per record.
"""

from __future__ import annotations

import csv
import enum
import logging
import os

import casbin

from dcl.errors import PermissionDenied

__all__ = ["OBJECT", "AclError", "Action", "Authorizer"]

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


class AclError(ValueError):
    """A model or policy file casbin cannot load."""


def _enforcer(model_file: str | os.PathLike[str],
              policy_file: str | os.PathLike[str]) -> casbin.Enforcer:
    for path in (model_file, policy_file):
        if not os.path.isfile(path):  # casbin would start with an empty policy
            raise AclError(f"no such file: {os.fspath(path)}")
    try:
        enforcer = casbin.Enforcer(os.fspath(model_file), os.fspath(policy_file))
    except Exception as exc:  # casbin raises whatever its parsers raise
        raise AclError(f"{os.fspath(model_file)} / {os.fspath(policy_file)}: {exc!r}") from None
    _check_policy_lines(enforcer, policy_file)
    return enforcer


def _check_policy_lines(enforcer: casbin.Enforcer, policy_file: str | os.PathLike[str]) -> None:
    """Casbin skips a line of an unknown type and takes one with too few or too many fields
    as it is: a typo in a grant would go unnoticed until a client is refused (or, with
    fields shifted, let in). Every line must match a definition of the model."""
    model = enforcer.get_model().model
    fields = {ptype: len(ast.tokens) for section in ("p", "g")
              for ptype, ast in model.get(section, {}).items()}
    with open(policy_file, newline="") as f:
        for number, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            ptype, values = row[0].strip(), [v.strip() for v in row[1:]]
            where = f"{os.fspath(policy_file)}:{number}"
            if ptype not in fields:
                raise AclError(f"{where}: {ptype!r} is no policy type of the model "
                               f"({', '.join(sorted(fields))}): {', '.join(row)!r}")
            if len(values) != fields[ptype] or not all(values):
                raise AclError(f"{where}: a {ptype!r} line takes {fields[ptype]} non-empty "
                               f"fields, not {', '.join(row)!r}")


class Authorizer:
    """A casbin enforcer with a decision cache."""

    def __init__(self, model_file: str | os.PathLike[str], policy_file: str | os.PathLike[str]):
        self._enforcer = _enforcer(model_file, policy_file)
        self._decisions: dict[tuple[str, str], bool] = {}

    def reload(self, model_file: str | os.PathLike[str],
               policy_file: str | os.PathLike[str]) -> None:
        """Take a new model and policy for every later call (calls in flight were already
        decided). The files are loaded in full first: if they cannot be, AclError says why
        and the current policy stays."""
        enforcer = _enforcer(model_file, policy_file)
        self._enforcer, self._decisions = enforcer, {}

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
