"""IMAP command parser: typed results per command, grammar errors, literals, mUTF-7, fuzzing."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymaddy.imap.parser import (
    MAX_DEPTH,
    AllKey,
    And,
    Append,
    BadCharset,
    Create,
    DateKey,
    Fetch,
    FlagKey,
    HeaderKey,
    ListCmd,
    Not,
    NumberKey,
    Or,
    ParseError,
    Search,
    Select,
    SeqKey,
    SeqSet,
    Sort,
    Store,
    TextKey,
    Thread,
    literal_at_end,
    parse_command,
    tag_of,
)
from pymaddy.imap.types import FetchItem, Section
from pymaddy.imap.utf7 import decode_mutf7, encode_mutf7


def args(raw: bytes) -> Any:
    return parse_command(raw).args


# ---------------------------------------------------------------------------
# Framing helpers


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b"a1 LOGIN {3}\r\n", (3, False)),
        (b"a1 LOGIN {3}", (3, False)),
        (b"a1 LOGIN bob {12+}\r\n", (12, True)),
        (b"a1 APPEND x ~{7}\r\n", (7, False)),
        (b"a1 LOGIN {99999999999999999999}", (99999999999999999999, False)),
        (b"a1 LOGIN " + b"{" + b"9" * 40 + b"}", (10**30, False)),
        (b"a1 NOOP\r\n", None),
        (b'a1 LOGIN "{3}"', None),
        (b"a1 LOGIN {}", None),
        (b"a1 LOGIN {3a}", None),
        (b"}", None),
    ],
)
def test_literal_at_end(line: bytes, want: tuple[int, bool] | None) -> None:
    assert literal_at_end(line) == want


@pytest.mark.parametrize(
    ("raw", "tag"),
    [
        (b"a1 NOOP", "a1"),
        (b"x.y] FOO", "x.y]"),
        (b"+ NOOP", "*"),
        (b"", "*"),
        (b" NOOP", "*"),
        (b"a{ X", "*"),
        (b"a1\r\n", "a1"),
    ],
)
def test_tag_of(raw: bytes, tag: str) -> None:
    assert tag_of(raw) == tag


# ---------------------------------------------------------------------------
# Simple commands and errors


@pytest.mark.parametrize(
    "name", ["CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "EXPUNGE", "UNSELECT", "IDLE", "NAMESPACE"]
)
def test_no_arg_commands(name: str) -> None:
    cmd = parse_command(f"t1 {name.lower()}\r\n".encode())
    assert (cmd.tag, cmd.name, cmd.uid, cmd.args) == ("t1", name, False, None)
    assert parse_command(f"t1 {name}".encode()).args is None
    with pytest.raises(ParseError):
        parse_command(f"t1 {name} extra".encode())


@pytest.mark.parametrize(
    ("raw", "tag"),
    [
        (b"a1 FROB", "a1"),
        (b"a1 NOOP  ", "a1"),
        (b"a1  NOOP", "a1"),
        (b"a1 LOGIN  bob pw", "a1"),
        (b"a1 LOGIN bob  pw", "a1"),
        (b"a1 LOGIN bob", "a1"),
        (b"a1 LOGIN bob pw ", "a1"),
        (b"a1 UID NOOP", "a1"),
        (b"a1 UID LIST", "a1"),
        (b"+ NOOP", "*"),
        (b"NOOP", "NOOP"),
        (b"a1\r\n", "a1"),
        (b"", "*"),
        (b"a(1 NOOP", "*"),
        (b'a1 LOGIN "bob pw', "a1"),
        (b'a1 LOGIN "b\\ob" pw', "a1"),
        (b"a1 LOGIN {5}\r\nbob pw", "a1"),
        (b"a1 LOGIN {3}bob pw", "a1"),
        (b"a1 NOOP\r\nx", "a1"),
    ],
)
def test_syntax_errors_keep_tag(raw: bytes, tag: str) -> None:
    with pytest.raises(ParseError) as ei:
        parse_command(raw)
    assert ei.value.tag == tag
    assert str(ei.value)


def test_unknown_command_message() -> None:
    with pytest.raises(ParseError, match="Unknown command") as ei:
        parse_command(b"zz9 XYZZY 1 2")
    assert ei.value.tag == "zz9"


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"a LOGIN bob secret", ("bob", "secret")),
        (b'a LOGIN "bob smith" "p\\"w\\\\d"', ("bob smith", 'p"w\\d')),
        (b"a LOGIN {3}\r\nbob {3+}\r\npw!\r\n", ("bob", "pw!")),
        (b"a LOGIN {3}\r\nbob {3+}\r\npw!", ("bob", "pw!")),
        (b'a LOGIN "" ""', ("", "")),
        (b"a LOGIN b]ob pw", ("b]ob", "pw")),
        (b"a LOGIN {2}\r\n\xc3\xa9 x", ("\u00e9", "x")),
    ],
)
def test_login(raw: bytes, want: tuple[str, str]) -> None:
    cmd = parse_command(raw)
    assert cmd.name == "LOGIN"
    assert cmd.args == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"a AUTHENTICATE plain", ("PLAIN", None)),
        (b"a AUTHENTICATE PLAIN =", ("PLAIN", b"")),
        (b"a AUTHENTICATE PLAIN AGJvYgBwdw==", ("PLAIN", b"\x00bob\x00pw")),
    ],
)
def test_authenticate(raw: bytes, want: tuple[str, bytes | None]) -> None:
    assert args(raw) == want


def test_authenticate_bad_base64() -> None:
    with pytest.raises(ParseError):
        parse_command(b"a AUTHENTICATE PLAIN AGJ")


# ---------------------------------------------------------------------------
# Mailboxes


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"a SELECT INBOX", Select("INBOX", False)),
        (b"a SELECT inBox", Select("INBOX", False)),
        (b'a SELECT "inbox"', Select("INBOX", False)),
        (b"a SELECT inbox.sub", Select("inbox.sub", False)),
        (b"a SELECT Entw&APw-rfe", Select("Entw\u00fcrfe", False)),
        (b"a SELECT INBOX (CONDSTORE)", Select("INBOX", True)),
        (b"a EXAMINE {8}\r\nA&-B &-C", Select("A&B &C", False)),
    ],
)
def test_select(raw: bytes, want: Select) -> None:
    assert args(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        b"a SELECT",
        b'a SELECT ""',
        b"a SELECT INBOX (QRESYNC (1 2))",
        b"a SELECT INBOX ()x",
        b"a SELECT a&b",
        b"a SELECT &AGE-",  # "a" must not be base64-encoded
        b"a SELECT {3}\r\na\nb",
        b"a SELECT &AAA-",  # encoded NUL
        b"a SELECT {2}\r\n\xc3\xa9",  # raw 8-bit is not modified UTF-7
    ],
)
def test_bad_mailbox(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(raw)


@pytest.mark.parametrize(
    ("raw", "name", "want"),
    [
        (b"a CREATE foo", "CREATE", Create("foo", [])),
        (b"a CREATE foo (USE (\\sent \\Trash))", "CREATE", Create("foo", ["\\Sent", "\\Trash"])),
        (b"a DELETE foo", "DELETE", "foo"),
        (b"a SUBSCRIBE &ZeVnLIqe-", "SUBSCRIBE", "\u65e5\u672c\u8a9e"),
        (b"a UNSUBSCRIBE inbox", "UNSUBSCRIBE", "INBOX"),
        (b'a RENAME "a b" c', "RENAME", ("a b", "c")),
        (
            b"a STATUS INBOX (messages UIDNEXT unseen HIGHESTMODSEQ SIZE)",
            "STATUS",
            ("INBOX", ["MESSAGES", "UIDNEXT", "UNSEEN", "HIGHESTMODSEQ", "SIZE"]),
        ),
        (b"a GETQUOTAROOT INBOX", "GETQUOTAROOT", "INBOX"),
        (b'a GETQUOTA ""', "GETQUOTA", ""),
        (b'a SETQUOTA "" (STORAGE 512 messages 10)', "SETQUOTA", ("", [("STORAGE", 512), ("MESSAGES", 10)])),
        (b"a ENABLE condstore utf8=accept", "ENABLE", ["CONDSTORE", "UTF8=ACCEPT"]),
        (b"a COMPRESS deflate", "COMPRESS", "DEFLATE"),
        (b"a ID NIL", "ID", None),
        (b'a ID ("name" "mutt" "version" NIL)', "ID", {"name": "mutt", "version": None}),
        (b"a ID ()", "ID", {}),
        (b"a COPY 1:3 Trash", "COPY", (SeqSet([(1, 3)]), "Trash")),
        (b"a MOVE 2,4:* Trash", "MOVE", (SeqSet([(2, 2), (4, None)]), "Trash")),
    ],
)
def test_mailbox_commands(raw: bytes, name: str, want: Any) -> None:
    cmd = parse_command(raw)
    assert cmd.name == name
    assert cmd.args == want


@pytest.mark.parametrize(
    "raw",
    [
        b"a STATUS INBOX ()",
        b"a STATUS INBOX (FOO)",
        b"a STATUS INBOX MESSAGES",
        b"a ENABLE",
        b"a CREATE x (USE (Sent))",
        b"a RENAME a",
        b"a COPY 0 x",
        b'a ID ("a")',
        b"a COMPRESS",
    ],
)
def test_mailbox_command_errors(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(raw)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b'a LIST "" *', ListCmd("", ["*"])),
        (b'a LIST "" %', ListCmd("", ["%"])),
        (b"a LIST foo/ bar*%]", ListCmd("foo/", ["bar*%]"])),
        (b'a LIST "" "*" RETURN (SPECIAL-USE)', ListCmd("", ["*"], [], ["SPECIAL-USE"])),
        (b'a LIST (special-use) "" *', ListCmd("", ["*"], ["SPECIAL-USE"])),
        (b'a LIST "" (INBOX "Sent*")', ListCmd("", ["INBOX", "Sent*"])),
        (b'a LIST "" * RETURN (STATUS (MESSAGES UNSEEN))', ListCmd("", ["*"], [], ["STATUS"], ["MESSAGES", "UNSEEN"])),
        (b"a LSUB &ZeVnLIqe-/ *", ListCmd("\u65e5\u672c\u8a9e/", ["*"])),
    ],
)
def test_list(raw: bytes, want: ListCmd) -> None:
    got = args(raw)
    assert got == want
    assert got.pattern == want.patterns[0]


def test_lsub_rejects_extended_forms() -> None:
    with pytest.raises(ParseError):
        parse_command(b'a LSUB "" * RETURN (CHILDREN)')


# ---------------------------------------------------------------------------
# APPEND

_PLUS1 = timezone(timedelta(hours=1))


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"a APPEND INBOX (\\Seen) {5}\r\nhello\r\n", Append("INBOX", ["\\Seen"], None, b"hello")),
        (b"a APPEND INBOX {5+}\r\nhello", Append("INBOX", [], None, b"hello")),
        (b"a APPEND INBOX () {0}\r\n", Append("INBOX", [], None, b"")),
        (
            b'a APPEND x (\\seen \\DRAFT $Junk) " 5-Jan-2024 10:00:00 +0100" {2}\r\nhi',
            Append("x", ["\\Seen", "\\Draft", "$Junk"], datetime(2024, 1, 5, 10, 0, tzinfo=_PLUS1), b"hi"),
        ),
        (
            b'a APPEND x "5-jan-2024 10:00:00 -0000" ~{2}\r\n\x00\x01',
            Append("x", [], datetime(2024, 1, 5, 10, 0, tzinfo=UTC), b"\x00\x01"),
        ),
        (
            b'a APPEND x "15-Dec-1999 23:59:59 -0830" {3}\r\n\r\n.',
            Append(
                "x", [], datetime(1999, 12, 15, 23, 59, 59, tzinfo=timezone(-timedelta(hours=8, minutes=30))), b"\r\n."
            ),
        ),
    ],
)
def test_append(raw: bytes, want: Append) -> None:
    assert args(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        b"a APPEND INBOX hello",
        b"a APPEND INBOX (\\Seen)",
        b'a APPEND INBOX "30-Feb-2024 10:00:00 +0000" {1}\r\nx',
        b'a APPEND INBOX "1-Foo-2024 10:00:00 +0000" {1}\r\nx',
        b'a APPEND INBOX "1-Jan-2024 10:00 +0000" {1}\r\nx',
        b"a APPEND INBOX {10}\r\nshort",
        b"a APPEND INBOX {1}\r\nxy",
    ],
)
def test_append_errors(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(raw)


# ---------------------------------------------------------------------------
# FETCH


def _items(raw: bytes) -> list[FetchItem]:
    f = args(raw)
    assert isinstance(f, Fetch)
    return f.request.items


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        (b"ALL", ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]),
        (b"fast", ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]),
        (b"FULL", ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]),
        (b"(uid flags)", ["UID", "FLAGS"]),
        (
            b"(ENVELOPE INTERNALDATE RFC822 RFC822.HEADER RFC822.SIZE RFC822.TEXT BODY BODYSTRUCTURE MODSEQ)",
            [
                "ENVELOPE",
                "INTERNALDATE",
                "RFC822",
                "RFC822.HEADER",
                "RFC822.SIZE",
                "RFC822.TEXT",
                "BODY",
                "BODYSTRUCTURE",
                "MODSEQ",
            ],
        ),
        (b"RFC822.HEADER", ["RFC822.HEADER"]),
    ],
)
def test_fetch_simple_items(spec: bytes, want: list[str]) -> None:
    items = _items(b"a FETCH 1:* " + spec)
    assert [i.name for i in items] == want
    assert all(i.section is None for i in items)


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        (b"BODY[]", FetchItem("BODY[]", Section())),
        (b"body.peek[]", FetchItem("BODY[]", Section(), peek=True)),
        (b"BODY[HEADER]", FetchItem("BODY[]", Section((), "HEADER"))),
        (b"BODY[text]", FetchItem("BODY[]", Section((), "TEXT"))),
        (b"BODY[1]", FetchItem("BODY[]", Section((1,), ""))),
        (b"BODY[1.2.3]", FetchItem("BODY[]", Section((1, 2, 3), ""))),
        (b"BODY[1.2.MIME]", FetchItem("BODY[]", Section((1, 2), "MIME"))),
        (b"BODY[2.HEADER]", FetchItem("BODY[]", Section((2,), "HEADER"))),
        (b"BODY[4.TEXT]", FetchItem("BODY[]", Section((4,), "TEXT"))),
        (
            b"BODY.PEEK[HEADER.FIELDS (from To {7}\r\nsubject)]",
            FetchItem("BODY[]", Section((), "HEADER.FIELDS", ("FROM", "TO", "SUBJECT")), peek=True),
        ),
        (b'BODY[1.HEADER.FIELDS.NOT ("X-Spam")]', FetchItem("BODY[]", Section((1,), "HEADER.FIELDS.NOT", ("X-SPAM",)))),
        (b"BODY[]<0.1024>", FetchItem("BODY[]", Section(), partial=(0, 1024))),
        (b"BODY.PEEK[TEXT]<100.5>", FetchItem("BODY[]", Section((), "TEXT"), peek=True, partial=(100, 5))),
    ],
)
def test_fetch_sections(spec: bytes, want: FetchItem) -> None:
    assert _items(b"a FETCH 1 " + spec) == [want]
    assert _items(b"a FETCH 1 (FLAGS " + spec + b")") == [FetchItem("FLAGS"), want]


def test_fetch_response_names() -> None:
    items = _items(b"a FETCH 1 (BODY.PEEK[1.HEADER.FIELDS (A B)]<5.10> RFC822.HEADER)")
    assert [i.response_name() for i in items] == ["BODY[1.HEADER.FIELDS (A B)]<5>", "RFC822.HEADER"]


def test_fetch_uid_and_changedsince() -> None:
    cmd = parse_command(b"a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)\r\n")
    assert cmd.name == "FETCH" and cmd.uid
    assert cmd.args.seqset == SeqSet([(1, None)])
    assert cmd.args.request.changedsince == 12345
    assert parse_command(b"a FETCH 1 FLAGS (changedsince 1)").args.request.changedsince == 1
    assert parse_command(b"a FETCH 1 FLAGS").args.request.changedsince is None


@pytest.mark.parametrize(
    "spec",
    [
        b"",
        b"()",
        b"(FLAGS",
        b"(ALL)",
        b"FOO",
        b"BODY[0]",
        b"BODY[MIME]",
        b"BODY[1.FOO]",
        b"BODY[HEADER.FIELDS ()]",
        b"BODY[HEADER.FIELDS]",
        b"BODY[]<5>",
        b"BODY[]<1.0>",
        b"BODY.PEEK",
        b"BODY[",
        b"(FLAGS  UID)",
        b"FLAGS (CHANGEDSINCE 0)",
        b"FLAGS (VANISHED)",
        b"FLAGS ()",
    ],
)
def test_fetch_errors(spec: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(b"a FETCH 1 " + spec)


# ---------------------------------------------------------------------------
# STORE


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"a STORE 1 FLAGS (\\Seen)", Store(SeqSet([(1, 1)]), "", False, ["\\Seen"])),
        (b"a STORE 1:2 +FLAGS.SILENT (\\seen foo)", Store(SeqSet([(1, 2)]), "+", True, ["\\Seen", "foo"])),
        (
            b"a STORE * -flags \\Deleted \\Flagged",
            Store(SeqSet([(None, None)]), "-", False, ["\\Deleted", "\\Flagged"]),
        ),
        (b"a STORE 1 FLAGS ()", Store(SeqSet([(1, 1)]), "", False, [])),
        (b"a STORE 1 (UNCHANGEDSINCE 0) +FLAGS (x)", Store(SeqSet([(1, 1)]), "+", False, ["x"], 0)),
        (b"a STORE 1 (unchangedsince 320162338) FLAGS.SILENT x", Store(SeqSet([(1, 1)]), "", True, ["x"], 320162338)),
    ],
)
def test_store(raw: bytes, want: Store) -> None:
    assert args(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        b"a STORE 1 FLAGS",
        b"a STORE 1 +FLAGZ (x)",
        b"a STORE 1 *FLAGS (x)",
        b"a STORE 1 FLAGS (x",
        b"a STORE 1 (FOO 1) FLAGS x",
        b"a STORE 1 () FLAGS x",
        b"a STORE 1 FLAGS (x) y",
        b"a STORE 1 FLAGS (x{)",
    ],
)
def test_store_errors(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(raw)


def test_uid_store_and_expunge() -> None:
    cmd = parse_command(b"a uid store 5 +FLAGS (x)")
    assert (cmd.name, cmd.uid) == ("STORE", True)
    cmd = parse_command(b"a UID EXPUNGE 1:3,7")
    assert (cmd.name, cmd.uid, cmd.args) == ("EXPUNGE", True, SeqSet([(1, 3), (7, 7)]))
    with pytest.raises(ParseError):
        parse_command(b"a UID EXPUNGE")


# ---------------------------------------------------------------------------
# Sequence sets


@pytest.mark.parametrize(
    ("text", "largest", "resolved"),
    [
        ("1:3,5,7:*", 10, [(1, 3), (5, 5), (7, 10)]),
        ("*", 4, [(4, 4)]),
        ("5:2", 10, [(2, 5)]),
        ("*:3", 2, [(2, 3)]),
        ("3,1,2", 10, [(1, 3)]),
        ("1:4,2:8,10", 10, [(1, 8), (10, 10)]),
        ("1:*", 0, []),
        ("20:30", 5, [(20, 30)]),
    ],
)
def test_seqset_resolve(text: str, largest: int, resolved: list[tuple[int, int]]) -> None:
    s = SeqSet.parse(text)
    assert s.resolve(largest) == resolved
    assert str(s) == text


def test_seqset_helpers() -> None:
    s = SeqSet.parse("2:4,9:*")
    assert [n for n in range(1, 13) if s.contains(n, 10)] == [2, 3, 4, 9, 10]
    assert list(s.iter_values(10)) == [2, 3, 4, 9, 10]
    assert list(SeqSet.parse("1:4294967295").iter_values(3)) == [1, 2, 3]
    assert s.has_star() and not SeqSet.parse("1").has_star()


@pytest.mark.parametrize("text", ["", "0", "1:0", "1,", ",1", "1::2", "1:2:3", "a", "$", "4294967296", "-1", "1 2"])
def test_seqset_errors(text: str) -> None:
    with pytest.raises(ParseError):
        SeqSet.parse(text)


# ---------------------------------------------------------------------------
# SEARCH / SORT / THREAD


def _key(crit: bytes, charset: bytes = b"") -> Any:
    prefix = b"a SEARCH " + (b"CHARSET " + charset + b" " if charset else b"")
    s = args(prefix + crit)
    assert isinstance(s, Search)
    return s.key


_S = SeqSet.parse


@pytest.mark.parametrize(
    ("crit", "want"),
    [
        (b"ALL", AllKey()),
        (b"ANSWERED", FlagKey("\\Answered")),
        (b"DELETED", FlagKey("\\Deleted")),
        (b"DRAFT", FlagKey("\\Draft")),
        (b"FLAGGED", FlagKey("\\Flagged")),
        (b"SEEN", FlagKey("\\Seen")),
        (b"RECENT", FlagKey("\\Recent")),
        (b"NEW", And((FlagKey("\\Recent"), FlagKey("\\Seen", True)))),
        (b"OLD", FlagKey("\\Recent", True)),
        (b"UNANSWERED", FlagKey("\\Answered", True)),
        (b"UNDELETED", FlagKey("\\Deleted", True)),
        (b"UNDRAFT", FlagKey("\\Draft", True)),
        (b"UNFLAGGED", FlagKey("\\Flagged", True)),
        (b"unseen", FlagKey("\\Seen", True)),
        (b"KEYWORD $Junk", FlagKey("$Junk")),
        (b"UNKEYWORD foo", FlagKey("foo", True)),
        (b"BCC bob", HeaderKey("BCC", "bob")),
        (b"CC bob", HeaderKey("CC", "bob")),
        (b'FROM "Bob Smith"', HeaderKey("FROM", "Bob Smith")),
        (b"TO {3}\r\nbob", HeaderKey("TO", "bob")),
        (b"SUBJECT {3+}\r\nhi!", HeaderKey("SUBJECT", "hi!")),
        (b'HEADER x-spam ""', HeaderKey("X-SPAM", "")),
        (b'HEADER "Message-ID" <x@y>', HeaderKey("MESSAGE-ID", "<x@y>")),
        (b"BODY hello", TextKey("BODY", "hello")),
        (b'TEXT "a \\"b\\""', TextKey("TEXT", 'a "b"')),
        (b"BEFORE 1-Feb-2024", DateKey("BEFORE", date(2024, 2, 1))),
        (b"ON 01-feb-2024", DateKey("ON", date(2024, 2, 1))),
        (b'SINCE "29-Feb-2024"', DateKey("SINCE", date(2024, 2, 29))),
        (b"SENTBEFORE 1-Jan-2000", DateKey("SENTBEFORE", date(2000, 1, 1))),
        (b"SENTON 1-Jan-2000", DateKey("SENTON", date(2000, 1, 1))),
        (b"SENTSINCE 1-Jan-2000", DateKey("SENTSINCE", date(2000, 1, 1))),
        (b"LARGER 100", NumberKey("LARGER", 100)),
        (b"SMALLER 0", NumberKey("SMALLER", 0)),
        (b"MODSEQ 620162338", NumberKey("MODSEQ", 620162338)),
        (b'MODSEQ "/flags/\\\\draft" all 5', NumberKey("MODSEQ", 5)),
        (b"UID 1:*", SeqKey(_S("1:*"), uid=True)),
        (b"1:3,5", SeqKey(_S("1:3,5"))),
        (b"*", SeqKey(_S("*"))),
        (b"NOT SEEN", Not(FlagKey("\\Seen"))),
        (b"OR SEEN FLAGGED", Or(FlagKey("\\Seen"), FlagKey("\\Flagged"))),
        (b"(SEEN)", FlagKey("\\Seen")),
        (b"(SEEN FLAGGED)", And((FlagKey("\\Seen"), FlagKey("\\Flagged")))),
        (b"SEEN FLAGGED", And((FlagKey("\\Seen"), FlagKey("\\Flagged")))),
        (
            b"OR (FROM a TO b) NOT OR 1 UID 2",
            Or(And((HeaderKey("FROM", "a"), HeaderKey("TO", "b"))), Not(Or(SeqKey(_S("1")), SeqKey(_S("2"), True)))),
        ),
        (b"NOT NOT (NOT DELETED)", Not(Not(Not(FlagKey("\\Deleted"))))),
        (
            b"OR OR SEEN DRAFT OR DELETED FLAGGED",
            Or(Or(FlagKey("\\Seen"), FlagKey("\\Draft")), Or(FlagKey("\\Deleted"), FlagKey("\\Flagged"))),
        ),
    ],
)
def test_search_keys(crit: bytes, want: Any) -> None:
    assert _key(crit) == want


@pytest.mark.parametrize(
    ("charset", "crit", "want"),
    [
        (b"UTF-8", b"SUBJECT {5}\r\n\xc3\xa9t\xc3\xa9", HeaderKey("SUBJECT", "\u00e9t\u00e9")),
        (b"us-ascii", b"SUBJECT x", HeaderKey("SUBJECT", "x")),
        (b"ISO-8859-1", b"BODY {1}\r\n\xe9", TextKey("BODY", "\u00e9")),
        (b'"KOI8-R"', b"TEXT {1}\r\n\xc1", TextKey("TEXT", "\u0430")),
    ],
)
def test_search_charsets(charset: bytes, crit: bytes, want: Any) -> None:
    assert _key(crit, charset) == want


def test_search_charset_field() -> None:
    assert args(b"a SEARCH CHARSET utf-8 ALL").charset == "UTF-8"
    assert args(b"a SEARCH ALL").charset is None
    assert args(b"a SEARCH RETURN (MIN MAX count) ALL").return_opts == ["MIN", "MAX", "COUNT"]
    assert args(b"a SEARCH RETURN () CHARSET UTF-8 SEEN") == Search("UTF-8", FlagKey("\\Seen"), [])


@pytest.mark.parametrize("charset", [b"X-NOPE", b"base64", b"rot13", b'""'])
def test_search_bad_charset(charset: bytes) -> None:
    with pytest.raises(BadCharset) as ei:
        parse_command(b"t9 SEARCH CHARSET " + charset + b" ALL")
    assert ei.value.tag == "t9"


@pytest.mark.parametrize(
    "crit",
    [
        b"",
        b"FOO",
        b"SEEN  FLAGGED",
        b"(SEEN",
        b"SEEN)",
        b"()",
        b"OR SEEN",
        b"NOT",
        b"FROM",
        b"HEADER x",
        b"BEFORE 1-Foo-2024",
        b"BEFORE 31-Feb-2024",
        b"BEFORE 2024-01-01",
        b"LARGER x",
        b"LARGER 99999999999",
        b"UID",
        b"UID 0",
        b"KEYWORD \\Seen",
        b'MODSEQ "/flags/x" bogus 5',
        b"$",
        b"CHARSET",
    ],
)
def test_search_errors(crit: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(b"a SEARCH " + crit)


def test_search_invalid_bytes_for_charset() -> None:
    with pytest.raises(ParseError) as ei:
        parse_command(b"a SEARCH CHARSET UTF-8 SUBJECT {1}\r\n\xff")
    assert not isinstance(ei.value, BadCharset)


def test_search_nesting_limit() -> None:
    ok = b"a SEARCH " + b"(" * (MAX_DEPTH - 2) + b"SEEN" + b")" * (MAX_DEPTH - 2)
    assert parse_command(ok).args.key == FlagKey("\\Seen")
    for deep in (b"(" * 5000 + b"SEEN" + b")" * 5000, b"NOT " * 5000 + b"SEEN", b"OR " * 5000 + b"SEEN" * 5001):
        with pytest.raises(ParseError, match="nested"):
            parse_command(b"a SEARCH " + deep)


def test_sort_and_thread() -> None:
    cmd = parse_command(b"a UID SORT (REVERSE arrival subject) UTF-8 SINCE 1-Jan-2024 SEEN")
    assert cmd.uid and cmd.name == "SORT"
    assert cmd.args == Sort(
        [("ARRIVAL", True), ("SUBJECT", False)], "UTF-8", And((DateKey("SINCE", date(2024, 1, 1)), FlagKey("\\Seen")))
    )
    assert args(b"a SORT (DISPLAYFROM DISPLAYTO CC TO FROM DATE SIZE) US-ASCII ALL").criteria[0] == (
        "DISPLAYFROM",
        False,
    )
    assert args(b"a THREAD references UTF-8 ALL") == Thread("REFERENCES", "UTF-8", AllKey())
    for bad in (
        b"a SORT () UTF-8 ALL",
        b"a SORT (FOO) UTF-8 ALL",
        b"a SORT (REVERSE) UTF-8 ALL",
        b"a SORT (DATE) ALL",
        b"a THREAD ORDEREDSUBJECT UTF-8",
        b"a SORT (DATE) UTF-8",
    ):
        with pytest.raises(ParseError):
            parse_command(bad)
    with pytest.raises(BadCharset):
        parse_command(b"a THREAD REFERENCES X-UNKNOWN ALL")


# ---------------------------------------------------------------------------
# Modified UTF-7


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("&", "&-"),
        ("a&b", "a&-b"),
        ("Entw\u00fcrfe", "Entw&APw-rfe"),
        ("\u65e5\u672c\u8a9e", "&ZeVnLIqe-"),
        ("~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("\U0001f600", "&2D3eAA-"),
        ("", ""),
        ("plain ASCII", "plain ASCII"),
    ],
)
def test_mutf7_roundtrip(text: str, wire: str) -> None:
    assert encode_mutf7(text) == wire
    assert decode_mutf7(wire) == text


@pytest.mark.parametrize("wire", ["&", "&Jjo", "&Jjo!-", "&AGE-", "&2D0-", "caf\u00e9", "&U,BTF2-", "&A-", "a\x00b"])
def test_mutf7_invalid(wire: str) -> None:
    with pytest.raises(ValueError):
        decode_mutf7(wire)


@given(st.text())
def test_mutf7_property(s: str) -> None:
    try:
        s.encode("utf-16-be")
    except UnicodeEncodeError:
        return  # lone surrogates have no UTF-16 form
    wire = encode_mutf7(s)
    assert all(0x20 <= ord(c) <= 0x7E for c in wire)
    assert decode_mutf7(wire) == s


# ---------------------------------------------------------------------------
# Fuzzing: any input gives a Command or a ParseError, never another exception


def _parse_or_error(raw: bytes) -> None:
    try:
        cmd = parse_command(raw)
    except ParseError as exc:
        assert isinstance(exc.tag, str) and exc.tag
        return
    assert cmd.name.isupper()


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    _parse_or_error(raw)
    tag_of(raw)
    literal_at_end(raw)


_TOKENS = [
    "(",
    ")",
    " ",
    "  ",
    '"',
    '\\"',
    "\\",
    "{",
    "}",
    "{3}\r\n",
    "{0}\r\n",
    "{2+}\r\n",
    "~{1}\r\n",
    "[",
    "]",
    "<",
    ">",
    "<0.5>",
    ".",
    "*",
    "%",
    "1",
    "0",
    "1:*",
    "4294967296",
    ",",
    ":",
    "NIL",
    "\r\n",
    "\x00",
    "\xff",
    "&",
    "&-",
    "&ZeVnLIqe-",
    "INBOX",
    "ALL",
    "FAST",
    "FULL",
    "BODY",
    "BODY.PEEK",
    "HEADER",
    "HEADER.FIELDS",
    ".NOT",
    "TEXT",
    "MIME",
    "FLAGS",
    "+FLAGS",
    "-FLAGS.SILENT",
    "\\Seen",
    "UNCHANGEDSINCE",
    "CHANGEDSINCE",
    "CHARSET",
    "UTF-8",
    "RETURN",
    "OR",
    "NOT",
    "UID",
    "FROM",
    "HEADER",
    "BEFORE",
    "1-Jan-2024",
    '"1-Jan-2024 00:00:00 +0000"',
    "MODSEQ",
    "KEYWORD",
    "LARGER",
    "REVERSE",
    "DATE",
    "CONDSTORE",
    "USE",
    "STATUS",
    "MESSAGES",
    "SPECIAL-USE",
    "=",
]
_COMMANDS = [
    "LOGIN",
    "AUTHENTICATE",
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "STATUS",
    "APPEND",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "SEARCH",
    "SORT",
    "THREAD",
    "ENABLE",
    "ID",
    "COMPRESS",
    "GETQUOTA",
    "GETQUOTAROOT",
    "SETQUOTA",
    "UID FETCH",
    "UID SEARCH",
    "UID EXPUNGE",
    "NOOP",
    "IDLE",
]


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_COMMANDS),
    st.lists(st.sampled_from(_TOKENS), max_size=25),
    st.booleans(),
)
def test_fuzz_generated_commands(name: str, tokens: list[str], crlf: bool) -> None:
    raw = ("t " + name + " " + "".join(tokens) + ("\r\n" if crlf else "")).encode("utf-8", "surrogateescape")
    _parse_or_error(raw)


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["(", "NOT ", "OR ", "SEEN ", ")", "SEEN", " "]), min_size=150, max_size=600))
def test_fuzz_deep_search(tokens: list[str]) -> None:
    _parse_or_error(("a SEARCH " + "".join(tokens)).encode())


_VALID = [
    b'a1 APPEND INBOX (\\Seen) "5-Jan-2024 10:00:00 +0100" {5}\r\nhello\r\n',
    b"a2 LOGIN {3}\r\nbob {3+}\r\npw!\r\n",
    b"a3 UID FETCH 1:*,7 (FLAGS BODY.PEEK[1.2.HEADER.FIELDS (FROM {2}\r\nTO)]<0.100>) (CHANGEDSINCE 5)\r\n",
    b"a4 SEARCH RETURN (MIN) CHARSET UTF-8 OR (FROM bob SUBJECT {2}\r\n\xc3\xa9) NOT 1:3,5 SINCE 1-Jan-2024\r\n",
    b"a5 STORE 1 (UNCHANGEDSINCE 7) +FLAGS.SILENT (\\Seen foo)\r\n",
    b'a6 LIST (SUBSCRIBED) "" ("*" %) RETURN (SPECIAL-USE STATUS (MESSAGES))\r\n',
    b"a7 CREATE &ZeVnLIqe- (USE (\\Sent))\r\n",
    b'a8 ID ("name" "x" "v" NIL)\r\n',
    b'a9 SORT (REVERSE DATE) UTF-8 MODSEQ "/flags/\\\\Seen" all 5\r\n',
    b'b1 SETQUOTA "" (STORAGE 10)\r\n',
]


@pytest.mark.parametrize("raw", _VALID)
def test_valid_corpus_truncations_and_mutations(raw: bytes) -> None:
    parse_command(raw)  # the full command is valid
    for i in range(len(raw)):
        _parse_or_error(raw[:i])
        for b in (b"\x00", b" ", b"(", b")", b"{", b'"', b"\\", b"*", b"9"):
            _parse_or_error(raw[:i] + b + raw[i + 1 :])
