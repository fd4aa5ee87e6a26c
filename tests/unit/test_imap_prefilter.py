"""SEARCH's SQL prefilter (pymaddy/endpoints/imap/fetch.py): a superset of the matches, never fewer."""

from __future__ import annotations

import sqlite3

import pytest

from pymaddy.endpoints.imap.fetch import prefilter
from pymaddy.imap import parser as P

HEADERS = [
    b"From: Alice <a@x>\r\n\r\n",
    b"From: =?utf-8?q?alice?= <b@x>\r\n\r\n",  # matches only once decoded
    b"From: Bob\r\n\r\n",
    None,  # header not cached: must be looked at
    "From: \u212aelvin <k@x>\r\n\r\n".encode(),  # KELVIN SIGN casefolds to "k"
    b"Subject: 100%_off\r\n\r\n",
    b"Subject: 100xxoff\r\n\r\n",
]


@pytest.mark.parametrize(("search", "kept"), [
    (b"FROM alice", [0, 1, 3, 4]),
    (b"FROM kelvin", [1, 3, 4]),
    (b'SUBJECT "%_"', [1, 3, 4, 5]),  # LIKE wildcards in the value are literal
    (b"OR FROM x FROM y", [0, 1, 2, 3, 4, 5, 6]),  # no prefilter under OR
    (b'FROM "al ice" SUBJECT 100', [1, 3, 4, 5, 6]),  # whitespace: that key is not prefiltered
    (b"SEEN", [0, 1, 2, 3, 4, 5, 6]),
])
def test_prefilter_keeps_every_possible_match(search: bytes, kept: list[int]) -> None:
    c = sqlite3.connect(":memory:")
    try:
        c.execute("CREATE TABLE messages (id INTEGER, header BLOB)")
        c.executemany("INSERT INTO messages VALUES (?, ?)", list(enumerate(HEADERS)))
        where, args = prefilter(P.parse_command(b"t SEARCH " + search).args.key)
        got = [r[0] for r in c.execute(f"SELECT id FROM messages m WHERE {where or '1'} ORDER BY id", args)]
    finally:
        c.close()
    assert got == kept
