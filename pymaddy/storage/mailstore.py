"""The IMAP side of storage.imapsql: one account's mailboxes and messages.

The IMAP endpoint and the `imap-mboxes` / `imap-msgs` commands work through
`AccountStore`; delivery (pymaddy/storage/imapsql.py) shares the schema.

Invariants:
* Every query names the account (`account_id = ?`) or a mailbox id that was
  looked up under it, so one account can never reach another's mailboxes.
* Every change to a mailbox's contents — a new message, a flag change, an
  expunge — bumps `mailboxes.highestmodseq` in the same transaction. A session
  notices changes made elsewhere (other sessions, delivery, the CLI in another
  process) by comparing it with the value it last saw (`poll`).
* A message's full text is `prefix || blob`; copies share the blob
  (`blobs.refs`), which goes once nothing refers to it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pymaddy.imap import searchindex
from pymaddy.storage.blob_fs import BlobWriter, FSBlobStore, new_key
from pymaddy.storage.compress import decompress
from pymaddy.storage.imapsql import (
    _MBOX_COLS,
    DELIMITER,
    IMAPSQL,
    INBOX,
    INDEX_COLS,
    INDEX_MARKS,
    INLINE_MAX,
    Account,
    MailboxExists,
    MailboxInfo,
    MailboxNotFound,
    StorageError,
    Update,
    _blob_content,
    _create_mailbox,
    _mailbox_row,
    _remove_refs,
    _require_account,
    account_key,
)
from pymaddy.storage.sqlschema import now

INDEX_BATCH = 500  # rows per step when indexing old messages for SEARCH
_SET_INDEX = (f"UPDATE messages SET {', '.join(f'{col} = ?' for col in searchindex.COLUMNS)}, "
              "header = coalesce(header, ?) WHERE id = ?")
MAX_NAME = 1024  # bytes of a mailbox name (UTF-8)
INLINE_ROWS = 512  # reads of up to this many rows without message text run on the event loop thread
INLINE_CONTENT_ROWS = 8  # reads of this many messages with their text, when it is in the index, too


class BadMailboxName(StorageError):
    pass


class MailboxHasChildren(StorageError):
    def __init__(self) -> None:
        super().__init__("Mailbox has children, delete them first")


class CannotDeleteInbox(StorageError):
    def __init__(self) -> None:
        super().__init__("Cannot delete INBOX")


def check_name(name: str) -> str:
    """A mailbox name as stored: INBOX canonical, no empty hierarchy levels, no control characters."""
    if name.endswith(DELIMITER):  # RFC 3501 §6.3.3: a trailing delimiter only declares intent
        name = name.rstrip(DELIMITER)
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise BadMailboxName("Invalid mailbox name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name) or any(c in name for c in "*%"):
        raise BadMailboxName("Invalid mailbox name")
    parts = name.split(DELIMITER)
    if any(p == "" for p in parts):
        raise BadMailboxName("Invalid mailbox name: empty hierarchy level")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return DELIMITER.join(parts)


def parents(name: str) -> list[str]:
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


# -- records --------------------------------------------------------------------------------------


@dataclass
class Msg:
    """A message row as FETCH and SEARCH need it. `data` (the full text) only when asked for."""

    id: int
    uid: int
    modseq: int
    internaldate: int
    size: int
    flags: tuple[str, ...]
    prefix: bytes
    blob_key: str
    header: bytes | None
    envelope: str | None
    bodystructure: str | None
    data: bytes | None = None


@dataclass(frozen=True)
class Status:
    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    highestmodseq: int
    size: int


@dataclass(frozen=True)
class Selection:
    info: MailboxInfo
    uids: list[int]
    recent: frozenset[int]  # UIDs this session sees as \Recent
    unseen: int  # messages without \Seen
    first_unseen_uid: int | None
    flags: frozenset[str]  # every flag and keyword in use, for the FLAGS response


@dataclass(frozen=True)
class Changes:
    """What changed in a mailbox since a session last looked."""

    highestmodseq: int
    uidnext: int
    uids: list[int] | None  # the full UID list when membership changed, else None
    flags: list[FlagChange]  # rows changed since
    gone: bool = False  # the mailbox itself was deleted


@dataclass(frozen=True)
class CopyResult:
    uidvalidity: int
    src: list[int]
    dst: list[int]


FlagChange = tuple[int, tuple[str, ...], int]  # (uid, flags, modseq)

_MSG_COLS = ("m.id, m.uid, m.modseq, m.internaldate, m.size, m.flags, m.prefix, m.blob_key, m.header, "
             "m.envelope, m.bodystructure")
# Without header or caches the three cache columns are not read: flag listings and flag SEARCHes then
# touch only the small columns.
_LIGHT_COLS = "m.id, m.uid, m.modseq, m.internaldate, m.size, m.flags, m.prefix, m.blob_key, NULL, NULL, NULL"


def _msg(r: Sequence[Any]) -> Msg:
    return Msg(r[0], r[1], r[2], r[3], r[4], tuple(r[5].split()) if r[5] else (), bytes(r[6]), r[7],
               None if r[8] is None else bytes(r[8]), r[9], r[10])


class _NeedsFiles(Exception):
    """A read on the loop thread met a message whose text is in a file: redo it in a thread."""


def split_header(data: bytes) -> bytes:
    """The header block of a message, blank separator line included (RFC 5322 §2.1)."""
    i = data.find(b"\r\n\r\n")
    j = data.find(b"\n\n")
    if i >= 0 and (j < 0 or i <= j):
        return data[: i + 4]
    if j >= 0:
        return data[: j + 2]
    return data


def join_flags(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def uid_ranges(uids: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted UIDs as contiguous (first, last) runs."""
    out: list[tuple[int, int]] = []
    for u in uids:
        if out and u == out[-1][1] + 1:
            out[-1] = (out[-1][0], u)
        else:
            out.append((u, u))
    return out


def _uid_where(uids: Sequence[int]) -> tuple[str, list[int]]:
    """A WHERE fragment selecting roughly `uids` (callers filter exactly): a few BETWEENs, or one span."""
    runs = uid_ranges(sorted(uids))
    if not runs:
        return "0", []
    if len(runs) > 16:
        return "m.uid BETWEEN ? AND ?", [runs[0][0], runs[-1][1]]
    return "(" + " OR ".join("m.uid BETWEEN ? AND ?" for _ in runs) + ")", [v for r in runs for v in r]


def _dead_among(c: sqlite3.Connection, keys: Iterable[str]) -> list[str]:
    """Of these blobs, drop the unreferenced inline ones and return the unreferenced file ones
    (their rows go once the files are deleted). Only the blobs a change touched are looked at."""
    dead: list[str] = []
    for key in set(keys):
        r = c.execute("SELECT refs, data IS NULL FROM blobs WHERE key = ?", (key,)).fetchone()
        if r is None or r[0] > 0:
            continue
        if r[1]:
            dead.append(key)
        else:
            c.execute("DELETE FROM blobs WHERE key = ?", (key,))
    return dead


def _bump(c: sqlite3.Connection, mailbox_id: int) -> int:
    """Allocate the next MODSEQ of a mailbox."""
    (modseq,) = c.execute("SELECT highestmodseq + 1 FROM mailboxes WHERE id = ?", (mailbox_id,)).fetchone()
    c.execute("UPDATE mailboxes SET highestmodseq = ? WHERE id = ?", (modseq, mailbox_id))
    return int(modseq)


def _usage(c: sqlite3.Connection, account_id: int) -> tuple[int, int, int | None]:
    size, n = c.execute("SELECT coalesce(sum(m.size), 0), count(*) FROM messages m JOIN mailboxes b "
                        "ON m.mailbox_id = b.id WHERE b.account_id = ?", (account_id,)).fetchone()
    r = c.execute("SELECT quota FROM accounts WHERE id = ?", (account_id,)).fetchone()
    return int(size), int(n), (int(r[0]) if r and r[0] is not None else None)


class OverQuota(StorageError):
    def __init__(self) -> None:
        super().__init__("Quota exceeded")


# -- the account view ---------------------------------------------------------------------------------


class AccountStore:
    """One account's mailboxes, for an IMAP session or a management command."""

    def __init__(self, store: IMAPSQL, account: Account) -> None:
        self.store = store
        self.account = account
        self.db = store._db()
        self.blobs: FSBlobStore = store._store()
        # (mailbox id, HIGHESTMODSEQ) after this store's last STORE or EXPUNGE: a session that was up
        # to date before it can move its own view forward without asking the database.
        self.last_change: tuple[int, int] = (0, 0)

    @property
    def name(self) -> str:
        return self.account.name

    def _publish(self, mailbox: str, kind: str = "changed") -> None:
        self.store.publish([Update(kind, self.account.name, mailbox, origin=id(self))])

    # -- mailboxes ------------------------------------------------------------------------------

    def _mbox(self, c: sqlite3.Connection, name: str) -> MailboxInfo:
        r = c.execute(f"SELECT {_MBOX_COLS} FROM mailboxes WHERE account_id = ? AND name = ?",
                      (self.account.id, name)).fetchone()
        if r is None:
            raise MailboxNotFound()
        return _mailbox_row(r)

    async def mailboxes(self) -> list[MailboxInfo]:
        aid = self.account.id

        def q(c: sqlite3.Connection) -> list[MailboxInfo]:
            rows = c.execute(f"SELECT {_MBOX_COLS} FROM mailboxes WHERE account_id = ? ORDER BY name",
                             (aid,)).fetchall()
            return [_mailbox_row(r) for r in rows]

        return await self.db.read(q)

    async def mailbox(self, name: str) -> MailboxInfo:
        return await self.db.read(lambda c: self._mbox(c, name))

    async def create(self, name: str, special_use: str | None = None) -> None:
        name = check_name(name)
        aid = self.account.id

        def job(c: sqlite3.Connection) -> None:
            if c.execute("SELECT 1 FROM mailboxes WHERE account_id = ? AND name = ?", (aid, name)).fetchone():
                raise MailboxExists()
            for p in parents(name):  # missing superiors are created too (RFC 3501 §6.3.3)
                if not c.execute("SELECT 1 FROM mailboxes WHERE account_id = ? AND name = ?", (aid, p)).fetchone():
                    _create_mailbox(c, aid, p)
            _create_mailbox(c, aid, name, special_use)

        await self.db.write(job)
        self._publish(name, "mailbox")

    async def delete(self, name: str) -> None:
        name = check_name(name)
        if name == INBOX:
            raise CannotDeleteInbox()
        aid = self.account.id

        def job(c: sqlite3.Connection) -> list[str]:
            mb = self._mbox(c, name)
            pattern = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + DELIMITER + "%"
            if c.execute("SELECT 1 FROM mailboxes WHERE account_id = ? AND name LIKE ? ESCAPE '\\' LIMIT 1",
                         (aid, pattern)).fetchone():
                raise MailboxHasChildren()
            keys = [k for (k,) in c.execute("SELECT DISTINCT blob_key FROM messages WHERE mailbox_id = ?", (mb.id,))]
            _remove_refs(c, "m.mailbox_id = ?", (mb.id,))
            c.execute("DELETE FROM mailboxes WHERE id = ?", (mb.id,))
            return _dead_among(c, keys)

        dead = await self.db.write(job)
        await self._delete_blobs(dead)
        self._publish(name, "mailbox")

    async def rename(self, old: str, new: str) -> None:
        old, new = check_name(old), check_name(new)
        aid = self.account.id

        def job(c: sqlite3.Connection) -> None:
            src = self._mbox(c, old)
            if c.execute("SELECT 1 FROM mailboxes WHERE account_id = ? AND name = ?", (aid, new)).fetchone():
                raise MailboxExists()
            if new.startswith(old + DELIMITER):
                raise BadMailboxName("Cannot move a mailbox into itself")
            for p in parents(new):
                if not c.execute("SELECT 1 FROM mailboxes WHERE account_id = ? AND name = ?", (aid, p)).fetchone():
                    _create_mailbox(c, aid, p)
            if old == INBOX:
                # RFC 3501 §6.3.5: renaming INBOX moves its messages to a new mailbox; INBOX stays, empty.
                dst = _create_mailbox(c, aid, new)
                c.execute("UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                          (src.uidnext, src.highestmodseq + 1, dst))
                c.execute("UPDATE messages SET mailbox_id = ? WHERE mailbox_id = ?", (dst, src.id))
                _bump(c, src.id)
                return
            c.execute("UPDATE mailboxes SET name = ? WHERE id = ?", (new, src.id))
            prefix = old + DELIMITER
            rows = c.execute("SELECT id, name FROM mailboxes WHERE account_id = ? AND substr(name, 1, ?) = ?",
                             (aid, len(prefix), prefix)).fetchall()
            for mid, child in rows:
                c.execute("UPDATE mailboxes SET name = ? WHERE id = ?", (new + DELIMITER + child[len(prefix):], mid))

        await self.db.write(job)
        self._publish(old, "mailbox")

    async def set_subscribed(self, name: str, on: bool) -> None:
        name = check_name(name)

        def job(c: sqlite3.Connection) -> None:
            mb = self._mbox(c, name)
            c.execute("UPDATE mailboxes SET subscribed = ? WHERE id = ?", (1 if on else 0, mb.id))

        await self.db.write(job)

    async def set_special_use(self, name: str, special_use: str | None) -> None:
        name = check_name(name)

        def job(c: sqlite3.Connection) -> None:
            mb = self._mbox(c, name)
            c.execute("UPDATE mailboxes SET special_use = ? WHERE id = ?", (special_use, mb.id))

        await self.db.write(job)

    async def status(self, name: str) -> Status:
        def q(c: sqlite3.Connection) -> Status:
            mb = self._mbox(c, name)
            n, recent, unseen, size = c.execute(
                "SELECT count(*), coalesce(sum(recent), 0), "
                "coalesce(sum(instr(' ' || flags || ' ', ' \\Seen ') = 0), 0), coalesce(sum(size), 0) "
                "FROM messages WHERE mailbox_id = ?", (mb.id,)).fetchone()
            return Status(n, recent, mb.uidnext, mb.uidvalidity, unseen, mb.highestmodseq, size)

        return await self.db.read(q)

    async def usage(self) -> tuple[int, int, int | None]:
        """(bytes, messages) stored in the account and its quota in bytes (None: no quota), for QUOTA."""
        aid = self.account.id

        def q(c: sqlite3.Connection) -> tuple[int, int, int | None]:
            return _usage(c, aid)

        return await self.db.read(q)

    # -- selection and change tracking -----------------------------------------------------------------------

    async def select(self, name: str, claim_recent: bool) -> Selection:
        """Open a mailbox. With `claim_recent` (a read-write SELECT when \\Recent is enabled) this session
        takes the \\Recent messages: no later session sees them as recent (RFC 3501 §2.3.2)."""

        def q(c: sqlite3.Connection) -> Selection:
            mb = self._mbox(c, name)
            uids: list[int] = []
            recent: list[int] = []
            first_unseen: int | None = None
            unseen = 0
            keywords: set[str] = set()
            for uid, flags, rec in c.execute("SELECT uid, flags, recent FROM messages WHERE mailbox_id = ? "
                                             "ORDER BY uid", (mb.id,)):
                uids.append(uid)
                if rec:
                    recent.append(uid)
                fl = flags.split() if flags else ()
                if "\\Seen" not in fl:
                    unseen += 1
                    if first_unseen is None:
                        first_unseen = uid
                keywords.update(fl)
            if claim_recent and recent:
                c.execute("UPDATE messages SET recent = 0 WHERE mailbox_id = ? AND recent = 1", (mb.id,))
            return Selection(mb, uids, frozenset(recent), unseen, first_unseen, frozenset(keywords))

        if claim_recent:
            sel: Selection = await self.db.write(q)
        else:
            sel = await self.db.read(q)
        return sel

    async def poll(self, mailbox_id: int, modseq: int, count: int, uidnext: int) -> Changes | None:
        """None when nothing changed since (modseq, count, uidnext), which one indexed read answers."""

        def q(c: sqlite3.Connection) -> Changes | None:
            r = c.execute("SELECT highestmodseq, uidnext FROM mailboxes WHERE id = ? AND account_id = ?",
                          (mailbox_id, self.account.id)).fetchone()
            if r is None:
                return Changes(0, 0, [], [], gone=True)
            hms, unext = int(r[0]), int(r[1])
            if hms == modseq and unext == uidnext:
                return None
            uids: list[int] | None = None
            (n,) = c.execute("SELECT count(*) FROM messages WHERE mailbox_id = ?", (mailbox_id,)).fetchone()
            if unext != uidnext or n != count:
                uids = [u for (u,) in c.execute("SELECT uid FROM messages WHERE mailbox_id = ? ORDER BY uid",
                                                (mailbox_id,))]
            flags = [(u, tuple(f.split()) if f else (), ms) for u, f, ms in c.execute(
                "SELECT uid, flags, modseq FROM messages WHERE mailbox_id = ? AND modseq > ? ORDER BY uid",
                (mailbox_id, modseq))]
            return Changes(hms, unext, uids, flags)

        # The common answer, "nothing changed", is one indexed row: read it on the loop thread.
        with contextlib.suppress(sqlite3.OperationalError):
            r = self.db.read_inline(lambda c: c.execute(
                "SELECT highestmodseq, uidnext FROM mailboxes WHERE id = ? AND account_id = ?",
                (mailbox_id, self.account.id)).fetchone())
            if r is not None and int(r[0]) == modseq and int(r[1]) == uidnext:
                return None
            if count <= INLINE_ROWS:  # a small mailbox's changes: cheaper here than a thread hop
                return self.db.read_inline(q)
        return await self.db.read(q)

    async def claim_recent(self, mailbox_id: int, uids: Sequence[int]) -> set[int]:
        """Take \\Recent for new arrivals this session is the first to be told of (RFC 3501 §2.3.2):
        the UIDs still marked recent become this session's and no other's."""
        if not uids:
            return set()

        def job(c: sqlite3.Connection) -> set[int]:
            out: set[int] = set()
            for i in range(0, len(uids), 500):
                part = list(uids[i : i + 500])
                marks = ",".join("?" * len(part))
                out.update(int(u) for (u,) in c.execute(
                    f"UPDATE messages SET recent = 0 WHERE mailbox_id = ? AND recent = 1 AND uid IN ({marks}) "
                    "RETURNING uid", (mailbox_id, *part)))
            return out

        claimed: set[int] = await self.db.write(job, durable=False)  # a lost claim only shows \\Recent again
        return claimed

    # -- messages ----------------------------------------------------------------------------------------

    def _rows(self, c: sqlite3.Connection, mailbox_id: int, uids: Sequence[int] | None, *,
              content: bool = False, header: bool = False, caches: bool = False,
              having: tuple[str, Sequence[Any]] = ("", ()), files: bool = True) -> list[Msg]:
        where, args = ("1", []) if uids is None else _uid_where(uids)
        if having[0]:
            where, args = f"{where} AND {having[0]}", [*args, *having[1]]
        cols = _MSG_COLS if (content or header or caches) else _LIGHT_COLS
        if content:
            cols += ", b.data, b.compression"
        join = " LEFT JOIN blobs b ON b.key = m.blob_key" if content else ""
        rows = c.execute(f"SELECT {cols} FROM messages m{join} WHERE m.mailbox_id = ? AND {where} ORDER BY m.uid",
                         [mailbox_id, *args]).fetchall()
        want = None if uids is None else set(uids)
        out: list[Msg] = []
        for r in rows:
            if want is not None and r[1] not in want:
                continue
            m = _msg(r)
            if content:
                if r[11] is None and not files:
                    raise _NeedsFiles()
                blob = bytes(r[11]) if r[11] is not None else self.blobs.get_sync(m.blob_key)
                m.data = m.prefix + decompress(r[12], blob)
            elif header and m.header is None:
                m.data = m.prefix + _blob_content(c, self.blobs, m.blob_key)
            out.append(m)
        return out

    async def fetch(self, mailbox_id: int, uids: Sequence[int] | None, content: bool = False, *,
                    header: bool = False, caches: bool = False,
                    having: tuple[str, Sequence[Any]] = ("", ()), rows_hint: int = 1 << 30) -> list[Msg]:
        """Rows for `uids` (None = all), in UID order; with `content`, the full text in `data`; with
        `header`, the header column (and the full text where it is empty); with `caches`, the
        header/ENVELOPE/BODYSTRUCTURE columns; `having`, an extra SQL condition on `m` (SEARCH's
        prefilter). Reads of at most INLINE_ROWS rows (`rows_hint`: the mailbox size, when `uids` is
        None) without message text run on the loop thread: a thread hop costs more than they do."""
        n = len(uids) if uids is not None else rows_hint
        if not content and n <= INLINE_ROWS:
            with contextlib.suppress(sqlite3.OperationalError):
                return self.db.read_inline(
                    lambda c: self._rows(c, mailbox_id, uids, header=header, caches=caches, having=having))
        elif content and n <= INLINE_CONTENT_ROWS:
            # A few messages whose text is in the index itself (small ones, storage/imapsql.py
            # INLINE_MAX): no file to read, so no reason to leave the loop thread.
            with contextlib.suppress(sqlite3.OperationalError, _NeedsFiles):
                return self.db.read_inline(lambda c: self._rows(c, mailbox_id, uids, content=True, header=header,
                                                                caches=caches, having=having, files=False))
        return await self.db.read(lambda c: self._rows(c, mailbox_id, uids, content=content, header=header,
                                                       caches=caches, having=having))

    async def search_uids(self, mailbox_id: int, cond: tuple[str, Sequence[Any]],
                          rows_hint: int = 1 << 30) -> list[int]:
        """UIDs of the messages meeting an SQL condition on `m` (SEARCH on index data); in a
        mailbox of at most INLINE_ROWS messages (`rows_hint`) on the loop thread."""

        def q(c: sqlite3.Connection) -> list[int]:
            return [u for (u,) in c.execute(f"SELECT m.uid FROM messages m WHERE m.mailbox_id = ? AND {cond[0]} "
                                            "ORDER BY m.uid", [mailbox_id, *cond[1]])]

        if rows_hint <= INLINE_ROWS:
            with contextlib.suppress(sqlite3.OperationalError):
                return self.db.read_inline(q)
        return await self.db.read(q)

    async def index_for_search(self, mailbox_id: int) -> None:
        """Fill SEARCH's header columns (imap/searchindex.py) of rows stored before they existed."""

        def missing(c: sqlite3.Connection) -> list[int]:
            return [u for (u,) in c.execute(f"SELECT m.uid FROM messages m WHERE m.mailbox_id = ? AND "
                                            f"{searchindex.UNINDEXED} LIMIT {INDEX_BATCH}", (mailbox_id,))]

        while True:
            try:
                uids = self.db.read_inline(missing)  # the partial index answers "none" at once
            except sqlite3.OperationalError:
                uids = await self.db.read(missing)
            if not uids:
                return
            rows = await self.db.read(functools.partial(self._rows, mailbox_id=mailbox_id, uids=uids, header=True))
            vals = []
            for m in rows:
                h = m.header if m.header is not None else split_header(m.data or b"")
                vals.append((*searchindex.index_row(h), h, m.id))

            def job(c: sqlite3.Connection, vals: list[tuple[Any, ...]] = vals) -> None:
                c.executemany(_SET_INDEX, vals)

            await self.db.write(job, durable=False)  # recomputed if a crash loses it
            if len(uids) < INDEX_BATCH:
                return

    def fetch_sync(self, mailbox_id: int, uids: Sequence[int] | None, content: bool = False) -> list[Msg]:
        return self.db.read_sync(lambda c: self._rows(c, mailbox_id, uids, content=content))

    async def save_caches(self, rows: list[tuple[int, bytes | None, str | None, str | None]]) -> None:
        """Remember parsed header/ENVELOPE/BODYSTRUCTURE of (message id, header, envelope, bodystructure)."""
        if not rows:
            return

        def job(c: sqlite3.Connection) -> None:
            c.executemany("UPDATE messages SET header = coalesce(?, header), envelope = coalesce(?, envelope), "
                          "bodystructure = coalesce(?, bodystructure) WHERE id = ?",
                          [(h, e, b, i) for i, h, e, b in rows])

        await self.db.write(job, durable=False)  # caches: recomputed if a crash loses them

    async def store_flags(self, mailbox_id: int, uids: Sequence[int], mode: str, flags: Iterable[str],
                          unchangedsince: int | None = None) -> tuple[list[FlagChange], list[int]]:
        """STORE: mode "" sets, "+" adds, "-" removes. Returns (changed (uid, flags, modseq), failed UIDs
        whose modseq is above `unchangedsince` (RFC 7162 §3.1.3))."""
        change = set(flags)

        def job(c: sqlite3.Connection) -> tuple[list[FlagChange], list[int]]:
            where, args = _uid_where(uids)
            want = set(uids)
            rows = c.execute(f"SELECT m.id, m.uid, m.flags, m.modseq FROM messages m WHERE m.mailbox_id = ? "
                             f"AND {where}", [mailbox_id, *args]).fetchall()
            changed: list[FlagChange] = []
            failed: list[int] = []
            updates: list[tuple[str, int, int]] = []
            modseq = 0
            for mid, uid, fl, ms in rows:
                if uid not in want:
                    continue
                if unchangedsince is not None and ms > unchangedsince:
                    failed.append(uid)
                    continue
                cur = set(fl.split()) if fl else set()
                new = change if mode == "" else (cur | change if mode == "+" else cur - change)
                if new == cur:
                    continue
                if not modseq:
                    modseq = _bump(c, mailbox_id)
                    self.last_change = (mailbox_id, modseq)
                joined = join_flags(new)
                updates.append((joined, modseq, mid))
                changed.append((uid, tuple(joined.split()) if joined else (), modseq))
            c.executemany("UPDATE messages SET flags = ?, modseq = ? WHERE id = ?", updates)
            return sorted(changed), sorted(failed)

        res = await self.db.write(job, durable=False)  # flags: a crash may lose the last moment's changes
        if res[0]:
            self._publish("")  # sessions re-check their own mailbox by id
        return res

    async def expunge(self, mailbox_id: int, uids: Sequence[int] | None = None) -> list[int]:
        """Remove messages flagged \\Deleted (only those among `uids` when given); returns their UIDs."""

        def job(c: sqlite3.Connection) -> tuple[list[int], list[str]]:
            return self._expunge(c, mailbox_id, uids)

        gone, dead = await self.db.write(job)
        await self._delete_blobs(dead)
        if gone:
            self._publish("")
        return gone

    def _expunge(self, c: sqlite3.Connection, mailbox_id: int, uids: Sequence[int] | None,
                 deleted_only: bool = True) -> tuple[list[int], list[str]]:
        """Remove messages (only \\Deleted ones with `deleted_only`); returns their UIDs and the file
        blobs nothing refers to any more."""
        where, args = ("1", []) if uids is None else _uid_where(uids)
        cond = " AND instr(' ' || m.flags || ' ', ' \\Deleted ') > 0" if deleted_only else ""
        rows = c.execute(f"SELECT m.id, m.uid, m.blob_key FROM messages m WHERE m.mailbox_id = ? AND {where}{cond}",
                         [mailbox_id, *args]).fetchall()
        want = None if uids is None else set(uids)
        rows = [r for r in rows if want is None or r[1] in want]
        if not rows:
            return [], []
        c.executemany("UPDATE blobs SET refs = refs - 1 WHERE key = ?", [(r[2],) for r in rows])
        c.executemany("DELETE FROM messages WHERE id = ?", [(r[0],) for r in rows])
        self.last_change = (mailbox_id, _bump(c, mailbox_id))
        return sorted(r[1] for r in rows), _dead_among(c, (r[2] for r in rows))

    async def copy(self, mailbox_id: int, uids: Sequence[int], dest: str, move: bool = False) -> CopyResult:
        """COPY (or MOVE, RFC 6851) to `dest` in this account; UIDs for COPYUID (RFC 4315 §3)."""
        recent = 0 if self.store.disable_recent else 1

        def job(c: sqlite3.Connection) -> tuple[CopyResult, list[str]]:
            dst = self._mbox(c, dest)
            where, args = _uid_where(uids)
            want = set(uids)
            rows = [r for r in c.execute(
                f"SELECT m.id, m.uid, m.internaldate, m.size, m.blob_key, m.prefix, m.flags, m.header, "
                f"m.envelope, m.bodystructure, {INDEX_COLS} FROM messages m WHERE m.mailbox_id = ? AND {where} "
                "ORDER BY m.uid", [mailbox_id, *args]).fetchall() if r[1] in want]
            if not rows:
                return CopyResult(dst.uidvalidity, [], []), []
            if not move:
                used, _n, quota = _usage(c, dst.account_id)
                if quota is not None and used + sum(r[3] for r in rows) > quota:
                    raise OverQuota()
            (first,) = c.execute("SELECT uidnext FROM mailboxes WHERE id = ?", (dst.id,)).fetchone()
            modseq = _bump(c, dst.id)
            c.execute("UPDATE mailboxes SET uidnext = ? WHERE id = ?", (first + len(rows), dst.id))
            c.executemany(
                "INSERT INTO messages (mailbox_id, uid, modseq, internaldate, size, blob_key, prefix, recent, "
                f"flags, header, envelope, bodystructure, {INDEX_COLS}) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {INDEX_MARKS})",
                [(dst.id, first + i, modseq, r[2], r[3], r[4], r[5], recent, r[6], r[7], r[8], r[9], *r[10:])
                 for i, r in enumerate(rows)])
            c.executemany("UPDATE blobs SET refs = refs + 1 WHERE key = ?", [(r[4],) for r in rows])
            src = [r[1] for r in rows]
            dead: list[str] = []
            if move:
                _gone, dead = self._expunge(c, mailbox_id, src, deleted_only=False)
            return CopyResult(dst.uidvalidity, src, list(range(first, first + len(rows)))), dead

        res, dead = await self.db.write(job)
        await self._delete_blobs(dead)
        if res.src:
            self._publish(dest)
        return res

    async def append(self, name: str, data: bytes, flags: Iterable[str] = (),
                     date: int | None = None) -> tuple[int, int]:
        """Store a message; returns (UIDVALIDITY, UID) for APPENDUID (RFC 4315 §3). Durable on return."""
        key = new_key()
        codec = self.store.codec
        stored = codec.compress(data) if codec is not None else data
        algo = codec.name if codec is not None else None
        inline = len(stored) <= INLINE_MAX
        blobs = self.blobs
        if not inline:
            w: BlobWriter = blobs.create()
            try:
                w.write(stored)
                w.commit(key, sync_dir=False, fsync=False)
            except BaseException:
                w.abort()
                raise
        joined = join_flags(flags)
        ts = now() if date is None else int(date)
        recent = 0 if self.store.disable_recent else 1
        path = "" if inline else blobs.path(key)
        header = split_header(data)
        search = searchindex.index_row(header)

        def job(c: sqlite3.Connection) -> tuple[int, int]:
            mb = self._mbox(c, name)
            used, _n, quota = _usage(c, mb.account_id)
            if quota is not None and used + len(data) > quota:
                raise OverQuota()
            if not inline and not os.path.exists(path):
                raise StorageError("message blob vanished before commit")
            c.execute("INSERT INTO blobs (key, size, refs, data, compression) VALUES (?, ?, 1, ?, ?)",
                      (key, len(data), stored if inline else None, algo))
            (uid,) = c.execute("SELECT uidnext FROM mailboxes WHERE id = ?", (mb.id,)).fetchone()
            modseq = _bump(c, mb.id)
            c.execute("UPDATE mailboxes SET uidnext = ? WHERE id = ?", (uid + 1, mb.id))
            c.execute("INSERT INTO messages (mailbox_id, uid, modseq, internaldate, size, blob_key, prefix, recent, "
                      f"flags, header, {INDEX_COLS}) VALUES (?, ?, ?, ?, ?, ?, x'', ?, ?, ?, {INDEX_MARKS})",
                      (mb.id, uid, modseq, ts, len(data), key, recent, joined, header, *search))
            return mb.uidvalidity, int(uid)

        try:
            if inline:
                res = await self.db.write(job)
            else:
                res = await self.db.write(job, sync=(blobs,), files=(lambda: blobs.fsync_blob(key),))
        except BaseException:
            if not inline:
                await self._delete_blobs([key])
            raise
        self._publish(name)
        return res

    async def _delete_blobs(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await self.blobs.delete(keys)
        except (OSError, ValueError):
            return

        def job(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM blobs WHERE key = ? AND refs <= 0", [(k,) for k in keys])

        await self.db.write(job)


async def get_quota(store: IMAPSQL, name: str) -> int | None:
    """An account's storage quota in bytes (None: none). Raises AccountNotFound."""
    key = account_key(name)

    def q(c: sqlite3.Connection) -> int | None:
        acct = _require_account(c, key)
        r = c.execute("SELECT quota FROM accounts WHERE id = ?", (acct.id,)).fetchone()
        return None if r[0] is None else int(r[0])

    return await store._db().read(q)


async def set_quota(store: IMAPSQL, name: str, value: int | None) -> None:
    key = account_key(name)

    def job(c: sqlite3.Connection) -> None:
        acct = _require_account(c, key)
        c.execute("UPDATE accounts SET quota = ? WHERE id = ?", (value, acct.id))

    await store._db().write(job)
