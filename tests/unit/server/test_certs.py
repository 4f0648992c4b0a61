"""The generated PKI: roles, SANs, EKUs, file modes, and refusal to clobber."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner, Result

from dcl.cli.main import app
from dcl.membership.crypto import MAX_KEYS, load_keyring
from dcl.server.certs import LOCK_NAME, PkiFiles, generate_pki, renew_node_certificates

pytestmark = pytest.mark.timeout(30)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in ext.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in ext.get_values_for_type(x509.IPAddress)
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return generate_pki(tmp_path_factory.mktemp("pki"), ["node1.internal", "10.1.2.3", "[fd00::7]"])


def test_certificates_carry_their_roles(files: PkiFiles) -> None:
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    assert (cn(load(files.server_cert)), ekus(load(files.server_cert))) == ("server", {server_auth})
    peer = load(files.peer_cert)
    assert (cn(peer), ekus(peer)) == ("peer", {server_auth, client_auth})
    assert cn(load(files.root_client_cert)) == "root"
    assert cn(load(files.nobody_client_cert)) == "nobody"
    assert ekus(load(files.root_client_cert)) == {client_auth}


def test_server_and_peer_names_include_defaults_and_given_hosts(files: PkiFiles) -> None:
    # IPv6 loopback is a default, and a host given in brackets (as in an address) is an IP.
    expected = {"localhost", "127.0.0.1", "::1", "node1.internal", "10.1.2.3", "fd00::7"}
    assert sans(load(files.server_cert)) == expected
    assert sans(load(files.peer_cert)) == expected
    ext = load(files.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ipaddress.ip_address("10.1.2.3") in ext.value.get_values_for_type(x509.IPAddress)


def test_every_certificate_chains_to_the_ca(files: PkiFiles) -> None:
    ca = load(files.ca_cert)
    for path in (files.server_cert, files.peer_cert, files.root_client_cert):
        load(path).verify_directly_issued_by(ca)
    # And OpenSSL accepts the key pairs as written.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.peer_cert, files.peer_key)


def test_secrets_are_private(files: PkiFiles) -> None:
    for path in (files.ca_key, files.server_key, files.peer_key, files.root_client_key,
                 files.nobody_client_key, files.gossip_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(bytes.fromhex(files.gossip_key.read_text().strip())) == 32


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = generate_pki(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError):
        generate_pki(tmp_path)
    assert first.ca_cert.read_bytes() == ca_before
    generate_pki(tmp_path, force=True)
    assert first.ca_cert.read_bytes() != ca_before


def test_cli_init_accepts_comma_separated_and_repeated_hosts(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "certs"
    result = runner.invoke(app, ["certs", "init", str(target), "--hosts", "a.test,b.test",
                                 "--hosts", "10.9.9.9"])
    assert result.exit_code == 0, result.output
    assert {"a.test", "b.test", "10.9.9.9"} <= sans(load(target / "server.pem"))

    again = runner.invoke(app, ["certs", "init", str(target)])
    assert again.exit_code == 1
    assert runner.invoke(app, ["certs", "init", str(target), "--force"]).exit_code == 0


def test_cli_client_issues_a_client_only_certificate_chained_to_the_ca(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "certs"
    assert runner.invoke(app, ["certs", "init", str(target)]).exit_code == 0
    result = runner.invoke(app, ["certs", "client", str(target), "alice"])
    assert result.exit_code == 0, result.output
    cert = load(target / "alice-client.pem")
    assert cn(cert) == "alice"
    assert ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(load(target / "ca.pem"))
    assert stat.S_IMODE((target / "alice-client-key.pem").stat().st_mode) == 0o600

    again = runner.invoke(app, ["certs", "client", str(target), "alice"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    bad = runner.invoke(app, ["certs", "client", str(target), "a/b"])
    assert bad.exit_code == 1 and "invalid client name" in bad.output
    missing = runner.invoke(app, ["certs", "client", str(tmp_path / "nowhere"), "bob"])
    assert missing.exit_code == 1 and "error:" in missing.output


def test_cli_rotate_ca_trusts_both_while_certificates_are_reissued_then_only_the_new(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    target = tmp_path / "certs"
    pki = generate_pki(target)
    old_ca = load(pki.ca_cert)

    def listed() -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())

    not_yet = runner.invoke(app, ["certs", "rotate-ca", "finish", str(target)])
    assert not_yet.exit_code == 1 and "no rotation is under way" in not_yet.output
    begun = runner.invoke(app, ["certs", "rotate-ca", "begin", str(target)])
    assert begun.exit_code == 0, begun.output
    assert "SIGHUP every node" in begun.output
    first, new_ca = listed()
    assert first == old_ca and new_ca.subject != old_ca.subject
    assert stat.S_IMODE(pki.ca_key.stat().st_mode) == 0o600
    again = runner.invoke(app, ["certs", "rotate-ca", "begin", str(target)])
    assert again.exit_code == 1 and "a rotation is under way" in again.output

    # Certificates still from the old CA: finishing would lock them out.
    early = runner.invoke(app, ["certs", "rotate-ca", "finish", str(target)])
    assert early.exit_code == 1
    for name in ("server.pem", "peer.pem", "root-client.pem", "nobody-client.pem"):
        assert name in early.output
    assert listed() == [old_ca, new_ca]  # nothing written

    assert runner.invoke(app, ["certs", "renew", str(target)]).exit_code == 0
    for name in ("root", "nobody", "alice"):
        assert runner.invoke(app, ["certs", "client", str(target), name,
                                   "--force"]).exit_code == 0
    for path in (pki.server_cert, pki.peer_cert, pki.root_client_cert,
                 target / "alice-client.pem"):
        load(path).verify_directly_issued_by(new_ca)  # the new CA signs from `begin` on
    done = runner.invoke(app, ["certs", "rotate-ca", "finish", str(target)])
    assert done.exit_code == 0, done.output
    assert listed() == [new_ca]


def test_a_ca_key_of_no_listed_ca_is_refused_before_signing(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path / "a")
    other = generate_pki(tmp_path / "b")
    pki.ca_key.write_bytes(other.ca_key.read_bytes())
    result = CliRunner().invoke(app, ["certs", "client", str(pki.directory), "carol"])
    assert result.exit_code == 1 and "is the key of no CA" in result.output
    assert not (pki.directory / "carol-client.pem").exists()


def test_cli_gossip_key_add_use_remove_names_keys_by_fingerprint_only(tmp_path: Path) -> None:
    runner = CliRunner()
    pki = generate_pki(tmp_path / "pki")
    path = str(pki.gossip_key)

    def roles() -> list[tuple[str, str]]:
        listed = runner.invoke(app, ["certs", "gossip-key", "list", path])
        assert listed.exit_code == 0, listed.output
        return [(fp, role) for fp, role in (line.split() for line in listed.stdout.splitlines())]

    outputs: list[str] = []

    def run(*args: str) -> Result:
        result = runner.invoke(app, ["certs", "gossip-key", *args])
        outputs.append(result.output)
        return result

    ((old, role),) = roles()
    assert role == "primary"
    added = run("add", path)
    assert added.exit_code == 0, added.output
    both = load_keyring(pki.gossip_key)
    listed = roles()
    new = listed[1][0]
    assert listed == [(old, "primary"), (new, "secondary")]
    assert stat.S_IMODE(pki.gossip_key.stat().st_mode) == 0o600

    primary = run("remove", path, old)
    assert primary.exit_code == 1 and "is the primary key" in primary.output
    unknown = run("use", path, "0123456789abcdef")
    assert unknown.exit_code == 1 and "no key with fingerprint" in unknown.output
    assert run("use", path, new).exit_code == 0
    assert roles() == [(new, "primary"), (old, "secondary")]
    assert run("remove", path, old).exit_code == 0
    assert roles() == [(new, "primary")]
    # Keys are named by fingerprint only: no output ever showed one.
    shown = "".join(outputs)
    for key in both:
        assert key.hex() not in shown and key.hex()[:16] not in shown

    for _ in range(MAX_KEYS - 1):
        assert runner.invoke(app, ["certs", "gossip-key", "add", path]).exit_code == 0
    full = runner.invoke(app, ["certs", "gossip-key", "add", path])
    assert full.exit_code == 1 and f"at most {MAX_KEYS}" in full.output
    pki.gossip_key.write_text(pki.gossip_key.read_text() + "garbage\n")
    damaged = runner.invoke(app, ["certs", "gossip-key", "list", path])
    assert damaged.exit_code == 1 and f"line {MAX_KEYS + 2}" in damaged.output


def test_a_ca_rotation_begun_but_cut_short_before_the_key_is_noticed_and_redone(
    tmp_path: Path,
) -> None:
    """begin writes ca.pem, then ca-key.pem: cut short in between, the old CA still signs.
    finish must not then claim the rotation done (it would write the old CA back alone),
    and begin run again replaces the CA whose key was lost."""
    runner = CliRunner()
    pki = generate_pki(tmp_path / "pki")
    target = str(pki.directory)
    old_ca, old_key = load(pki.ca_cert), pki.ca_key.read_bytes()
    assert runner.invoke(app, ["certs", "rotate-ca", "begin", target]).exit_code == 0
    keyless = x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())[1]
    pki.ca_key.write_bytes(old_key)  # as if the key had never been written

    cut = runner.invoke(app, ["certs", "rotate-ca", "finish", target])
    assert cut.exit_code == 1 and "was cut short; run it again" in cut.output
    again = runner.invoke(app, ["certs", "rotate-ca", "begin", target])
    assert again.exit_code == 0, again.output
    assert "whose key was never written" in again.output
    first, new_ca = x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())
    assert first == old_ca and new_ca not in (old_ca, keyless)
    assert runner.invoke(app, ["certs", "renew", target]).exit_code == 0
    load(pki.server_cert).verify_directly_issued_by(new_ca)


def test_a_ca_rotation_refuses_files_it_did_not_write_and_names_a_damaged_one(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    pki = generate_pki(tmp_path / "pki")
    target = str(pki.directory)
    extra = generate_pki(tmp_path / "extra")
    listed = pki.ca_cert.read_bytes()
    pki.ca_cert.write_bytes(listed + extra.ca_cert.read_bytes() + extra.ca_cert.read_bytes())
    three = runner.invoke(app, ["certs", "rotate-ca", "begin", target])
    assert three.exit_code == 1 and "lists 3 CAs" in three.output
    pki.ca_cert.write_bytes(listed)

    assert runner.invoke(app, ["certs", "rotate-ca", "begin", target]).exit_code == 0
    assert runner.invoke(app, ["certs", "renew", target]).exit_code == 0
    for name in ("root", "nobody"):
        assert runner.invoke(app, ["certs", "client", target, name, "--force"]).exit_code == 0
    (pki.directory / "carol-client.pem").write_text("not a certificate\n")
    damaged = runner.invoke(app, ["certs", "rotate-ca", "finish", target])
    assert damaged.exit_code == 1
    assert "carol-client.pem" in damaged.output and "or remove them" in damaged.output
    (pki.directory / "carol-client.pem").unlink()
    assert runner.invoke(app, ["certs", "rotate-ca", "finish", target]).exit_code == 0


def test_dcl_certs_commands_on_one_directory_run_one_at_a_time(tmp_path: Path) -> None:
    """While one command holds the directory's lock, another waits for it instead of
    interleaving its writes (two rotations at once could orphan a CA's key)."""
    pki = generate_pki(tmp_path / "pki")
    before = pki.server_cert.read_bytes()
    fd = os.open(pki.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another command, mid-way
        done = threading.Event()

        def renew() -> None:
            renew_node_certificates(pki.directory)
            done.set()

        worker = threading.Thread(target=renew)
        worker.start()
        assert not done.wait(0.5)
        assert pki.server_cert.read_bytes() == before
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert done.wait(10)
        worker.join()
    finally:
        os.close(fd)
    assert pki.server_cert.read_bytes() != before
