"""storage.blob.fs: a flat directory of crash-safe blobs, relative to state_dir."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pymaddy.storage.blob_fs import TMP_PREFIX, FSBlobStore, NoSuchBlob
from pymaddy.storage.sqlitedb import SQLiteDB
from tests.runtime_helpers import Runtime


def run(tmp: Path, fn: object, root: str = "blobs") -> None:
    text = f"state_dir {tmp}\nstorage.blob.fs store {{\n root {root}\n}}\n"

    async def main() -> None:
        async with Runtime(text, tmp, ["store"]) as rt:
            await fn(rt.block("store", FSBlobStore))  # type: ignore[operator]

    asyncio.run(main())


def test_put_get_delete(tmp_path: Path) -> None:
    async def t(st: FSBlobStore) -> None:
        assert st.root == str(tmp_path / "a" / "b")
        assert await st.put("k1", b"hello") == 5
        assert await st.get("k1") == b"hello"
        assert (tmp_path / "a" / "b" / "k1").read_bytes() == b"hello"
        assert st.fsyncs_dir == 1
        await st.put("k1", b"again")  # replace is atomic
        assert await st.get("k1") == b"again"
        await st.delete(["k1", "missing"])
        with pytest.raises(NoSuchBlob):
            await st.get("k1")
        with pytest.raises(ValueError):
            await st.put("../escape", b"x")
        with pytest.raises(ValueError):
            await st.put(TMP_PREFIX + "x", b"x")
        assert list(st.iter_keys()) == []

    run(tmp_path, t, root="a/b")


def test_writer_abort_and_stale_temporaries(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    stale = blobs / (TMP_PREFIX + "old")
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = blobs / (TMP_PREFIX + "new")
    fresh.write_bytes(b"x")

    async def t(st: FSBlobStore) -> None:
        assert not stale.exists() and fresh.exists()  # start() removed only the old leftover
        w = st.create()
        w.write(b"part")
        w.abort()
        assert sorted(os.listdir(blobs)) == [fresh.name]
        w = st.create()
        w.write(b"a")
        w.write(b"b")
        w.commit("kk", sync_dir=False)
        assert st.get_sync("kk") == b"ab" and st.size("kk") == 2

    run(tmp_path, t)


def test_writer_file_syncs_fail_only_their_job(tmp_path: Path) -> None:
    """A job's file sync (deferred blob fsync) that fails fails that job alone, before the transaction."""
    class Dir:
        n = 0

        def sync_dir(self) -> None:
            self.n += 1

    def bad() -> None:
        raise OSError("gone")

    d = Dir()
    db = SQLiteDB(str(tmp_path / "x.db"), group_window=0.5)
    db.open()
    try:
        db.expect()
        db.expect()
        f1 = db.submit(lambda c: c.execute("CREATE TABLE t (x)") and 1, sync=(d,), expected=True, files=(bad,))
        f2 = db.submit(lambda c: c.execute("CREATE TABLE u (x)") and 2, sync=(d,), expected=True,
                       files=(lambda: None,))
        assert f2.result(5) == 2
        with pytest.raises(OSError, match="gone"):
            f1.result(5)
        assert db.stats.file_syncs == 1 and d.n == 1
        names = db.read_sync(lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master")})
        assert "u" in names and "t" not in names
    finally:
        db.close()
