"""SQLite access for imapsql: one writer thread with group commit, a pool of readers.

Writes are jobs — functions of a connection — queued to a single writer
thread. The writer takes every job waiting, runs each inside its own
SAVEPOINT (one failing job does not spoil the others) and commits them all in
one transaction: one WAL fsync (`synchronous=FULL`) for the whole batch.
Before the transaction it runs the jobs' file syncs (`files`: the fsync of each
blob file written without one, back to back on this thread; a failing one fails
only its job) and then fsyncs the blob directories the remaining jobs depend on,
once per batch, so no committed row can point at a blob a crash could lose.

While deliveries are on their way to commit (`expect()`ed but not yet
submitted) the writer waits up to `group_window` for them, so concurrent
senders share transactions; a lone sender never waits.

Reads run on a small thread pool, each thread with its own connection; WAL lets
them proceed while the writer commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pymaddy.storage.sqlschema import migrate

T = TypeVar("T")

DEFAULT_GROUP_WINDOW = 0.003  # seconds the writer waits for expected commits
MAX_BATCH = 512
READERS = 4


class DirSync(Protocol):
    def sync_dir(self) -> None: ...


@dataclass
class Stats:
    """Instrumentation: what the writer did."""

    transactions: int = 0  # COMMITs of batches
    jobs: int = 0  # jobs run (committed or failed)
    failed_jobs: int = 0
    max_batch: int = 0
    dir_syncs: int = 0
    file_syncs: int = 0


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any]
    sync: tuple[DirSync, ...] = ()
    files: tuple[Callable[[], None], ...] = ()
    after: list[Callable[[], None]] = field(default_factory=list)
    # write(): the awaiting coroutine's future, resolved from `future` by one loop callback per batch
    aio: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None = None
    durable: bool = True  # False: the commit may skip its WAL fsync (see write())


class DatabaseClosed(Exception):
    pass


def connect(path: str, busy_timeout_ms: int, cache_size: int, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    if cache_size:
        conn.execute(f"PRAGMA cache_size = {int(cache_size)}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


class SQLiteDB:
    def __init__(
        self,
        path: str,
        busy_timeout_ms: int = 5000,
        cache_size: int = 0,
        group_window: float = DEFAULT_GROUP_WINDOW,
    ) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.cache_size = cache_size
        self.group_window = group_window
        self.stats = Stats()
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._expected = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._rconns: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._rlock = threading.Lock()
        self._sync_full = True  # the writer connection's current `synchronous` (FULL from connect())
        self._inline: sqlite3.Connection | None = None
        # Several server processes write this database (the `workers` directive): they take turns
        # through a blocking lock on a file next to it, which hands over at once, instead of
        # SQLite's busy handler, which sleeps 1, 2, 5, 10… ms between tries.
        self.process_lock_path: str | None = None
        self._lock_fd = -1

    # -- life cycle -----------------------------------------------------------------------

    def open(self) -> tuple[int, int]:
        """Open (creating if needed), set WAL and migrate; blocking. Returns (old, new) schema version."""
        conn = connect(self.path, self.busy_timeout_ms, self.cache_size)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL mode (got {mode})")
            # A new database gets incremental auto-vacuum; set before the first table exists.
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA wal_autocheckpoint = 4000")
            versions = migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._wconn = conn
        if self.process_lock_path is not None:
            self._lock_fd = os.open(self.process_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="imapsql-read")
        self._thread = threading.Thread(target=self._writer, name="imapsql-writer", daemon=True)
        self._thread.start()
        return versions

    def close(self, timeout: float | None = None) -> None:
        """Finish queued jobs, stop the writer, close every connection; blocking."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
        with self._rlock:
            conns, self._rconns = self._rconns, []
            self._inline = None
        for c in conns:
            with contextlib.suppress(sqlite3.Error):
                c.close()
        if self._wconn is not None and (self._thread is None or not self._thread.is_alive()):
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("PRAGMA optimize")
            with contextlib.suppress(sqlite3.Error):
                self._wconn.close()
            self._wconn = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # -- writing ----------------------------------------------------------------------------

    def expect(self) -> None:
        """A commit will follow soon (a delivery is writing its body): batch with it."""
        with self._cond:
            self._expected += 1

    def unexpect(self) -> None:
        with self._cond:
            self._expected = max(0, self._expected - 1)
            self._cond.notify_all()

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        sync: tuple[DirSync, ...] = (),
        expected: bool = False,
        files: tuple[Callable[[], None], ...] = (),
    ) -> Future[T]:
        """Queue a write job; with `expected`, it is the commit an earlier expect() announced.

        Before the transaction that runs `fn`, the writer calls each of `files`
        (fsyncs of data the job makes reachable; an exception fails the job) and
        then `sync_dir()` of each of `sync`, once per batch."""
        return self._submit(_Job(fn, Future(), sync, files), expected)

    def _submit(self, job: _Job, expected: bool) -> Future[Any]:
        fut = job.future
        with self._cond:
            if expected:
                self._expected = max(0, self._expected - 1)
            if self._closing or self._thread is None:
                fut.set_exception(DatabaseClosed("imapsql: database is closed"))
                return fut
            self._queue.append(job)
            # Wake the writer only when it has something to do: it waits either for a first job (the
            # queue was empty) or, inside the group window, for the expected commits (none left) or
            # a full batch. Every other arrival would wake it only to wait again.
            q = len(self._queue)
            if q == 1 or self._expected == 0 or q >= MAX_BATCH:
                self._cond.notify_all()
        return fut

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        sync: tuple[DirSync, ...] = (),
        expected: bool = False,
        files: tuple[Callable[[], None], ...] = (),
        durable: bool = True,
    ) -> T:
        """submit() and wait. The writer wakes the event loop once per batch, not once per job.

        `durable=False` is for changes a crash may roll back without harm (IMAP flags, caches): a
        batch of only such jobs commits with `synchronous=NORMAL`, i.e. without the WAL fsync. WAL
        keeps the order, so the next durable commit's fsync makes them durable too, and a crash
        can only lose such a batch whole, never corrupt or reorder anything."""
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[T] = loop.create_future()
        job = _Job(fn, Future(), sync, files, aio=(loop, afut), durable=durable)
        cfut = self._submit(job, expected)
        if cfut.done():
            _copy_result(cfut, afut)
        else:
            # a caller that gives up before the job starts drops it (as asyncio.wrap_future would)
            afut.add_done_callback(lambda f: cfut.cancel() if f.cancelled() else None)
        return await afut

    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.group_window
            # Commits announced by expect() are on their way: wait a moment for them.
            while self._expected > 0 and len(self._queue) < MAX_BATCH and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Job] = []
            while self._queue and len(batch) < MAX_BATCH:
                batch.append(self._queue.popleft())
            return batch

    def _writer(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            finally:
                _wake(batch)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, batch: list[_Job],
                     results: list[tuple[_Job, Any, BaseException | None]]) -> None:
        """One transaction, a savepoint per job: a failing job rolls back alone."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    res = job.fn(conn)
                except BaseException as e:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((job, None, e))
                else:
                    conn.execute("RELEASE job")
                    results.append((job, res, None))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _run_batch(self, batch: list[_Job]) -> None:
        conn = self._wconn
        assert conn is not None
        # A job whose caller gave up before it started is dropped; once running it cannot be cancelled.
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not batch:
            return
        results: list[tuple[_Job, Any, BaseException | None]] = []
        # File syncs first, back to back; a job whose data cannot be made durable fails alone.
        ready: list[_Job] = []
        for job in batch:
            try:
                for f in job.files:
                    f()
                    self.stats.file_syncs += 1
            except Exception as e:
                self.stats.failed_jobs += 1
                job.future.set_exception(e)
            else:
                ready.append(job)
        batch = ready
        if not batch:
            return
        try:
            synced: set[int] = set()
            for job in batch:
                for s in job.sync:
                    if id(s) not in synced:
                        synced.add(id(s))
                        s.sync_dir()
                        self.stats.dir_syncs += 1
            full = any(j.durable for j in batch)
            if full != self._sync_full:
                conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
                self._sync_full = full
            if self._lock_fd >= 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._transaction(conn, batch, results)
            finally:
                if self._lock_fd >= 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except BaseException as e:
            self.stats.failed_jobs += len(batch)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        self.stats.transactions += 1
        self.stats.jobs += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        for job, res, err in results:
            if err is not None:
                self.stats.failed_jobs += 1
                job.future.set_exception(err)
            else:
                job.future.set_result(res)

    # -- reading ----------------------------------------------------------------------------

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.busy_timeout_ms, self.cache_size, readonly=True)
            self._local.conn = conn
            with self._rlock:
                self._rconns.append(conn)
        return conn

    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self._reader_conn())

    def read_inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a small read on the calling (event loop) thread: no thread hop.

        Only for queries of a few indexed rows. WAL readers do not wait for the writer; the
        connection's busy timeout is kept short so that the rare lock (WAL recovery) cannot stall
        the loop for long, and then the caller gets sqlite3.OperationalError."""
        if self._readers is None:
            raise DatabaseClosed("imapsql: database is closed")
        conn = self._inline
        if conn is None:
            conn = self._inline = connect(self.path, 50, self.cache_size, readonly=True)
            with self._rlock:
                self._rconns.append(conn)
        return fn(conn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            raise DatabaseClosed("imapsql: database is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self.read_sync, fn)


def _copy_result(src: Future[Any], dst: asyncio.Future[Any]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


def _resolve(pairs: list[tuple[Future[Any], asyncio.Future[Any]]]) -> None:
    for src, dst in pairs:
        _copy_result(src, dst)


def _wake(batch: list[_Job]) -> None:
    """Hand the batch's results to the waiting coroutines: one call_soon_threadsafe per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Future[Any], asyncio.Future[Any]]]] = {}
    for job in batch:
        if job.aio is not None and job.future.done():
            by_loop.setdefault(job.aio[0], []).append((job.future, job.aio[1]))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_resolve, pairs)
