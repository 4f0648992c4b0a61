"""Authorization: may this certificate CN perform this action?

Decisions come from a casbin model + policy (files given by the operator). Casbin evaluates a
matcher expression per call, which is slow next to our per-call budget, and the policy only
changes on a reload (SIGHUP), so decisions are cached per (subject, action) until then.
Authorization is checked once per call or stream, never per record.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Iterable
from types import SimpleNamespace

import casbin
from casbin.persist.adapter import load_policy_line

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
    try:  # the model alone first, so a bad policy line is reported with its number
        rules = _check_policy_lines(casbin.Enforcer(os.fspath(model_file)), policy_file)
        enforcer = casbin.Enforcer(os.fspath(model_file), os.fspath(policy_file))
    except AclError:
        raise
    except Exception as exc:  # casbin raises whatever its parsers raise
        raise AclError(f"{os.fspath(model_file)} / {os.fspath(policy_file)}: {exc!r}") from None
    model = enforcer.get_model().model
    if any(list(map(list, model[t[0]][t].policy)) != rules.policy(t) for t in rules.types):
        raise AclError(f"{os.fspath(policy_file)} changed while it was read; try again")
    for action in Action:  # a rule casbin loaded but cannot evaluate fails every call
        try:
            enforcer.enforce(ANONYMOUS_PROBE, OBJECT, str(action))
        except Exception as exc:
            raise AclError(f"{os.fspath(policy_file)}: casbin cannot evaluate it: "
                           f"{exc!r}") from None
    return enforcer


#: Subject of the trial decisions a new policy must survive; no certificate carries it.
ANONYMOUS_PROBE = "<acl-probe>"


class _Rules:
    """Where casbin's own line parser puts a rule: model[section][type].policy."""

    def __init__(self, types: Iterable[str]):
        self.types = list(types)
        self.model: dict[str, dict[str, SimpleNamespace]] = {}
        for ptype in self.types:
            self.model.setdefault(ptype[0], {})[ptype] = SimpleNamespace(policy=[])

    def policy(self, ptype: str) -> list[list[str]]:
        rules: list[list[str]] = self.model[ptype[0]][ptype].policy
        return rules


def _check_policy_lines(enforcer: casbin.Enforcer, policy_file: str | os.PathLike[str]
                        ) -> _Rules:
    """Casbin skips a line of an unknown type, takes one with too few or too many fields as
    it is (and then fails every decision), and keeps quotes as part of a name: a typo in a
    grant goes unnoticed until a client is refused, or takes the node's ACL down. Each line
    goes through casbin's own parser, split as casbin splits the file, and must give a rule
    of a type the model defines, with that many non-empty fields and no quotes. Returns
    the rules read."""
    model = enforcer.get_model().model
    fields = {ptype: len(ast.tokens) for section in ("p", "g")
              for ptype, ast in model.get(section, {}).items()}
    rules = _Rules(fields)
    with open(policy_file, "rb") as f:
        lines = f.read().split(b"\n")
    for number, raw in enumerate(lines, 1):
        line = raw.decode(errors="replace").strip()
        where = f"{os.fspath(policy_file)}:{number}"
        # Casbin's type is the text before the first comma outside brackets: where that
        # differs from the text before the first comma, it holds a bracket, so it is no
        # type of the model either way.
        ptype = line.split(",")[0].strip()
        target = rules.policy(ptype) if ptype in fields else []
        before = len(target)
        try:
            load_policy_line(line, rules)
        except IndexError:  # a closing bracket with none open, or no type before a comma
            raise AclError(f"{where}: casbin cannot parse it: {line!r}") from None
        if not line or line.startswith("#"):
            continue
        if len(target) == before:
            raise AclError(f"{where}: {ptype!r} is no policy type of the model "
                           f"({', '.join(sorted(fields))}): {line!r}")
        values = target[-1]
        if len(values) != fields[ptype] or not all(values):
            raise AclError(f"{where}: a {ptype!r} line takes {fields[ptype]} non-empty "
                           f"fields, not {line!r}")
        if any('"' in v or "'" in v for v in values):
            raise AclError(f"{where}: casbin takes quotes as part of a name: {line!r}")
    return rules


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
        self.adopt(Authorizer(model_file, policy_file))

    def adopt(self, other: Authorizer) -> None:
        """Decide from now on as `other` does: the second half of a reload whose files
        were loaded (and checked) before anything else changed."""
        self._enforcer, self._decisions = other._enforcer, {}

    def allowed(self, subject: str, action: Action | str) -> bool:
        key = (subject, str(action))
        decision = self._decisions.get(key)
        if decision is None:
            try:
                decision = bool(self._enforcer.enforce(subject, OBJECT, key[1]))
            except Exception:  # the checks at load should make this unreachable: fail closed
                log.exception("acl cannot decide subject=%s action=%s: denied", *key)
                return False
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
