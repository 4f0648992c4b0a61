"""ACL decisions from the generated casbin model and policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcl.errors import PermissionDenied
from dcl.server.acl import Action, Authorizer
from dcl.server.certs import generate_pki

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def authorizer(tmp_path_factory: pytest.TempPathFactory) -> Authorizer:
    files = generate_pki(tmp_path_factory.mktemp("acl"))
    return Authorizer(files.acl_model, files.acl_policy)


@pytest.mark.parametrize(
    ("subject", "granted"),
    [
        ("root", {Action.PRODUCE, Action.CONSUME, Action.ADMIN}),
        ("peer", {Action.PEER, Action.ADMIN, Action.CONSUME, Action.PRODUCE}),
        ("nobody", set()),
        ("server", set()),
        ("<anonymous>", set()),
    ],
)
def test_policy_grants_exactly_the_documented_rights(
    authorizer: Authorizer, subject: str, granted: set[Action]
) -> None:
    assert {a for a in Action if authorizer.allowed(subject, a)} == granted


def test_denial_raises_permission_denied_naming_subject_and_action(authorizer: Authorizer) -> None:
    with pytest.raises(PermissionDenied) as info:
        authorizer.authorize("nobody", Action.PRODUCE)
    assert (info.value.subject, info.value.action) == ("nobody", "produce")
    authorizer.authorize("root", Action.PRODUCE)


def test_decisions_are_cached_per_subject_and_action(tmp_path: Path) -> None:
    files = generate_pki(tmp_path)
    authorizer = Authorizer(files.acl_model, files.acl_policy)
    assert authorizer.allowed("root", Action.ADMIN)
    # The policy is read once; a later edit does not change cached (or any) decisions.
    files.acl_policy.write_text("")
    assert authorizer.allowed("root", Action.ADMIN)
