"""Certificates and keys for a real federation, with the ``cryptography`` package.

* A study CA signs the coordinator's (SuperLink's) TLS certificate; every site trusts
  the CA certificate, so a site only talks to the real coordinator.
* Each site has an ECDSA P-384 key pair in OpenSSH format (Flower's SuperNode
  authentication): the coordinator registers the public key, the private key never
  leaves the site.
Private keys are written with mode 0600, atomically. No Flower import: plain Python.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medgan_core.errors import ConfigError
from medgan_core.fileio import atomic_write_bytes


@dataclass(frozen=True)
class CertificatePaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)  # created 0600 by mkstemp, renamed into place
    os.chmod(path, 0o600)
    return path


def _write_public(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MedGAN-FL study"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Always in the SuperLink's certificate: the coordinator's own commands (register, run)
#: reach the Control API over loopback, the only place it answers (``server.superlink_guard``).
LOOPBACK_SANS = ("localhost", "127.0.0.1")


def check_san(name: str) -> str:
    """A host name (RFC 1123) or an IP address for the SuperLink's certificate."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ConfigError(f"--san {name!r} is not a host name or IP address (labels of 1-63 letters, digits or '-', "
                          "253 characters at most)")
    return name


def check_site_name(name: str) -> str:
    """A site name is used as a file name: letters, digits, '.', '_', '-', no path."""
    if not _SITE_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"site name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (no '/' or '..'), "
                          "starting with a letter or digit")
    return name


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def init_certificates(out: str | Path, sans: list[str], days: int = 365, force: bool = False) -> CertificatePaths:
    """Create a study CA and the SuperLink's TLS certificate for the host names/IPs ``sans``."""
    out = Path(out)
    paths = CertificatePaths(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    if not sans:
        raise ConfigError("give at least one --san: the host name or IP address the sites will connect to")
    sans = [check_san(name) for name in sans]
    sans += [name for name in LOOPBACK_SANS if name not in sans]
    if paths.ca_key.exists() and not force:
        raise ConfigError(f"{paths.ca_key} exists; pass --force to replace the study's CA (every site must then get the new ca.crt)")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("MedGAN-FL study CA"))
        .issuer_name(_name("MedGAN-FL study CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("MedGAN-FL SuperLink"))  # names live in the SANs (a CN holds 64 characters)
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()
    _write_private(paths.ca_key, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password))
    _write_public(paths.ca_cert, ca_cert.public_bytes(pem))
    _write_private(paths.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password))
    _write_public(paths.server_cert, server_cert.public_bytes(pem))
    return paths


def site_key_pair(out: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: ``<name>`` (private, 0600) and ``<name>.pub``."""
    out = Path(out)
    check_site_name(name)
    private_path, public_path = out / name, out / f"{name}.pub"
    if private_path.exists() and not force:
        raise ConfigError(f"{private_path} exists; pass --force to replace this site's key (re-register it afterwards)")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    _write_public(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, public_path


def check_certificate(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; create it with 'medgan certs init'")
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what} {path} is not a PEM certificate ({exc})") from exc
    return path


def check_private_key(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            serialization.load_ssh_private_key(data, password=None)
        else:
            serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what} {path} is not an unencrypted private key ({exc})") from exc
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{what} {path} can be read by other users; run 'chmod 600 {path}'")
    return path


def check_public_key(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"public key {path} does not exist; the site creates it with 'medgan site keys'")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{path} is a PRIVATE key: it must never leave the site. Register the site's NAME.pub file")
    if b"CERTIFICATE" in data:
        raise ConfigError(f"{path} is a certificate, not a site's public key; register the site's NAME.pub file")
    try:
        serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not an OpenSSH public key ({exc})") from exc
    return path
