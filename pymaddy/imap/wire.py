"""Encoders for IMAP response strings (RFC 3501 §4.3, §9 `astring`, `nstring`).

Every string the server sends goes through one of these, so quoting rules live
in one place: an atom when the grammar allows it, a quoted string when the
value is short 7-bit text without CR/LF/NUL, a literal otherwise.
"""

from __future__ import annotations

# RFC 3501 §9: atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials / resp-specials
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
_QUOTED_MAX = 1024


def _to_bytes(s: str | bytes) -> bytes:
    return s.encode("utf-8") if isinstance(s, str) else s


def is_atom(b: bytes) -> bool:
    return bool(b) and all(0x20 < c < 0x7F and c not in _ATOM_SPECIALS for c in b)


def can_quote(b: bytes) -> bool:
    # 8-bit text goes as a literal: quoted strings are 7-bit (RFC 3501 §4.3) unless UTF8=ACCEPT.
    return len(b) <= _QUOTED_MAX and all(0 < c < 0x80 and c not in (0x0A, 0x0D) for c in b)


def literal(s: str | bytes) -> bytes:
    b = _to_bytes(s)
    return b"{%d}\r\n" % len(b) + b


def quoted(s: str | bytes) -> bytes:
    """A quoted string if possible, else a literal."""
    b = _to_bytes(s)
    if not can_quote(b):
        return literal(b)
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def string(s: str | bytes) -> bytes:
    return quoted(s)


def nstring(s: str | bytes | None) -> bytes:
    return b"NIL" if s is None else quoted(s)


def astring(s: str | bytes) -> bytes:
    b = _to_bytes(s)
    return b if is_atom(b) and b.upper() != b"NIL" else quoted(b)


def plist(items: list[bytes]) -> bytes:
    """A parenthesized list of already-encoded items."""
    return b"(" + b" ".join(items) + b")"
