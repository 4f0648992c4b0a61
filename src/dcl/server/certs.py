"""Generate a development/test PKI and ACL for a DCL cluster.

One CA signs every certificate, so trust is "signed by our CA" and identity is the CN:
``server`` serves clients, ``peer`` is what nodes present to each other (client and server
EKUs, because a node dials its peers with the same certificate it serves with), ``root`` is a
full-rights client and ``nobody`` an authenticated client the ACL grants nothing — useful for
proving that authorization, not just authentication, is enforced.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dcl.storage.files import replace_atomically

__all__ = [
    "DEFAULT_HOSTS",
    "LOCK_NAME",
    "MODEL_CONF",
    "POLICY_CSV",
    "PkiFiles",
    "begin_ca_rotation",
    "finish_ca_rotation",
    "generate_pki",
    "issue_client_certificate",
    "one_at_a_time",
    "renew_node_certificates",
]

_T = TypeVar("_T")
_P = ParamSpec("_P")
_Dir = str | os.PathLike[str]

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

MODEL_CONF = """\
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = r.sub == p.sub && (p.obj == "*" || r.obj == p.obj) && r.act == p.act
"""

POLICY_CSV = """\
p, root, *, produce
p, root, *, consume
p, root, *, admin
p, peer, *, peer
p, peer, *, admin
p, peer, *, consume
p, peer, *, produce
"""

_CA_LIFETIME = datetime.timedelta(days=3650)
_LEAF_LIFETIME = datetime.timedelta(days=825)
# Tolerate small clock skew between the machine that issues and the one that verifies.
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class PkiFiles:
    """Paths of everything ``generate_pki`` writes, named for their role."""

    directory: Path

    def _p(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca_cert(self) -> Path:
        return self._p("ca.pem")

    @property
    def ca_key(self) -> Path:
        return self._p("ca-key.pem")

    @property
    def server_cert(self) -> Path:
        return self._p("server.pem")

    @property
    def server_key(self) -> Path:
        return self._p("server-key.pem")

    @property
    def peer_cert(self) -> Path:
        return self._p("peer.pem")

    @property
    def peer_key(self) -> Path:
        return self._p("peer-key.pem")

    @property
    def root_client_cert(self) -> Path:
        return self._p("root-client.pem")

    @property
    def root_client_key(self) -> Path:
        return self._p("root-client-key.pem")

    @property
    def nobody_client_cert(self) -> Path:
        return self._p("nobody-client.pem")

    @property
    def nobody_client_key(self) -> Path:
        return self._p("nobody-client-key.pem")

    @property
    def acl_model(self) -> Path:
        return self._p("model.conf")

    @property
    def acl_policy(self) -> Path:
        return self._p("policy.csv")

    @property
    def gossip_key(self) -> Path:
        return self._p("gossip.key")

    def all(self) -> list[Path]:
        return [
            self.ca_cert, self.ca_key, self.server_cert, self.server_key,
            self.peer_cert, self.peer_key, self.root_client_cert, self.root_client_key,
            self.nobody_client_cert, self.nobody_client_key,
            self.acl_model, self.acl_policy, self.gossip_key,
        ]


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DCL Store"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.removeprefix("[").removesuffix("]") for h in hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _issue_ca(now: datetime.datetime, common_name: str = "DCL Store CA"
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usages: Sequence[x509.ObjectIdentifier],
    hosts: Sequence[str],
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Replace path atomically: a node reloading its certificates (SIGHUP) while they are
    renewed reads the old file or the new one, never half of one; a secret is never
    readable by others, not even briefly."""
    replace_atomically(path, [data], mode=0o600 if secret else 0o644)


#: The lock file `one_at_a_time` keeps in a directory (left there: removing a lock file
#: races with the next command opening it).
LOCK_NAME = ".dcl-certs.lock"


def one_at_a_time(
    func: Callable[Concatenate[_Dir, _P], _T],
) -> Callable[Concatenate[_Dir, _P], _T]:
    """Run ``func(directory, ...)`` holding an exclusive lock on directory: two commands
    at once (two `begin_ca_rotation`, say) could otherwise leave a CA listed whose key the
    other one overwrote."""

    @functools.wraps(func)
    def locked(directory: _Dir, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            fd = os.open(Path(directory) / LOCK_NAME,
                         os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # no such directory: func says so
            return func(directory, *args, **kwargs)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return func(directory, *args, **kwargs)
        finally:
            os.close(fd)

    return locked


def generate_pki(
    directory: str | os.PathLike[str],
    hosts: Iterable[str] = (),
    *,
    force: bool = False,
) -> PkiFiles:
    """Write CA, server/peer/client certificates, ACL files and a gossip key into directory.

    ``hosts`` are added to the SANs of the server and peer certificates, after localhost and
    127.0.0.1. Refuses (FileExistsError, before writing anything) to overwrite existing files
    unless ``force``: silently replacing a CA would orphan every certificate it signed.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)  # so that it can be locked
    return _generate_pki(directory, hosts, force=force)


@one_at_a_time
def _generate_pki(directory: str | os.PathLike[str], hosts: Iterable[str], *,
                  force: bool) -> PkiFiles:
    files = PkiFiles(Path(directory))
    existing = [p for p in files.all() if p.exists()]
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise FileExistsError(f"refusing to overwrite existing files in {directory}: {names}")

    san_hosts = [*DEFAULT_HOSTS, *(h.strip() for h in hosts if h.strip())]
    now = datetime.datetime.now(datetime.UTC)
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    ca_cert, ca_key = _issue_ca(now)
    leaves = [
        (files.server_cert, files.server_key, "server", [server_auth], san_hosts),
        (files.peer_cert, files.peer_key, "peer", [server_auth, client_auth], san_hosts),
        (files.root_client_cert, files.root_client_key, "root", [client_auth], []),
        (files.nobody_client_cert, files.nobody_client_key, "nobody", [client_auth], []),
    ]
    _write(files.ca_cert, _cert_pem(ca_cert), secret=False)
    _write(files.ca_key, _key_pem(ca_key), secret=True)
    for cert_path, key_path, cn, usages, leaf_hosts in leaves:
        cert, key = _issue_leaf(ca_cert, ca_key, cn, usages, leaf_hosts, now)
        _write(cert_path, _cert_pem(cert), secret=False)
        _write(key_path, _key_pem(key), secret=True)
    _write(files.acl_model, MODEL_CONF.encode(), secret=False)
    _write(files.acl_policy, POLICY_CSV.encode(), secret=False)
    _write(files.gossip_key, (secrets.token_hex(32) + "\n").encode(), secret=True)
    return files


@one_at_a_time
def renew_node_certificates(
    directory: str | os.PathLike[str], hosts: Iterable[str] = ()
) -> list[Path]:
    """Issue new server and peer certificates and keys, signed by the CA `generate_pki` wrote
    into directory, in place of the old ones; returns the paths written.

    They name the hosts the server certificate named (so a renewal keeps every address it
    served), plus ``hosts``. Nodes pick the new files up on SIGHUP, without a restart.
    """
    files = PkiFiles(Path(directory))
    ca_cert, ca_key = _load_ca(files)
    old = _load_pem(files.server_cert, x509.load_pem_x509_certificate)
    try:
        names = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        kept = [*map(str, names.get_values_for_type(x509.DNSName)),
                *map(str, names.get_values_for_type(x509.IPAddress))]
    except x509.ExtensionNotFound:
        kept = list(DEFAULT_HOSTS)
    san_hosts = [*kept, *(h.strip() for h in hosts if h.strip())]
    now = datetime.datetime.now(datetime.UTC)
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    written: list[Path] = []
    for cert_path, key_path, cn, usages in (
        (files.server_cert, files.server_key, "server", [server_auth]),
        (files.peer_cert, files.peer_key, "peer", [server_auth, client_auth]),
    ):
        cert, key = _issue_leaf(ca_cert, ca_key, cn, usages, san_hosts, now)
        # Key first: a reload between the two renames sees the old certificate with the
        # new key, which it refuses, rather than loading a mismatched pair.
        _write(key_path, _key_pem(key), secret=True)
        _write(cert_path, _cert_pem(cert), secret=False)
        written += [cert_path, key_path]
    return written


def _load_pem(path: Path, load: Callable[[bytes], _T]) -> _T:
    """`load` applied to the file, a parse error naming the file (cryptography's does not)."""
    data = path.read_bytes()
    try:
        return load(data)
    except ValueError as exc:
        raise ValueError(f"{path}: not what dcl certs init wrote there ({exc})") from None


def _load_ca(files: PkiFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA that signs: ca-key.pem and, of the CAs ca.pem lists (two during a rotation),
    the one whose public key is that key's."""
    ca_certs = _load_pem(files.ca_cert, x509.load_pem_x509_certificates)
    ca_key = _load_pem(files.ca_key,
                       lambda d: serialization.load_pem_private_key(d, password=None))
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{files.ca_key} is not an EC private key written by dcl certs init")
    for ca_cert in ca_certs:
        if ca_cert.public_key() == ca_key.public_key():
            return ca_cert, ca_key
    raise ValueError(f"{files.ca_key} is the key of no CA that {files.ca_cert} lists")


@one_at_a_time
def begin_ca_rotation(directory: str | os.PathLike[str]) -> tuple[list[Path], str | None]:
    """First step of replacing the cluster CA (before it expires, or when its key may have
    leaked); returns the paths written and, when it replaced one, the name of a second CA
    that had no key here (a `begin` cut short between its two writes).

    A new CA: ca.pem lists the old CA and the new one, so whatever reads it (after SIGHUP,
    for nodes) trusts certificates from either while they are replaced, and ca-key.pem is
    the new CA's key, so `renew_node_certificates` and `issue_client_certificate` sign with
    it from now on. `finish_ca_rotation` takes the old CA out. One rotation at a time.
    """
    files = PkiFiles(Path(directory))
    signing, _ = _load_ca(files)  # the files are what dcl certs wrote, before any change
    listed = _load_pem(files.ca_cert, x509.load_pem_x509_certificates)
    replaced = None
    if len(listed) > 2:
        raise ValueError(f"{files.ca_cert} lists {len(listed)} CAs; dcl certs rotates a "
                         "file of one (two while rotating)")
    if len(listed) == 2:
        if signing != listed[0]:
            raise ValueError(f"{files.ca_cert} lists 2 CAs: a rotation is under way; finish "
                             "it first (dcl certs rotate-ca finish)")
        # The second CA's key was never written: it signed nothing, so it goes.
        replaced = listed.pop().subject.rfc4514_string()
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key = _issue_ca(now, f"DCL Store CA {now:%Y-%m-%dT%H:%M:%SZ}")
    # The list first: cut short before the key is written, the old CA still signs, and
    # `finish_ca_rotation` refuses (this function, run again, replaces the keyless CA).
    _write(files.ca_cert, b"".join(_cert_pem(c) for c in (*listed, ca_cert)), secret=False)
    _write(files.ca_key, _key_pem(ca_key), secret=True)
    return [files.ca_cert, files.ca_key], replaced


@one_at_a_time
def finish_ca_rotation(directory: str | os.PathLike[str]) -> list[Path]:
    """Last step of a CA rotation: ca.pem lists only the CA that signs now; returns the
    paths written. After SIGHUP, nodes refuse new connections with certificates the old CA
    signed, and close those open.

    Refuses while the server, peer or a ``*-client.pem`` certificate in directory is not
    signed by the new CA (nodes would refuse the first two at the reload and go on as they
    were; such a client would be shut out), and when `begin_ca_rotation` was cut short.
    """
    files = PkiFiles(Path(directory))
    ca_cert, _ = _load_ca(files)
    listed = _load_pem(files.ca_cert, x509.load_pem_x509_certificates)
    if len(listed) == 1:
        raise ValueError(f"{files.ca_cert} lists one CA: no rotation is under way "
                         "(dcl certs rotate-ca begin starts one)")
    if ca_cert == listed[0]:
        raise ValueError(f"{files.ca_key} is still the first CA's key: `dcl certs rotate-ca "
                         "begin` was cut short; run it again")
    stale = []
    for path in [files.server_cert, files.peer_cert,
                 *sorted(files.directory.glob("*-client.pem"))]:
        try:
            cert = _load_pem(path, x509.load_pem_x509_certificate)
            cert.verify_directly_issued_by(ca_cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            stale.append(path.name)
    if stale:
        raise ValueError(f"not signed by the new CA: {', '.join(stale)}; issue them anew "
                         "(dcl certs renew; dcl certs client DIR NAME --force) or remove "
                         "them, SIGHUP every node, then finish")
    _write(files.ca_cert, _cert_pem(ca_cert), secret=False)
    return [files.ca_cert]


_COMMON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@one_at_a_time
def issue_client_certificate(
    directory: str | os.PathLike[str], common_name: str, *, force: bool = False
) -> tuple[Path, Path]:
    """Sign a client certificate for ``common_name`` with the CA that `generate_pki` wrote
    into directory: ``<name>-client.pem`` and ``<name>-client-key.pem`` there.

    The certificate only proves the name; what it may do is what policy.csv grants that
    name (e.g. ``p, alice, *, produce``), so issuing one grants nothing by itself.
    """
    if not _COMMON_NAME.fullmatch(common_name):
        raise ValueError(
            f"invalid client name {common_name!r}: use letters, digits, '.', '_', '-' "
            "(at most 64, starting with a letter or digit)"
        )
    files = PkiFiles(Path(directory))
    cert_path = files.directory / f"{common_name}-client.pem"
    key_path = files.directory / f"{common_name}-client-key.pem"
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise FileExistsError(f"refusing to overwrite existing files in {directory}: {names}")
    ca_cert, ca_key = _load_ca(files)
    now = datetime.datetime.now(datetime.UTC)
    cert, key = _issue_leaf(
        ca_cert, ca_key, common_name, [ExtendedKeyUsageOID.CLIENT_AUTH], [], now
    )
    # Key first, as in a renewal: cut short in between, the old certificate is left with
    # a key that is not its own, which fails loudly, rather than a new one with the old key.
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, _cert_pem(cert), secret=False)
    return cert_path, key_path
