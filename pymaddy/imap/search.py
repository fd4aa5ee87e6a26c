"""SEARCH criteria evaluation (RFC 3501 §6.4.4) over the AST from pymaddy.imap.parser.

The server wraps each message in something satisfying `SearchTarget`; `needs`
tells it up front whether headers or the body may be read so it loads only
that, and `matches` evaluates cheap criteria (flags, sizes, numbers) before
content ones inside AND lists so most messages never get their content loaded.

Choices where the RFC leaves room:
- String criteria match a case-insensitive (casefold) substring of the decoded text.
- An empty string matches when the header field exists (HEADER, FROM, ...) and always for BODY/TEXT.
- BEFORE/ON/SINCE use the UTC date of INTERNALDATE; SENT* use the date written in the
  Date: header (its own local date); a message without a parsable Date: matches no SENT* key.
- NEW = RECENT UNSEEN, OLD = NOT RECENT (desugared by the parser).
"""

from __future__ import annotations

import datetime as _dt
from typing import Protocol

from pymaddy.imap.parser import (
    AllKey,
    And,
    DateKey,
    FlagKey,
    HeaderKey,
    Not,
    NumberKey,
    Or,
    SearchKey,
    SeqKey,
    TextKey,
)


class SearchTarget(Protocol):
    """One message as the evaluator sees it; content methods may load lazily."""

    seq: int
    uid: int
    flags: frozenset[str]
    size: int
    internaldate: float  # Unix time
    modseq: int
    recent: bool

    def header_values(self, name: str) -> list[str]:
        """Decoded values of a top-level header field (name is upper-case; match case-insensitively)."""
        ...

    def sent_date(self) -> _dt.date | None:
        """The date written in the Date: header, None if absent or unparsable."""
        ...

    def body_text(self) -> str:
        """Decoded body text."""
        ...

    def full_text(self) -> str:
        """Decoded header and body text."""
        ...


_SENT_KEYS = frozenset({"SENTBEFORE", "SENTON", "SENTSINCE"})


def needs(key: SearchKey) -> set[str]:
    """Which content ("header", "body") evaluating `key` may read."""
    match key:
        case HeaderKey():
            return {"header"}
        case DateKey(op=op) if op in _SENT_KEYS:
            return {"header"}
        case TextKey(op="BODY"):
            return {"body"}
        case TextKey():
            return {"header", "body"}
        case Not(key=k):
            return needs(k)
        case Or(left=a, right=b):
            return needs(a) | needs(b)
        case And(keys=ks):
            out: set[str] = set()
            for k in ks:
                out |= needs(k)
            return out
        case _:
            return set()


def _cost(key: SearchKey) -> int:
    """0: metadata only, 1: headers, 2: body; used to order AND evaluation."""
    n = needs(key)
    return 2 if "body" in n else 1 if n else 0


def _has_flag(msg: SearchTarget, flag: str) -> bool:
    if flag == "\\Recent":
        return msg.recent
    if flag in msg.flags:
        return True
    # Flags are case-insensitive (RFC 3501 §2.3.2); the exact hit above is the fast path.
    folded = flag.casefold()
    return any(f.casefold() == folded for f in msg.flags)


def _contains(haystack: str, needle: str) -> bool:
    return needle.casefold() in haystack.casefold()


def _match_header(msg: SearchTarget, key: HeaderKey) -> bool:
    values = msg.header_values(key.field)
    if not values:
        return False
    if not key.value:
        return True  # RFC 3501 §6.4.4 HEADER: empty string matches any message with the field
    return any(_contains(v, key.value) for v in values)


def _match_date(msg: SearchTarget, key: DateKey) -> bool:
    if key.op in _SENT_KEYS:
        d = msg.sent_date()
        if d is None:
            return False
        op = key.op[4:]
    else:
        d = _dt.datetime.fromtimestamp(msg.internaldate, _dt.UTC).date()
        op = key.op
    if op == "BEFORE":
        return d < key.date
    if op == "ON":
        return d == key.date
    return d >= key.date  # SINCE: "within or later than the specified date"


def matches(key: SearchKey, msg: SearchTarget, largest_seq: int, largest_uid: int) -> bool:
    """Whether `msg` satisfies `key`; `*` in sequence sets means largest_seq / largest_uid."""
    match key:
        case AllKey():
            return True
        case FlagKey(flag=flag, negate=negate):
            return _has_flag(msg, flag) != negate
        case SeqKey(seqset=seqset, uid=True):
            return seqset.contains(msg.uid, largest_uid)
        case SeqKey(seqset=seqset):
            return seqset.contains(msg.seq, largest_seq)
        case NumberKey(op="LARGER", n=n):
            return msg.size > n
        case NumberKey(op="SMALLER", n=n):
            return msg.size < n
        case NumberKey(n=n):  # MODSEQ (RFC 7162 §3.1.5): modseq >= n
            return msg.modseq >= n
        case DateKey():
            return _match_date(msg, key)
        case HeaderKey():
            return _match_header(msg, key)
        case TextKey(op="BODY", value=v):
            return not v or _contains(msg.body_text(), v)
        case TextKey(value=v):
            return not v or _contains(msg.full_text(), v)
        case Not(key=k):
            return not matches(k, msg, largest_seq, largest_uid)
        case Or(left=a, right=b):
            if _cost(b) < _cost(a):
                a, b = b, a
            return matches(a, msg, largest_seq, largest_uid) or matches(b, msg, largest_seq, largest_uid)
        case And(keys=ks):
            return all(matches(k, msg, largest_seq, largest_uid) for k in sorted(ks, key=_cost))
    raise TypeError(f"not a search key: {key!r}")
