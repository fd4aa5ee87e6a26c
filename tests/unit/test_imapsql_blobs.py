"""storage.blob.fs: a flat directory of crash-safe blobs, relative to state_dir."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pymaddy.storage.blob_fs import TMP_PREFIX, FSBlobStore, NoSuchBlob
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
