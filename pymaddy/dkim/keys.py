"""DKIM private keys in the files maddy reads and writes (internal/modify/dkim/keys.go).

New keys are written the way maddy writes them so either server can use the
other's `state_dir/dkim_keys/`:

* `DOMAIN_SELECTOR.key`: one PEM `PRIVATE KEY` block (PKCS#8), mode 0600,
  created exclusively;
* `DOMAIN_SELECTOR.dns` (or `key_path + ".dns"` when key_path does not end in
  `.key`): exactly the TXT value to publish, no trailing newline —
  `v=DKIM1; k=rsa; p=<base64 DER SubjectPublicKeyInfo>` or, for Ed25519
  (RFC 8463 §4.2), `v=DKIM1; k=ed25519; p=<base64 of the 32 raw key bytes>`.

Existing keys may be PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or
`EC PRIVATE KEY`; only RSA and Ed25519 can sign, as in maddy.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

NEWKEY_ALGOS = ("rsa4096", "rsa2048", "ed25519")


class DKIMKeyError(Exception):
    """A key file cannot be read, parsed, used or written; the message names the file."""


@dataclass(frozen=True)
class SigningKey:
    """A private key that can make DKIM signatures: `algo` is the `k=`/`a=` key part."""

    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @property
    def algo(self) -> str:
        return "rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ed25519"

    @property
    def fast(self) -> bool:
        """Signing takes well under a millisecond (Ed25519, RSA up to 2048 bits)."""
        return not isinstance(self.key, rsa.RSAPrivateKey) or self.key.key_size <= 2048

    def sign(self, data: bytes) -> bytes:
        """Sign the header hash input (RFC 6376 §3.7). RSA: PKCS#1 v1.5 over SHA-256 of `data`
        (§3.3.1); Ed25519: PureEdDSA over the SHA-256 digest of `data` (RFC 8463 §3)."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self.key.sign(hashlib.sha256(data).digest())

    def pem(self) -> bytes:
        """PKCS#8 PEM, as maddy's x509.MarshalPKCS8PrivateKey + pem.Encode."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def generate_key(algo: str) -> SigningKey:
    """A fresh key for `newkey_algo` (rsa4096, rsa2048, ed25519)."""
    if algo == "rsa4096":
        return SigningKey(rsa.generate_private_key(65537, 4096))
    if algo == "rsa2048":
        return SigningKey(rsa.generate_private_key(65537, 2048))
    if algo == "ed25519":
        return SigningKey(ed25519.Ed25519PrivateKey.generate())
    raise DKIMKeyError(f"unknown key algorithm: {algo}")


def dns_record(key: SigningKey) -> str:
    """The TXT record value publishing the public half, byte for byte as maddy writes it."""
    pub = key.key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        blob = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        kind = "rsa"
    else:
        blob = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    return f"v=DKIM1; k={kind}; p={base64.b64encode(blob).decode('ascii')}"


def dns_path_for(key_path: str) -> str:
    """Where the TXT value of `key_path` goes: `.key` replaced by `.dns`, else `.dns` appended."""
    if os.path.splitext(key_path)[1] == ".key":
        return key_path[:-4] + ".dns"
    return key_path + ".dns"


def _pem_block(data: bytes) -> tuple[str, bytes] | None:
    """The type and whole text of the first PEM block, as Go's pem.Decode finds it."""
    start = data.find(b"-----BEGIN ")
    while start >= 0:
        eol = data.find(b"-----", start + 11)
        if eol < 0:
            return None
        kind = data[start + 11 : eol].decode("latin-1")
        end_marker = b"-----END " + kind.encode("latin-1") + b"-----"
        end = data.find(end_marker, eol)
        if end >= 0:
            return kind, data[start : end + len(end_marker)] + b"\n"
        start = data.find(b"-----BEGIN ", eol)
    return None


def load_key(path: str) -> SigningKey:
    """Read a key file written by maddy, pymaddy or openssl (PKCS#8 or PKCS#1 RSA, PKCS#8
    Ed25519). Raises FileNotFoundError when absent, DKIMKeyError when unusable."""
    with open(path, "rb") as f:
        data = f.read()
    block = _pem_block(data)
    if block is None:
        raise DKIMKeyError(f"modify.dkim: {path}: invalid PEM block")
    kind, pem = block
    if kind not in ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"):
        raise DKIMKeyError(f"modify.dkim: {path}: not a private key or unsupported format")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise DKIMKeyError(f"modify.dkim: {path}: {e}") from None
    if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return SigningKey(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raise DKIMKeyError(f"modify.dkim: {path}: ECDSA keys are not supported")
    raise DKIMKeyError(f"modify.dkim: {path}: unknown key type: {type(key).__name__}")


def write_new_key(key_path: str, algo: str) -> tuple[SigningKey, str]:
    """Generate a key and write the `.dns` file, then the key file (0600, exclusive) — maddy's
    order, so a crash never leaves a key without its record. Returns the key and DNS path."""
    try:
        key = generate_key(algo)
        directory = os.path.dirname(key_path)
        if directory:
            # 0777 & umask: the directory also holds the public .dns files.
            os.makedirs(directory, 0o777, exist_ok=True)
        dns_path = dns_path_for(key_path)
        with open(dns_path, "w", encoding="ascii") as f:
            f.write(dns_record(key))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as kf:
            kf.write(key.pem())
    except (OSError, DKIMKeyError) as e:
        raise DKIMKeyError(f"modify.dkim: generate {key_path}: {e}") from None
    return key, dns_path


def load_or_generate(key_path: str, algo: str) -> tuple[SigningKey, bool]:
    """The key at `key_path`, generated (with its .dns file) when the file does not exist.
    The flag tells whether it is new, so the caller can ask the admin to publish it."""
    try:
        return load_key(key_path), False
    except FileNotFoundError:
        pass
    except OSError as e:
        raise DKIMKeyError(f"modify.dkim: {key_path}: {e.strerror or e}") from None
    key, _ = write_new_key(key_path, algo)
    return key, True


__all__ = [
    "NEWKEY_ALGOS",
    "DKIMKeyError",
    "SigningKey",
    "dns_path_for",
    "dns_record",
    "generate_key",
    "load_key",
    "load_or_generate",
    "write_new_key",
]
