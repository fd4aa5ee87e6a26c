"""The update pipe between processes sharing an imapsql database (pymaddy/storage/updatepipe.py)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from pymaddy.storage.imapsql import Update
from pymaddy.storage.updatepipe import Listener, push


def test_notices_reach_the_listener_and_garbage_is_ignored(tmp_path: Path) -> None:
    path = str(tmp_path / "sql-x.sock")
    got: list[dict[str, Any]] = []

    async def main() -> None:
        lst = Listener(path, got.append)
        await lst.start()
        try:
            ok = await asyncio.to_thread(push, path, [Update("changed", "a@example.org", "INBOX", 3),
                                                      Update("account_removed", "b@example.org")])
            assert ok
            with socket.socket(socket.AF_UNIX) as s:  # a confused peer: nothing of it is taken
                s.connect(path)
                s.sendall(b"not json\n{\"kind\": 1}\n[]\n" + b"x" * 10000 + b"\n")
            for _ in range(200):
                if len(got) >= 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        finally:
            await lst.stop()

    asyncio.run(main())
    assert got == [{"kind": "changed", "account": "a@example.org", "mailbox": "INBOX", "uid": 3},
                   {"kind": "account_removed", "account": "b@example.org", "mailbox": "", "uid": 0}]
    assert not Path(path).exists()  # the listener removes its own socket


def test_push_without_a_listener_is_not_an_error(tmp_path: Path) -> None:
    assert push(str(tmp_path / "nobody.sock"), [Update("changed", "a", "INBOX")]) is False
    assert push(str(tmp_path / "nobody.sock"), []) is True


def test_a_new_listener_takes_over_and_the_old_one_leaves_its_path_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "sql-y.sock")
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []

    async def main() -> None:
        old = Listener(path, first.append)
        await old.start()
        new = Listener(path, second.append)  # a reload starts the new generation before stopping the old
        await new.start()
        await old.stop()
        assert Path(path).exists()
        await asyncio.to_thread(push, path, [Update("changed", "a", "INBOX")])
        for _ in range(200):
            if second:
                break
            await asyncio.sleep(0.01)
        await new.stop()

    asyncio.run(main())
    assert first == [] and len(second) == 1
