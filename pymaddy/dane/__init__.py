"""DANE for SMTP (RFC 7672) over TLSA records (RFC 6698): match a peer's certificate chain.

A protocol library: the caller looks the records up (and decides whether the
answer was DNSSEC-authenticated), hands over the chain the server presented
(DER, leaf first) and maps the verdict to its own errors. Chain verification
for DANE-TA uses `cryptography`'s X.509 verifier; it is CPU work, so async
callers run `verify` in a thread.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

__all__ = ["TLSA", "Verdict", "record_matches", "usable", "verify"]

TLSA = tuple[int, int, int, bytes]  # usage, selector, matching type, association data

# RFC 7672 §3.1: SMTP uses only DANE-TA(2) and DANE-EE(3); PKIX-TA/EE (0, 1) are unusable.
DANE_TA, DANE_EE = 2, 3


class Verdict(enum.Enum):
    NO_USABLE_RECORDS = "none"  # no effect on the connection (RFC 7672 §2.2: treat as no TLSA)
    AUTHENTICATED = "authenticated"  # a record matched: the peer is authenticated
    NO_MATCH = "no-match"  # usable records exist, none matched: do not deliver (RFC 7672 §2.2)


def usable(records: Sequence[TLSA]) -> list[TLSA]:
    """RFC 7672 §3.1, RFC 6698 §2.1: usages 2/3, selectors 0/1, matching types 0/1/2."""
    return [r for r in records if r[0] in (DANE_TA, DANE_EE) and r[1] in (0, 1) and r[2] in (0, 1, 2)]


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:  # RFC 6698 §2.1.2: full certificate
        return der
    return cert.public_key().public_bytes(  # 1: SubjectPublicKeyInfo
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:  # RFC 6698 §2.1.3
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: TLSA, der: bytes) -> bool:
    """Does one TLSA record's association data match this DER certificate?"""
    _, selector, mtype, data = record
    try:
        cert = x509.load_der_x509_certificate(der)
        return _digest(_selected(cert, der, selector), mtype) == data
    except ValueError:
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify(
    records: Sequence[TLSA], chain: Sequence[bytes], server_name: str, now: datetime.datetime | None = None
) -> Verdict:
    """RFC 7672 §3: DANE-EE matches the leaf only (no name or expiry checks, §3.1.1); DANE-TA
    makes a matching CA certificate of the presented chain a trust anchor and validates the leaf
    up to it with the MX host name as reference identifier (§3.1.2, §3.2.2)."""
    recs = usable(records)
    if not recs:
        return Verdict.NO_USABLE_RECORDS
    if not chain:
        return Verdict.NO_MATCH
    ee = [r for r in recs if r[0] == DANE_EE]
    ta = [r for r in recs if r[0] == DANE_TA]
    if any(record_matches(r, chain[0]) for r in ee):
        return Verdict.AUTHENTICATED
    if not ta:
        return Verdict.NO_MATCH
    try:
        certs = [x509.load_der_x509_certificate(d) for d in chain]
    except ValueError:
        return Verdict.NO_MATCH
    roots: list[x509.Certificate] = []
    inter: list[x509.Certificate] = []
    for cert, der in zip(certs, chain, strict=True):
        if _is_ca(cert) and any(record_matches(r, der) for r in ta):
            roots.append(cert)
        else:
            inter.append(cert)
    if not roots:
        return Verdict.NO_MATCH
    builder = verification.PolicyBuilder().store(verification.Store(roots))
    builder = builder.time(now or datetime.datetime.now(datetime.UTC))
    try:
        verifier = builder.build_server_verifier(x509.DNSName(server_name.rstrip(".")))
        verifier.verify(certs[0], inter[1:] if inter and inter[0] is certs[0] else inter)
    except (verification.VerificationError, ValueError):
        return Verdict.NO_MATCH
    return Verdict.AUTHENTICATED
