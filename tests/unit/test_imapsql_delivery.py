"""storage.imapsql as a delivery target: headers, recipients, quarantine, durability, group commit."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import PartialDelivery
from pymaddy.runtime.module import ModuleError
from pymaddy.storage import imapsql
from pymaddy.storage.blob_fs import FSBlobStore
from pymaddy.storage.imapsql import IMAPSQL, INLINE_MAX_DEFAULT, AccountExists, AccountNotFound
from pymaddy.storage.sqlschema import SCHEMA_VERSION
from pymaddy.tables.base import Table
from tests.runtime_helpers import Runtime


def conf(tmp: Path, extra: str = "") -> str:
    return (
        f"state_dir {tmp}\n"
        "storage.imapsql local_mailboxes {\n"
        "    driver sqlite3\n"
        "    dsn imapsql.db\n"
        f"{extra}"
        "}\n"
    )


def run(tmp: Path, fn: Callable[[IMAPSQL], Awaitable[None]], extra: str = "") -> None:
    async def main() -> None:
        async with Runtime(conf(tmp, extra), tmp, ["local_mailboxes"]) as rt:
            await fn(rt.block("local_mailboxes", IMAPSQL))

    asyncio.run(main())


async def deliver(
    st: IMAPSQL,
    rcpts: list[str],
    *,
    header: bytes = b"Subject: hi\r\nFrom: <bob@example.com>\r\n",
    body: Body | None = None,
    sender: str = "bob@example.com",
    quarantine: bool = False,
) -> None:
    d = await st.start_delivery(MsgMeta(quarantine=quarantine), sender)
    try:
        for r in rcpts:
            await d.add_rcpt(r)
        await d.body(Header.parse(header), body or Body(b"Hello!\r\n"))
        await d.commit()
    except BaseException:
        await d.abort()
        raise


def test_delivered_message_gets_delivered_to_and_return_path(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        await deliver(st, ["Alice@EXAMPLE.org"])
        (msg,) = await st.list_messages("alice@example.org")
        data = await st.read_message(msg)
        assert data == (
            b"Delivered-To: alice@example.org\r\n"
            b"Return-Path: <bob@example.com>\r\n"
            b"Subject: hi\r\nFrom: <bob@example.com>\r\n"
            b"\r\nHello!\r\n"
        )
        assert msg.uid == 1 and msg.size == len(data)
        (inbox,) = await st.list_mailboxes("alice@example.org")
        assert (inbox.name, inbox.uidnext) == ("INBOX", 2)
        assert inbox.highestmodseq == msg.modseq

    run(tmp_path, t)


def test_null_sender_and_spooled_body(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.write_bytes(b"x" * 300_000 + b"\r\n")

    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        await deliver(st, ["alice@example.org"], sender="", body=Body(path=str(spool)))
        (msg,) = await st.list_messages("alice@example.org")
        data = await st.read_message(msg)
        assert data.startswith(b"Delivered-To: alice@example.org\r\nReturn-Path: <>\r\nSubject: hi\r\n")
        assert data.endswith(b"\r\n\r\n" + b"x" * 300_000 + b"\r\n")

    run(tmp_path, t)
    assert spool.exists()  # the target never consumes the caller's buffer


def test_unknown_user_is_501_5_1_1(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        d = await st.start_delivery(MsgMeta(), "bob@example.com")
        with pytest.raises(SMTPError) as ei:
            await d.add_rcpt("nobody@example.org")
        assert (ei.value.code, ei.value.enhanced, ei.value.message) == (501, (5, 1, 1), "User does not exist")
        with pytest.raises(SMTPError) as ei:
            await d.add_rcpt("not an address")
        assert ei.value.code == 501
        await d.abort()
        # SMTP never creates accounts.
        assert await st.list_accounts() == ["alice@example.org"]

    run(tmp_path, t)


BIG = b"z" * INLINE_MAX_DEFAULT + b"\r\nHello!\r\n"  # over INLINE_MAX: stored as a blob file


@pytest.fixture(autouse=True)
def _inline_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small bodies go into the index (the intended setting, whatever the module default is)."""
    monkeypatch.setattr(imapsql, "INLINE_MAX", INLINE_MAX_DEFAULT)


def _blob_rows(tmp: Path) -> list[tuple[int, bool]]:
    """(refs, stored inline) of every blobs row."""
    conn = sqlite3.connect(tmp / "imapsql.db")
    try:
        return [(r[0], r[1] is not None) for r in conn.execute("SELECT refs, data FROM blobs")]
    finally:
        conn.close()


@pytest.mark.parametrize("big", [False, True])
def test_same_account_twice_is_delivered_once(tmp_path: Path, big: bool) -> None:
    files = 1 if big else 0

    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        await st.create_account("carol@example.org")
        await deliver(st, ["alice@example.org", "ALICE@example.org", "carol@example.org"],
                      body=Body(BIG) if big else None)
        (a,) = await st.list_messages("alice@example.org")
        (c,) = await st.list_messages("carol@example.org")
        assert (await st.read_message(c)).startswith(b"Delivered-To: carol@example.org\r\nReturn-Path:")
        assert st.read_message_sync(c) == await st.read_message(c)
        # One blob, shared by both copies: a file when big, else a row holding the body.
        assert a.blob_key == c.blob_key
        assert len(os.listdir(tmp_path / "messages")) == files
        assert _blob_rows(tmp_path) == [(2, not big)]
        # Removing one account keeps the shared blob; removing the last drops it.
        await st.remove_account("alice@example.org")
        assert len(os.listdir(tmp_path / "messages")) == files
        assert _blob_rows(tmp_path) == [(1, not big)]
        assert (await st.read_message(c)).endswith(b"Hello!\r\n")
        await st.remove_account("carol@example.org")
        assert os.listdir(tmp_path / "messages") == []
        assert _blob_rows(tmp_path) == []

    run(tmp_path, t)


def test_quarantine_goes_to_the_junk_special_use_mailbox(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        await st.create_mailbox("alice@example.org", "Spam", "\\Junk")
        await st.create_account("carol@example.org")
        await deliver(st, ["alice@example.org", "carol@example.org"], quarantine=True)
        assert await st.list_messages("alice@example.org") == []
        assert len(await st.list_messages("alice@example.org", "Spam")) == 1
        # No \Junk mailbox: junk_mailbox is created, with the \Junk attribute.
        boxes = {m.name: m.special_use for m in await st.list_mailboxes("carol@example.org")}
        assert boxes == {"INBOX": None, "Quarantine": "\\Junk"}
        assert len(await st.list_messages("carol@example.org", "Quarantine")) == 1
        assert await st.list_messages("carol@example.org") == []

    run(tmp_path, t, extra="    junk_mailbox Quarantine\n")


def test_appendlimit_does_not_apply_to_smtp(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        assert st.appendlimit == 1024
        await st.create_account("alice@example.org")
        await st.set_appendlimit("alice@example.org", 10)
        await deliver(st, ["alice@example.org"], body=Body(b"y" * 100_000))
        (msg,) = await st.list_messages("alice@example.org")
        assert msg.size > 100_000

    run(tmp_path, t, extra="    appendlimit 1K\n")


def test_delivery_map_maps_recipients_to_accounts(tmp_path: Path) -> None:
    class Map(Table):
        async def lookup_multi(self, key: str) -> list[str]:
            return {"postmaster@example.org": ["Alice@example.org"], "alice@example.org": ["alice@example.org"]}.get(
                key, []
            )

    async def t(st: IMAPSQL) -> None:
        st.delivery_map = Map()
        await st.create_account("alice@example.org")
        await st.create_account("bob@example.org")
        await deliver(st, ["PostMaster@example.org", "alice@example.org"])
        assert len(await st.list_messages("alice@example.org")) == 1
        d = await st.start_delivery(MsgMeta(), "")
        with pytest.raises(SMTPError) as ei:
            await d.add_rcpt("bob@example.org")  # an account, but not in the map
        assert ei.value.code == 501
        await d.abort()

    run(tmp_path, t)


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        d = await st.start_delivery(MsgMeta(), "bob@example.com")
        await d.add_rcpt("alice@example.org")
        await d.body(Header.parse(b"Subject: x\r\n"), Body(BIG))
        assert len(os.listdir(tmp_path / "messages")) == 1
        assert await st.list_messages("alice@example.org") == []  # not visible before commit
        await d.abort()
        assert os.listdir(tmp_path / "messages") == []
        assert st.db is not None
        await asyncio.sleep(0)
        assert await st.list_messages("alice@example.org") == []

    run(tmp_path, t)


def test_body_non_atomic_reports_every_recipient(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        await st.create_account("carol@example.org")
        d = await st.start_delivery(MsgMeta(), "bob@example.com")
        assert isinstance(d, PartialDelivery)
        await d.add_rcpt("alice@example.org")
        await d.add_rcpt("carol@example.org")
        seen: list[tuple[str, SMTPError | None]] = []
        await d.body_non_atomic(lambda r, e: seen.append((r, e)), Header.parse(b"A: b\r\n"), Body(b""))
        await d.commit()
        assert seen == [("alice@example.org", None), ("carol@example.org", None)]
        assert len(await st.list_messages("carol@example.org")) == 1

    run(tmp_path, t)


def test_table_lookup_and_account_api(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        await st.create_account("Alice@example.org", [("\\Sent", "Sent"), ("\\Trash", "")])
        assert await st.lookup("alice@EXAMPLE.org") == ""
        assert await st.lookup("nobody@example.org") is None
        with pytest.raises(AccountExists, match="imap: user already exists"):
            await st.create_account("ALICE@example.org")
        with pytest.raises(AccountNotFound, match="imap: user doesn't exists"):
            await st.remove_account("nobody@example.org")
        assert [(m.name, m.special_use) for m in await st.list_mailboxes("alice@example.org")] == [
            ("INBOX", None),
            ("Sent", "\\Sent"),
        ]
        acct = await st.get_or_create_account("dave@example.org")
        assert acct == await st.get_or_create_account("Dave@example.org")
        assert [m.name for m in await st.list_mailboxes("dave@example.org")] == ["INBOX"]
        assert await st.get_appendlimit("dave@example.org") is None
        await st.set_appendlimit("dave@example.org", 5000)
        assert await st.get_appendlimit("dave@example.org") == 5000
        assert await st.list_accounts() == ["alice@example.org", "dave@example.org"]
        assert st.update_socket_path().endswith(".sock")

    run(tmp_path, t)


def test_updates_are_published_after_commit(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        got: list[tuple[str, str, str, int]] = []
        unsub = st.subscribe(lambda u: got.append((u.kind, u.account, u.mailbox, u.uid)))
        await st.create_account("alice@example.org")
        await deliver(st, ["alice@example.org"])
        await deliver(st, ["alice@example.org"], quarantine=True)
        unsub()
        await deliver(st, ["alice@example.org"])
        assert got == [("message", "alice@example.org", "INBOX", 1), ("message", "alice@example.org", "Junk", 1)]

    run(tmp_path, t)


def _db_check(path: Path) -> tuple[str, int, int]:
    conn = sqlite3.connect(path)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        fk = len(conn.execute("PRAGMA foreign_key_check").fetchall())
        ver = conn.execute("SELECT version FROM schema_version").fetchone()[0]
        return ok, fk, ver
    finally:
        conn.close()


@pytest.mark.parametrize("big", [False, True])
def test_concurrent_deliveries_are_stored_once_and_batched(tmp_path: Path, big: bool) -> None:
    n = 50

    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        await st.create_account("carol@example.org")
        assert st.db is not None
        before = st.db.stats.transactions
        dirs_before = st.db.stats.dir_syncs

        async def one(i: int) -> None:
            await deliver(st, ["alice@example.org", "carol@example.org"], header=b"Subject: %d\r\n" % i,
                          body=Body(b"body %d\r\n" % i * (20_000 if big else 50)))

        await asyncio.gather(*(one(i) for i in range(n)))
        txs = st.db.stats.transactions - before
        # Group commit: 50 commits share far fewer transactions (one fsync each).
        assert txs < n // 2, st.db.stats
        assert st.db.stats.max_batch > 1
        # Blob files are fsynced on the writer thread, the directory once per batch; inline bodies need neither.
        assert st.db.stats.file_syncs == (n if big else 0)
        dirs = st.db.stats.dir_syncs - dirs_before
        assert (dirs <= txs) if big else (dirs == 0), st.db.stats
        for acct in ("alice@example.org", "carol@example.org"):
            msgs = await st.list_messages(acct)
            assert [m.uid for m in msgs] == list(range(1, n + 1))
            subjects = sorted([(await st.read_message(m)).split(b"Subject: ")[1].split(b"\r\n")[0] for m in msgs])
            assert subjects == sorted(b"%d" % i for i in range(n))
        assert len(os.listdir(tmp_path / "messages")) == (n if big else 0)

    run(tmp_path, t)
    assert _db_check(tmp_path / "imapsql.db") == ("ok", 0, SCHEMA_VERSION)

    # It opens cleanly again and everything is there.
    async def again(st: IMAPSQL) -> None:
        assert len(await st.list_messages("carol@example.org")) == n

    run(tmp_path, again)


def test_lone_sender_is_not_delayed_and_commits_alone(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        assert st.db is not None
        # Let the start-up garbage collection (one write transaction) finish first: it is not ours to count.
        for _ in range(2000):
            if st.db.stats.transactions >= 2:
                break
            await asyncio.sleep(0.001)
        before = st.db.stats.transactions
        for _ in range(5):
            await deliver(st, ["alice@example.org"])
        assert st.db.stats.transactions - before == 5

    run(tmp_path, t)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    run(tmp_path, lambda st: asyncio.sleep(0))
    conn = sqlite3.connect(tmp_path / "imapsql.db")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ModuleError, match="schema version 99 is newer"):
        run(tmp_path, lambda st: asyncio.sleep(0))


def test_sqlite_is_in_wal_mode_and_blob_dir_is_created(tmp_path: Path) -> None:
    async def t(st: IMAPSQL) -> None:
        assert isinstance(st.blobs, FSBlobStore)
        assert st.blobs.root == str(tmp_path / "blobs")

    run(tmp_path, t, extra="    msg_store fs blobs\n")
    assert (tmp_path / "blobs").is_dir()
    conn = sqlite3.connect(tmp_path / "imapsql.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_unsupported_driver_refuses_to_start(tmp_path: Path) -> None:
    text = f"state_dir {tmp_path}\nstorage.imapsql local_mailboxes {{\n driver postgres\n dsn x\n}}\n"

    async def main() -> None:
        async with Runtime(text, tmp_path, ["local_mailboxes"]):
            pass

    with pytest.raises(ModuleError, match="not supported yet"):
        asyncio.run(main())


def test_schema_v1_database_is_migrated_and_its_blobs_still_read(tmp_path: Path) -> None:
    from pymaddy.storage.sqlschema import MIGRATIONS, render

    # A version-1 database (before inline bodies) with one message in a blob file.
    conn = sqlite3.connect(tmp_path / "imapsql.db", isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for stmt in MIGRATIONS[0]:
        conn.execute(render(stmt))
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute("INSERT INTO accounts (id, name, created) VALUES (1, 'alice@example.org', 0)")
    conn.execute("INSERT INTO mailboxes (id, account_id, name, uidvalidity, uidnext) VALUES (1, 1, 'INBOX', 7, 2)")
    conn.execute("INSERT INTO blobs (key, size, refs) VALUES ('oldkey', 5, 1)")
    conn.execute("INSERT INTO messages (mailbox_id, uid, modseq, internaldate, size, blob_key, prefix) "
                 "VALUES (1, 1, 1, 0, 9, 'oldkey', x'41420d0a')")
    conn.executemany("INSERT INTO flags VALUES (1, ?)", [("\\Seen",), ("$Label1",), ("\\Answered",)])
    conn.close()
    (tmp_path / "messages").mkdir()
    (tmp_path / "messages" / "oldkey").write_bytes(b"hello")

    async def t(st: IMAPSQL) -> None:
        await deliver(st, ["alice@example.org"])
        old, new = await st.list_messages("alice@example.org")
        assert await st.read_message(old) == b"AB\r\nhello"
        assert old.flags == ("$Label1", "\\Answered", "\\Seen")  # v3: the flags table moved into the row
        assert new.flags == ()
        assert (await st.read_message(new)).endswith(b"Hello!\r\n")

    run(tmp_path, t)
    assert _db_check(tmp_path / "imapsql.db") == ("ok", 0, SCHEMA_VERSION)
    assert SCHEMA_VERSION == 5
    # v5: SEARCH's header columns are written with new rows; old rows get them at their first search.
    conn = sqlite3.connect(tmp_path / "imapsql.db")
    rows = conn.execute("SELECT uid, s_from, s_subject FROM messages ORDER BY uid").fetchall()
    conn.close()
    assert rows[0] == (1, None, None)
    assert rows[1][1] is not None and rows[1][2] is not None
