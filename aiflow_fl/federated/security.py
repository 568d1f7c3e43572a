"""Credentials of a secure deployment: TLS certificates and SuperNode authentication key pairs.

Flower 1.41's two mechanisms, both used by ``aiflow deploy`` unless ``--insecure``:

* **TLS** (encrypted links, the SuperLink proven by its certificate): ``flower-superlink
  --ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY``; every client (``flower-supernode
  --root-certificates CA``, the ``flwr`` CLI's ``root-certificates`` connection key) verifies the
  SuperLink's certificate against the CA. :func:`make_tls` generates a throw-away CA and a server
  certificate for the run (subject alternative names ``127.0.0.1``, ``::1``, ``localhost``) with the
  ``cryptography`` package; users may give their own three files instead.
* **SuperNode authentication** (only known nodes join): ``flower-superlink --enable-supernode-auth``;
  each SuperNode has its own elliptic-curve key pair (NIST P-384, OpenSSH encoding, as Flower
  loads it) and starts with ``--auth-supernode-private-key``; the SuperLink accepts a node only if
  its public key was registered through the Control API (``flwr supernode register PUBLIC_KEY
  CONNECTION``). A node signs its requests with its private key; an unregistered key is refused.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aiflow_fl.errors import AiflowError


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the SuperLink's TLS: the CA clients trust, the server certificate and its key."""

    ca_cert: Path
    cert: Path
    key: Path

    def check(self) -> "TlsFiles":
        """Refuse missing or unreadable files (user-given paths) before any process starts."""
        for name, path in (("--ssl-ca-certfile", self.ca_cert), ("--ssl-certfile", self.cert), ("--ssl-keyfile", self.key)):
            if not path.is_file():
                raise AiflowError(f"{name} {path} is not a file; give all three TLS files, or none to generate them.")
        try:
            x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            x509.load_pem_x509_certificate(self.cert.read_bytes())
        except ValueError as exc:
            raise AiflowError(f"A TLS certificate is not PEM-encoded X.509 ({self.ca_cert} / {self.cert}): {exc}") from None
        return self


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH-encoded EC P-384)."""

    private: Path
    public: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"), days: int = 7) -> TlsFiles:
    """A self-signed CA and a server certificate it signs, valid for ``hosts`` (IPs or DNS names)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiflow-fl deployment CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return files


def make_node_key(folder: Path, name: str) -> NodeKey:
    """One SuperNode's key pair: ``name`` (private, 0600) and ``name.pub`` (to register)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKey(folder / name, folder / f"{name}.pub")
    _write_private(pair.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    pair.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return pair
