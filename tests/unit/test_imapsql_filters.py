"""storage.imapsql delivery: imap_filter (imap.filter.command), compression, the header cache."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from pymaddy.mail.message import Body
from pymaddy.storage.imapsql import IMAPSQL, INLINE_MAX_DEFAULT
from tests.unit.test_imapsql_delivery import deliver, run

FILTER = r"""#!/bin/sh
# args: account, subject; the message on stdin
msg=$(cat)
case "$msg" in
  *"Subject: spam"*) printf 'Junk\n\\Seen\n$Label1\n' ;;
  *"Subject: nowhere"*) printf 'NoSuchFolder\n$Moved\n' ;;
  *"Subject: flags only"*) printf '\n$Important\n' ;;
  *"Subject: broken"*) exit 3 ;;
  *) printf '%s|%s\n' "$1" "$2" > "$(dirname "$0")/args.txt" ;;
esac
"""


def rows(tmp: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(tmp / "imapsql.db")
    try:
        return [(a, b, c) for a, b, c in conn.execute(
            "SELECT mb.name, m.flags, substr(m.header, 1, 40) FROM messages m "
            "JOIN mailboxes mb ON mb.id = m.mailbox_id ORDER BY m.id")]
    finally:
        conn.close()


def test_imap_filter_command_picks_folder_and_flags(tmp_path: Path) -> None:
    script = tmp_path / "filter.sh"
    script.write_text(FILTER)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    extra = f"    imap_filter {{\n        command {script} {{account_name}} {{subject}}\n    }}\n"

    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org", [("\\Junk", "Junk")])
        for subject in ("spam", "nowhere", "flags only", "broken", "plain"):
            await deliver(st, ["alice@example.org"], header=f"Subject: {subject}\r\n".encode())
        # Quarantined mail is not filtered: it goes to Junk as it is.
        await deliver(st, ["alice@example.org"], header=b"Subject: plain\r\n", quarantine=True)

    run(tmp_path, t, extra)
    got = [(mb, fl) for mb, fl, _ in rows(tmp_path)]
    assert got == [("Junk", "$Label1 \\Seen"), ("INBOX", "$Moved"), ("INBOX", "$Important"), ("INBOX", ""),
                   ("INBOX", ""), ("Junk", "")]
    assert (tmp_path / "args.txt").read_text() == "alice@example.org|plain\n"


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_delivery_compresses_inline_and_file_blobs(tmp_path: Path, algo: str) -> None:
    big = b"line of text, not random\r\n" * (INLINE_MAX_DEFAULT // 10)

    async def t(st: IMAPSQL) -> None:
        await st.create_account("alice@example.org")
        await deliver(st, ["alice@example.org"])
        await deliver(st, ["alice@example.org"], body=Body(big))
        small, large = await st.list_messages("alice@example.org")
        assert (await st.read_message(small)).endswith(b"\r\nHello!\r\n")
        data = await st.read_message(large)
        assert data.endswith(b"\r\n\r\n" + big) and len(data) == large.size

    run(tmp_path, t, f"    compression {algo}\n")
    conn = sqlite3.connect(tmp_path / "imapsql.db")
    try:
        blobs = conn.execute("SELECT key, size, compression, data IS NOT NULL FROM blobs ORDER BY size").fetchall()
        headers = [bytes(h) for (h,) in conn.execute("SELECT header FROM messages ORDER BY id")]
    finally:
        conn.close()
    assert [(c, inline) for _, _, c, inline in blobs] == [(algo, 1), (algo, 0)]
    stored = (tmp_path / "messages" / blobs[1][0]).read_bytes()
    assert len(stored) < blobs[1][1] // 10  # compressed on disk
    magic = b"\x04\x22\x4d\x18" if algo == "lz4" else b"\x28\xb5\x2f\xfd"
    assert stored.startswith(magic)
    # Each copy's header is cached at delivery for the IMAP server: Delivered-To, Return-Path, the header.
    assert headers[0] == (b"Delivered-To: alice@example.org\r\nReturn-Path: <bob@example.com>\r\n"
                          b"Subject: hi\r\nFrom: <bob@example.com>\r\n\r\n")
