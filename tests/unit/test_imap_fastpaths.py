"""The IMAP server's fast paths give exactly what the reference implementations give.

- header_fields_fast (one regex scan) vs pymaddy.imap.message.header_fields;
- to_sql (SEARCH on index data, including the header columns of imap/searchindex.py, answered by
  SQLite) vs pymaddy.imap.search.matches.
"""

from __future__ import annotations

import datetime
import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from pymaddy.endpoints.imap.fetch import header_fields_fast, to_sql
from pymaddy.imap import parser as P
from pymaddy.imap import searchindex
from pymaddy.imap.message import header_fields
from pymaddy.imap.search import matches

LINES = [b"From: a@x", b"from : b", b"To: c", b" folded", b"\tfolded2", b"Subject: s", b"X-Y: z", b"garbage",
         b"DATE: d", b"", b"Body-From: nope", b": colon first", b"\r"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=12), st.sampled_from([b"\r\n", b"\n"]),
       st.lists(st.sampled_from(["FROM", "TO", "SUBJECT", "DATE", "X-Y", "NOPE"]), min_size=1, max_size=4,
                unique=True), st.booleans())
def test_header_fields_fast_matches_reference(lines: list[bytes], eol: bytes, names: list[str], end: bool) -> None:
    header = eol.join(lines) + (eol + eol if end else b"")
    assert header_fields_fast(header, tuple(names)) == header_fields(header, set(names), False)


HEADERS = [
    b"",
    b"From: Alice <alice@example.test>\r\nTo: bob@x\r\nTo: Carol\r\n <carol@y>\r\nSubject: Stra\xc3\x9fe\r\n\r\n",
    b"from: =?utf-8?q?J=C3=BCrgen?= <j@x>\r\nCC: ALICE@x\r\nSubject: =?utf-8?b?0J7RgtGH0ZHRgg==?=\r\n\r\n",
    b"Subject:\r\nBcc: hidden@z\r\nTo:\r\n\r\n",
    b"Subject: strasse und Re: meeting\nFrom: eve\n\n",
]


class _Msg:
    def __init__(self, seq: int, row: tuple[frozenset[str], int, int, int], header: bytes = b"") -> None:
        flags, size, off, modseq = row
        self.seq, self.uid, self.flags, self.size = seq, 2 * seq - 1, flags, size
        self.internaldate, self.modseq, self.recent = float(BASE + off), modseq, False
        self.header = header

    def header_values(self, name: str) -> list[str]:
        return searchindex.field_values(self.header, name)

    def sent_date(self) -> datetime.date | None:
        raise AssertionError("index-only search read a header")

    def body_text(self) -> str:
        raise AssertionError("index-only search read a body")

    def full_text(self) -> str:
        raise AssertionError("index-only search read a body")


FLAGS = ["\\Seen", "\\Deleted", "\\Flagged", "$Work", "$work"]
DAY = 86400
BASE = int(datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC).timestamp())

leaf = st.one_of(
    st.just("ALL"),
    st.sampled_from(["SEEN", "UNSEEN", "DELETED", "UNDELETED", "FLAGGED", "UNFLAGGED", "KEYWORD $Work",
                     "UNKEYWORD $WORK"]),
    st.builds(lambda op, n: f"{op} {n}", st.sampled_from(["LARGER", "SMALLER", "MODSEQ"]),
              st.integers(0, 40)),
    st.builds(lambda op, d: f"{op} {d}-Nov-2026", st.sampled_from(["BEFORE", "ON", "SINCE"]), st.integers(1, 6)),
    st.builds(lambda a, b: f"UID {a}:{b}", st.integers(1, 12), st.sampled_from(["*", "3", "9"])),
    st.builds(lambda f, v: f'{f} "{v}"', st.sampled_from(["FROM", "TO", "CC", "BCC", "SUBJECT", "HEADER SUBJECT",
                                                          "HEADER from"]),
              st.sampled_from(["", "alice", "ALICE", "strasse", "STRASSE", "ß", "jürgen", "Отчёт", "carol@y", "x"])),
)
keys = st.recursive(leaf, lambda inner: st.one_of(
    st.builds(lambda k: f"NOT {k}", inner),
    st.builds(lambda a, b: f"OR {a} {b}", inner, inner),
    st.builds(lambda a, b: f"({a} {b})", inner, inner),
), max_leaves=6)

msgs_st = st.lists(st.tuples(st.frozensets(st.sampled_from(FLAGS)), st.integers(0, 40), st.integers(0, 6 * DAY),
                             st.integers(1, 40), st.sampled_from(HEADERS)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(keys, msgs_st)
def test_index_search_in_sql_matches_the_evaluator(
        search: str, rows: list[tuple[frozenset[str], int, int, int, bytes]]) -> None:
    key = P.parse_command(f"t SEARCH {search}".encode()).args.key
    msgs = [_Msg(i + 1, row[:4], row[4]) for i, row in enumerate(rows)]
    largest_uid = msgs[-1].uid if msgs else 0
    expected = [m.uid for m in msgs if matches(key, m, len(msgs), largest_uid)]
    sql = to_sql(key, largest_uid)
    assert sql is not None, search
    c = sqlite3.connect(":memory:")
    try:
        cols = ", ".join(f"{col} TEXT" for col in searchindex.COLUMNS)
        c.execute("CREATE TABLE messages (uid INTEGER, flags TEXT, size INTEGER, internaldate INTEGER, modseq INTEGER, "
                  f"{cols})")
        c.executemany(f"INSERT INTO messages VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(searchindex.COLUMNS))})",
                      [(m.uid, " ".join(sorted(m.flags)), m.size, int(m.internaldate), m.modseq,
                        *searchindex.index_row(m.header)) for m in msgs])
        got = [u for (u,) in c.execute(f"SELECT m.uid FROM messages m WHERE {sql[0]} ORDER BY m.uid", sql[1])]
    finally:
        c.close()
    assert got == expected, (search, sql)


def test_keys_needing_the_message_or_the_session_are_not_translated() -> None:
    for search in ("HEADER X-Y x", "RECENT", "NEW", "1:3", "OR SEEN BODY x", "SENTSINCE 1-Nov-2026"):
        assert to_sql(P.parse_command(f"t SEARCH {search}".encode()).args.key, 10) is None, search
