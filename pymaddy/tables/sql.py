"""`table.sql_query` and `table.sql_table` on SQLite (maddy's internal/table/sql_query.go, sql_table.go).

Only the SQLite drivers (`sqlite3`, `sqlite`) are implemented; `postgres` and
`mysql` are refused at start-up. Queries run in one worker thread per table
with its own connection, never on the event loop. The connection is in
autocommit mode, WAL journal and a busy timeout, so the server and the CLI
(`pymaddy creds`) can use the same file at once.

Arguments: with `named_args`, `:key` and `:value`; otherwise positional — `$1`
and `$2` (bound by number, whatever their order in the query) or `?`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import MutableTable

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

R = TypeVar("R")

SQLITE_DRIVERS = ("sqlite3", "sqlite")
DEFAULT_BUSY_TIMEOUT_MS = 5000  # mattn/go-sqlite3's default
_NUMBERED = re.compile(r"[$:@?](\d+)")


class TableError(Exception):
    """A lookup or change failed in the backend; worded as maddy words it."""


@dataclass
class SQLiteDSN:
    """What a go-sqlite3 style DSN asks for."""

    target: str  # a path or a `file:` URI
    uri: bool
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
    journal_mode: str | None = None
    synchronous: str | None = None
    foreign_keys: bool | None = None
    memory: bool = False


def parse_dsn(dsn: str, base_dir: str) -> SQLiteDSN:
    """Parse `path`, `path?_opt=v` or `file:path?opt=v`; relative paths are relative to `base_dir`.

    `_`-prefixed options are go-sqlite3's own (busy timeout, journal mode, …);
    other options of a `file:` URI are passed to SQLite.
    """
    query = ""
    q = dsn.find("?")
    if q >= 1:
        dsn, query = dsn[:q], dsn[q + 1 :]
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    mine = {k: v for k, v in params if k.startswith("_")}
    passed = [(k, v) for k, v in params if not k.startswith("_")]
    is_uri = dsn.startswith("file:")
    path = dsn[len("file:") :] if is_uri else dsn
    memory = path in (":memory:", "") or any(k == "mode" and v == "memory" for k, v in passed)
    if not memory and not is_uri:
        target = os.path.join(base_dir, path)
    elif is_uri and not memory:
        if path.startswith("//"):
            # file://host/path: SQLite accepts an empty host or localhost only.
            rest = path[2:]
            slash = rest.find("/")
            host, upath = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
            path = upath if host in ("", "localhost") else path
        if not path.startswith("/"):
            path = os.path.join(base_dir, path)
        target = "file:" + path + ("?" + urllib.parse.urlencode(passed) if passed else "")
    else:
        target = "file:" + (path or ":memory:") + ("?" + urllib.parse.urlencode(passed) if passed else "")
        is_uri = True
    out = SQLiteDSN(target, is_uri, memory=memory)
    for k, v in mine.items():
        key = k.lower()
        if key in ("_busy_timeout", "_timeout"):
            try:
                out.busy_timeout_ms = int(v)
            except ValueError:
                raise ModuleError(f"Invalid _busy_timeout: {v!r}") from None
        elif key in ("_journal_mode", "_journal"):
            out.journal_mode = v.upper()
        elif key in ("_synchronous", "_sync"):
            out.synchronous = v.upper()
        elif key in ("_foreign_keys", "_fk"):
            out.foreign_keys = v.lower() in ("1", "yes", "true", "on")
    return out


class SQLiteConn:
    """One SQLite connection used from its own single worker thread."""

    def __init__(self, dsn: SQLiteDSN) -> None:
        self.dsn = dsn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymaddy-sql")
        self._conn: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        def call() -> R:
            if self._conn is None:
                raise TableError("database is closed")
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._open)

    def _open(self) -> None:
        d = self.dsn
        conn = sqlite3.connect(
            d.target, uri=d.uri, timeout=d.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(d.busy_timeout_ms)}")
            if not d.memory:
                mode = d.journal_mode or "WAL"
                with contextlib.suppress(sqlite3.Error):  # e.g. a read-only database
                    conn.execute(f"PRAGMA journal_mode = {mode}").fetchall()
            if d.synchronous:
                conn.execute(f"PRAGMA synchronous = {d.synchronous}")
            if d.foreign_keys is not None:
                conn.execute(f"PRAGMA foreign_keys = {'ON' if d.foreign_keys else 'OFF'}")
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, close)
        finally:
            self._pool.shutdown(wait=False)


def _args(query: str, named: bool, values: tuple[str, ...]) -> dict[str, str] | tuple[str, ...]:
    """Bind values: `:key`/`:value` by name, `$1`/`$2` by their number, `?` by position."""
    if named:
        return dict(zip(("key", "value"), values, strict=False))
    if _NUMBERED.search(query):
        return {str(i): v for i, v in enumerate(values, 1)}
    return values


class SQLQueryTable(Module, MutableTable):
    """Lookups (and, with add/list/set/del, changes) through SQL queries."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.mod = inst.schema.name
        self.driver: str = s.get("driver") or ""
        self.dsn_text: str = s.get("dsn") or ""
        self.named = bool(s.get("named_args"))
        self.init_queries: list[str] = list(s.get("init") or [])
        self.queries: dict[str, str] = {k: s.get(k) or "" for k in ("lookup", "add", "list", "set", "del")}
        if self.driver not in SQLITE_DRIVERS:
            raise ModuleError(f"{self.mod}: driver {self.driver} is not supported yet (only sqlite3)")
        self.db: SQLiteConn | None = None

    def log_name(self) -> str:
        return self.inst.schema.name

    async def start(self) -> None:
        dsn = parse_dsn(self.dsn_text, self.ctx.state_dir)
        db = SQLiteConn(dsn)
        try:
            await db.open()
        except sqlite3.Error as e:
            await db.close()
            raise ModuleError(f"{self.mod}: failed to open db: {e}") from None
        self.db = db
        try:
            await db.run(self._prepare)
        except ModuleError:
            await self.stop()
            raise

    def _prepare(self, conn: sqlite3.Connection) -> None:
        for q in self.init_queries:
            try:
                conn.executescript(q)
            except sqlite3.Error as e:
                raise ModuleError(f"{self.mod}: init query failed: {e}") from None
        # maddy prepares every query at start-up: a typo is a start-up error, not a failed lookup.
        shapes = {"lookup": ("",), "add": ("", ""), "list": (), "set": ("", ""), "del": ("",)}
        for name, query in self.queries.items():
            if not query:
                continue
            try:
                conn.execute("EXPLAIN " + query, _args(query, self.named, shapes[name])).fetchall()
            except sqlite3.ProgrammingError:
                pass  # a binding mismatch shows when the query is used, as in maddy
            except sqlite3.Error as e:
                raise ModuleError(f"{self.mod}: failed to prepare {name} query: {e}") from None

    async def stop(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            await db.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        if self.db is None:
            raise TableError(f"{self.mod}: database is not open")
        return await self.db.run(fn)

    # -- Table ---------------------------------------------------------------------------

    async def lookup_multi(self, key: str) -> list[str]:
        query = self.queries["lookup"]

        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(query, _args(query, self.named, (key,))).fetchall()
            return [_text(r[0]) for r in rows]

        try:
            return await self._run(q)
        except sqlite3.Error as e:
            raise TableError(f"{self.mod}; lookup {key}: {e}") from None

    async def lookup(self, key: str) -> str | None:
        query = self.queries["lookup"]

        def q(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(query, _args(query, self.named, (key,))).fetchone()
            return None if row is None else _text(row[0])

        try:
            return await self._run(q)
        except sqlite3.Error as e:
            raise TableError(f"{self.mod}: lookup {key}: {e}") from None

    # -- MutableTable ------------------------------------------------------------------------

    def _need(self, *names: str) -> None:
        for name in names:
            if not self.queries[name]:
                raise TableError(f"{self.mod}: table is not mutable (no '{name}' query)")

    async def keys(self) -> list[str]:
        self._need("list")
        query = self.queries["list"]
        try:
            return await self._run(lambda conn: [_text(r[0]) for r in conn.execute(query).fetchall()])
        except sqlite3.Error as e:
            raise TableError(f"{self.mod}: list: {e}") from None

    async def remove_key(self, key: str) -> None:
        self._need("del")
        query = self.queries["del"]
        try:
            await self._run(lambda conn: conn.execute(query, _args(query, self.named, (key,))))
        except sqlite3.Error as e:
            raise TableError(f"{self.mod}: del {key}: {e}") from None

    async def set_key(self, key: str, value: str) -> None:
        self._need("set", "add")
        add, upd = self.queries["add"], self.queries["set"]

        def q(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(add, _args(add, self.named, (key, value)))
            except sqlite3.Error:
                # maddy: an insert that fails (the key exists) becomes an update.
                conn.execute(upd, _args(upd, self.named, (key, value)))

        try:
            await self._run(q)
        except sqlite3.Error as e:
            raise TableError(f"{self.mod}: add {key}: {e}") from None


class SQLTable(SQLQueryTable):
    """`table.sql_table`: the schema generates the sql_query settings (CREATE TABLE IF NOT EXISTS …)."""


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return "" if v is None else str(v)
