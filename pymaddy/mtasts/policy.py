"""RFC 8461 §3.1 TXT records and §3.2 policy files, and §4.1 MX matching."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["MAX_AGE_LIMIT", "MODES", "NoPolicy", "Policy", "PolicyError", "match_mx", "parse_policy", "parse_txt"]

MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: max_age is at most one year
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_MX = re.compile(r"^(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")


class PolicyError(ValueError):
    """A malformed TXT record or policy file."""


class NoPolicy(Exception):
    """The domain publishes no (usable) MTA-STS policy."""


@dataclass(frozen=True)
class Policy:
    mode: str
    max_age: int
    mx: tuple[str, ...] = field(default_factory=tuple)

    def match(self, mx: str) -> bool:
        return any(match_mx(pattern, mx) for pattern in self.mx)

    def to_text(self) -> str:
        """The policy in its own file format (what the fs cache stores)."""
        lines = ["version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx), f"max_age: {self.max_age}"]
        return "\r\n".join(lines) + "\r\n"


def parse_txt(records: list[str]) -> str:
    """The policy id of the one `v=STSv1` record among a domain's TXT records (RFC 8461 §3.1).

    Records not starting with `v=STSv1` are ignored; none or several → NoPolicy."""
    sts = [r for r in records if re.match(r"^v=STSv1\s*(;|$)", r)]
    if not sts:
        raise NoPolicy("no MTA-STS TXT record")
    if len(sts) > 1:
        raise NoPolicy("multiple MTA-STS TXT records")
    fields: dict[str, str] = {}
    for raw in sts[0].split(";"):
        part = raw.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise PolicyError(f"malformed MTA-STS TXT field {part!r}")
        fields.setdefault(key, value)
    ident = fields.get("id", "")
    if not _ID.match(ident):
        raise PolicyError("MTA-STS TXT record without a valid id")
    return ident


def parse_policy(text: str) -> Policy:
    """Parse a policy file (RFC 8461 §3.2): `key: value` lines, CRLF or LF; unknown keys ignored."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip(" \t")
        if not line:
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not colon or not _KEY.match(key):
            raise PolicyError(f"malformed policy line {line[:60]!r}")
        if key == "mx":
            if not _MX.match(value):
                raise PolicyError(f"invalid mx pattern {value!r}")
            mx.append(value.lower().rstrip("."))
        else:
            values.setdefault(key, value)  # RFC 8461 §3.2: only the first occurrence counts
    if values.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    mode = values.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"invalid policy mode {mode!r}")
    age = values.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError("missing or invalid max_age")
    max_age = min(int(age), MAX_AGE_LIMIT)
    if mode != "none" and not mx:
        raise PolicyError("policy without mx patterns")
    return Policy(mode, max_age, tuple(mx))


def match_mx(pattern: str, mx: str) -> bool:
    """RFC 8461 §4.1: exact match, or `*.` matching exactly one leftmost label; case-insensitive."""
    pattern = pattern.lower().rstrip(".")
    mx = mx.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = mx.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == mx
