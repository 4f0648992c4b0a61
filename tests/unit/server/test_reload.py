"""What a reload (SIGHUP) reads: renewed certificates and a CA file with a CA taken out,
into live contexts over real TLS sockets, and a new ACL policy; and every bad file refused
with nothing changed."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from dcl.server.acl import AclError, Authorizer
from dcl.server.certs import LOCK_NAME, PkiFiles, generate_pki, renew_node_certificates
from dcl.tls import (
    CertificateError,
    TlsFiles,
    ca_certificates,
    client_context,
    issued_by_any,
    server_context,
)


@pytest.fixture
def pki(tmp_path: Path) -> PkiFiles:
    return generate_pki(tmp_path / "pki", ["node1.internal"])


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@contextlib.asynccontextmanager
async def echo_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def connect(port: int, ctx: ssl.SSLContext
                  ) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection: the serial of the certificate the server showed, and the streams."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="127.0.0.1")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number, reader, writer


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"ping")
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(4), 5)


async def echoes(port: int, ctx: ssl.SSLContext) -> bool:
    """Whether a new connection is accepted and answers; a refusal comes at the handshake
    or, in TLS 1.3 (the client's side of the handshake ends first), as an alert on the
    first read."""
    try:
        _, reader, writer = await connect(port, ctx)
        try:
            return await roundtrip(reader, writer) == b"ping"
        finally:
            writer.close()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return False


async def test_a_renewed_certificate_is_served_to_new_connections_and_old_ones_go_on(
    pki: PkiFiles,
) -> None:
    live = server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    client = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    old = serial(pki.server_cert)
    async with echo_server(live) as port:
        shown, reader, writer = await connect(port, client)
        assert shown == old
        written = renew_node_certificates(pki.directory)
        assert set(written) == {pki.server_cert, pki.server_key, pki.peer_cert, pki.peer_key}
        new = serial(pki.server_cert)
        assert new != old
        # Renewed, not loaded: the files changed, what is served did not.
        assert (await connect(port, client))[0] == old
        live.use(live.renewed(TlsFiles.read(pki.server_cert, pki.server_key, pki.ca_cert)))
        shown_after, r2, w2 = await connect(port, client)
        assert shown_after == new
        assert await roundtrip(r2, w2) == b"ping"
        assert await roundtrip(reader, writer) == b"ping"  # opened before: unaffected
        for w in (writer, w2):
            w.close()


async def test_a_ca_taken_out_of_the_ca_file_is_not_trusted_after_a_reload(
    pki: PkiFiles, tmp_path: Path,
) -> None:
    """The last step of a CA rotation (or dropping a compromised CA): once the CA file no
    longer lists a CA and the node reloads, new connections with certificates it signed are
    refused, both ways. A connection opened before goes on at this level; the agent closes
    it (tests/integration/test_reload.py)."""
    other = generate_pki(tmp_path / "other", ["node1.internal"])
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes() + other.ca_cert.read_bytes())
    live = server_context(pki.server_cert, pki.server_key, bundle)
    ours = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    theirs = client_context(other.root_client_cert, other.root_client_key, pki.ca_cert)
    dialer = client_context(pki.peer_cert, pki.peer_key, bundle)
    their_server = server_context(other.peer_cert, other.peer_key, bundle)
    async with echo_server(live) as port, echo_server(their_server) as their_port:
        _, reader, writer = await connect(port, theirs)
        assert await roundtrip(reader, writer) == b"ping"  # both CAs trusted at first
        assert live.cert_store_stats()["x509_ca"] == 2
        _, r0, w0 = await connect(their_port, dialer)
        assert await roundtrip(r0, w0) == b"ping"
        w0.close()

        bundle.write_bytes(pki.ca_cert.read_bytes())
        live.use(live.renewed(TlsFiles.read(pki.server_cert, pki.server_key, bundle)))
        dialer.use(dialer.renewed(
            TlsFiles.read(pki.peer_cert, pki.peer_key, bundle, client_auth=True)))

        assert not await echoes(port, theirs)
        assert live.cert_store_stats()["x509_ca"] == 1  # what is in use, not the first load
        with pytest.raises(ssl.SSLCertVerificationError):  # our dials refuse their server
            await connect(their_port, dialer)
        _, r2, w2 = await connect(port, ours)
        assert await roundtrip(r2, w2) == b"ping"
        assert await roundtrip(reader, writer) == b"ping"  # opened before: goes on
        for w in (writer, w2):
            w.close()


def test_a_renewal_keeps_the_names_and_the_ca_and_adds_hosts(pki: PkiFiles) -> None:
    def names(path: Path) -> set[str]:
        ext = x509.load_pem_x509_certificate(path.read_bytes()).extensions
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        return {*map(str, san.get_values_for_type(x509.DNSName)),
                *map(str, san.get_values_for_type(x509.IPAddress))}

    before = names(pki.server_cert)
    assert "node1.internal" in before
    renew_node_certificates(pki.directory, ["node2.internal"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    for cert in (pki.server_cert, pki.peer_cert):
        assert names(cert) == before | {"node2.internal"}
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(ca)
    for key in (pki.server_key, pki.peer_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # No scratch file left behind; only the lock file commands share stays.
    assert [f.name for f in pki.directory.iterdir() if f.name.startswith(".")] == [LOCK_NAME]


@pytest.mark.parametrize("damage", ["key of another certificate", "expired", "not yet valid",
                                    "certificate not PEM", "half a key", "missing CA",
                                    "another CA's certificate", "a server-only certificate "
                                    "to dial with"])
def test_files_that_cannot_serve_are_refused_before_any_context_sees_them(
    pki: PkiFiles, damage: str, tmp_path: Path
) -> None:
    """Each would break handshakes with peers after the reload, or the live context."""
    cert, key, ca = pki.server_cert, pki.server_key, pki.ca_cert
    now, client_auth = None, False
    if damage == "another CA's certificate":
        other = generate_pki(tmp_path / "other")
        cert, key = other.peer_cert, other.peer_key
    elif damage.startswith("a server-only"):
        client_auth = True  # as the peer certificate is checked: it also dials
    elif damage == "key of another certificate":
        key = pki.peer_key
    elif damage == "expired":
        now = TlsFiles.read(cert, key, ca).not_after + 1
    elif damage == "not yet valid":
        now = TlsFiles.read(cert, key, ca).not_before - 1
    elif damage == "certificate not PEM":
        cert.write_bytes(b"not a certificate\n")
    elif damage == "half a key":
        key.write_bytes(key.read_bytes()[:60])
    else:
        ca = pki.directory / "missing.pem"
    with pytest.raises(CertificateError) as refused:
        TlsFiles.read(cert, key, ca, now=now, client_auth=client_auth)
    assert str(refused.value)  # says what it is, for the log line
    # The files as written pass both ways they are used.
    if damage in ("another CA's certificate", "expired") or damage.startswith("a server"):
        TlsFiles.read(pki.server_cert, pki.server_key, pki.ca_cert)
        TlsFiles.read(pki.peer_cert, pki.peer_key, pki.ca_cert, client_auth=True)
        assert "PRIVATE" not in repr(TlsFiles.read(pki.server_cert, pki.server_key,
                                                   pki.ca_cert))


def test_a_new_policy_takes_effect_and_a_bad_one_changes_nothing(pki: PkiFiles) -> None:
    acl = Authorizer(pki.acl_model, pki.acl_policy)
    assert not acl.allowed("nobody", "produce")  # decided, and cached
    with pki.acl_policy.open("a") as f:
        f.write("p, nobody, *, produce\n")
    assert not acl.allowed("nobody", "produce")  # not before the reload
    acl.reload(pki.acl_model, pki.acl_policy)
    assert acl.allowed("nobody", "produce")
    good = pki.acl_policy.read_text()
    # Casbin itself would take each of these without a word, and then skip the line, deny
    # by a name with quotes in it, or fail every decision (so every call).
    for typo, says in (("p, nobody, *\n", "takes 3 non-empty fields"),
                       ("p, nobody, *, consume, now\n", "takes 3 non-empty fields"),
                       ("p, nobody, , consume\n", "takes 3 non-empty fields"),
                       ('p, "al,ice", *, consume\n', "takes 3 non-empty fields"),
                       ("p, alice[, *, consume\n", "takes 3 non-empty fields"),
                       ('p, "alice", *, consume\n', "quotes"),
                       ("p nobody * consume\n", "is no policy type"),
                       ("g, nobody, root\n", "is no policy type"),
                       (", nobody, *, consume\n", "is no policy type"),
                       ("p, alice), *, consume\n", "cannot parse")):
        pki.acl_policy.write_text(good + '# a comment, with "a quote\n\n' + typo)
        with pytest.raises(AclError, match=f"policy.csv:{good.count(chr(10)) + 3}: .*{says}"):
            acl.reload(pki.acl_model, pki.acl_policy)
    # Old Mac line ends: one line to casbin (which splits on LF only), so one bad rule.
    pki.acl_policy.write_bytes(b"p, root, *, produce\rp, nobody, *, produce\r")
    with pytest.raises(AclError, match=r"policy\.csv:1: .*takes 3 non-empty fields"):
        acl.reload(pki.acl_model, pki.acl_policy)
    # Brackets hold commas for casbin, so a field may have them; Windows line ends are fine.
    pki.acl_policy.write_bytes(good.replace("\n", "\r\n").encode()
                               + b"p, nobody, f(a,b), produce\r\n")
    Authorizer(pki.acl_model, pki.acl_policy)
    pki.acl_policy.write_text(good)
    with pytest.raises(AclError, match="no such file"):
        acl.reload(pki.acl_model, pki.directory / "gone.csv")
    with pytest.raises(AclError):
        pki.acl_model.write_text("garbage\n")
        acl.reload(pki.acl_model, pki.acl_policy)
    assert acl.allowed("nobody", "produce") and acl.allowed("root", "consume")
    assert not acl.allowed("nobody", "consume")


async def test_a_reloaded_peer_context_dials_with_the_renewed_certificate(
    pki: PkiFiles,
) -> None:
    """Raft dials peers with the peer certificate: after a reload, new connections show the
    renewed one to the server they reach."""
    shown: list[int] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        shown.append(x509.load_der_x509_certificate(der).serial_number)
        writer.close()

    server = await asyncio.start_server(
        record, "127.0.0.1", 0, ssl=server_context(pki.peer_cert, pki.peer_key, pki.ca_cert))
    port = server.sockets[0].getsockname()[1]
    dialer = client_context(pki.peer_cert, pki.peer_key, pki.ca_cert)
    try:
        for step in ("before", "after"):
            if step == "after":
                renew_node_certificates(pki.directory)
                dialer.use(dialer.renewed(
                    TlsFiles.read(pki.peer_cert, pki.peer_key, pki.ca_cert, client_auth=True)))
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=dialer,
                                                      server_hostname="127.0.0.1")
            for _ in range(500):  # the server side's handshake ends on its own schedule
                if len(shown) == (1 if step == "before" else 2):
                    break
                await asyncio.sleep(0.01)
            writer.close()
            assert shown[-1] == serial(pki.peer_cert)
    finally:
        server.close()
    assert len(set(shown)) == 2


def test_a_secret_written_over_a_crash_leftover_gets_its_own_mode_and_no_symlink(
    tmp_path: Path,
) -> None:
    """`dcl certs` writes through replace_atomically: a temporary file a crash left behind
    (world-readable) must not lend its mode to a key, and one that is a symlink must not
    redirect it."""
    from dcl.storage.files import TMP_SUFFIX, replace_atomically

    key = tmp_path / "server-key.pem"
    leftover = key.with_name(key.name + TMP_SUFFIX)
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    replace_atomically(key, [b"secret"], mode=0o600)
    assert key.read_bytes() == b"secret"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    elsewhere = tmp_path / "elsewhere"
    leftover.symlink_to(elsewhere)
    with pytest.raises(OSError):
        replace_atomically(key, [b"new secret"], mode=0o600)
    assert not elsewhere.exists() and key.read_bytes() == b"secret"


@pytest.mark.parametrize("damaged", ["server.pem", "ca.pem", "ca-key.pem"])
def test_a_renewal_over_damaged_files_names_the_file_and_writes_nothing(
    pki: PkiFiles, damaged: str
) -> None:
    (pki.directory / damaged).write_text("garbage\n")
    before = {f: f.read_bytes() for f in (pki.server_key, pki.peer_cert, pki.peer_key)}
    with pytest.raises(ValueError, match=f"{damaged}: not what dcl certs init wrote"):
        renew_node_certificates(pki.directory)
    assert {f: f.read_bytes() for f in before} == before


def test_issued_by_any_matches_only_the_ca_that_signed_a_certificate_itself(
    pki: PkiFiles, tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    other = generate_pki(tmp_path / "other")
    ours, theirs = ca_certificates(pki.ca_cert.read_bytes()), ca_certificates(
        other.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(pki.root_client_cert.read_bytes())
    der = leaf.public_bytes(Encoding.DER)
    assert issued_by_any(der, ours) and issued_by_any(der, ours | theirs)
    assert not issued_by_any(der, theirs) and not issued_by_any(der, ())
    assert not issued_by_any(b"not a certificate", ours)
    # A CA certificate issues nothing to itself through this check's eyes but its own.
    assert issued_by_any(next(iter(ours)), ours) and not issued_by_any(next(iter(ours)), theirs)
    with pytest.raises(CertificateError):
        ca_certificates(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
