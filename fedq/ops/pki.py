"""A federation's certificates: the hub's CA, Redis's server certificate and one client
certificate per site (``fedq k8s hub-secrets``).

Redis on the hub serves TLS only and asks every connection for a certificate signed by the
hub's CA (``--tls-auth-clients yes``); its ACL then says what the connection's user may do. A
site gets its own key and certificate (common name: the site's id), so a stolen bundle is one
site's, and a site is cut off by leaving it out of the ACL file. Keys are EC P-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedq.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CERT, KEY = "tls.crt", "tls.key"
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM bytes."""

    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def make_ca(common_name: str = "fedq-hub-ca", days: int = DEFAULT_DAYS) -> Issued:
    """A self-signed CA that signs certificates and nothing else."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def issue(ca: Issued, common_name: str, hosts: Sequence[str] = (), server: bool = False,
          days: int = DEFAULT_DAYS) -> Issued:
    """A certificate signed by ca: for TLS clients, and with server=True also for a server
    answering to hosts (DNS names or IP addresses)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA's key is not an EC key (fedq makes its CA with fedq k8s hub-secrets)")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH, *([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])]
    builder = (_builder(common_name, ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def write(directory: Path, issued: Issued, cert_name: str = CERT, key_name: str = KEY) -> None:
    """The certificate (0644) and its key (0600) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / cert_name).write_bytes(issued.cert)
    key = directory / key_name
    key.touch(mode=0o600)
    key.chmod(0o600)
    key.write_bytes(issued.key)


def load_or_make_ca(directory: Path) -> Issued:
    """The CA kept in directory (ca.crt, ca.key), made there first when it is not."""
    cert, key = directory / CA_CERT, directory / CA_KEY
    if cert.exists() and key.exists():
        return Issued(cert.read_bytes(), key.read_bytes())
    ca = make_ca()
    write(directory, ca, CA_CERT, CA_KEY)
    return ca
