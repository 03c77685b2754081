"""The node's identity: a persistent key, a self-signed certificate, a node id.

The node id is derived from the public key (base32 of the SHA-256 of the
SubjectPublicKeyInfo, 26 characters), so it cannot be claimed without the key
and stays the same across restarts.  The certificate names the node id as its
subjectAltName DNS name, so a peer checks "this certificate is node X" with
service-identity, and checks "X really is this key" by recomputing the hash --
a pinned SPKI hash, as Tahoe-LAFS authenticates its storage servers.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname

from meshd.errors import StartupError
from meshd.statedir import StateDir, StateDirError

log = logging.getLogger("meshd.mesh.identity")

NODE_ID_CHARS = 26  # 130 bits of the SPKI hash
CERT_DAYS = 100 * 365  # pinned by hash, so expiry protects nothing; renewals would break pins


class IdentityError(StartupError):
    """The identity files exist but cannot be used; the message names them and the fix
    (at start: one line, and the daemon does not start rather than become another node)."""


_IDENTITY_FIX = ("restore identity/ from a backup, or remove identity/ to make "
                 "a new node id (peers then see a new node, and tokens it issued stop working)")


def _reason(e: Exception) -> str:
    """cryptography's message without its FAQ link."""
    return str(e).split(" See https://")[0].strip().rstrip(".") or type(e).__name__


def spki_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER): the pin."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def node_id_for(cert: x509.Certificate) -> str:
    """The node id a certificate's key stands for."""
    return base64.b32encode(spki_sha256(cert)).decode().lower()[:NODE_ID_CHARS]


def check_peer_certificate(
    cert: x509.Certificate | None,
    claimed_node_id: str,
    *,
    pin_spki_sha256: bytes | None = None,
) -> None:
    """Raise ValueError (with the reason) unless ``cert`` is node ``claimed_node_id``.

    Three checks: the key hashes to the claimed id; the certificate names that
    id in its subjectAltName (service-identity); and, when pinned (from an
    invite token), the key's hash is the pinned one.
    """
    if cert is None:
        raise ValueError("peer presented no certificate")
    if pin_spki_sha256 is not None and not hmac.compare_digest(spki_sha256(cert), pin_spki_sha256):
        raise ValueError(
            "peer's certificate is not the one the token pins "
            f"(expected key hash {pin_spki_sha256.hex()[:16]}..., got {spki_sha256(cert).hex()[:16]}...)"
        )
    actual = node_id_for(cert)
    if not hmac.compare_digest(actual, claimed_node_id):
        raise ValueError(f"peer claims node id {claimed_node_id} but its key is node {actual}")
    try:
        verify_certificate_hostname(cert, claimed_node_id)
    except (VerificationError, ValueError) as e:
        raise ValueError(f"peer's certificate does not name node {claimed_node_id}: {e}") from None


@dataclass(frozen=True)
class Identity:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def node_id(self) -> str:
        return node_id_for(self.cert)

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.cert)


def _make_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    public = key.public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    node_id = base64.b32encode(hashlib.sha256(der).digest()).decode().lower()[:NODE_ID_CHARS]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def create(state: StateDir) -> Identity:
    """A new key and certificate, written to the state directory (0600, atomically)."""
    state.ensure()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _make_cert(key)
    state.write_bytes(
        state.key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    state.write_bytes(state.cert_path, cert.public_bytes(serialization.Encoding.PEM))
    identity = Identity(key, cert)
    old = state.last_node_id()
    if old is not None or state.used_before():
        was = f"node {old}" if old is not None else "a node whose id is not known"
        log.warning("no identity in %s: created a new one, node %s; this state directory "
                    "belonged to %s, whose identity is gone (peers see a new node, and the "
                    "invite tokens it issued no longer work)", state.key_path.parent,
                    identity.node_id, was)
    else:
        log.info("created a new identity: node %s (%s)", identity.node_id, state.path)
    state.store_node_id(identity.node_id)
    return identity


def ephemeral() -> Identity:
    """A new key and certificate kept in memory only (a ``--client``: a fresh node id per
    run, nothing written, so it can share a machine and a state directory with a GPU node)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return Identity(key, _make_cert(key))


def load(state: StateDir) -> Identity | None:
    """The stored identity, None when there is none; IdentityError when it is unusable."""
    key_pem = state.read_bytes(state.key_path)
    cert_pem = state.read_bytes(state.cert_path)
    if key_pem is None and cert_pem is None:
        return None
    if key_pem is None or cert_pem is None:
        missing = state.key_path if key_pem is None else state.cert_path
        raise IdentityError(f"{missing} is missing; {_IDENTITY_FIX}")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"{state.key_path} is not a usable private key "
                            f"({_reason(e)}); {_IDENTITY_FIX}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise IdentityError(f"{state.cert_path} is not a PEM certificate ({_reason(e)}); "
                            f"{_IDENTITY_FIX}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{state.key_path} is not an EC key; {_IDENTITY_FIX}")
    cert_key = cert.public_key()
    if (not isinstance(cert_key, ec.EllipticCurvePublicKey)
            or key.public_key().public_numbers() != cert_key.public_numbers()):
        raise IdentityError(f"{state.cert_path} does not belong to {state.key_path} (the "
                            f"certificate is another key's); {_IDENTITY_FIX}")
    return Identity(key, cert)


def load_or_create(state: StateDir) -> Identity:
    """The node's identity, created on first start.  Stable across restarts."""
    try:
        identity = load(state)
        if identity is None:
            return create(state)
        state.store_node_id(identity.node_id)
        return identity
    except StateDirError as e:
        raise IdentityError(str(e)) from None
