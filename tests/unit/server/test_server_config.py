"""DclServer construction rules and TLS helpers that need no network."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Cardinality, Handler

from dcl.server.acl import Action, Authorizer
from dcl.server.certs import generate_pki
from dcl.server.server import DclServer
from dcl.tls import ANONYMOUS, client_context, common_name, server_context

pytestmark = pytest.mark.timeout(30)


class Unmapped:
    """A handler for a method no ACL entry covers."""

    async def Do(self, stream: Any) -> None:
        pass

    def __mapping__(self) -> dict[str, Handler]:
        return {"/x.v1.Secret/Do": Handler(self.Do, Cardinality.UNARY_UNARY, object, object)}


async def test_a_method_without_an_acl_action_is_refused_at_construction(
    tmp_path: Path,
) -> None:
    files = generate_pki(tmp_path)
    ctx = server_context(files.server_cert, files.server_key, files.ca_cert)
    auth = Authorizer(files.acl_model, files.acl_policy)
    with pytest.raises(ValueError, match=r"/x\.v1\.Secret/Do"):
        DclServer([Unmapped()], ssl_context=ctx, authorizer=auth)
    DclServer(
        [Unmapped()], ssl_context=ctx, authorizer=auth,
        method_actions={"/x.v1.Secret/": Action.ADMIN},
    )


def test_contexts_require_mutual_tls_over_h2(tmp_path: Path) -> None:
    files = generate_pki(tmp_path)
    server = server_context(files.server_cert, files.server_key, files.ca_cert)
    client = client_context(files.root_client_cert, files.root_client_key, files.ca_cert)
    assert server.verify_mode is ssl.CERT_REQUIRED
    assert client.verify_mode is ssl.CERT_REQUIRED and client.check_hostname
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_common_name_reads_the_subject_of_a_peer_certificate() -> None:
    cert = {"subject": ((("organizationName", "DCL Store"),), (("commonName", "root"),))}
    assert common_name(cert) == "root"
    assert common_name(None) == ANONYMOUS
    assert common_name({"subject": ()}) == ANONYMOUS
