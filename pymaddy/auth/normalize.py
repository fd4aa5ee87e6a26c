"""Username and address normalizers (maddy's authz.NormalizeFuncs, spec §C).

| name                    | result                                                            |
|-------------------------|-------------------------------------------------------------------|
| `auto`                  | `precis_casefold_email` for a valid address, else `precis_casefold` |
| `precis_casefold_email` | PRECIS UsernameCaseMapped on the local part, domain as for lookups |
| `precis_casefold`       | PRECIS UsernameCaseMapped on the whole string                      |
| `precis_email`          | PRECIS UsernameCasePreserved on the local part, domain as for lookups |
| `precis`                | PRECIS UsernameCasePreserved on the whole string                   |
| `casefold`              | lower-case                                                         |
| `noop`                  | unchanged                                                          |

PRECIS (RFC 8265) comes from `precis-i18n`: width mapping, case mapping (the
CaseMapped profile), NFC, and rejection of spaces, controls and other
disallowed code points. "Domain as for lookups" is maddy's dns.ForLookup:
A-labels to U-labels, NFC, lower-case, no trailing dot.

Every function raises `NormalizeError` (a ValueError) for input it refuses.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

import precis_i18n

from pymaddy.tables.schema import valid_domain as _maddy_valid_domain


class NormalizeError(ValueError):
    pass


_CASE_MAPPED = precis_i18n.get_profile("UsernameCaseMapped")
_CASE_PRESERVED = precis_i18n.get_profile("UsernameCasePreserved")

_VALID_GRAPHIC = frozenset("!#$%&'*+-/=?^_`{|}~.")


def _enforce(profile: Any, s: str) -> str:
    try:
        out: str = profile.enforce(s)
    except UnicodeError as e:
        raise NormalizeError(f"precis: {e.reason if isinstance(e, UnicodeEncodeError) else e}") from None
    return out


def precis_casefold(s: str) -> str:
    """PRECIS UsernameCaseMapped (maddy's key for pass_table and credentials)."""
    return _enforce(_CASE_MAPPED, s)


def precis(s: str) -> str:
    """PRECIS UsernameCasePreserved."""
    return _enforce(_CASE_PRESERVED, s)


def casefold(s: str) -> str:
    return s.lower()


def noop(s: str) -> str:
    return s


def split(addr: str) -> tuple[str, str]:
    """maddy's address.Split: last `@`; `postmaster` alone has an empty domain."""
    if addr.lower() == "postmaster":
        return addr, ""
    at = addr.rfind("@")
    if at == -1:
        raise NormalizeError("address: missing at-sign")
    local, domain = addr[:at], addr[at + 1 :]
    if not local:
        raise NormalizeError("address: empty local-part")
    if not domain:
        raise NormalizeError("address: empty domain")
    return local, domain


def domain_for_lookup(domain: str) -> str:
    """maddy's dns.ForLookup: U-labels, NFC, lower-case, without the trailing dot."""
    labels = []
    for label in domain.split("."):
        if label[:4].lower() != "xn--":
            labels.append(label)
            continue
        try:
            labels.append(label[4:].encode("ascii").decode("punycode"))
        except UnicodeError as e:
            raise NormalizeError(f"idna: invalid label {label!r}: {e}") from None
    out = unicodedata.normalize("NFC", ".".join(labels)).lower()
    return out.removesuffix(".")


def _unquote_ok(local: str) -> bool:
    # maddy's UnquoteMbox, reduced to "is it well-formed and free of controls".
    quoted = escaped = terminated = False
    n = 0
    for ch in local:
        if terminated:
            return False
        if ch == '"' and not escaped:
            quoted = not quoted
            if not quoted:
                terminated = True
            continue
        if ch == "\\" and not escaped:
            if not quoted:
                return False
            escaped = True
            continue
        if ch == "@" and not quoted:
            return False
        escaped = False
        if ch < " " or ch == "\x7f":
            return False
        n += 1
    return n > 0


def valid_mailbox_name(local: str) -> bool:
    if local.startswith('"'):
        return _unquote_ok(local)
    return all(c in _VALID_GRAPHIC or (c.isascii() and c.isalnum()) or ord(c) > 0x7F for c in local)


def valid_address(addr: str) -> bool:
    """maddy's address.Valid."""
    if len(addr.encode("utf-8")) > 320:
        return False
    try:
        local, domain = split(addr)
    except NormalizeError:
        return False
    if domain == "":
        return True
    return valid_mailbox_name(local) and _maddy_valid_domain(domain)


def _precis_email(addr: str, fn: Callable[[str], str]) -> str:
    try:
        local, domain = split(addr)
    except NormalizeError as e:
        raise NormalizeError(f"address: precis: {e}") from None
    try:
        local = fn(local)
    except NormalizeError as e:
        raise NormalizeError(f"address: precis: {e}") from None
    return local + "@" + domain_for_lookup(domain)


def precis_casefold_email(addr: str) -> str:
    return _precis_email(addr, precis_casefold)


def precis_email(addr: str) -> str:
    return _precis_email(addr, precis)


def auto(s: str) -> str:
    if valid_address(s):
        return precis_casefold_email(s)
    return precis_casefold(s)


NormalizeFunc = Callable[[str], str]

NORMALIZERS: dict[str, NormalizeFunc] = {
    "auto": auto,
    "precis_casefold_email": precis_casefold_email,
    "precis_casefold": precis_casefold,
    "precis_email": precis_email,
    "precis": precis,
    "casefold": casefold,
    "noop": noop,
}


def get(name: str) -> NormalizeFunc:
    """The normalizer called `name` (the config's auth_map_normalize / *_normalize values)."""
    try:
        return NORMALIZERS[name]
    except KeyError:
        raise NormalizeError(f"unknown normalization function: {name}") from None


__all__ = [
    "NORMALIZERS",
    "NormalizeError",
    "NormalizeFunc",
    "auto",
    "casefold",
    "domain_for_lookup",
    "get",
    "noop",
    "precis",
    "precis_casefold",
    "precis_casefold_email",
    "precis_email",
    "split",
    "valid_address",
]
