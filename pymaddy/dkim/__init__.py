"""DKIM (RFC 6376, RFC 8463) as maddy does it: key files, signing, verification.

A library package: it never imports server configuration, so the modifier
(`pymaddy.modify.dkim`), the check (`pymaddy.checks.dkim`) and the `pymaddy dns`
command share one implementation.
"""

from pymaddy.dkim.core import (
    DKIMError,
    SignOptions,
    TXTLookup,
    Verification,
    sign,
    signature_tags,
    verify,
)
from pymaddy.dkim.keys import (
    DKIMKeyError,
    SigningKey,
    dns_path_for,
    dns_record,
    generate_key,
    load_key,
    load_or_generate,
)

__all__ = [
    "DKIMError",
    "DKIMKeyError",
    "SignOptions",
    "SigningKey",
    "TXTLookup",
    "Verification",
    "dns_path_for",
    "dns_record",
    "generate_key",
    "load_key",
    "load_or_generate",
    "sign",
    "signature_tags",
    "verify",
]
