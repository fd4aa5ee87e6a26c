"""Decoded, case-folded copies of the header fields SEARCH asks about most, kept in the message row.

Why: `SEARCH FROM "alice"` otherwise decodes the From field of every message in Python on each
search (RFC 2047 words, folding), which was a third of an IMAP server process's CPU under a mixed
load. Messages never change, so their row keeps one column per field (`messages.s_from` …,
storage/sqlschema.py v5), written when the message is stored, and such a search becomes one SQL
condition.

A column holds every occurrence of the field as SEP + value.casefold(); "" when the field is
absent; NULL when not computed yet (rows older than the column). `condition()` answers exactly what
pymaddy.imap.search answers for the same key (RFC 3501 §6.4.4: case-insensitive substring of the
decoded field), or None when it cannot (the caller evaluates in Python then).
"""

from __future__ import annotations

import re
from typing import Any

from pymaddy.imap.message import decode_header

FIELDS = ("from", "to", "cc", "bcc", "subject")
COLUMNS = tuple(f"s_{f}" for f in FIELDS)
SEP = "\x1e"  # between values; never part of a needle condition() accepts

_FIELD_RES: dict[str, re.Pattern[bytes]] = {}


def _field_re(name: str) -> re.Pattern[bytes]:
    """Every occurrence of a header field with its folded continuation lines (RFC 5322 §2.2.3)."""
    rx = _FIELD_RES.get(name)
    if rx is None:
        rx = re.compile(rb"(?im)^" + re.escape(name.encode("ascii", "replace")) + rb"[ \t]*:((?:.*)(?:\r?\n[ \t].*)*)")
        if len(_FIELD_RES) < 256:
            _FIELD_RES[name] = rx
    return rx


def field_values(header: bytes, name: str) -> list[str]:
    """The decoded values of every `name` field in a raw header block, in order."""
    return [decode_header(v.strip()) for v in _field_re(name).findall(header)]


def _column(values: list[str]) -> str:
    # SQLite's string functions stop at NUL: a NUL becomes SEP, which no accepted needle contains.
    # Lone surrogates cannot be stored as UTF-8; decode_header never makes them, but be safe.
    text = "".join(SEP + v.casefold() for v in values).replace("\x00", SEP)
    return text.encode("utf-8", "replace").decode("utf-8")


def index_row(header: bytes) -> tuple[str, ...]:
    """The column values (in COLUMNS order) for a message's raw header block."""
    return tuple(_column(field_values(header, f)) for f in FIELDS)


def condition(field: str, needle: str) -> tuple[str, list[Any]] | None:
    """An SQL condition on `m` equal to searching `field` for `needle`, or None."""
    f = field.lower()
    if f not in FIELDS or SEP in needle or "\x00" in needle:
        return None
    col = f"m.s_{f}"
    if not needle:
        return f"{col} <> ''", []  # the field is present (RFC 3501 §6.4.4 HEADER with "")
    return f"instr({col}, ?) > 0", [needle.casefold()]


UNINDEXED = "m.s_subject IS NULL"  # rows written before the columns existed (all are set together)
