"""storage.blob.fs: message bodies as files in one flat directory (spec §B.8).

One file per blob, named by its key. Writes are crash-safe: the data goes to
a temporary file in the same directory, is fsynced, then renamed to its key;
the directory itself is fsynced by `sync_dir()`, which callers batch. The
imapsql writer defers both: `commit(key, fsync=False, sync_dir=False)` in the
delivery, then, on the writer thread, `fsync_blob(key)` for every blob of a
group commit and one `sync_dir()`, before the index transaction that makes the
blobs visible.

The methods without `async` block and are meant for worker threads; the async
ones run them off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

from pymaddy.runtime.module import Module, ModuleError, RuntimeContext

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance

TMP_PREFIX = ".tmp-"
TMP_MAX_AGE = 3600.0  # temporary files older than this are leftovers of a crash
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class NoSuchBlob(KeyError):
    """The key names no blob."""


def new_key() -> str:
    """A fresh random blob key (128 bits, hex)."""
    return secrets.token_hex(16)


def check_key(key: str) -> str:
    if not _KEY.match(key) or key.startswith(TMP_PREFIX):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobWriter:
    """A blob being written: `write()` pieces, then `commit(key)` or `abort()`."""

    def __init__(self, store: FSBlobStore) -> None:
        self.store = store
        self.tmp = os.path.join(store.root, TMP_PREFIX + secrets.token_hex(8))
        self._f: BinaryIO | None = open(self.tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._f is not None, "blob already finished"
        self._f.write(data)
        self.size += len(data)

    def commit(self, key: str, sync_dir: bool = True, fsync: bool = True) -> None:
        """fsync the data and rename it to `key`. Without sync_dir the rename is
        durable only after the next `store.sync_dir()`; without fsync the data is
        durable only after `store.fsync_blob(key)` (the caller must not make the
        blob reachable before both)."""
        check_key(key)
        f, self._f = self._f, None
        assert f is not None, "blob already finished"
        try:
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        finally:
            f.close()
        try:
            os.replace(self.tmp, self.store.path(key))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise
        if sync_dir:
            self.store.sync_dir()

    def abort(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


class FSBlobStore(Module):
    """A flat directory of blobs; `root` is relative to state_dir."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        root = str(self.settings.get("root") or "")
        self.root = os.path.join(ctx.state_dir, root) if ctx.state_dir else os.path.abspath(root)
        self.fsyncs_dir = 0  # instrumentation: directory fsyncs done
        self.fsyncs_file = 0  # instrumentation: deferred blob fsyncs done (fsync_blob)

    def log_name(self) -> str:
        return "storage.blob.fs"

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.open_sync)
        except OSError as e:
            raise ModuleError(f"storage.blob.fs: {self.root}: {e.strerror or e}") from None

    def open_sync(self) -> None:
        os.makedirs(self.root, 0o700, exist_ok=True)
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self, max_age: float = TMP_MAX_AGE) -> int:
        """Delete temporary files a crash left behind (never ones another writer may still use)."""
        n = 0
        now = time.time()
        with os.scandir(self.root) as it:
            for e in it:
                if e.name.startswith(TMP_PREFIX):
                    try:
                        if now - e.stat().st_mtime > max_age:
                            os.unlink(e.path)
                            n += 1
                    except OSError:
                        pass
        return n

    # -- blocking API (worker threads) ---------------------------------------------------

    def path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def create(self) -> BlobWriter:
        return BlobWriter(self)

    def put_sync(self, key: str, data: bytes | Iterable[bytes], sync_dir: bool = True) -> int:
        w = self.create()
        try:
            for chunk in [data] if isinstance(data, bytes) else data:
                w.write(chunk)
            w.commit(key, sync_dir=sync_dir)
        except BaseException:
            w.abort()
            raise
        return w.size

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            raise NoSuchBlob(key) from None

    def get_sync(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def size(self, key: str) -> int:
        try:
            return os.path.getsize(self.path(key))
        except FileNotFoundError:
            raise NoSuchBlob(key) from None

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def delete_sync(self, keys: Iterable[str]) -> None:
        """Remove blobs; missing ones are not an error (deletion is idempotent)."""
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(key))

    def fsync_blob(self, key: str) -> None:
        """fsync a blob's data (written with `commit(key, fsync=False)`); NoSuchBlob if it is gone."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise NoSuchBlob(key) from None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.fsyncs_file += 1

    def sync_dir(self) -> None:
        """fsync the directory: makes earlier renames and unlinks durable."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.fsyncs_dir += 1

    def iter_keys(self) -> Iterator[str]:
        with os.scandir(self.root) as it:
            for e in it:
                if not e.name.startswith(TMP_PREFIX) and e.is_file(follow_symlinks=False):
                    yield e.name

    # -- async API -------------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> int:
        return await asyncio.to_thread(self.put_sync, key, data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self.get_sync, key)

    async def delete(self, keys: Iterable[str]) -> None:
        await asyncio.to_thread(self.delete_sync, list(keys))
