"""storage.imapsql / target.imapsql: mailboxes in SQLite, bodies in a blob store (spec §F).

This module is the delivery side and the account API; the IMAP server builds
on the same schema (pymaddy/storage/sqlschema.py) and the read helpers here.

Delivery (maddy's internal/storage/imapsql/delivery.go, go-imap-sql Delivery):

* add_rcpt: normalize (`delivery_normalize`) → `delivery_map` (if set) → account
  (lower-cased like go-imap-sql); unknown ⇒ `501 5.1.1 User does not exist`; an
  account already added is accepted again and delivered once.
* body: the message — `Return-Path: <sender>` on top — is stored once: up to
  INLINE_MAX bytes it is kept in memory and goes into the index itself
  (`blobs.data`) at commit; larger, it is written to a new blob file (temporary
  file, rename, no fsync yet). Every copy gets its own `Delivered-To: <account>`
  prefix stored in its index row. Quarantined mail goes
  to the account's `\\Junk` mailbox, created as `junk_mailbox` when missing.
* commit: the index rows are written by the group-committing writer
  (pymaddy/storage/sqlitedb.py): the blob files of the batch are fsynced and the
  blob directory once, then the rows (and inline bodies) are committed with
  `synchronous=FULL`, shared with every other commit of the same moment. When
  commit() returns, the message is on disk.

`appendlimit` is an IMAP APPEND limit only; SMTP delivery ignores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pymaddy.auth.normalize import NormalizeError
from pymaddy.auth.normalize import get as get_normalizer
from pymaddy.imap import searchindex
from pymaddy.mail.errors import SMTPError, internal_error
from pymaddy.mail.message import Body, Header, MsgMeta, random_hex
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget, PartialDelivery, StatusCallback
from pymaddy.runtime.module import Module, ModuleError, RuntimeContext
from pymaddy.storage import updatepipe
from pymaddy.storage.blob_fs import BlobWriter, FSBlobStore, NoSuchBlob
from pymaddy.storage.compress import Codec, codec, decompress
from pymaddy.storage.imapfilter import FilterInput, FilterResult, IMAPFilter
from pymaddy.storage.sqlitedb import SQLiteDB
from pymaddy.storage.sqlschema import SchemaError, now
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance

INBOX = "INBOX"
DELIMITER = "."
SPECIAL_USE = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
# `imap-acct create` default folders: (special-use attribute, default name).
DEFAULT_SPECIAL = (("\\Sent", "Sent"), ("\\Trash", "Trash"), ("\\Junk", "Junk"), ("\\Drafts", "Drafts"),
                   ("\\Archive", "Archive"))
CHUNK = 256 * 1024
# Messages (Return-Path + header + body) up to this size are stored in the index (blobs.data), inside
# the group-commit transaction, so they cost only their batch's one WAL sync; larger ones go to the
# blob store, their file fsyncs batched before the same COMMIT.
INLINE_MAX_DEFAULT = 128 * 1024
INLINE_MAX = INLINE_MAX_DEFAULT
# resolve_recipient keeps found accounts this long (seconds): RCPT needs no query per message. Only the
# RCPT answer relies on it — the commit finds the account by name again inside its transaction — and this
# process's own remove/set calls and `account_removed` updates (also those another process pushes through
# the update pipe) drop the entry at once; any other removal by another process is seen within this time
# (until then RCPT is accepted and DATA answered 501 5.1.1). Unknown names are not cached.
ACCOUNT_CACHE_TTL = 1.0
ACCOUNT_CACHE_MAX = 4096
INDEX_COLS = ", ".join(searchindex.COLUMNS)  # SEARCH's header columns, written with every message row
INDEX_MARKS = ", ".join("?" * len(searchindex.COLUMNS))
ORPHAN_MIN_AGE = 3600.0  # blob files without a row are swept only when older than this
MAINTENANCE_INTERVAL = 5 * 3600.0  # maddy/go-imap-sql run `PRAGMA optimize` every 5 hours


# -- errors (go-imap-sql / go-imap wording) ---------------------------------------------------


class StorageError(Exception):
    pass


class AccountExists(StorageError):
    def __init__(self) -> None:
        super().__init__("imap: user already exists")


class AccountNotFound(StorageError):
    def __init__(self) -> None:
        super().__init__("imap: user doesn't exists")


class _AccountsGone(StorageError):
    """Delivery commit: no recipient's account exists any more (removed since RCPT)."""

    def __init__(self) -> None:
        super().__init__("imapsql: recipient accounts removed since RCPT")


class MailboxExists(StorageError):
    def __init__(self) -> None:
        super().__init__("Mailbox already exists")


class MailboxNotFound(StorageError):
    def __init__(self) -> None:
        super().__init__("No such mailbox")


def user_does_not_exist(reason: str = "") -> SMTPError:
    return SMTPError(501, (5, 1, 1), "User does not exist", target="imapsql", reason=reason)


def mailbox_full(reason: str = "") -> SMTPError:
    return SMTPError(552, (5, 2, 2), "Mailbox is full", target="imapsql", reason=reason)


def _usage_bytes(c: sqlite3.Connection, account_id: int) -> int:
    (size,) = c.execute("SELECT coalesce(sum(m.size), 0) FROM messages m JOIN mailboxes b ON m.mailbox_id = b.id "
                        "WHERE b.account_id = ?", (account_id,)).fetchone()
    return int(size)


def _storage_smtp_error(e: BaseException) -> SMTPError:
    if isinstance(e, SMTPError):
        return e
    if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
        return SMTPError(453, (4, 3, 2), "Internal server error, try again later", target="imapsql", reason=str(e))
    return internal_error(e, temporary=True)


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    appendlimit: int | None
    quota: int | None = None  # bytes (schema v4); checked at RCPT/LMTP delivery, APPEND, COPY


@dataclass(frozen=True)
class MailboxInfo:
    id: int
    account_id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: str | None
    subscribed: bool
    appendlimit: int | None


@dataclass(frozen=True)
class MessageInfo:
    id: int
    mailbox_id: int
    uid: int
    modseq: int
    internaldate: int
    size: int
    blob_key: str
    prefix: bytes
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Update:
    """A change IMAP sessions must learn about (published after the commit).

    kind: "message" (new message `uid` in `mailbox`), "mailbox" (created, deleted or renamed),
    "changed" (messages added, flagged or expunged), "account_removed".
    """

    kind: str
    account: str
    mailbox: str = ""
    uid: int = 0
    origin: int = 0  # who made the change (an AccountStore's id), so a session can skip its own


UpdateSink = Callable[[Update], None]


def account_key(name: str) -> str:
    """Account names as go-imap-sql keys them (strings.ToLower)."""
    return name.lower()


def _mailbox_row(r: tuple[Any, ...]) -> MailboxInfo:
    return MailboxInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8])


_MBOX_COLS = "id, account_id, name, uidvalidity, uidnext, highestmodseq, special_use, subscribed, appendlimit"


# -- blocking SQL (run in the writer or reader threads) ------------------------------------------


def _get_account(conn: sqlite3.Connection, name: str) -> Account | None:
    r = conn.execute("SELECT id, name, appendlimit, quota FROM accounts WHERE name = ?", (name,)).fetchone()
    return Account(r[0], r[1], r[2], r[3]) if r else None


def _require_account(conn: sqlite3.Connection, name: str) -> Account:
    acct = _get_account(conn, name)
    if acct is None:
        raise AccountNotFound()
    return acct


def _create_mailbox(conn: sqlite3.Connection, account_id: int, name: str, special_use: str | None = None) -> int:
    if name.upper() == INBOX:
        name = INBOX
    if conn.execute("SELECT 1 FROM mailboxes WHERE account_id = ? AND name = ?", (account_id, name)).fetchone():
        raise MailboxExists()
    cur = conn.execute(
        "INSERT INTO mailboxes (account_id, name, uidvalidity, special_use) VALUES (?, ?, ?, ?)",
        (account_id, name, secrets.randbelow(0xFFFFFFFE) + 1, special_use),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _create_account(conn: sqlite3.Connection, name: str, special: Iterable[tuple[str, str]] = ()) -> Account:
    if _get_account(conn, name) is not None:
        raise AccountExists()
    cur = conn.execute("INSERT INTO accounts (name, created) VALUES (?, ?)", (name, now()))
    assert cur.lastrowid is not None
    _create_mailbox(conn, cur.lastrowid, INBOX)
    for attr, mbox in special:
        if mbox:
            _create_mailbox(conn, cur.lastrowid, mbox, attr)
    return Account(cur.lastrowid, name, None)


def _inbox_by_account_name(conn: sqlite3.Connection, account: str) -> int | None:
    """The INBOX id of the account that has this name now (not a possibly stale account id)."""
    r = conn.execute(
        "SELECT b.id FROM accounts a JOIN mailboxes b ON b.account_id = a.id WHERE a.name = ? AND b.name = ?",
        (account, INBOX),
    ).fetchone()
    return int(r[0]) if r else None


# UPDATE … RETURNING needs SQLite 3.35; older libraries take the three-statement path.
_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
_INBOX_NEXT_UID = (
    "UPDATE mailboxes SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1 "
    "WHERE id = (SELECT b.id FROM accounts a JOIN mailboxes b ON b.account_id = a.id WHERE a.name = ? AND b.name = ?) "
    "RETURNING id, uidnext - 1, highestmodseq"
)


def _mailbox_id(conn: sqlite3.Connection, account_id: int, name: str) -> int | None:
    r = conn.execute("SELECT id FROM mailboxes WHERE account_id = ? AND name = ?", (account_id, name)).fetchone()
    return int(r[0]) if r else None


def _junk_mailbox(conn: sqlite3.Connection, account_id: int, fallback: str) -> tuple[int, str]:
    """go-imap-sql SpecialMailbox: the first `\\Junk` mailbox, else `fallback` (created as \\Junk)."""
    r = conn.execute(
        "SELECT id, name FROM mailboxes WHERE account_id = ? AND special_use = ? ORDER BY id LIMIT 1",
        (account_id, "\\Junk"),
    ).fetchone()
    if r:
        return int(r[0]), str(r[1])
    mid = _mailbox_id(conn, account_id, fallback)
    if mid is None:
        mid = _create_mailbox(conn, account_id, fallback, "\\Junk")
    return mid, fallback


def _remove_refs(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> None:
    """Drop blob references of the messages selected by `where` (over messages m JOIN mailboxes b)."""
    rows = conn.execute(
        f"SELECT m.blob_key, count(*) FROM messages m JOIN mailboxes b ON m.mailbox_id = b.id WHERE {where} "
        "GROUP BY m.blob_key",
        args,
    ).fetchall()
    conn.executemany("UPDATE blobs SET refs = refs - ? WHERE key = ?", [(n, k) for k, n in rows])


def _next_uid(conn: sqlite3.Connection, mailbox_id: int) -> tuple[int, int]:
    """Allocate the next UID and MODSEQ of a mailbox (inside the write transaction)."""
    uid, modseq = conn.execute("SELECT uidnext, highestmodseq + 1 FROM mailboxes WHERE id = ?",
                               (mailbox_id,)).fetchone()
    conn.execute("UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?", (uid + 1, modseq, mailbox_id))
    return int(uid), int(modseq)


def _optimize(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA optimize")
    conn.execute("PRAGMA incremental_vacuum(1000)")


def _dead_blobs(conn: sqlite3.Connection) -> list[str]:
    """Drop unreferenced inline blobs; return the unreferenced ones kept in the blob store (their rows
    go once the files are deleted)."""
    conn.execute("DELETE FROM blobs WHERE refs <= 0 AND data IS NOT NULL")
    return [r[0] for r in conn.execute("SELECT key FROM blobs WHERE refs <= 0 AND data IS NULL").fetchall()]


def _blob_content(conn: sqlite3.Connection, store: FSBlobStore, key: str) -> bytes:
    """A blob's bytes: from the index when stored inline (blobs.data), else from the blob store."""
    r = conn.execute("SELECT data, compression FROM blobs WHERE key = ?", (key,)).fetchone()
    if r is None:
        return store.get_sync(key)
    return decompress(r[1], bytes(r[0]) if r[0] is not None else store.get_sync(key))


# -- the module -----------------------------------------------------------------------------------


class IMAPSQL(Module, DeliveryTarget, Table):
    """storage.imapsql (and target.imapsql)."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.driver = str(s.get("driver") or "")
        self.dsn = " ".join(s.get("dsn") or [])
        self.junk_mailbox: str = s.get("junk_mailbox") or "Junk"
        limit = s.get("appendlimit")
        self.appendlimit: int | None = None if limit is None or limit < 0 else int(limit)
        self.disable_recent = bool(s.get("disable_recent", True))
        comp = s.get("compression")
        try:
            self.codec: Codec | None = codec(getattr(comp, "algo", "off"), getattr(comp, "level", None))
        except (ValueError, ImportError) as e:
            raise ModuleError(f"imapsql: compression: {e}") from None
        try:
            self._delivery_norm = get_normalizer(s.get("delivery_normalize") or "precis_casefold_email")
            self._auth_norm = get_normalizer(s.get("auth_normalize") or "auto")
        except NormalizeError as e:
            raise ModuleError(f"imapsql: {e}") from None
        self._delivery_map_inst = s.get("delivery_map")
        self._auth_map_inst = s.get("auth_map")
        self._blob_inst = s.get("msg_store")
        self.delivery_map: Table | None = None
        self.auth_map: Table | None = None
        self.blobs: FSBlobStore | None = None
        self.db: SQLiteDB | None = None
        self.group_window: float | None = None  # tests may tune; None = sqlitedb default
        self._sinks: list[UpdateSink] = []
        self._acct_cache: dict[str, tuple[Account, float]] = {}  # key -> (account, expiry); see ACCOUNT_CACHE_TTL
        self._norm_cache: dict[str, str] = {}  # recipient -> delivery_normalize(recipient) (a pure function)
        self._acct_cache_unsub: Callable[[], None] | None = None
        self._listener: updatepipe.Listener | None = None
        self._fanout: updatepipe.Fanout | None = None
        self.imap_filter: IMAPFilter | None = None
        self._bg: set[asyncio.Task[Any]] = set()

    def log_name(self) -> str:
        return "imapsql"

    # -- life cycle ---------------------------------------------------------------------------------

    def db_path(self) -> str:
        dsn = self.dsn
        if dsn.startswith("file:"):
            dsn = dsn[5:]
        dsn = dsn.split("?", 1)[0]
        return os.path.join(self.ctx.state_dir, dsn) if self.ctx.state_dir else os.path.abspath(dsn)

    async def start(self) -> None:
        driver = "sqlite" if self.driver == "sqlite3" else self.driver
        if driver != "sqlite":
            raise ModuleError(f"imapsql: driver {self.driver} is not supported yet (only sqlite3)")
        if self._blob_inst is None:
            raise ModuleError("imapsql: msg_store is not set")
        blobs = self.ctx.module(self._blob_inst)
        if not isinstance(blobs, FSBlobStore):
            raise ModuleError(f"imapsql: msg_store {self._blob_inst.label} is not supported yet")
        self.blobs = blobs
        if self._delivery_map_inst is not None:
            self.delivery_map = self._table(self._delivery_map_inst)
        if self._auth_map_inst is not None:
            self.log.msg("auth_map in storage.imapsql is deprecated and will be removed in the next release, "
                         "use storage_map in imap config instead")
            self.auth_map = self._table(self._auth_map_inst)
        flt = self.settings.get("imap_filter")
        if flt is not None:
            obj = self.ctx.module(flt)
            if not isinstance(obj, IMAPFilter):
                raise ModuleError(f"imapsql: {flt.label} is not an IMAP filter")
            self.imap_filter = obj
        db = SQLiteDB(self.db_path(), int(self.settings.get("sqlite3_busy_timeout") or 5000),
                      int(self.settings.get("sqlite3_cache_size") or 0))
        if self.group_window is not None:
            db.group_window = self.group_window
        if self.ctx.processes > 1:
            db.process_lock_path = self.db_path() + ".writelock"
        try:
            old, new = await asyncio.to_thread(db.open)
        except (sqlite3.Error, SchemaError, OSError) as e:
            raise ModuleError(f"imapsql: {e}") from None
        if old != new:
            self.log.debug("database schema migrated", path=db.path, **{"from": old, "to": new})
        self.db = db
        if not self.ctx.options.management and self.ctx.runtime_dir:
            main = self.update_socket_path()
            own = updatepipe.worker_path(main, os.getpid()) if self.ctx.worker else main
            listener = updatepipe.Listener(own, self._on_remote_update)
            try:
                await listener.start()
                self._listener = listener
            except OSError as e:
                self.log.error("cannot listen for updates from other processes", err=e, path=own)
            if self.ctx.processes > 1:
                self._fanout = updatepipe.Fanout(main, own)
        if not self.ctx.worker:  # the supervisor's chores, once per database
            self._spawn(self.collect_garbage())
            self._spawn(self._maintenance())

    def _table(self, inst: ModuleInstance) -> Table:
        obj = self.ctx.module(inst)
        if not isinstance(obj, Table):
            raise ModuleError(f"imapsql: {inst.label} is not a table")
        return obj

    async def stop(self) -> None:
        for t in list(self._bg):
            t.cancel()
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._fanout is not None:
            self._fanout.close()
            self._fanout = None
        db, self.db = self.db, None
        if db is not None:
            await asyncio.to_thread(db.close, 0.9)

    async def _maintenance(self) -> None:
        """Every MAINTENANCE_INTERVAL: query planner statistics, free pages back to the file system."""
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                await self._db().write(_optimize)
            except Exception as e:
                self.log.error("SQLite maintenance failed", err=e)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _db(self) -> SQLiteDB:
        if self.db is None:
            raise StorageError("imapsql: storage is not started")
        return self.db

    def _store(self) -> FSBlobStore:
        if self.blobs is None:
            raise StorageError("imapsql: storage is not started")
        return self.blobs

    # -- update propagation (the IMAP work builds on this) -------------------------------------------

    def subscribe(self, sink: UpdateSink) -> Callable[[], None]:
        """Call `sink` for every update committed by this process; returns the unsubscribe function."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink) if sink in self._sinks else None

    def publish(self, updates: Iterable[Update]) -> None:
        """Hand committed updates to local subscribers and, through the update pipe
        (pymaddy/storage/updatepipe.py), to the server's other processes."""
        updates = list(updates)
        if self.ctx.options.management and updates:
            updatepipe.push(self.update_socket_path(), updates)
        elif self._fanout is not None and updates:
            self._fanout.send(updates)
        self._deliver_local(updates)

    def _deliver_local(self, updates: Iterable[Update]) -> None:
        for u in updates:
            for sink in list(self._sinks):
                try:
                    sink(u)
                except Exception as e:
                    self.log.error("update subscriber failed", err=e)

    def _on_remote_update(self, obj: dict[str, Any]) -> None:
        self._deliver_local([Update(str(obj["kind"]), str(obj["account"]), str(obj.get("mailbox") or ""),
                                    int(obj.get("uid") or 0))])

    def update_socket_path(self) -> str:
        """RUNTIME/sql-<sha1 hex of DSN>.sock, where maddy's processes exchange updates for this DB."""
        digest = hashlib.sha1(self.dsn.encode()).hexdigest()
        return os.path.join(self.ctx.runtime_dir, f"sql-{digest}.sock")

    # -- Table: existing accounts map to "" ------------------------------------------------------------

    async def lookup_multi(self, key: str) -> list[str]:
        try:
            name = await self.auth_normalize(key)
        except (NormalizeError, LookupError):
            return []
        acct = await self._db().read(lambda c: _get_account(c, name))
        return [""] if acct is not None else []

    async def auth_normalize(self, username: str) -> str:
        """maddy's authNormalize (auth_normalize + deprecated auth_map) then go-imap-sql's lower-casing."""
        name = self._auth_norm(username)
        if self.auth_map is not None:
            mapped = await self.auth_map.lookup(name)
            if mapped is None:
                raise LookupError(username)
            name = mapped
        return account_key(name)

    # -- accounts (CLI, IMAP login) ----------------------------------------------------------------------

    async def create_account(self, name: str, special: Iterable[tuple[str, str]] = ()) -> Account:
        """Create an account with INBOX and the given (special-use attribute, name) folders.

        Raises AccountExists. A folder name that is empty is skipped.
        """
        key = account_key(name)
        folders = list(special)
        return await self._db().write(lambda c: _create_account(c, key, folders))

    async def get_or_create_account(self, name: str) -> Account:
        """The account (created with INBOX only when missing): IMAP login auto-creates accounts."""
        key = account_key(name)

        def job(c: sqlite3.Connection) -> Account:
            return _get_account(c, key) or _create_account(c, key)

        return await self._db().write(job)

    async def get_account(self, name: str) -> Account | None:
        key = account_key(name)
        return await self._db().read(lambda c: _get_account(c, key))

    async def list_accounts(self) -> list[str]:
        rows = await self._db().read(lambda c: c.execute("SELECT name FROM accounts ORDER BY id").fetchall())
        return [r[0] for r in rows]

    async def remove_account(self, name: str) -> None:
        """Delete the account, its mailboxes and messages (blobs go once nothing refers to them)."""
        key = account_key(name)

        def job(c: sqlite3.Connection) -> None:
            acct = _require_account(c, key)
            _remove_refs(c, "b.account_id = ?", (acct.id,))
            c.execute("DELETE FROM accounts WHERE id = ?", (acct.id,))

        self._acct_cache.pop(key, None)
        try:
            await self._db().write(job)
        finally:
            self._acct_cache.pop(key, None)
        self.publish([Update("account_removed", key)])
        await self.collect_garbage(orphans=False)

    async def get_appendlimit(self, name: str) -> int | None:
        """The account's own APPENDLIMIT (None = not set). Raises AccountNotFound."""
        key = account_key(name)
        acct = await self._db().read(lambda c: _require_account(c, key))
        return acct.appendlimit

    async def set_appendlimit(self, name: str, value: int | None) -> None:
        key = account_key(name)

        def job(c: sqlite3.Connection) -> None:
            acct = _require_account(c, key)
            c.execute("UPDATE accounts SET appendlimit = ? WHERE id = ?", (value, acct.id))

        await self._db().write(job)
        self._acct_cache.pop(key, None)

    # -- mailboxes and messages (read side, used by tests and later by IMAP) -----------------------------

    async def create_mailbox(self, account: str, name: str, special_use: str | None = None) -> MailboxInfo:
        key = account_key(account)

        def job(c: sqlite3.Connection) -> MailboxInfo:
            acct = _require_account(c, key)
            mid = _create_mailbox(c, acct.id, name, special_use)
            return _mailbox_row(c.execute(f"SELECT {_MBOX_COLS} FROM mailboxes WHERE id = ?", (mid,)).fetchone())

        info = await self._db().write(job)
        self.publish([Update("mailbox", key, info.name)])
        return info

    async def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        key = account_key(account)

        def q(c: sqlite3.Connection) -> list[MailboxInfo]:
            acct = _require_account(c, key)
            rows = c.execute(f"SELECT {_MBOX_COLS} FROM mailboxes WHERE account_id = ? ORDER BY name",
                             (acct.id,)).fetchall()
            return [_mailbox_row(r) for r in rows]

        return await self._db().read(q)

    async def list_messages(self, account: str, mailbox: str = INBOX) -> list[MessageInfo]:
        key = account_key(account)

        def q(c: sqlite3.Connection) -> list[MessageInfo]:
            acct = _require_account(c, key)
            mid = _mailbox_id(c, acct.id, mailbox)
            if mid is None:
                raise MailboxNotFound()
            rows = c.execute(
                "SELECT id, mailbox_id, uid, modseq, internaldate, size, blob_key, prefix, flags FROM messages "
                "WHERE mailbox_id = ? ORDER BY uid",
                (mid,),
            ).fetchall()
            return [
                MessageInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7]), tuple(r[8].split()))
                for r in rows
            ]

        return await self._db().read(q)

    def _read_message_fn(self, msg: MessageInfo) -> Callable[[sqlite3.Connection], bytes]:
        store = self._store()

        def q(c: sqlite3.Connection) -> bytes:
            return msg.prefix + _blob_content(c, store, msg.blob_key)

        return q

    def read_message_sync(self, msg: MessageInfo) -> bytes:
        """The full message (prefix + body), whether the body is inline in the index or a blob file."""
        return self._db().read_sync(self._read_message_fn(msg))

    async def read_message(self, msg: MessageInfo) -> bytes:
        return await self._db().read(self._read_message_fn(msg))

    # -- garbage -------------------------------------------------------------------------------------------

    async def collect_garbage(self, orphans: bool = True) -> int:
        """Delete blobs nothing refers to: rows with refs = 0 (after a removal or a crash), and,
        with `orphans`, files without a row older than ORPHAN_MIN_AGE (a crash between the blob
        rename and the index commit). Returns how many blobs went."""
        db, store = self._db(), self._store()
        try:
            dead = await db.write(_dead_blobs)
            if dead:
                await store.delete(dead)
                dk = list(dead)
                await db.write(lambda c: c.executemany(
                    "DELETE FROM blobs WHERE key = ? AND refs <= 0", [(k,) for k in dk]))
            n = len(dead)
            if orphans:
                n += await asyncio.to_thread(self._sweep_orphans_sync)
            return n
        except Exception as e:
            self.log.error("blob garbage collection failed", err=e)
            return 0

    def _sweep_orphans_sync(self) -> int:
        db, store = self._db(), self._store()
        cutoff = time.time() - ORPHAN_MIN_AGE
        old: list[str] = []
        for key in store.iter_keys():
            try:
                if os.path.getmtime(store.path(key)) < cutoff:
                    old.append(key)
            except (OSError, ValueError):
                continue
        if not old:
            return 0

        def known(c: sqlite3.Connection) -> set[str]:
            out: set[str] = set()
            for i in range(0, len(old), 500):
                part = old[i : i + 500]
                marks = ",".join("?" * len(part))
                out.update(r[0] for r in c.execute(f"SELECT key FROM blobs WHERE key IN ({marks})", part))
            return out

        have = db.read_sync(known)
        gone = [k for k in old if k not in have]
        store.delete_sync(gone)
        if gone:
            self.log.msg("removed orphaned message blobs", count=len(gone))
        return len(gone)

    # -- delivery ------------------------------------------------------------------------------------------

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        return IMAPSQLDelivery(self, meta, mail_from)

    async def resolve_recipient(self, rcpt: str) -> Account:
        """maddy's deliveryNormalize + GetUser: the account for a recipient, or 501 5.1.1.

        Found accounts are cached for ACCOUNT_CACHE_TTL (see there); the commit re-checks by name."""
        name = self._norm_cache.get(rcpt)
        if name is None:
            try:
                name = self._delivery_norm(rcpt)
            except NormalizeError as e:
                raise user_does_not_exist(str(e)) from None
            if len(self._norm_cache) >= ACCOUNT_CACHE_MAX:
                self._norm_cache.clear()
            self._norm_cache[rcpt] = name
        if self.delivery_map is not None:
            try:
                mapped = await self.delivery_map.lookup(name)
            except Exception as e:
                raise user_does_not_exist(str(e)) from None
            if mapped is None:
                raise user_does_not_exist()
            name = mapped
        key = account_key(name)
        if self._acct_cache_unsub is None:
            # removals published here or (through the update pipe) by another process drop the entry at once
            self._acct_cache_unsub = self.subscribe(self._acct_cache_update)
        cached = self._acct_cache.get(key)
        t = time.monotonic()
        if cached is not None and cached[1] > t:
            return cached[0]
        try:
            acct = await self._db().read(lambda c: _get_account(c, key))
        except Exception as e:
            raise _storage_smtp_error(e) from None
        if acct is None:
            self._acct_cache.pop(key, None)
            raise user_does_not_exist()
        if len(self._acct_cache) >= ACCOUNT_CACHE_MAX:
            self._acct_cache.clear()
        self._acct_cache[key] = (acct, t + ACCOUNT_CACHE_TTL)
        return acct

    def _acct_cache_update(self, u: Update) -> None:
        if u.kind == "account_removed":
            self._acct_cache.pop(u.account, None)


@dataclass
class _Rcpt:
    rcpt_to: str
    account: Account


@dataclass
class _Body:
    key: str
    size: int
    written: bool = False  # a blob file exists (not yet fsynced: the commit's batch does that)
    data: bytes | None = None  # inline body (compressed when `algo`), stored in the index at commit
    algo: str | None = None  # blobs.compression
    header: bytes = b""  # Return-Path + header + blank line: the IMAP header cache of each copy


class IMAPSQLDelivery(PartialDelivery):
    def __init__(self, store: IMAPSQL, meta: MsgMeta, mail_from: str) -> None:
        self.store = store
        self.meta = meta
        self.mail_from = mail_from
        self.rcpts: dict[str, _Rcpt] = {}
        self.blob: _Body | None = None
        self.placement: dict[str, FilterResult] = {}  # account -> folder and flags from the imap_filter
        self._expecting = False
        self._done = False

    async def add_rcpt(self, rcpt: str) -> None:
        acct = await self.store.resolve_recipient(rcpt)
        if acct.name in self.rcpts:
            return
        if acct.quota is not None:
            # RFC 3463 §3.3 X.2.2 "mailbox full"; with SIZE= declared (RFC 1870) the message itself counts
            await self._check_quota(acct, max(self.meta.size, 0))
        self.rcpts[acct.name] = _Rcpt(rcpt, acct)

    async def _check_quota(self, acct: Account, size: int) -> None:
        try:
            used = await self.store._db().read(lambda c: _usage_bytes(c, acct.id))
        except Exception as e:
            raise _storage_smtp_error(e) from None
        quota = acct.quota or 0
        if used + size > quota or used >= quota:
            raise mailbox_full(f"{used} of {quota} bytes used, message {size} bytes")

    async def body(self, header: Header, body: Body) -> None:
        if self.blob is not None:
            raise RuntimeError("imapsql: body() called twice")
        if not self.rcpts:
            return
        store = self.store
        db, blobs = store._db(), store._store()
        if store.imap_filter is not None and not self.meta.quarantine:
            await self._run_filters(store.imap_filter, header, body)
        sender = self.mail_from.replace("\r", "").replace("\n", "")
        head = b"Return-Path: <" + sender.encode("utf-8") + b">\r\n" + header.to_bytes() + b"\r\n"
        key = random_hex(16)  # blob_fs.new_key's form (128 bits, hex), from a buffered urandom pool
        cdc = store.codec
        algo = cdc.name if cdc is not None else None
        db.expect()
        self._expecting = True
        try:
            if len(head) + body.size <= INLINE_MAX:
                # an in-memory body is read without a thread hop; a spooled one in a worker thread
                data = head + (body.read_all() if body.path is None else await asyncio.to_thread(body.read_all))
                stored = cdc.compress(data) if cdc is not None else data
                self.blob = _Body(key, len(data), data=stored, algo=algo, header=head)
                return
            size = await asyncio.to_thread(_write_blob, blobs, key, head, body, cdc)
        except BaseException as e:
            self._unexpect()
            raise _storage_smtp_error(e) from None
        self.blob = _Body(key, size, written=True, algo=algo, header=head)

    async def _run_filters(self, flt: IMAPFilter, header: Header, body: Body) -> None:
        """imap_filter per recipient (spec §B.9); a failing filter only costs its opinion."""
        for name, r in self.rcpts.items():
            inp = FilterInput(self.meta, name, r.rcpt_to, self.meta.original_rcpts.get(r.rcpt_to, r.rcpt_to),
                              header, body)
            try:
                res = await flt.filter(inp)
            except Exception as e:
                self.store.log.error("imap_filter failed", err=e, msg_id=self.meta.id)
                continue
            if res.folder or res.flags:
                self.placement[name] = res

    async def body_non_atomic(self, status: StatusCallback, header: Header, body: Body) -> None:
        # LMTP reports each recipient on its own, so an account over quota (now that the size is
        # known) fails alone and is not delivered to.
        for name, r in list(self.rcpts.items()):
            if r.account.quota is None:
                continue
            try:
                await self._check_quota(r.account, body.size + len(header.to_bytes()))
            except SMTPError as e:
                status(r.rcpt_to, e)
                del self.rcpts[name]
        if not self.rcpts:
            return
        try:
            await self.body(header, body)
        except SMTPError as e:
            for r in self.rcpts.values():
                status(r.rcpt_to, e)
            return
        for r in self.rcpts.values():
            status(r.rcpt_to, None)

    def _unexpect(self) -> None:
        if self._expecting:
            self._expecting = False
            self.store._db().unexpect()

    async def commit(self) -> None:
        if self._done:
            return
        self._done = True
        if self.blob is None or not self.rcpts:
            self._unexpect()
            return
        store = self.store
        db, blobs = store._db(), store._store()
        blob = self.blob
        targets = list(self.rcpts)
        quarantine = self.meta.quarantine
        placement = self.placement
        junk = store.junk_mailbox
        recent = 0 if store.disable_recent else 1

        inline = blob.data is not None
        blob_path = "" if inline else blobs.path(blob.key)
        # Every copy's header differs only by its Delivered-To prefix, which the index leaves out.
        search = searchindex.index_row(blob.header)

        def job(c: sqlite3.Connection) -> list[Update]:
            # Never index a blob that is not there (e.g. swept by a concurrent garbage collection).
            if not inline and not os.path.exists(blob_path):
                raise StorageError(f"imapsql: message blob {blob.key} vanished before commit")
            ts = now()
            # refs counts the messages below; corrected at the end if an account went away meanwhile
            c.execute("INSERT INTO blobs (key, size, refs, data, compression) VALUES (?, ?, ?, ?, ?)",
                      (blob.key, blob.size, len(targets), blob.data, blob.algo))
            updates: list[Update] = []
            # The account is looked up by name here, in the transaction: the Account seen at RCPT may be
            # from resolve_recipient's cache, and an account removed and created again can have another id
            # (or its old id can belong to another account now).
            for name in targets:
                flags = ""
                placed = placement.get(name)
                if placed is not None and not quarantine:
                    acct = _get_account(c, name)
                    if acct is None:
                        continue  # the account went away since RCPT
                    mbox, mbox_id = INBOX, None
                    if placed.folder:  # a folder that does not exist means INBOX (maddy)
                        mbox_id = _mailbox_id(c, acct.id, placed.folder)
                        mbox = placed.folder if mbox_id is not None else INBOX
                    if mbox_id is None:
                        mbox_id = _mailbox_id(c, acct.id, INBOX)
                    if mbox_id is None:
                        continue
                    uid, modseq = _next_uid(c, mbox_id)
                    flags = " ".join(sorted(set(placed.flags)))
                elif quarantine:
                    acct = _get_account(c, name)
                    mbox_id, mbox = _junk_mailbox(c, acct.id, junk) if acct is not None else (0, "")
                    if not mbox_id:
                        continue  # the account went away since RCPT
                    uid, modseq = _next_uid(c, mbox_id)
                elif _RETURNING:
                    # INBOX lookup by account name and UID/MODSEQ allocation in one statement
                    r = c.execute(_INBOX_NEXT_UID, (name, INBOX)).fetchall()
                    if not r:
                        continue  # the account went away since RCPT
                    mbox_id, uid, modseq = r[0]
                    mbox = INBOX
                else:
                    mbox_id, mbox = _inbox_by_account_name(c, name) or 0, INBOX
                    if not mbox_id:
                        continue  # the account went away since RCPT
                    uid, modseq = _next_uid(c, mbox_id)
                prefix = b"Delivered-To: " + name.encode("utf-8") + b"\r\n"
                c.execute(
                    "INSERT INTO messages (mailbox_id, uid, modseq, internaldate, size, blob_key, prefix, recent, "
                    f"flags, header, {INDEX_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {INDEX_MARKS})",
                    (mbox_id, uid, modseq, ts, blob.size + len(prefix), blob.key, prefix, recent, flags,
                     prefix + blob.header, *search),
                )
                updates.append(Update("message", name, mbox, uid))
            if not updates:
                # every recipient's account went away since RCPT: refuse rather than answer 250 for nothing
                raise _AccountsGone()
            if len(updates) != len(targets):
                c.execute("UPDATE blobs SET refs = ? WHERE key = ?", (len(updates), blob.key))
            return updates

        self._expecting = False
        key = blob.key

        def fsync_blob() -> None:
            try:
                blobs.fsync_blob(key)
            except NoSuchBlob:
                raise StorageError(f"imapsql: message blob {key} vanished before commit") from None

        try:
            if inline:
                updates = await db.write(job, expected=True)
            else:
                updates = await db.write(job, sync=(blobs,), expected=True, files=(fsync_blob,))
        except _AccountsGone as e:
            # the job's savepoint was rolled back: no row refers to the blob file
            if not inline:
                with contextlib.suppress(OSError, ValueError):
                    await blobs.delete([blob.key])
            raise user_does_not_exist(str(e)) from None
        except BaseException as e:
            raise _storage_smtp_error(e) from None
        store.publish(updates)

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._unexpect()
        blob, self.blob = self.blob, None
        if blob is not None and blob.written and self.store.blobs is not None:
            with contextlib.suppress(OSError, ValueError, NoSuchBlob):
                await self.store.blobs.delete([blob.key])


def _write_blob(blobs: FSBlobStore, key: str, head: bytes, body: Body, cdc: Codec | None = None) -> int:
    """Write the message to a new blob file; returns its size before compression."""
    w: BlobWriter = blobs.create()
    size = 0
    stream = cdc.stream() if cdc is not None else None
    try:
        for chunk in _chunks(head, body):
            size += len(chunk)
            w.write(stream.compress(chunk) if stream is not None else chunk)
        if stream is not None:
            w.write(stream.flush())
        # The file and directory fsyncs are left to the group commit (on the writer thread, per batch).
        w.commit(key, sync_dir=False, fsync=False)
    except BaseException:
        w.abort()
        raise
    return size


def _chunks(head: bytes, body: Body) -> Iterator[bytes]:
    yield head
    with body.open() as f:
        while chunk := f.read(CHUNK):
            yield chunk
