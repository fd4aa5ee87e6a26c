"""Email address handling: split, validate, normalize for lookups (maddy's framework/address).

RFC 5321 §4.1.2 mailbox syntax, with SMTPUTF8 (RFC 6531) local parts and IDN domains.
"""

from __future__ import annotations

import re
import unicodedata

# Dot-atom characters of RFC 5322 §3.2.3, plus any non-ASCII (RFC 6532 §3.2).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_ATEXT = re.compile(rf"^{_ATOM}(\.{_ATOM})*$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class AddressError(ValueError):
    pass


def split(addr: str) -> tuple[str, str]:
    """(local part, domain). `postmaster` without a domain is allowed (RFC 5321 §4.1.1.3)."""
    if addr.lower() == "postmaster":
        return addr, ""
    at = addr.rfind("@")
    if at <= 0 or at == len(addr) - 1:
        raise AddressError(f"malformed address: {addr!r}")
    return addr[:at], addr[at + 1 :]


def unquote_local(local: str) -> str:
    """`"john doe"` → `john doe` (quoted-string local parts, RFC 5321 §4.1.2)."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def quote_local(local: str) -> str:
    if _ATEXT.match(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def valid_domain(domain: str) -> bool:
    d = domain.rstrip(".")
    if not d or len(d) > 253:
        return False
    if d.startswith("[") and d.endswith("]"):
        return True  # address literal; callers decide whether to accept it
    try:
        ascii_d = d.encode("idna").decode("ascii") if not d.isascii() else d
    except UnicodeError:
        return False
    return all(_LABEL.match(label) for label in ascii_d.split("."))


def valid(addr: str) -> bool:
    try:
        local, domain = split(addr)
    except AddressError:
        return False
    if domain == "":
        return True
    if len(local) > 64 * 4:
        return False
    local_ok = bool(_ATEXT.match(local)) or (local.startswith('"') and local.endswith('"') and len(local) >= 2)
    return local_ok and valid_domain(domain)


def domain_for_lookup(domain: str) -> str:
    """Lower-case U-label form without trailing dot (maddy's dns.ForLookup)."""
    d = unicodedata.normalize("NFC", domain.rstrip(".")).lower()
    if "xn--" in d:
        try:
            d = d.encode("ascii").decode("idna").lower()
        except UnicodeError as e:
            raise AddressError(f"invalid domain {domain!r}: {e}") from None
    return d


def for_lookup(addr: str) -> str:
    """The key under which tables look an address up: NFC, case-folded local part, U-label domain."""
    local, domain = split(addr)
    local = unicodedata.normalize("NFC", unquote_local(local)).casefold()
    if not domain:
        return local
    return local + "@" + domain_for_lookup(domain)


def to_ascii_domain(domain: str) -> str:
    """A-label form, for peers without SMTPUTF8."""
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise AddressError(f"invalid domain {domain!r}: {e}") from None


def is_ascii(addr: str) -> bool:
    return addr.isascii()
