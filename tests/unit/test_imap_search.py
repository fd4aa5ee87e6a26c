"""SEARCH evaluation against an in-memory message (RFC 3501 §6.4.4 semantics)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pytest

from pymaddy.imap.parser import SearchKey, parse_command
from pymaddy.imap.search import SearchTarget, matches, needs


@dataclass
class Msg:
    """A SearchTarget that records which content was read."""

    seq: int = 3
    uid: int = 30
    flags: frozenset[str] = frozenset({"\\Seen", "$Junk"})
    size: int = 1000
    internaldate: float = dt.datetime(2024, 3, 10, 23, 30, tzinfo=dt.UTC).timestamp()
    modseq: int = 50
    recent: bool = False
    headers: dict[str, list[str]] = field(
        default_factory=lambda: {
            "FROM": ["Bob Smith <bob@example.org>"],
            "TO": ["alice@example.com", "Carol <carol@example.net>"],
            "SUBJECT": ["Entwürfe für März"],
            "X-EMPTY": [""],
        }
    )
    date: dt.date | None = dt.date(2024, 3, 11)
    body: str = "Hello World\nSecond LINE"
    reads: set[str] = field(default_factory=set)

    def header_values(self, name: str) -> list[str]:
        self.reads.add("header")
        return self.headers.get(name.upper(), [])

    def sent_date(self) -> dt.date | None:
        self.reads.add("header")
        return self.date

    def body_text(self) -> str:
        self.reads.add("body")
        return self.body

    def full_text(self) -> str:
        self.reads.add("header")
        self.reads.add("body")
        head = "\n".join(f"{k}: {v}" for k, vs in self.headers.items() for v in vs)
        return head + "\n\n" + self.body


def key(crit: str) -> SearchKey:
    k: SearchKey = parse_command(b"a SEARCH CHARSET UTF-8 " + crit.encode()).args.key
    return k


def check(crit: str, msg: Msg | None = None, largest_seq: int = 5, largest_uid: int = 50) -> bool:
    m = msg or Msg()
    target: SearchTarget = m
    k = key(crit)
    got = matches(k, target, largest_seq, largest_uid)
    # Content the evaluator read must be content `needs` announced.
    assert m.reads <= needs(k), (crit, m.reads, needs(k))
    return got


@pytest.mark.parametrize(
    ("crit", "want"),
    [
        ("ALL", True),
        ("SEEN", True),
        ("UNSEEN", False),
        ("seen", True),
        ("ANSWERED", False),
        ("UNANSWERED", True),
        ("DELETED", False),
        ("UNDELETED", True),
        ("DRAFT", False),
        ("UNDRAFT", True),
        ("FLAGGED", False),
        ("UNFLAGGED", True),
        ("KEYWORD $Junk", True),
        ("KEYWORD $junk", True),
        ("KEYWORD other", False),
        ("UNKEYWORD other", True),
        ("UNKEYWORD $Junk", False),
        ("RECENT", False),
        ("OLD", True),
        ("NEW", False),
        ("LARGER 999", True),
        ("LARGER 1000", False),
        ("SMALLER 1001", True),
        ("SMALLER 1000", False),
        ("MODSEQ 50", True),
        ("MODSEQ 51", False),
        ("3", True),
        ("1:2,4:*", False),
        ("*", False),
        ("2:*", True),
        ("UID 30", True),
        ("UID 31:*", False),
        ("UID *", False),
        ("UID 1:29,30", True),
        # header strings: case-insensitive substrings of decoded values
        ("FROM bob", True),
        ("FROM BOB@EXAMPLE", True),
        ("FROM carol", False),
        ("TO carol", True),
        ("CC anyone", False),
        ("BCC x", False),
        ('SUBJECT "für"', True),
        ('SUBJECT "FÜR MÄRZ"', True),
        ('SUBJECT "ENTWÜRFE"', True),
        ('SUBJECT ""', True),
        ('CC ""', False),
        ('HEADER X-Empty ""', True),
        ('HEADER x-missing ""', False),
        ("HEADER to example.net", True),
        ("HEADER to example.xyz", False),
        ("BODY world", True),
        ('BODY "second line"', True),
        ("BODY bob", False),
        ("TEXT bob", True),
        ("TEXT world", True),
        ("TEXT nowhere", False),
        ('BODY ""', True),
        # dates: INTERNALDATE is 2024-03-10 23:30 UTC, Date: header says 2024-03-11
        ("ON 10-Mar-2024", True),
        ("ON 11-Mar-2024", False),
        ("BEFORE 10-Mar-2024", False),
        ("BEFORE 11-Mar-2024", True),
        ("SINCE 10-Mar-2024", True),
        ("SINCE 11-Mar-2024", False),
        ("SENTON 11-Mar-2024", True),
        ("SENTBEFORE 11-Mar-2024", False),
        ("SENTBEFORE 12-Mar-2024", True),
        ("SENTSINCE 11-Mar-2024", True),
        ("SENTSINCE 12-Mar-2024", False),
        # boolean structure
        ("NOT SEEN", False),
        ("NOT NOT SEEN", True),
        ("OR DELETED SEEN", True),
        ("OR DELETED FLAGGED", False),
        ("SEEN FROM bob", True),
        ("SEEN FROM alice", False),
        ("(SEEN (LARGER 10 (UID 30)))", True),
        ("OR (DELETED BODY world) (NOT FLAGGED FROM smith)", True),
        ("NOT OR BODY world DELETED", False),
        ("OR OR 1 2 OR UID 30 DELETED", True),
    ],
)
def test_matches(crit: str, want: bool) -> None:
    assert check(crit) is want


def test_recent_new() -> None:
    m = Msg(recent=True, flags=frozenset())
    assert check("NEW", m) and check("RECENT", m) and not check("OLD", m) and check("UNSEEN", m)
    assert not check("NEW", Msg(recent=True))


def test_missing_date_header_matches_no_sent_key() -> None:
    m = Msg(date=None)
    for crit in ("SENTON 11-Mar-2024", "SENTBEFORE 1-Jan-2100", "SENTSINCE 1-Jan-1970"):
        assert not check(crit, m)
    assert check("NOT SENTSINCE 1-Jan-1970", m)


def test_star_resolves_against_largest() -> None:
    m = Msg(seq=5, uid=50)
    assert check("*", m, largest_seq=5, largest_uid=50)
    assert check("UID *", m, largest_seq=5, largest_uid=50)
    assert check("UID 100:*", m, largest_seq=5, largest_uid=50)  # 100:* is 50:100
    assert not check("*", m, largest_seq=6, largest_uid=51)


def test_cheap_keys_short_circuit() -> None:
    m = Msg()
    assert not matches(key("BODY world TEXT x FROM bob DELETED"), m, 5, 50)
    assert m.reads == set()
    m = Msg()
    assert matches(key("OR BODY world SEEN"), m, 5, 50)
    assert m.reads == set()
    m = Msg()
    assert not matches(key("FROM alice BODY world"), m, 5, 50)
    assert m.reads == {"header"}


@pytest.mark.parametrize(
    ("crit", "want"),
    [
        ("ALL", set()),
        ("SEEN UID 1 LARGER 5 MODSEQ 3 BEFORE 1-Jan-2024 1:*", set()),
        ("FROM x", {"header"}),
        ('HEADER X ""', {"header"}),
        ("SENTON 1-Jan-2024", {"header"}),
        ("BODY x", {"body"}),
        ("TEXT x", {"header", "body"}),
        ("OR SEEN NOT BODY x", {"body"}),
        ("(SUBJECT a (BODY b))", {"header", "body"}),
    ],
)
def test_needs(crit: str, want: set[str]) -> None:
    assert needs(key(crit)) == want
