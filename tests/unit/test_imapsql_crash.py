"""Crash safety of imapsql delivery: a delivering process killed with SIGKILL loses nothing it acknowledged.

The child delivers in a loop from several concurrent senders (so group commit
is in play) and prints `MSGID SHA256` after each commit() returns. The parent
kills it at an arbitrary moment and checks the files it left: every
acknowledged message is in the index and intact, and no index row points at a
missing or truncated blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from pymaddy.storage.imapsql import IMAPSQL
from tests.runtime_helpers import Runtime

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, hashlib, random, sys
from pathlib import Path
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.storage import imapsql
from pymaddy.storage.imapsql import IMAPSQL, AccountExists
imapsql.INLINE_MAX = imapsql.INLINE_MAX_DEFAULT  # both kinds of bodies
from tests.runtime_helpers import Runtime

tmp, tag = Path(sys.argv[1]), sys.argv[2]
TEXT = f"state_dir {tmp}\nstorage.imapsql local_mailboxes {{\n driver sqlite3\n dsn imapsql.db\n}}\n"

async def main():
    async with Runtime(TEXT, tmp, ["local_mailboxes"]) as rt:
        st = rt.block("local_mailboxes", IMAPSQL)
        for a in ("alice@example.org", "carol@example.org"):
            try:
                await st.create_account(a)
            except AccountExists:
                pass
        print("ready", flush=True)

        async def sender(w):
            rnd = random.Random(w)
            i = 0
            while True:
                mid = f"{tag}-{w}-{i}"
                # Sizes on both sides of INLINE_MAX: bodies in the index and in blob files.
                body = (mid.encode() + b"\r\n") * rnd.randint(1, 24000)
                d = await st.start_delivery(MsgMeta(quarantine=(i % 5 == 0)), "bob@example.com")
                await d.add_rcpt("alice@example.org")
                if i % 2:
                    await d.add_rcpt("carol@example.org")
                await d.body(Header.parse(b"Message-Id: <" + mid.encode() + b">\r\n"), Body(body))
                await d.commit()
                sys.stdout.write(f"{mid} {hashlib.sha256(body).hexdigest()}\n")
                sys.stdout.flush()
                i += 1

        await asyncio.gather(*(sender(w) for w in range(8)))

asyncio.run(main())
"""


def _run_and_kill(tmp: Path, tag: str, acks_before_kill: int) -> dict[str, str]:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, str(script), str(tmp), tag], stdout=subprocess.PIPE, cwd=ROOT, env=env)
    acked: dict[str, str] = {}
    assert p.stdout is not None
    try:
        assert p.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 60
        while len(acked) < acks_before_kill and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            mid, sha = line.decode().split()
            acked[mid] = sha
        # Kill at an arbitrary point of the next commits.
        time.sleep(random.uniform(0, 0.05))
        p.send_signal(signal.SIGKILL)
        rest = p.stdout.read()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    for text in rest.decode().splitlines(keepends=True):
        if text.endswith("\n"):  # a line cut by the kill was never acknowledged
            mid, sha = text.split()
            acked[mid] = sha
    assert len(acked) >= acks_before_kill, "the child did not deliver"
    return acked


def _check_files(tmp: Path, acked: dict[str, str]) -> None:
    conn = sqlite3.connect(tmp / "imapsql.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = conn.execute(
            "SELECT m.blob_key, m.prefix, b.size, a.name, b.data FROM messages m JOIN blobs b ON b.key = m.blob_key "
            "JOIN mailboxes x ON x.id = m.mailbox_id JOIN accounts a ON a.id = x.account_id"
        ).fetchall()
        # Every row's blob exists (the join above also proves a blobs row exists) and is complete.
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == len(rows)
        for key, _prefix, size, _acct, data in rows:
            if data is None:
                assert os.path.getsize(tmp / "messages" / key) == size
            else:
                assert len(data) == size
        # Reference counts match the rows.
        bad = conn.execute(
            "SELECT b.key FROM blobs b WHERE b.refs != (SELECT count(*) FROM messages m WHERE m.blob_key = b.key)"
        ).fetchall()
        assert bad == []
    finally:
        conn.close()
    found: dict[str, str] = {}
    for key, prefix, _size, acct, inline in rows:
        data = bytes(prefix) + (bytes(inline) if inline is not None else (tmp / "messages" / key).read_bytes())
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"Delivered-To: " + acct.encode() + b"\r\nReturn-Path: <bob@example.com>\r\n")
        mid = head.split(b"Message-Id: <")[1].split(b">")[0].decode()
        found[mid] = hashlib.sha256(body).hexdigest()
    missing = [m for m in acked if m not in found]
    assert not missing, f"{len(missing)} acknowledged deliveries lost, e.g. {missing[:3]}"
    assert all(found[m] == sha for m, sha in acked.items())


def test_sigkill_loses_no_acknowledged_delivery(tmp_path: Path) -> None:
    total: dict[str, str] = {}
    for rnd, kill_after in enumerate((60, 150)):
        total.update(_run_and_kill(tmp_path, f"r{rnd}", kill_after))
        _check_files(tmp_path, total)
    conn = sqlite3.connect(tmp_path / "imapsql.db")
    try:
        kinds = dict(conn.execute("SELECT data IS NULL, count(*) FROM blobs GROUP BY data IS NULL").fetchall())
    finally:
        conn.close()
    assert kinds.get(0) and kinds.get(1), f"both inline and file bodies expected: {kinds}"

    # The store opens cleanly afterwards and serves every acknowledged message.
    async def reopen() -> None:
        async with Runtime(
            f"state_dir {tmp_path}\nstorage.imapsql local_mailboxes {{\n driver sqlite3\n dsn imapsql.db\n}}\n",
            tmp_path,
            ["local_mailboxes"],
        ) as rt:
            st = rt.block("local_mailboxes", IMAPSQL)
            n = len(await st.list_messages("alice@example.org")) + len(await st.list_messages("alice@example.org",
                                                                                               "Junk"))
            assert n >= len(total)

    asyncio.run(reopen())
