"""IMAP4rev1 command parser (RFC 3501 §9 grammar plus the extensions the server offers).

The session hands over one complete command as wire bytes, literals included
(`a1 LOGIN {3}\\r\\nbob {3+}\\r\\npw!\\r\\n`). `parse_command` turns it into a
`Command` whose `args` is a typed value per command, or raises `ParseError`
whose text is the BAD reply. Parsing is strict about the grammar (single spaces,
no trailing garbage) and never recurses deeper than `MAX_DEPTH`, so hostile input
gives a BAD, not a RecursionError.

Search keys are parsed into the small AST defined here (see `SearchKey`); the
evaluator lives in pymaddy.imap.search.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, TypeAlias

from pymaddy.imap.types import FetchItem, FetchRequest, Section
from pymaddy.imap.utf7 import decode_mutf7

MAX_DEPTH = 100  # nesting of search-key parentheses / NOT / OR
MAX_U32 = 0xFFFFFFFF  # RFC 3501 §9 number / nz-number
MAX_MODSEQ = 0x7FFFFFFFFFFFFFFF  # RFC 7162 §7 mod-sequence-value (63 bits)
MAX_U64 = 0xFFFFFFFFFFFFFFFF  # RFC 9208 quota limits (number64)


class ParseError(Exception):
    """A syntax error; str() is the human text of the tagged (or untagged) BAD reply."""

    def __init__(self, message: str, tag: str = "*") -> None:
        super().__init__(message)
        self.tag = tag


class BadCharset(ParseError):
    """SEARCH/SORT/THREAD named a charset we cannot decode: reply NO [BADCHARSET (UTF-8 US-ASCII)]."""


# ---------------------------------------------------------------------------
# Character classes (RFC 3501 §9)

_CTL = frozenset(range(0x00, 0x20)) | {0x7F}
# atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials / resp-specials
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | _CTL
_ATOM_CHARS = frozenset(c for c in range(0x01, 0x80) if c not in _ATOM_SPECIALS)
_ASTRING_CHARS = _ATOM_CHARS | {ord("]")}
_TAG_CHARS = _ASTRING_CHARS - {ord("+")}  # RFC 3501 §9 tag
_LIST_CHARS = _ATOM_CHARS | frozenset(b"%*]")  # list-char = ATOM-CHAR / list-wildcards / resp-specials
_DIGITS = frozenset(b"0123456789")

_SP = 0x20


# ---------------------------------------------------------------------------
# Sequence sets


@dataclass
class SeqSet:
    """A parsed sequence-set (RFC 3501 §9 `sequence-set`); None stands for `*`.

    Ranges are kept as written; `resolve` normalizes them against the mailbox.
    """

    ranges: list[tuple[int | None, int | None]] = field(default_factory=list)
    # (largest, resolve(largest)) memo for contains(); treat `ranges` as read-only after parsing.
    _resolved: tuple[int, list[tuple[int, int]]] | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def parse(text: str | bytes) -> SeqSet:
        """Parse `1:3,5,7:*`; ParseError on anything else (0 is not a sequence number)."""
        raw = text.encode("ascii", "replace") if isinstance(text, str) else text
        if not raw:
            raise ParseError("Empty sequence set")
        ranges: list[tuple[int | None, int | None]] = []
        for part in raw.split(b","):
            bounds = part.split(b":")
            if len(bounds) > 2:
                raise ParseError("Invalid sequence range")
            vals = [_seq_number(b) for b in bounds]
            ranges.append((vals[0], vals[-1]))
        return SeqSet(ranges)

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Sorted, merged, inclusive ranges with `*` = largest; values are not clipped to `largest`.

        With largest == 0 (empty mailbox) a range naming `*` refers to nothing and is dropped.
        """
        spans: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if largest < 1 and (a is None or b is None):
                continue
            lo = largest if a is None else a
            hi = largest if b is None else b
            if lo > hi:  # RFC 3501 §9 seq-range: "2:4" and "4:2" are equivalent
                lo, hi = hi, lo
            spans.append((lo, hi))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return merged

    def contains(self, n: int, largest: int) -> bool:
        """Membership test; the resolved ranges are cached per `largest` (SEARCH asks once per message)."""
        if self._resolved is None or self._resolved[0] != largest:
            self._resolved = (largest, self.resolve(largest))
        spans = self._resolved[1]
        i = bisect.bisect_right(spans, (n, MAX_U64)) - 1
        return i >= 0 and spans[i][0] <= n <= spans[i][1]

    def iter_values(self, largest: int) -> Iterator[int]:
        """Ascending values, clipped to `largest` (nothing above it exists, so `1:4294967295` stays cheap)."""
        for lo, hi in self.resolve(largest):
            yield from range(lo, min(hi, largest) + 1)

    def has_star(self) -> bool:
        return any(a is None or b is None for a, b in self.ranges)

    def __str__(self) -> str:
        def one(v: int | None) -> str:
            return "*" if v is None else str(v)

        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.ranges)


def _seq_number(b: bytes) -> int | None:
    # RFC 3501 §9: seq-number = nz-number / "*"
    if b == b"*":
        return None
    if not b or not all(c in _DIGITS for c in b) or len(b) > 10:
        raise ParseError("Invalid sequence number")
    n = int(b)
    if n == 0 or n > MAX_U32:
        raise ParseError("Sequence number out of range")
    return n


# ---------------------------------------------------------------------------
# Search key AST (RFC 3501 §6.4.4)
#
# A SEARCH criterion is one of the dataclasses below; the top level of a
# command is an `And` of its keys (or the single key). Shorthand keys are
# desugared so the evaluator stays small:
#   ANSWERED/DELETED/DRAFT/FLAGGED/SEEN/RECENT -> FlagKey("\\Answered"...)
#   UNANSWERED... / UNSEEN                     -> FlagKey(..., negate=True)
#   KEYWORD k / UNKEYWORD k                    -> FlagKey(k) / FlagKey(k, negate=True)
#   NEW -> And((FlagKey("\\Recent"), FlagKey("\\Seen", True)));  OLD -> FlagKey("\\Recent", True)
#   FROM/TO/CC/BCC/SUBJECT s                   -> HeaderKey("FROM", s) ...
#   HEADER name s                              -> HeaderKey(name.upper(), s)
#   LARGER/SMALLER n, MODSEQ n                 -> NumberKey("LARGER"|"SMALLER"|"MODSEQ", n)
#   BEFORE/ON/SINCE/SENTBEFORE/SENTON/SENTSINCE d -> DateKey(op, d)
#   BODY s / TEXT s                            -> TextKey("BODY"|"TEXT", s)
#   <sequence-set> / UID <sequence-set>        -> SeqKey(seqset, uid=False|True)


@dataclass(frozen=True)
class AllKey:
    pass


@dataclass(frozen=True)
class FlagKey:
    flag: str  # canonical system flag ("\\Seen", "\\Recent") or keyword as given
    negate: bool = False


@dataclass(frozen=True)
class NumberKey:
    op: str  # LARGER, SMALLER, MODSEQ (modseq >= n)
    n: int


@dataclass(frozen=True)
class DateKey:
    op: str  # BEFORE, ON, SINCE (INTERNALDATE) / SENTBEFORE, SENTON, SENTSINCE (Date: header)
    date: date


@dataclass(frozen=True)
class HeaderKey:
    field: str  # upper-cased field name
    value: str  # "" = the field is present


@dataclass(frozen=True)
class TextKey:
    op: str  # BODY or TEXT
    value: str


@dataclass(frozen=True)
class SeqKey:
    seqset: SeqSet
    uid: bool = False


@dataclass(frozen=True)
class Not:
    key: SearchKey


@dataclass(frozen=True)
class Or:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True)
class And:
    keys: tuple[SearchKey, ...]


SearchKey: TypeAlias = AllKey | FlagKey | NumberKey | DateKey | HeaderKey | TextKey | SeqKey | Not | Or | And


# ---------------------------------------------------------------------------
# Command argument types


@dataclass
class Command:
    tag: str
    name: str  # upper-case, without the UID prefix
    uid: bool
    args: Any


@dataclass
class Select:
    mailbox: str
    condstore: bool = False  # RFC 7162 §3.1.8 (CONDSTORE) select parameter


@dataclass
class Create:
    mailbox: str
    special_use: list[str] = field(default_factory=list)  # RFC 6154 §3 CREATE ... (USE (...))


@dataclass
class ListCmd:
    """LIST / LSUB arguments; the LIST-EXTENDED parts (RFC 5258) are upper-cased option names."""

    reference: str
    patterns: list[str]
    select_opts: list[str] = field(default_factory=list)
    return_opts: list[str] = field(default_factory=list)
    return_status: list[str] = field(default_factory=list)  # RFC 5819 RETURN (STATUS (...))

    @property
    def pattern(self) -> str:
        return self.patterns[0] if self.patterns else ""


@dataclass
class Append:
    mailbox: str
    flags: list[str]
    date: datetime | None
    message: bytes


@dataclass
class Fetch:
    seqset: SeqSet
    request: FetchRequest


@dataclass
class Store:
    seqset: SeqSet
    mode: str  # "" replace, "+" add, "-" remove
    silent: bool
    flags: list[str]
    unchangedsince: int | None = None  # RFC 7162 §3.1.3


@dataclass
class Search:
    charset: str | None
    key: SearchKey
    return_opts: list[str] | None = None  # RFC 4731 ESEARCH `RETURN (...)`, None if absent


@dataclass
class Sort:
    criteria: list[tuple[str, bool]]  # (key, reverse)
    charset: str
    key: SearchKey


@dataclass
class Thread:
    algorithm: str
    charset: str
    key: SearchKey


STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE"})
SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"})
_UID_COMMANDS = frozenset({"COPY", "MOVE", "FETCH", "SEARCH", "STORE", "EXPUNGE", "SORT", "THREAD"})
_NO_ARG_COMMANDS = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "EXPUNGE", "UNSELECT", "IDLE", "NAMESPACE"}
)
_SYSTEM_FLAGS = {f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")}
_SPECIAL_USE = {f.upper(): f for f in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")}
_MONTHS = {
    m: i
    for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), start=1)
}


# ---------------------------------------------------------------------------
# Tokenizer


class _Reader:
    """A cursor over the raw command bytes with one method per grammar token."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def at_end(self) -> bool:
        return self.data[self.pos :] in (b"", b"\r\n", b"\n")

    def end(self) -> None:
        if not self.at_end():
            raise ParseError("Unexpected extra arguments" if self.peek() == _SP else "Garbage after command")

    def sp(self) -> None:
        """Exactly one space (RFC 3501 §9: the grammar never allows more)."""
        if self.peek() != _SP:
            raise ParseError("Missing argument" if self.at_end() else "Expected a space")
        self.pos += 1
        if self.peek() == _SP:
            raise ParseError("Double space")
        if self.at_end():
            raise ParseError("Missing argument after space")

    def maybe_sp(self) -> bool:
        """Consume a space if another argument follows."""
        if self.peek() == _SP:
            self.sp()
            return True
        return False

    def expect(self, ch: bytes) -> None:
        if self.data[self.pos : self.pos + len(ch)] != ch:
            raise ParseError(f"Expected {ch.decode()!r}")
        self.pos += len(ch)

    def take(self, chars: frozenset[int]) -> bytes:
        start = self.pos
        data = self.data
        n = len(data)
        while self.pos < n and data[self.pos] in chars:
            self.pos += 1
        return data[start : self.pos]

    def atom(self, what: str = "atom") -> str:
        b = self.take(_ATOM_CHARS)
        if not b:
            raise ParseError(f"Expected {what}")
        return b.decode("ascii")

    def number(self, maximum: int = MAX_U32, nonzero: bool = False) -> int:
        b = self.take(_DIGITS)
        if not b:
            raise ParseError("Expected a number")
        if len(b) > 20 or int(b) > maximum:
            raise ParseError("Number out of range")
        n = int(b)
        if nonzero and n == 0:
            raise ParseError("Expected a non-zero number")
        return n

    def quoted(self) -> bytes:
        # RFC 3501 §9 quoted: only \" and \\ escapes, no CR/LF/NUL. 8-bit octets are
        # tolerated (clients send UTF-8 here in practice).
        self.expect(b'"')
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                raise ParseError("Unterminated quoted string")
            c = data[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(data) or data[self.pos] not in (0x22, 0x5C):
                    raise ParseError("Invalid escape in quoted string")
                out.append(data[self.pos])
                self.pos += 1
            elif c in (0x00, 0x0A, 0x0D):
                raise ParseError("Invalid character in quoted string")
            else:
                out.append(c)

    def literal(self, allow8: bool = False) -> bytes:
        # RFC 3501 §4.3 literal, RFC 7888 `{N+}`, RFC 3516 literal8 `~{N}`.
        if allow8 and self.peek() == ord("~"):
            self.pos += 1
        self.expect(b"{")
        digits = self.take(_DIGITS)
        if not digits:
            raise ParseError("Invalid literal size")
        if self.peek() == ord("+"):
            self.pos += 1
        self.expect(b"}")
        if self.data.startswith(b"\r\n", self.pos):
            self.pos += 2
        elif self.peek() == 0x0A:
            self.pos += 1
        else:
            raise ParseError("Literal size must be followed by CRLF")
        if len(digits) > 20:
            raise ParseError("Truncated literal")
        n = int(digits)
        if self.pos + n > len(self.data):
            raise ParseError("Truncated literal")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == ord("{"):
            return self.literal()
        raise ParseError("Expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, ord("{")):
            return self.string()
        b = self.take(_ASTRING_CHARS)
        if not b:
            raise ParseError("Expected a string")
        return b

    def nstring(self) -> bytes | None:
        if self.data[self.pos : self.pos + 3].upper() == b"NIL" and self.data[self.pos + 3 : self.pos + 4] in (
            b"",
            b" ",
            b")",
            b"\r",
            b"\n",
        ):
            self.pos += 3
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        # RFC 3501 §9 list-mailbox = 1*list-char / string
        c = self.peek()
        if c in (0x22, ord("{")):
            return self.string()
        b = self.take(_LIST_CHARS)
        if not b:
            raise ParseError("Expected a mailbox pattern")
        return b

    def paren_list(self, item: Any) -> list[Any]:
        """`(` [item *(SP item)] `)` with the given item reader."""
        self.expect(b"(")
        out: list[Any] = []
        if self.peek() == ord(")"):
            self.pos += 1
            return out
        while True:
            out.append(item())
            if self.peek() == ord(")"):
                self.pos += 1
                return out
            if self.peek() != _SP:
                raise ParseError("Expected ')' or a space")
            self.sp()

    def flag(self) -> str:
        # RFC 3501 §9 flag = "\" atom / keyword (system flags canonicalized; \* for PERMANENTFLAGS only)
        if self.peek() == 0x5C:
            self.pos += 1
            name = "\\" + self.atom("flag")
            return _SYSTEM_FLAGS.get(name.upper(), name)
        return self.atom("flag")


# ---------------------------------------------------------------------------
# Helpers


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError("Invalid UTF-8") from exc


def _mailbox_name(b: bytes, pattern: bool = False) -> str:
    """Decode a mailbox name (RFC 3501 §5.1.3 modified UTF-7); INBOX is case-insensitive (§5.1).

    Invalid modified UTF-7 (including raw 8-bit text) is a ParseError rather
    than being passed through, so every stored name has one canonical spelling.
    """
    text = _utf8(b)
    try:
        name = decode_mutf7(text)
    except ValueError as exc:
        raise ParseError(f"Invalid mailbox name: {exc}") from exc
    if any(c in name for c in "\x00\r\n"):
        raise ParseError("Mailbox name contains NUL, CR or LF")
    if name.upper() == "INBOX":
        return "INBOX"
    if not name and not pattern:
        raise ParseError("Empty mailbox name")
    return name


_DATE_RE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})")
_DATETIME_RE = re.compile(rb"( ?\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")


def _month(b: bytes) -> int:
    m = _MONTHS.get(b.decode("ascii").upper())
    if m is None:
        raise ParseError("Invalid month")
    return m


def _parse_date(r: _Reader) -> date:
    # RFC 3501 §9 date = date-text / DQUOTE date-text DQUOTE; date-day = 1*2DIGIT
    quoted = r.peek() == 0x22
    if quoted:
        r.pos += 1
    m = _DATE_RE.match(r.data, r.pos)
    if m is None:
        raise ParseError("Invalid date")
    r.pos = m.end()
    if quoted:
        r.expect(b'"')
    try:
        return date(int(m.group(3)), _month(m.group(2)), int(m.group(1)))
    except ValueError as exc:
        raise ParseError("Invalid date") from exc


def _parse_datetime(r: _Reader) -> datetime:
    # RFC 3501 §9 date-time = DQUOTE date-day-fixed "-" date-month "-" date-year SP time SP zone DQUOTE
    r.expect(b'"')
    m = _DATETIME_RE.match(r.data, r.pos)
    if m is None:
        raise ParseError("Invalid date-time")
    r.pos = m.end()
    r.expect(b'"')
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    try:
        offset = timedelta(hours=int(zh), minutes=int(zm))
        if offset >= timedelta(hours=24):
            raise ValueError("zone out of range")
        tz = timezone(-offset if sign == b"-" else offset)
        return datetime(int(year), _month(mon), int(day), int(hh), int(mm), int(ss), tzinfo=tz)
    except ValueError as exc:
        raise ParseError("Invalid date-time") from exc


def _seqset(r: _Reader) -> SeqSet:
    b = r.take(_DIGITS | frozenset(b"*:,"))
    if not b:
        raise ParseError("Expected a sequence set")
    return SeqSet.parse(b)


def _flag_list_or_flags(r: _Reader) -> list[str]:
    # STORE accepts `(\Seen \Draft)` or bare `\Seen \Draft` (RFC 3501 §9 store-att-flags)
    if r.peek() == ord("("):
        flags: list[str] = r.paren_list(r.flag)
        return flags
    flags = [r.flag()]
    while r.peek() == _SP:
        r.sp()
        flags.append(r.flag())
    return flags


def _check_charset(name: str) -> str:
    try:
        # LookupError for unknown names and for bytes-to-bytes codecs (base64, hex);
        # an empty input would skip the lookup, hence the sample byte.
        b"a".decode(name)
    except LookupError as exc:
        raise BadCharset(f"Unsupported charset {name}") from exc
    except ValueError:  # UnicodeError: the codec exists but dislikes the sample
        pass
    return name.upper()


def _search_string(r: _Reader, charset: str | None) -> str:
    b = r.astring()
    if charset is None:
        return b.decode("utf-8", "replace")  # 7-bit by default; be lenient with UTF-8
    try:
        return b.decode(charset)
    except ValueError as exc:  # UnicodeDecodeError and codec-specific errors
        raise ParseError(f"Search string is not valid {charset}") from exc


# ---------------------------------------------------------------------------
# SEARCH keys (RFC 3501 §6.4.4)

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", False),
    "RECENT": ("\\Recent", False),
    "OLD": ("\\Recent", True),
    "UNANSWERED": ("\\Answered", True),
    "UNDELETED": ("\\Deleted", True),
    "UNDRAFT": ("\\Draft", True),
    "UNFLAGGED": ("\\Flagged", True),
    "UNSEEN": ("\\Seen", True),
}
_HEADER_KEYS = frozenset({"FROM", "TO", "CC", "BCC", "SUBJECT"})
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
_ARG_KEYS = (
    _HEADER_KEYS
    | _DATE_KEYS
    | {"KEYWORD", "UNKEYWORD", "HEADER", "BODY", "TEXT", "LARGER", "SMALLER", "MODSEQ", "UID", "NOT", "OR"}
)
_SEARCH_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _search_key(r: _Reader, charset: str | None, depth: int) -> SearchKey:
    if depth > MAX_DEPTH:
        raise ParseError("Search key nested too deeply")
    c = r.peek()
    if c == ord("("):
        r.pos += 1
        keys = [_search_key(r, charset, depth + 1)]
        while r.peek() == _SP:
            r.sp()
            keys.append(_search_key(r, charset, depth + 1))
        r.expect(b")")
        return keys[0] if len(keys) == 1 else And(tuple(keys))
    if c in _DIGITS or c == ord("*"):
        return SeqKey(_seqset(r))
    name = r.take(_SEARCH_NAME_CHARS).decode("ascii").upper()
    if not name:
        raise ParseError("Expected a search key")
    if name == "ALL":
        return AllKey()
    if name in _FLAG_KEYS:
        flag, negate = _FLAG_KEYS[name]
        return FlagKey(flag, negate)
    if name == "NEW":
        return And((FlagKey("\\Recent"), FlagKey("\\Seen", negate=True)))
    if name not in _ARG_KEYS:
        raise ParseError(f"Unknown search key {name}")
    r.sp()
    if name in ("KEYWORD", "UNKEYWORD"):
        return FlagKey(r.atom("keyword"), negate=name == "UNKEYWORD")
    if name in _HEADER_KEYS:
        return HeaderKey(name, _search_string(r, charset))
    if name == "HEADER":
        field_name = _utf8(r.astring()).upper()
        r.sp()
        return HeaderKey(field_name, _search_string(r, charset))
    if name in ("BODY", "TEXT"):
        return TextKey(name, _search_string(r, charset))
    if name in _DATE_KEYS:
        return DateKey(name, _parse_date(r))
    if name in ("LARGER", "SMALLER"):
        return NumberKey(name, r.number())
    if name == "MODSEQ":
        # RFC 7162 §3.1.5: MODSEQ [SP entry-name SP entry-type-req] SP mod-sequence-valzer;
        # the per-flag form is accepted and treated as the message's overall modseq.
        if r.peek() == 0x22:
            r.quoted()
            r.sp()
            if r.atom("entry type").lower() not in ("priv", "shared", "all"):
                raise ParseError("Invalid MODSEQ entry type")
            r.sp()
        return NumberKey("MODSEQ", r.number(MAX_MODSEQ))
    if name == "UID":
        return SeqKey(_seqset(r), uid=True)
    if name == "NOT":
        return Not(_search_key(r, charset, depth + 1))
    if name == "OR":
        left = _search_key(r, charset, depth + 1)
        r.sp()
        return Or(left, _search_key(r, charset, depth + 1))
    raise ParseError(f"Unknown search key {name}")


def _search_keys(r: _Reader, charset: str | None) -> SearchKey:
    """1*(SP search-key) up to the end of the command; the list is an implicit AND."""
    keys: list[SearchKey] = []
    while not r.at_end():
        r.sp()
        keys.append(_search_key(r, charset, 1))
    if not keys:
        raise ParseError("Missing search criteria")
    return keys[0] if len(keys) == 1 else And(tuple(keys))


def _charset(r: _Reader) -> str:
    return _check_charset(_utf8(r.astring()))


# ---------------------------------------------------------------------------
# Per-command argument parsers. Each starts right after the command name.


def _args_search(r: _Reader) -> Search:
    # RFC 3501 §6.4.4, RFC 4731 §3: SEARCH [RETURN (opts)] [CHARSET x] keys
    return_opts: list[str] | None = None
    charset: str | None = None
    save = r.pos
    if r.maybe_sp():
        word = r.take(_SEARCH_NAME_CHARS).upper()
        if word == b"RETURN" and r.peek() == _SP:
            r.sp()
            return_opts = [s.upper() for s in r.paren_list(r.atom)]
            save = r.pos
            word = r.take(_SEARCH_NAME_CHARS).upper() if r.maybe_sp() else b""
        if word == b"CHARSET" and r.peek() == _SP:
            r.sp()
            charset = _charset(r)
        else:
            r.pos = save
    return Search(charset, _search_keys(r, charset), return_opts)


def _sort_criterion(r: _Reader) -> tuple[str, bool]:
    key = r.atom("sort key").upper()
    reverse = key == "REVERSE"
    if reverse:
        r.sp()
        key = r.atom("sort key").upper()
    if key not in SORT_KEYS:
        raise ParseError(f"Unknown sort key {key}")
    return key, reverse


def _args_sort(r: _Reader) -> Sort:
    # RFC 5256 §3: SORT sort-criteria SP search-charset 1*(SP search-key)
    r.sp()
    criteria: list[tuple[str, bool]] = r.paren_list(lambda: _sort_criterion(r))
    if not criteria:
        raise ParseError("Empty sort criteria")
    r.sp()
    charset = _charset(r)
    return Sort(criteria, charset, _search_keys(r, charset))


def _args_thread(r: _Reader) -> Thread:
    # RFC 5256 §3: THREAD thread-alg SP search-charset 1*(SP search-key)
    r.sp()
    alg = r.atom("thread algorithm").upper()
    r.sp()
    charset = _charset(r)
    return Thread(alg, charset, _search_keys(r, charset))


_FETCH_MACROS = {
    # RFC 3501 §6.4.5
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_FETCH_SIMPLE = frozenset(
    {
        "ENVELOPE",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "UID",
        "BODY",
        "BODYSTRUCTURE",
        "MODSEQ",
    }
)
_FETCH_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
_SECTION_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")


def _section(r: _Reader) -> Section:
    # RFC 3501 §9 section = "[" [section-spec] "]"
    r.expect(b"[")
    spec = r.take(_SECTION_CHARS).decode("ascii").upper()
    parts: list[int] = []
    words = spec.split(".") if spec else []
    while words and words[0].isdigit():
        w = words.pop(0)
        if len(w) > 10 or int(w) == 0 or int(w) > MAX_U32:
            raise ParseError("Invalid section part number")
        parts.append(int(w))
    specifier = ".".join(words)
    if specifier not in ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
        raise ParseError("Invalid section")
    if specifier == "MIME" and not parts:
        raise ParseError("MIME needs a part number")  # RFC 3501 §9 section-text
    fields: tuple[str, ...] = ()
    if specifier.startswith("HEADER.FIELDS"):
        r.sp()
        names: list[str] = r.paren_list(lambda: _utf8(r.astring()).upper())
        if not names:
            raise ParseError("Empty header list")
        fields = tuple(names)
    r.expect(b"]")
    return Section(tuple(parts), specifier, fields)


def _fetch_att(r: _Reader) -> FetchItem:
    name = r.take(_FETCH_NAME_CHARS).decode("ascii").upper()
    if r.peek() == ord("[") and name in ("BODY", "BODY.PEEK"):
        section = _section(r)
        partial: tuple[int, int] | None = None
        if r.peek() == ord("<"):
            # RFC 3501 §9: "<" number "." nz-number ">"
            r.pos += 1
            start = r.number()
            r.expect(b".")
            length = r.number(nonzero=True)
            r.expect(b">")
            partial = (start, length)
        return FetchItem("BODY[]", section, peek=name == "BODY.PEEK", partial=partial)
    if name in _FETCH_SIMPLE:
        return FetchItem(name)
    raise ParseError(f"Unknown fetch item {name or '?'}")


def _args_fetch(r: _Reader) -> Fetch:
    # RFC 3501 §6.4.5; RFC 7162 §3.1.4 (CHANGEDSINCE n) fetch modifier
    r.sp()
    seqset = _seqset(r)
    r.sp()
    items: list[FetchItem]
    if r.peek() == ord("("):
        items = r.paren_list(lambda: _fetch_att(r))
        if not items:
            raise ParseError("Empty fetch list")
    else:
        save = r.pos
        word = r.take(_FETCH_NAME_CHARS).decode("ascii").upper()
        if word in _FETCH_MACROS and r.peek() in (_SP, -1, 0x0D, 0x0A):
            items = [FetchItem(n) for n in _FETCH_MACROS[word]]
        else:
            r.pos = save
            items = [_fetch_att(r)]
    request = FetchRequest(items)
    if r.maybe_sp():

        def modifier() -> None:
            name = r.atom("fetch modifier").upper()
            if name != "CHANGEDSINCE":
                raise ParseError(f"Unsupported fetch modifier {name}")
            r.sp()
            request.changedsince = r.number(MAX_MODSEQ, nonzero=True)

        if not r.paren_list(modifier):
            raise ParseError("Empty fetch modifier list")
    r.end()
    return Fetch(seqset, request)


def _args_store(r: _Reader) -> Store:
    # RFC 3501 §6.4.6; RFC 7162 §3.1.3 (UNCHANGEDSINCE n)
    r.sp()
    seqset = _seqset(r)
    r.sp()
    unchanged: list[int] = []
    if r.peek() == ord("("):

        def modifier() -> None:
            name = r.atom("store modifier").upper()
            if name != "UNCHANGEDSINCE":
                raise ParseError(f"Unsupported store modifier {name}")
            r.sp()
            unchanged.append(r.number(MAX_MODSEQ))

        r.paren_list(modifier)
        if not unchanged:
            raise ParseError("Empty store modifier list")
        r.sp()
    mode = ""
    if r.peek() in (ord("+"), ord("-")):
        mode = chr(r.peek())
        r.pos += 1
    item = r.take(_FETCH_NAME_CHARS).decode("ascii").upper()
    if item not in ("FLAGS", "FLAGS.SILENT"):
        raise ParseError("Expected FLAGS, +FLAGS or -FLAGS")
    r.sp()
    flags = _flag_list_or_flags(r)
    r.end()
    return Store(seqset, mode, item.endswith(".SILENT"), flags, unchanged[-1] if unchanged else None)


def _args_append(r: _Reader) -> Append:
    # RFC 3501 §6.3.11: APPEND mailbox [SP flag-list] [SP date-time] SP literal
    r.sp()
    mailbox = _mailbox_name(r.astring())
    r.sp()
    flags: list[str] = []
    when: datetime | None = None
    if r.peek() == ord("("):
        flags = r.paren_list(r.flag)
        r.sp()
    if r.peek() == 0x22:
        when = _parse_datetime(r)
        r.sp()
    if r.peek() not in (ord("{"), ord("~")):
        raise ParseError("Expected a message literal")
    message = r.literal(allow8=True)
    r.end()
    return Append(mailbox, flags, when, message)


def _args_select(r: _Reader) -> Select:
    r.sp()
    mailbox = _mailbox_name(r.astring())
    condstore = False
    if r.maybe_sp():
        # RFC 4466 §2.1 select-params; RFC 7162 §3.1.8 CONDSTORE
        for p in r.paren_list(r.atom):
            if p.upper() != "CONDSTORE":
                raise ParseError(f"Unsupported select parameter {p}")
            condstore = True
    r.end()
    return Select(mailbox, condstore)


def _special_use(r: _Reader) -> str:
    if r.peek() != 0x5C:
        raise ParseError("Expected a special-use attribute")
    r.pos += 1
    name = "\\" + r.atom("attribute")
    return _SPECIAL_USE.get(name.upper(), name)


def _args_create(r: _Reader) -> Create:
    r.sp()
    mailbox = _mailbox_name(r.astring())
    uses: list[str] = []
    if r.maybe_sp():
        # RFC 4466 §2.2 create-params; RFC 6154 §3 USE (attrs)
        def param() -> None:
            if r.atom("create parameter").upper() != "USE":
                raise ParseError("Unsupported CREATE parameter")
            r.sp()
            uses.extend(r.paren_list(lambda: _special_use(r)))

        r.paren_list(param)
    r.end()
    return Create(mailbox, uses)


def _args_list(r: _Reader) -> ListCmd:
    # RFC 3501 §6.3.8 / RFC 5258 §3: LIST [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]
    r.sp()
    select_opts: list[str] = []
    if r.peek() == ord("("):
        select_opts = [s.upper() for s in r.paren_list(r.atom)]
        r.sp()
    reference = _mailbox_name(r.astring(), pattern=True)
    r.sp()
    if r.peek() == ord("("):
        patterns = r.paren_list(lambda: _mailbox_name(r.list_mailbox(), pattern=True))
        if not patterns:
            raise ParseError("Empty pattern list")
    else:
        patterns = [_mailbox_name(r.list_mailbox(), pattern=True)]
    out = ListCmd(reference, patterns, select_opts)
    if r.maybe_sp():
        if r.atom().upper() != "RETURN":
            raise ParseError("Expected RETURN")
        r.sp()

        def ret_opt() -> str:
            name = r.atom("return option").upper()
            if name == "STATUS" and r.peek() == _SP:
                r.sp()  # RFC 5819 STATUS (status-att ...)
                out.return_status.extend(_status_item(s) for s in r.paren_list(r.atom))
            return name

        out.return_opts = r.paren_list(ret_opt)
    r.end()
    return out


def _status_item(s: str) -> str:
    s = s.upper()
    if s not in STATUS_ITEMS:
        raise ParseError(f"Unknown status item {s}")
    return s


def _args_status(r: _Reader) -> tuple[str, list[str]]:
    r.sp()
    mailbox = _mailbox_name(r.astring())
    r.sp()
    items = [_status_item(s) for s in r.paren_list(r.atom)]
    if not items:
        raise ParseError("Empty status item list")
    r.end()
    return mailbox, items


def _args_authenticate(r: _Reader) -> tuple[str, bytes | None]:
    # RFC 3501 §6.2.2; RFC 4959 SASL-IR initial response ("=" is an empty response)
    r.sp()
    mech = r.atom("mechanism").upper()
    initial: bytes | None = None
    if r.maybe_sp():
        b64 = r.take(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
        if b64 == b"=":
            initial = b""
        else:
            try:
                initial = base64.b64decode(b64, validate=True)
            except binascii.Error as exc:
                raise ParseError("Invalid base64 initial response") from exc
            if not b64:
                raise ParseError("Expected an initial response")
    r.end()
    return mech, initial


def _args_id(r: _Reader) -> dict[str, str | None] | None:
    # RFC 2971 §3.3: id_params_list = "(" *(string SP nstring) ")" / nil
    r.sp()
    if r.data[r.pos : r.pos + 3].upper() == b"NIL":
        r.pos += 3
        r.end()
        return None
    out: dict[str, str | None] = {}

    def pair() -> None:
        k = r.string().decode("utf-8", "replace")
        r.sp()
        v = r.nstring()
        out[k] = None if v is None else v.decode("utf-8", "replace")

    r.paren_list(pair)
    r.end()
    return out


def _args_setquota(r: _Reader) -> tuple[str, list[tuple[str, int]]]:
    # RFC 9208 §4.2.3: SETQUOTA quota-root SP "(" [setquota-resource *(SP setquota-resource)] ")"
    r.sp()
    root = _utf8(r.astring())
    r.sp()

    def res() -> tuple[str, int]:
        name = r.atom("resource").upper()
        r.sp()
        return name, r.number(MAX_U64)

    limits: list[tuple[str, int]] = r.paren_list(res)
    r.end()
    return root, limits


def _parse_args(r: _Reader, name: str, uid: bool) -> Any:
    if name == "EXPUNGE" and uid:
        # RFC 4315 §2.1 UID EXPUNGE sequence-set
        r.sp()
        s = _seqset(r)
        r.end()
        return s
    if name in _NO_ARG_COMMANDS:
        r.end()
        return None
    if name == "LOGIN":
        r.sp()
        user = _utf8(r.astring())
        r.sp()
        password = _utf8(r.astring())
        r.end()
        return user, password
    if name == "AUTHENTICATE":
        return _args_authenticate(r)
    if name in ("SELECT", "EXAMINE"):
        return _args_select(r)
    if name == "CREATE":
        return _args_create(r)
    if name in ("DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "GETQUOTAROOT"):
        r.sp()
        mbox = _mailbox_name(r.astring())
        r.end()
        return mbox
    if name == "RENAME":
        r.sp()
        old = _mailbox_name(r.astring())
        r.sp()
        new = _mailbox_name(r.astring())
        r.end()
        return old, new
    if name == "STATUS":
        return _args_status(r)
    if name in ("LIST", "LSUB"):
        lst = _args_list(r)
        if name == "LSUB" and (lst.select_opts or lst.return_opts or len(lst.patterns) != 1):
            raise ParseError("LSUB takes a reference and one pattern")
        return lst
    if name == "APPEND":
        return _args_append(r)
    if name == "FETCH":
        return _args_fetch(r)
    if name == "STORE":
        return _args_store(r)
    if name in ("COPY", "MOVE"):
        r.sp()
        s = _seqset(r)
        r.sp()
        mbox = _mailbox_name(r.astring())
        r.end()
        return s, mbox
    if name == "SEARCH":
        return _args_search(r)
    if name == "SORT":
        return _args_sort(r)
    if name == "THREAD":
        return _args_thread(r)
    if name == "ENABLE":
        caps: list[str] = []
        while not r.at_end() or not caps:
            r.sp()
            caps.append(r.atom("capability").upper())
        return caps
    if name == "ID":
        return _args_id(r)
    if name == "COMPRESS":
        r.sp()
        mech = r.atom("mechanism").upper()
        r.end()
        return mech
    if name == "GETQUOTA":
        r.sp()
        root = _utf8(r.astring())
        r.end()
        return root
    if name == "SETQUOTA":
        return _args_setquota(r)
    raise ParseError("Unknown command")


# ---------------------------------------------------------------------------
# Public entry points


def literal_at_end(line: bytes) -> tuple[int, bool] | None:
    """(N, nonsync) if the line ends with a `{N}` / `{N+}` (or `~{N}`) marker, else None.

    RFC 3501 §4.3, RFC 7888 §3. Sizes longer than 30 digits are reported as
    10**30 (over any limit) rather than converting absurd digit strings.
    """
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start < 0:
        return None
    inner = line[start + 1 : -1]
    nonsync = inner.endswith(b"+")
    if nonsync:
        inner = inner[:-1]
    if not inner or not inner.isdigit():
        return None
    return (int(inner) if len(inner) <= 30 else 10**30), nonsync


def tag_of(raw: bytes) -> str:
    """The command's tag for a BAD reply, or `*` if it has none we can echo."""
    end = len(raw)
    for i, c in enumerate(raw):
        if c in (_SP, 0x0D, 0x0A):
            end = i
            break
    tag = raw[:end]
    if tag and all(c in _TAG_CHARS for c in tag):
        return tag.decode("ascii")
    return "*"


def parse_command(raw: bytes) -> Command:
    """Parse one complete command (literals inline, final CRLF optional)."""
    r = _Reader(raw)
    tagb = r.take(_TAG_CHARS)
    if not tagb or (r.peek() != _SP and not r.at_end()):
        raise ParseError("Invalid tag", "*")
    tag = tagb.decode("ascii")  # same answer as tag_of()
    try:
        r.sp()
        name = r.take(_SEARCH_NAME_CHARS).decode("ascii").upper()
        if not name:
            raise ParseError("Expected a command name")
        if r.peek() not in (-1, _SP, 0x0D, 0x0A):
            raise ParseError("Unknown command")
        uid = False
        if name == "UID":
            uid = True
            r.sp()
            name = r.take(_SEARCH_NAME_CHARS).decode("ascii").upper()
            if name not in _UID_COMMANDS or r.peek() not in (-1, _SP, 0x0D, 0x0A):
                raise ParseError("Invalid UID command")
        args = _parse_args(r, name, uid)
        return Command(tag, name, uid, args)
    except ParseError as exc:
        exc.tag = tag
        raise
