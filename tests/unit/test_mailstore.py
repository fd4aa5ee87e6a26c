"""AccountStore (pymaddy/storage/mailstore.py): the IMAP side of storage.imapsql over a real SQLite index."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pymaddy.storage.imapsql import IMAPSQL, INBOX, MailboxExists, MailboxNotFound
from pymaddy.storage.mailstore import (
    AccountStore,
    BadMailboxName,
    CannotDeleteInbox,
    MailboxHasChildren,
    OverQuota,
    check_name,
    set_quota,
)
from tests.runtime_helpers import Runtime

MSG = b"From: a@example.net\r\nSubject: s\r\n\r\n" + b"body line\r\n" * 20


def run(tmp: Path, fn: Callable[[AccountStore], Awaitable[None]], extra: str = "") -> None:
    cfg = f"state_dir {tmp}\nstorage.imapsql local_mailboxes {{\n driver sqlite3\n dsn imapsql.db\n{extra}}}\n"

    async def main() -> None:
        async with Runtime(cfg, tmp, ["local_mailboxes"]) as rt:
            st = rt.block("local_mailboxes", IMAPSQL)
            acct = await st.get_or_create_account("alice@example.org")
            await fn(AccountStore(st, acct))

    asyncio.run(main())


def blob_rows(tmp: Path) -> list[tuple[str, int, int, str | None, bool]]:
    conn = sqlite3.connect(tmp / "imapsql.db")
    try:
        return [(k, s, r, c, d is not None) for k, s, r, c, d in
                conn.execute("SELECT key, size, refs, compression, data FROM blobs ORDER BY key")]
    finally:
        conn.close()


@pytest.mark.parametrize("algo", ["off", "lz4", "zstd 5"])
@pytest.mark.parametrize("size", [100, 200_000])
def test_append_round_trips_with_every_compression(tmp_path: Path, algo: str, size: int) -> None:
    data = MSG + bytes(range(256)) * (size // 256)

    async def t(a: AccountStore) -> None:
        _, uid = await a.append(INBOX, data, ["\\Seen", "$x"], 1_700_000_000)
        mb = await a.mailbox(INBOX)
        (m,) = await a.fetch(mb.id, [uid], content=True)
        assert m.data == data and m.size == len(data) and m.flags == ("$x", "\\Seen")
        assert m.internaldate == 1_700_000_000
        assert m.header == b"From: a@example.net\r\nSubject: s\r\n\r\n"  # cached at APPEND

    run(tmp_path, t, extra=f" compression {algo}\n")
    ((_key, stored_size, refs, comp, inline),) = blob_rows(tmp_path)
    assert stored_size == len(data) and refs == 1
    assert comp == (None if algo == "off" else algo.split(maxsplit=1)[0])
    if algo == "off":
        assert inline == (size < 64 * 1024)


def test_mailbox_names_and_hierarchy(tmp_path: Path) -> None:
    async def t(a: AccountStore) -> None:
        await a.create("Work.Projects.2026")
        names = [m.name for m in await a.mailboxes()]
        assert names == ["INBOX", "Work", "Work.Projects", "Work.Projects.2026"]
        with pytest.raises(MailboxExists):
            await a.create("Work")
        with pytest.raises(MailboxHasChildren):
            await a.delete("Work")
        with pytest.raises(CannotDeleteInbox):
            await a.delete("inbox")
        await a.rename("Work", "Job")
        assert [m.name for m in await a.mailboxes()] == ["INBOX", "Job", "Job.Projects", "Job.Projects.2026"]
        with pytest.raises(BadMailboxName):
            await a.rename("Job", "Job.Projects.Inner")
        with pytest.raises(MailboxNotFound):
            await a.delete("Nope")

    run(tmp_path, t)
    for bad in ("", ".x", "a..b", "a\x00b", "a*", "b%", "x\r\ny"):
        with pytest.raises(BadMailboxName):
            check_name(bad)
    assert check_name("inbox.Sub.") == "INBOX.Sub"


def test_copy_move_expunge_keep_blob_references_right(tmp_path: Path) -> None:
    async def t(a: AccountStore) -> None:
        await a.create("Archive")
        uids = [(await a.append(INBOX, MSG + bytes([65 + i]) * 70_000))[1] for i in range(3)]
        inbox = await a.mailbox(INBOX)
        res = await a.copy(inbox.id, uids[:2], "Archive")
        assert res.src == uids[:2] and res.dst == [1, 2]
        res = await a.copy(inbox.id, [uids[2]], "Archive", move=True)
        assert res.dst == [3]
        assert [m.uid for m in await a.fetch(inbox.id, None)] == uids[:2]
        # Expunge takes only \Deleted messages.
        assert await a.expunge(inbox.id) == []
        await a.store_flags(inbox.id, uids[:2], "+", ["\\Deleted"])
        assert await a.expunge(inbox.id, [uids[0]]) == [uids[0]]
        assert await a.expunge(inbox.id) == [uids[1]]
        archive = await a.mailbox("Archive")
        got = await a.fetch(archive.id, None, content=True)
        assert [m.data[-1:] for m in got if m.data] == [b"A", b"B", b"C"]
        await a.delete("Archive")

    run(tmp_path, t)
    assert blob_rows(tmp_path) == []  # everything went with the last reference
    assert sorted(p.name for p in (tmp_path / "messages").iterdir() if not p.name.startswith(".")) == []


def test_poll_reports_new_flagged_and_expunged_messages(tmp_path: Path) -> None:
    async def t(a: AccountStore) -> None:
        for _ in range(3):
            await a.append(INBOX, MSG)
        sel = await a.select(INBOX, claim_recent=False)
        info = sel.info
        assert await a.poll(info.id, info.highestmodseq, len(sel.uids), info.uidnext) is None
        await a.store_flags(info.id, [2], "+", ["\\Seen"])
        ch = await a.poll(info.id, info.highestmodseq, 3, info.uidnext)
        assert ch is not None and ch.uids is None and [(u, f) for u, f, _ in ch.flags] == [(2, ("\\Seen",))]
        await a.store_flags(info.id, [1], "", ["\\Deleted"])
        await a.expunge(info.id)
        await a.append(INBOX, MSG)
        ch = await a.poll(info.id, info.highestmodseq, 3, info.uidnext)
        assert ch is not None and ch.uids == [2, 3, 4]
        changed, failed = await a.store_flags(info.id, [2, 3], "+", ["\\Flagged"], unchangedsince=4)
        assert failed == [2] and [u for u, _, _ in changed] == [3]

    run(tmp_path, t)


def test_quota_limits_append_and_copy(tmp_path: Path) -> None:
    async def t(a: AccountStore) -> None:
        await set_quota(a.store, a.name, 600)
        await a.append(INBOX, MSG)
        used, n, quota = await a.usage()
        assert (used, n, quota) == (len(MSG), 1, 600)
        with pytest.raises(OverQuota):
            await a.append(INBOX, MSG * 3)
        await a.create("Copy")
        inbox = await a.mailbox(INBOX)
        await a.copy(inbox.id, [1], "Copy")
        with pytest.raises(OverQuota):
            await a.copy(inbox.id, [1], "Copy")
        await a.copy(inbox.id, [1], "Copy", move=True)  # a move adds nothing

    run(tmp_path, t)
