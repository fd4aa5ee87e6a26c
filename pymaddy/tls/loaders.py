"""TLS certificate loaders: `tls.loader.file` and `tls.loader.self_signed` (spec §B.10).

A loader owns a list of `CertPair`s (a certificate chain and its key, already
validated) and picks one per handshake by the client's SNI name
(`TLSLoader.select`). `pymaddy.tls.server.server_context` turns that into an
`ssl.SSLContext`; the loader never builds contexts itself, because one loader
may serve endpoints with different `protocols`/`ciphers` tuning.

A reload replaces the whole list at once (one attribute assignment on the
event loop thread) and bumps `TLSLoader.version`, so the server side knows its
cached per-certificate contexts are stale and the next handshake gets the new
certificate — listeners are never rebuilt.

Key material reaches OpenSSL without touching the disk where possible: Python's
`ssl` only loads certificates from files, so `load_into()` writes the PEM to an
anonymous `memfd` and hands OpenSSL its `/proc/self/fd/N` path; where memfd is
unavailable it uses a private (0600) temporary file removed right after loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pymaddy.runtime.module import Module, ModuleError, RuntimeContext

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance

__all__ = [
    "CertPair",
    "FileLoader",
    "SelfSignedLoader",
    "TLSLoader",
    "load_into",
    "parse_pair",
]

RELOAD_INTERVAL = 60.0  # maddy's time.NewTicker(time.Minute)
SELF_SIGNED_VALIDITY = dt.timedelta(days=7)
SELF_SIGNED_ORG = "Maddy Self-Signed"

_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)


@dataclass(frozen=True, eq=False)
class CertPair:
    """One certificate chain with its private key, as PEM, plus what SNI needs."""

    chain_pem: bytes  # leaf first, then intermediates
    key_pem: bytes  # unencrypted PKCS#8
    leaf: x509.Certificate
    dns_names: tuple[str, ...] = ()  # lower-case SAN DNS names (may be wildcards)
    ip_names: tuple[str, ...] = ()
    source: str = ""  # "CERT and KEY" for messages

    def matches(self, server_name: str) -> bool:
        """Go's VerifyHostname on the SANs: case-insensitive, `*.` covers exactly one label."""
        name = server_name.rstrip(".").lower()
        if not name:
            return False
        for pat in self.dns_names:
            if pat == name:
                return True
            if pat.startswith("*.") and "." in name:
                first, rest = name.split(".", 1)
                if first and rest == pat[2:]:
                    return True
        return name in self.ip_names

    def same_material(self, other: CertPair) -> bool:
        return self.chain_pem == other.chain_pem and self.key_pem == other.key_pem


def _san_names(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = tuple(n.rstrip(".").lower() for n in san.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return dns, ips


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_RE.finditer(data)]


def parse_pair(cert_data: bytes, key_data: bytes, source: str = "") -> CertPair:
    """Validate a PEM certificate chain and its key the way Go's tls.X509KeyPair does.

    The certificate file's CERTIFICATE blocks form the chain (other blocks are
    skipped); the key is the first `* PRIVATE KEY` block of the key file
    (PKCS#8, PKCS#1 RSA, SEC1 EC; Ed25519 comes as PKCS#8), so a combined
    cert+key file works for both. Raises ValueError with Go-like wording.
    """
    certs = [pem for kind, pem in _pem_blocks(cert_data) if kind == "CERTIFICATE"]
    if not certs:
        raise ValueError("tls: failed to find any PEM data in certificate input")
    try:
        chain = [x509.load_pem_x509_certificate(pem) for pem in certs]
    except ValueError as e:
        raise ValueError(f"x509: malformed certificate: {e}") from None
    keys = [pem for kind, pem in _pem_blocks(key_data) if kind == "PRIVATE KEY" or kind.endswith(" PRIVATE KEY")]
    if not keys:
        raise ValueError("tls: failed to find any PEM data in key input")
    try:
        key = serialization.load_pem_private_key(keys[0], password=None)
    except TypeError:
        raise ValueError("tls: failed to parse private key: the key is encrypted") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"tls: failed to parse private key: {e}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("tls: private key does not match public key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    dns, ips = _san_names(chain[0])
    return CertPair(chain_pem, key_pem, chain[0], dns, ips, source)


def load_into(ctx: ssl.SSLContext, pair: CertPair) -> None:
    """`ctx.load_cert_chain` from memory: memfd if possible, else a 0600 temp file removed at once."""
    blob = pair.chain_pem + pair.key_pem
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        try:
            fd = memfd("pymaddy-tls", getattr(os, "MFD_CLOEXEC", 0))
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                os.write(fd, blob)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
    fd, path = tempfile.mkstemp(prefix="pymaddy-tls-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


class TLSLoader(Module):
    """What `server_context` needs from a `tls_loader` module."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.pairs: tuple[CertPair, ...] = ()
        self.version = 0  # bumped whenever `pairs` changes

    def _install(self, pairs: Sequence[CertPair]) -> bool:
        """Swap in a new list (unless it is the same material); True if it changed."""
        new = tuple(pairs)
        if len(new) == len(self.pairs) and all(a.same_material(b) for a, b in zip(new, self.pairs, strict=True)):
            return False
        self.pairs = new
        self.version += 1
        return True

    def select(self, server_name: str | None) -> CertPair | None:
        """The first certificate whose SANs match the SNI name, else the first one (Go's order)."""
        pairs = self.pairs
        if not pairs:
            return None
        if server_name and len(pairs) > 1:
            for p in pairs:
                if p.matches(server_name):
                    return p
        return pairs[0]


class FileLoader(TLSLoader):
    """`tls.loader.file`: PEM files, re-read every minute and on `reload()`.

    A load error at start refuses to start (the message names both files); a
    failed re-read later is logged and the previous certificates stay in use.
    """

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.cert_paths: list[str] = list(self.settings.get("certs") or [])
        self.key_paths: list[str] = list(self.settings.get("keys") or [])
        self.reload_interval: float = RELOAD_INTERVAL
        self._ticker: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _read(self) -> list[CertPair]:
        """Read and validate every pair; raises ModuleError naming the files."""
        if len(self.cert_paths) != len(self.key_paths):
            raise ModuleError("tls.loader.file: mismatch in certs and keys count")
        if not self.cert_paths:
            raise ModuleError("tls.loader.file: at least one certificate required")
        out: list[CertPair] = []
        for cert_path, key_path in zip(self.cert_paths, self.key_paths, strict=True):
            where = f"{cert_path} and {key_path}"
            try:
                with open(cert_path, "rb") as f:
                    cert_data = f.read()
                with open(key_path, "rb") as f:
                    key_data = f.read()
                pair = parse_pair(cert_data, key_data, where)
                # Let OpenSSL itself accept it too (unsupported key types, security level).
                load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair)
            except OSError as e:
                reason = f"open {e.filename or cert_path}: {e.strerror or e}"
                raise ModuleError(f"tls.loader.file: failed to load {where}: {reason}") from None
            except (ValueError, ssl.SSLError) as e:
                raise ModuleError(f"tls.loader.file: failed to load {where}: {e}") from None
            out.append(pair)
        return out

    async def start(self) -> None:
        self._install(await asyncio.to_thread(self._read))
        if self.reload_interval > 0:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def reload(self) -> bool:
        """Re-read the files now; on failure log it and keep the current certificates."""
        async with self._lock:
            try:
                pairs = await asyncio.to_thread(self._read)
            except ModuleError as e:
                self.log.error("reload failed", err=str(e).removeprefix("tls.loader.file: "))
                return False
            if self._install(pairs):
                self.log.debug("certificates reloaded", version=self.version)
            return True

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.log.debug("reloading certs")
            await self.reload()

    async def stop(self) -> None:
        task, self._ticker = self._ticker, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def make_self_signed(names: Sequence[str], now: dt.datetime | None = None) -> CertPair:
    """maddy's self-signed certificate: ECDSA P-256, 7 days, O=Maddy Self-Signed, names as SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = now or dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, SELF_SIGNED_ORG)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, SELF_SIGNED_ORG)]))
        .public_key(key.public_key())
        .serial_number(secrets.randbits(128) or 1)
        .not_valid_before(start)
        .not_valid_after(start + SELF_SIGNED_VALIDITY)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    dns, ips = _san_names(cert)
    return CertPair(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, dns, ips, "self-signed")


def _write_shared(path: str, pair: CertPair) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.key_pem + pair.chain_pem)
    os.replace(tmp, path)


def _read_shared(path: str) -> CertPair:
    with open(path, "rb") as f:
        data = f.read()
    cert = x509.load_pem_x509_certificate(data)
    key = serialization.load_pem_private_key(data, None)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    dns, ips = _san_names(cert)
    return CertPair(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, dns, ips, "self-signed")


class SelfSignedLoader(TLSLoader):
    """`tls.loader.self_signed`: a fresh in-memory certificate at every start.

    Names: the inline arguments (DNS names or IP addresses). pymaddy difference:
    without any, the certificate names the global `hostname` (or `localhost`),
    where maddy makes one with no names at all.
    """

    def names(self) -> list[str]:
        names = list(self.settings.get("names") or [])
        if not names:
            host = self.ctx.globals.get("hostname")
            names = [str(host) if host else "localhost"]
        return names

    _shared: str | None = None  # the file this (supervisor) loader wrote for the workers

    def _shared_path(self) -> str:
        """Where the supervisor leaves the certificate for its worker processes: they must
        present the same one (a client that pinned it would see another from each process)."""
        digest = hashlib.sha1("\0".join([str(self.ctx.generation), *self.names()]).encode()).hexdigest()
        return os.path.join(self.ctx.runtime_dir, f"self-signed-{digest}.pem")

    async def start(self) -> None:
        shared = self._shared_path() if self.ctx.processes > 1 and self.ctx.runtime_dir else None
        if shared is not None and self.ctx.worker:
            try:
                pair = await asyncio.to_thread(_read_shared, shared)
            except (OSError, ValueError) as e:
                self.log.error("cannot read the supervisor's self-signed certificate, making one", err=e)
            else:
                self._install([pair])
                return
        try:
            pair = await asyncio.to_thread(make_self_signed, self.names())
        except ValueError as e:  # e.g. a name cryptography refuses
            raise ModuleError(f"tls.loader.self_signed: {e}") from None
        if shared is not None and not self.ctx.worker:
            try:
                await asyncio.to_thread(_write_shared, shared, pair)
                self._shared = shared
            except OSError as e:
                self.log.error("cannot share the self-signed certificate with the worker processes", err=e)
        self._install([pair])

    async def stop(self) -> None:
        path, self._shared = self._shared, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        await super().stop()
