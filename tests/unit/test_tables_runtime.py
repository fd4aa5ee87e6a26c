"""Table modules at run time: real objects built from config text (spec §B.6)."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from pymaddy.runtime.module import ModuleError
from pymaddy.tables.base import MutableTable, Table
from pymaddy.tables.file import FileTable, parse_text
from pymaddy.tables.regexp import RE2Error, translate
from pymaddy.tables.sql import SQLQueryTable, SQLTable, TableError, parse_dsn
from tests.runtime_helpers import Runtime

T = TypeVar("T")

FIXTURES = Path("/work/shared/fixtures/maddy-upstream")
DEFAULT_CONF = FIXTURES / "default" / "maddy.conf"


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def default_conf(aliases: Path) -> str:
    return DEFAULT_CONF.read_text().replace("/etc/maddy/aliases", str(aliases))


async def lookups(
    text: str, state: Path, block: str, keys: list[str], roots: list[str] | None = None
) -> list[list[str]]:
    async with Runtime(text, state, roots or [block]) as rt:
        table = rt.table(block)
        return [await table.lookup_multi(k) for k in keys]


def chain_of(body: str) -> str:
    """A named chain around inline tables (top-level static/regexp blocks cannot be referenced by name)."""
    return "table.chain t {\n" + body + "\n}\n"


# -- the default configuration's local_rewrites ---------------------------------------------


@pytest.fixture
def aliases(tmp_path: Path) -> Path:
    p = tmp_path / "aliases"
    p.write_text(
        "# aliases\n"
        "info@example.org: alice@example.org, bob@example.org\n"
        "sales@example.org: carol@example.org\n"
        "sales@example.org: dave@example.org\n"
    )
    return p


def test_default_local_rewrites(tmp_path: Path, aliases: Path) -> None:
    keys = [
        "foo+tag@example.org",
        "postmaster",
        "foo@example.org",
        "info@example.org",
        "info+lists@example.org",
        "sales@example.org",
        "a+b+c@example.org",
    ]
    got = run(lookups(default_conf(aliases), tmp_path, "local_rewrites", keys))
    assert got == [
        ["foo@example.org"],
        ["postmaster@example.org"],  # $(primary_domain)
        ["foo@example.org"],  # every step optional: the key passes through
        ["alice@example.org", "bob@example.org"],
        ["alice@example.org", "bob@example.org"],  # tag stripped, then the alias expands
        ["carol@example.org", "dave@example.org"],  # repeated keys accumulate
        ["a+b@example.org"],  # greedy (.+) as in Go
    ]


def test_default_local_rewrites_missing_aliases_file(tmp_path: Path) -> None:
    async def go() -> tuple[list[str], list[str]]:
        async with Runtime(default_conf(tmp_path / "nope"), tmp_path, ["local_rewrites"]) as rt:
            return await rt.table("local_rewrites").lookup_multi("x+y@example.org"), rt.log_lines

    values, logs = run(go())
    assert values == ["x@example.org"]
    assert any(f"table.file: ignoring non-existent file: {tmp_path / 'nope'}" in line for line in logs)


def test_regexp_catch_all_recipe(tmp_path: Path) -> None:
    # A catch-all regexp step appended to the default chain: every address of the domain,
    # aliased or not (chain steps apply in turn), ends in the catch-all mailbox.
    text = chain_of(
        'optional_step regexp "(.+)\\+(.+)@(.+)" "$1@$3"\n'
        " optional_step file aliases\n"
        ' optional_step regexp ".*@example.org" "catchall@example.org"'
    )
    (tmp_path / "aliases").write_text("info@example.org: alice@example.com\n")
    keys = ["info@example.org", "whoever+tag@example.org", "x@example.com"]
    got = run(lookups(text, tmp_path, "t", keys))
    assert got == [["alice@example.com"], ["catchall@example.org"], ["x@example.com"]]


# -- table.file ----------------------------------------------------------------------------------


def test_file_format_fixture() -> None:
    text = (FIXTURES / "docs-examples" / "reference__table__file__4.aliases").read_text()
    assert parse_text("f", text) == {
        "aaa": ["bbb", ""],
        "ccc": ["ddd"],
        # Only a `#` in the first column starts a comment (maddy's code; its docs say otherwise).
        "# Trailing and leading whitespace is ignored.": [""],
        "ddd": ["firstvalue", "secondvalue", "firstvalue", "secondvalue"],
    }


def test_file_format_details() -> None:
    assert parse_text("f", "  # indented hash is a key\n#comment\r\nk: a,, b \r\n") == {
        "# indented hash is a key": [""],
        "k": ["a", "", "b"],
    }
    assert parse_text("f", "a: b: c\n") == {"a": ["b: c"]}
    with pytest.raises(ValueError, match=r"^f:2: empty address before colon$"):
        parse_text("f", "ok\n : value\n")


def test_file_start_errors(tmp_path: Path) -> None:
    (tmp_path / "bad").write_text("a: b\n: c\n")
    with pytest.raises(ModuleError, match=r"bad:2: empty address before colon"):
        run(lookups("table.file t {\n file bad\n}\n", tmp_path, "t", []))


def test_file_relative_to_state_dir_and_inline(tmp_path: Path) -> None:
    (tmp_path / "al").write_text("k: v\nalone\n")
    text = chain_of("step file al")
    assert run(lookups(text, tmp_path, "t", ["k", "alone", "x"])) == [["v"], [""], []]


def test_file_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FileTable, "reload_interval", 0.1)
    path = tmp_path / "aliases"
    path.write_text("a: 1\n")
    old = time.time() - 60
    os.utime(path, (old, old))

    async def wait_for(table: Table, key: str, want: list[str]) -> None:
        for _ in range(100):
            if await table.lookup_multi(key) == want:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{key} never became {want}: {await table.lookup_multi(key)}")

    async def go() -> list[str]:
        async with Runtime("table.file t {\n file aliases\n}\n", tmp_path, ["t"]) as rt:
            t = rt.block("t", FileTable)
            assert await t.lookup_multi("a") == ["1"]
            # A change is picked up once the file is half an interval old.
            path.write_text("a: 2, 3\nb\n")
            await wait_for(t, "a", ["2", "3"])
            assert await t.lookup_multi("b") == [""]
            # A bad file keeps the old data and is logged.
            path.write_text("a: 4\n: broken\n")
            await asyncio.sleep(0.5)
            assert await t.lookup_multi("a") == ["2", "3"]
            # A fixed file is taken again.
            path.write_text("a: 5\n")
            await wait_for(t, "a", ["5"])
            # A removed file empties the table.
            path.unlink()
            await wait_for(t, "a", [])
            return rt.log_lines

    logs = run(go())
    assert any("table.file: " in line and "aliases:2: empty address before colon" in line for line in logs)


def test_file_reload_waits_for_settled_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FileTable, "reload_interval", 100.0)
    path = tmp_path / "aliases"
    path.write_text("a: 1\n")

    async def go() -> None:
        async with Runtime("table.file t {\n file aliases\n}\n", tmp_path, ["t"]) as rt:
            t = rt.block("t", FileTable)
            path.write_text("a: 2\n")
            await t.reload()  # modified just now: younger than half an interval
            assert await t.lookup_multi("a") == ["1"]
            old = time.time() - 60
            os.utime(path, (old, old))
            await t.reload()
            assert await t.lookup_multi("a") == ["2"]

    run(go())


# -- table.static, identity, email_* -------------------------------------------------------------------


def test_static_and_simple_tables(tmp_path: Path) -> None:
    text = (
        "table.chain s {\n step static {\n entry a x y\n entry a z\n entry b w\n }\n}\n"
        "table.chain id {\n step identity\n}\n"
        "table.chain lp {\n step email_localpart\n}\n"
        "table.chain lpo {\n step email_localpart_optional\n}\n"
        "table.chain ewd {\n step email_with_domain example.org example.com\n}\n"
    )

    async def go() -> dict[str, list[list[str]]]:
        async with Runtime(text, tmp_path, ["s", "id", "lp", "lpo", "ewd"]) as rt:
            out: dict[str, list[list[str]]] = {}
            for name, keys in {
                "s": ["a", "b", "c"],
                "id": ["Whatever@X"],
                "lp": ["user@example.org", "nodomain", "postmaster", '"a b"@x', "@x"],
                "lpo": ["user@example.org", "nodomain"],
                "ewd": ["user", "a b", 'q"uote'],
            }.items():
                t = rt.table(name)
                out[name] = [await t.lookup_multi(k) for k in keys]
            return out

    got = run(go())
    assert got["s"] == [["z"], ["w"], []]  # the last entry for a key wins
    assert got["id"] == [["Whatever@X"]]
    assert got["lp"] == [["user"], [], ["postmaster"], ['"a b"'], []]
    assert got["lpo"] == [["user"], ["nodomain"]]
    assert got["ewd"] == [
        ["user@example.org", "user@example.com"],
        ['"a b"@example.org', '"a b"@example.com'],
        ['"q\\"uote"@example.org', '"q\\"uote"@example.com'],
    ]


# -- table.chain --------------------------------------------------------------------------------------------


def test_chain_fan_out_and_misses(tmp_path: Path) -> None:
    text = (
        "table.chain fan {\n"
        " step static {\n entry k a b\n }\n"
        " step static {\n entry a a1 a2\n entry b b1\n }\n"
        "}\n"
        "table.chain strict {\n step static {\n entry k a b\n }\n step static {\n entry a a1\n }\n}\n"
        "table.chain opt {\n step static {\n entry k a b\n }\n optional_step static {\n entry a a1\n }\n}\n"
        "table.chain empty {\n}\n"
    )

    async def go() -> list[list[str]]:
        async with Runtime(text, tmp_path, ["fan", "strict", "opt", "empty"]) as rt:
            return [
                await rt.table("fan").lookup_multi("k"),
                await rt.table("fan").lookup_multi("zz"),
                await rt.table("strict").lookup_multi("k"),
                # an optional step missing for one value is skipped for all (maddy's `continue STEP`)
                await rt.table("opt").lookup_multi("k"),
                await rt.table("empty").lookup_multi("k"),
            ]

    assert run(go()) == [["a1", "a2", "b1"], [], [], ["a", "b"], ["k"]]


def test_chain_docs_example(tmp_path: Path) -> None:
    (tmp_path / "emails").write_text("john@example.org: john@other.example\n")
    text = chain_of('step regexp "(.+?)(\\+[^+\\"@]+)?@example.org" "$1@example.org"\n step file emails')
    assert run(lookups(text, tmp_path, "t", ["john+x@example.org", "john@other.org"])) == [
        ["john@other.example"],
        [],
    ]


# -- table.regexp -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "block", "key", "want"),
    [
        ('"(.+)@(.+)" "$2" "$1"', "", "user@example.org", ["example.org", "user"]),
        ('"(?P<user>.+)@(?P<dom>.+)" "${dom}:${user}"', "", "u@d", ["d:u"]),
        ('"(?<user>.+)@(.+)" "$user-$2"', "", "u@d", ["u-d"]),
        ('"(.+)@(.+)" "$1x" "${1}x" "$$1" "$9" "$" "${1"', "", "u@d", ["", "ux", "$1", "", "$", "${1"]),
        ('"(a)|(b)" "[$1][$2]"', "", "b", ["[][b]"]),
        ('"(.+)" "$1"', "", "MiXeD", ["MiXeD"]),
        ('"abc" "hit"', "", "ABC", ["hit"]),  # case_insensitive by default
        ('"abc" "hit"', "case_insensitive no", "ABC", []),
        ('"b" "hit"', "", "abc", []),  # full_match by default
        ('"b" "hit"', "full_match no", "abc", ["hit"]),
        ('"^b" "hit"', "full_match no", "abc", []),
        ('"(.+)" "$1"', "expand_replaceholders no", "x", ["$1"]),
        ('".*"', "", "anything", []),  # no replacement: never matches (maddy's code)
        ('"[[:digit:]]+\\d" "n"', "", "123", ["n"]),
        ('"\\d+" "n"', "", "\u0661\u0662", []),  # Go's \\d is ASCII-only
        ('"a.c" "hit"', "", "a\nc", []),
        ('"abc" "hit"', "", "abc\n", []),  # $ is end of text, not before a final newline
        ('"x\\Q.+\\E" "hit"', "", "x.+", ["hit"]),
        ('"a\\\\b" "hit"', "", "a\\b", ["hit"]),  # only \" is an escape in config strings
    ],
)
def test_regexp(tmp_path: Path, args: str, block: str, key: str, want: list[str]) -> None:
    body = f"step regexp {args}" + (" {\n " + block + "\n }" if block else "")
    assert run(lookups(chain_of(body), tmp_path, "t", [key])) == [want]


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("a(?=b)", "invalid or unsupported Perl syntax"),
        ("(a)\\1", "invalid escape sequence"),
        ("(a", "missing closing )"),
        ("a)", "unexpected )"),
        ("[a", "missing closing ]"),
    ],
)
def test_regexp_rejects_what_re2_rejects(pattern: str, error: str) -> None:
    with pytest.raises(RE2Error, match=re.escape(error)):
        translate(pattern)


def test_regexp_translation() -> None:
    assert translate("a(?i)b|c").pattern == "a(?i:b)|(?i:c)"
    assert re.fullmatch(translate("a(?i)b|c").pattern, "C")
    assert not re.fullmatch(translate("a(?i)b|c").pattern, "AB")
    t = translate("(?P<1x>a)(b)(?<n>c)")
    assert t.names == [("1x", 1), ("n", 3)] and t.groups == 3
    assert re.fullmatch(translate("[[:alpha:][:digit:]]+").pattern, "ab12")
    # `{,n}` is no repetition in RE2 (Python would read it as one): a literal brace.
    assert re.fullmatch(translate("a{,3}").pattern, "a{,3}")
    assert re.fullmatch(translate("a{2,3}").pattern, "aaa")
    with pytest.raises(RE2Error, match="invalid repeat count"):
        translate("a{1001}")


def test_regexp_bad_pattern_is_start_error(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match=r"^table\.regexp: error parsing regexp"):
        run(lookups(chain_of('step regexp "a(?=b)" "x"'), tmp_path, "t", []))


# -- table.sql_query / table.sql_table ----------------------------------------------------------------------

SQL_TABLE = "table.sql_table t {{\n driver {driver}\n dsn {dsn}\n table_name passwords\n}}\n"


def test_sql_table_two_connections(tmp_path: Path) -> None:
    text = SQL_TABLE.format(driver="sqlite3", dsn="credentials.db")

    async def go() -> None:
        async with Runtime(text, tmp_path, ["t"]) as a, Runtime(text, tmp_path, ["t"]) as b:
            ta, tb = a.block("t", SQLTable), b.block("t", SQLTable)
            assert isinstance(ta, MutableTable)
            assert await ta.lookup_multi("u@example.org") == []
            await ta.set_key("u@example.org", "hash1")
            assert await tb.lookup("u@example.org") == "hash1"
            await tb.set_key("u@example.org", "hash2")  # exists: the insert fails, the update runs
            assert await ta.lookup_multi("u@example.org") == ["hash2"]
            await ta.set_key("v@example.org", "h")
            assert sorted(await tb.keys()) == ["u@example.org", "v@example.org"]
            await tb.remove_key("u@example.org")
            assert await ta.lookup("u@example.org") is None
            assert await ta.keys() == ["v@example.org"]

    run(go())
    db = sqlite3.connect(tmp_path / "credentials.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT key, value FROM passwords").fetchall() == [("v@example.org", "h")]
    finally:
        db.close()


def test_sql_table_numbered_args_driver_sqlite(tmp_path: Path) -> None:
    # The "sqlite" spelling gets $1/$2 (maddy names only "sqlite3"); $2 comes first in the UPDATE.
    text = SQL_TABLE.format(driver="sqlite", dsn="file:creds.db?_busy_timeout=1000")

    async def go() -> list[str]:
        async with Runtime(text, tmp_path, ["t"]) as rt:
            t = rt.block("t", SQLTable)
            await t.set_key("k", "v1")
            await t.set_key("k", "v2")
            return await t.lookup_multi("k")

    assert run(go()) == ["v2"]
    assert (tmp_path / "creds.db").exists()


def test_sql_query(tmp_path: Path) -> None:
    text = (
        "table.sql_query q {\n driver sqlite3\n dsn aliases.db\n"
        ' init "CREATE TABLE IF NOT EXISTS aliases (address TEXT, alias TEXT)" \\\n'
        "      \"INSERT INTO aliases VALUES ('a@x', 'b@x'), ('a@x', 'c@x')\"\n"
        ' lookup "SELECT alias FROM aliases WHERE address = $1 ORDER BY alias"\n}\n'
    )

    async def go() -> tuple[list[str], list[str], str | None]:
        async with Runtime(text, tmp_path, ["q"]) as rt:
            t = rt.block("q", SQLQueryTable)
            with pytest.raises(TableError, match=r"table is not mutable \(no 'list' query\)"):
                await t.keys()
            with pytest.raises(TableError, match=r"no 'set' query"):
                await t.set_key("a", "b")
            return await t.lookup_multi("a@x"), await t.lookup_multi("zz"), await t.lookup("a@x")

    assert run(go()) == (["b@x", "c@x"], [], "b@x")


def test_sql_query_named_args(tmp_path: Path) -> None:
    text = (
        "table.sql_query q {\n driver sqlite3\n dsn :memory:\n named_args yes\n"
        ' init "CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)"\n'
        ' lookup "SELECT v FROM kv WHERE k = :key"\n'
        ' add "INSERT INTO kv VALUES (:key, :value)"\n'
        ' set "UPDATE kv SET v = :value WHERE k = :key"\n'
        ' del "DELETE FROM kv WHERE k = :key"\n'
        ' list "SELECT k FROM kv"\n}\n'
    )

    async def go() -> tuple[list[str], list[str]]:
        async with Runtime(text, tmp_path, ["q"]) as rt:
            t = rt.block("q", SQLQueryTable)
            await t.set_key("a", "1")
            await t.set_key("a", "2")
            await t.set_key("b", "3")
            await t.remove_key("b")
            return await t.lookup_multi("a"), await t.keys()

    assert run(go()) == (["2"], ["a"])


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (' lookup "SELEC v FROM kv"', r"failed to prepare lookup query: near \"SELEC\""),
        (' lookup "SELECT v FROM nope WHERE k = $1"', r"failed to prepare lookup query: no such table: nope"),
        (' init "CREATE TABLE"\n lookup "SELECT 1"', r"init query failed"),
    ],
)
def test_sql_query_start_errors(tmp_path: Path, body: str, error: str) -> None:
    text = "table.sql_query q {\n driver sqlite3\n dsn db.sqlite\n" + body + "\n}\n"
    with pytest.raises(ModuleError, match="^table.sql_query: " + error):
        run(lookups(text, tmp_path, "q", []))


def test_sql_postgres_not_supported(tmp_path: Path) -> None:
    text = 'table.sql_query q {\n driver postgres\n dsn "dbname=maddy"\n lookup "SELECT 1"\n}\n'
    with pytest.raises(ModuleError, match="not supported yet"):
        run(lookups(text, tmp_path, "q", []))


def test_parse_dsn(tmp_path: Path) -> None:
    d = parse_dsn("creds.db?_busy_timeout=100&_journal_mode=DELETE", "/state")
    assert (d.target, d.uri, d.busy_timeout_ms, d.journal_mode) == ("/state/creds.db", False, 100, "DELETE")
    d = parse_dsn("file:sub/x.db?mode=rwc&_fk=1", "/state")
    assert (d.target, d.uri, d.foreign_keys) == ("file:/state/sub/x.db?mode=rwc", True, True)
    assert parse_dsn("/abs/x.db", "/state").target == "/abs/x.db"
    assert parse_dsn("file:///abs/x.db", "/state").target == "file:/abs/x.db"
    assert parse_dsn(":memory:", "/state").memory
