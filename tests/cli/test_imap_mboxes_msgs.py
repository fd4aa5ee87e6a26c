"""`pymaddy imap-mboxes` and `pymaddy imap-msgs` as a user runs them: real processes, exit codes and
output (maddy's wording and Go's rendering of flags, attributes and dates)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_imap_acct import write_conf

WARN = "WARNING: --uid=true will be the default in 0.7\n"
USER = "alice@example.org"

MSG1 = (b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.com>\r\n"
        b"To: bob@example.org, Carol <carol@example.net>\r\n"
        b"Subject: =?utf-8?q?H=C3=A9llo?= there\r\n"
        b"Date: Mon, 02 Jan 2006 15:04:05 -0700\r\n"
        b"Message-Id: <1@example.com>\r\n"
        b"In-Reply-To: <0@example.com>\r\n"
        b"\r\n"
        b"Body line\r\n\xff binary tail\r\n")
MSG2 = b"Subject: second\r\nDate: Tue, 03 Jan 2006 10:00:00 +0000\r\n\r\nno from\r\n"
MSG3 = b"From: x@example.com\r\nSubject: third\r\n\r\nthree\r\n"


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    c = write_conf(tmp_path)
    assert run_text(c, "imap-acct", "create", USER)[0] == 0
    return c


def run_bytes(conf: Path, *args: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
    r = subprocess.run(
        [sys.executable, "-m", "pymaddy", "-config", str(conf), *args],
        check=False,
        capture_output=True,
        input=stdin,
        env=dict(os.environ, TZ="UTC", PYTHONIOENCODING="utf-8"),
        timeout=60,
    )
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def run_text(conf: Path, *args: str, stdin: str | bytes = b"") -> tuple[int, str, str]:
    code, out, err = run_bytes(conf, *args, stdin=stdin.encode() if isinstance(stdin, str) else stdin)
    return code, out.decode("utf-8"), err


def mboxes(conf: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    return run_text(conf, "imap-mboxes", *args, stdin=stdin)


def msgs(conf: Path, *args: str, stdin: str | bytes = b"") -> tuple[int, str, str]:
    return run_text(conf, "imap-msgs", *args, stdin=stdin)


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent commands (reads, failures) at the same time: each process start is costly."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda f: f(), calls))


def flag_lines(conf: Path, mbox: str) -> list[str]:
    code, out, _ = msgs(conf, "list", USER, mbox)
    assert code == 0
    return [line.strip() for line in out.splitlines() if line.startswith("  ")]


DEFAULT_LIST = ("INBOX\t[\\HasNoChildren]\n"
                "Sent\t[\\Sent \\HasNoChildren]\n"
                "Trash\t[\\Trash \\HasNoChildren]\n"
                "Junk\t[\\Junk \\HasNoChildren]\n"
                "Drafts\t[\\Drafts \\HasNoChildren]\n"
                "Archive\t[\\Archive \\HasNoChildren]\n")


def test_mboxes(conf: Path) -> None:
    assert together(
        lambda: mboxes(conf, "list", USER),
        lambda: mboxes(conf, "list"),
        lambda: mboxes(conf, "list", "nobody@example.org"),
        lambda: mboxes(conf, "create", USER),
        lambda: mboxes(conf, "create", "--special", "flagged", USER, "F"),
        lambda: mboxes(conf, "create", USER, "Sent"),
        lambda: mboxes(conf, "rename", USER, "Sent"),
        lambda: mboxes(conf, "rename", USER, "Nope", "Other"),
    ) == [
        (0, DEFAULT_LIST, ""),
        (2, "", "Error: USERNAME is required\n"),
        (1, "", "Error: imap: user doesn't exists\n"),
        (2, "", "Error: NAME is required\n"),
        (1, "", "Error: imap: special attribute is not supported\n"),
        (1, "", "Error: Mailbox already exists\n"),
        (2, "", "Error: NEWNAME is required\n"),
        (1, "", "Error: No such mailbox\n"),
    ]

    assert mboxes(conf, "create", "--special", "sent", USER, "Work.Outbox") == (0, "", "")
    assert mboxes(conf, "create", "-special", "Junk", USER, "Spam") == (0, "", "")
    assert mboxes(conf, "list", USER) == (0, DEFAULT_LIST + "Work\t[\\HasChildren]\n"
                                          "Work.Outbox\t[\\Sent \\HasNoChildren]\n"
                                          "Spam\t[\\Junk \\HasNoChildren]\n", "")
    assert mboxes(conf, "rename", USER, "Work", "Projects") == (0, "", "")

    # remove: message count, confirmation, -y
    assert msgs(conf, "add", USER, "Spam", stdin=MSG3) == (0, "1\n", "")
    assert mboxes(conf, "remove", USER, "Spam", stdin="n\n") == (
        1, "", "Mailbox Spam contains 1 messages.\nAre you sure you want to delete that mailbox? [y/N]: "
               "Error: Cancelled\n")
    assert mboxes(conf, "remove", USER, "Spam", stdin="y\n") == (
        0, "", "Mailbox Spam contains 1 messages.\nAre you sure you want to delete that mailbox? [y/N]: ")
    assert mboxes(conf, "remove", "-y", USER, "Projects.Outbox") == (0, "", "")
    db = sqlite3.connect(conf.parent / "state" / "imapsql.db")
    try:
        with db:
            db.execute("UPDATE mailboxes SET subscribed = 0 WHERE name != 'Sent'")
    finally:
        db.close()
    assert together(
        lambda: mboxes(conf, "remove", "--yes", USER, "Spam"),
        lambda: mboxes(conf, "remove", "-y", USER, "inbox"),
        lambda: mboxes(conf, "list", USER),
        lambda: mboxes(conf, "list", "-s", USER),
        lambda: mboxes(conf, "list", "--subscribed", "bob@example.org"),
    ) == [
        (1, "", "Error: No such mailbox\n"),
        (1, "", "Error: DeleteMailbox: can't delete INBOX\n"),
        (0, DEFAULT_LIST + "Projects\t[\\HasNoChildren]\n", ""),
        (0, "Sent\t[\\Sent \\HasNoChildren]\n", ""),
        (1, "", "Error: imap: user doesn't exists\n"),
    ]
    db = sqlite3.connect(conf.parent / "state" / "imapsql.db")
    try:
        with db:
            db.execute("UPDATE mailboxes SET subscribed = 0")
    finally:
        db.close()
    assert mboxes(conf, "list", "--subscribed", USER) == (0, "", "No mailboxes.\n")


def test_add_list_dump(conf: Path) -> None:
    assert together(
        lambda: msgs(conf, "add", USER, "INBOX"),
        lambda: msgs(conf, "add", USER),
        lambda: msgs(conf, "add", "nobody@example.org", "INBOX", stdin=MSG1),
        lambda: msgs(conf, "add", USER, "Nope", stdin=MSG1),
        lambda: msgs(conf, "add", "--date", "yesterday", USER, "INBOX", stdin=MSG2)[0],
    ) == [
        (2, "", "Error: Empty message, refusing to continue\n"),
        (2, "", "Error: MAILBOX is required\n"),
        (1, "", "Error: imap: user doesn't exists\n"),
        (1, "", "Error: No such mailbox\n"),
        2,
    ]
    assert msgs(conf, "add", "--flag", "\\Seen", "-f", "$Label1", "--date", "2020-01-02T03:04:05+01:00",
                USER, "INBOX", stdin=MSG1) == (0, "1\n", "")
    assert msgs(conf, "add", "-date", "2021-05-06T07:08:09Z", USER, "inbox", stdin=MSG2) == (0, "2\n", "")

    bad = WARN + "Error: No messages matched\n"
    assert together(
        # dump is byte-exact, one message or all of them
        lambda: run_bytes(conf, "imap-msgs", "dump", "-u", USER, "INBOX", "1"),
        lambda: run_bytes(conf, "imap-msgs", "dump", USER, "INBOX", "2"),
        lambda: run_bytes(conf, "imap-msgs", "dump", USER, "INBOX"),
        lambda: msgs(conf, "list", USER, "INBOX"),
        lambda: msgs(conf, "list", "-f", "-u", USER, "INBOX", "1"),
        lambda: msgs(conf, "list", "--full", USER, "INBOX", "*"),
        # sets that match nothing, bad sets, unknown mailbox
        lambda: msgs(conf, "list", USER, "INBOX", "3:5"),
        lambda: msgs(conf, "list", "-u", USER, "INBOX", "7:9"),
        lambda: msgs(conf, "list", "-u", USER, "Sent"),
        lambda: msgs(conf, "dump", USER, "Sent", "1"),
        lambda: msgs(conf, "list", "-u", USER, "INBOX", "1:x"),
        lambda: msgs(conf, "dump", "-u", USER, "INBOX", "0"),
        lambda: msgs(conf, "list", USER, "Nope"),
    ) == [
        (0, MSG1, ""),
        (0, MSG2, WARN),
        (0, MSG1 + MSG2, ""),
        (0, "UID 1: Jörg <jorg@example.com> - Héllo there\n"
            "  [$Label1 \\Seen], 2006-01-02 15:04:05 -0700 -0700\n\n"
            "UID 2:  - second\n"
            "  [], 2006-01-03 10:00:00 +0000 UTC\n\n", ""),
        (0, "- Server meta-data:\n"
            "UID: 1\n"
            "Sequence number: 1\n"
            "Flags: [$Label1 \\Seen]\n"
            f"Body size: {len(MSG1)}\n"
            "Internal date: 1577930645 2020-01-02 02:04:05 +0000 UTC\n"
            "- Envelope:\n"
            "From: Jörg <jorg@example.com>\n"
            "To:  <bob@example.org>, Carol <carol@example.net>\n"
            "In-Reply-To: <0@example.com>\n"
            "Message-Id: <1@example.com>\n"
            "Date: 1136239445 2006-01-02 15:04:05 -0700 -0700\n"
            "Subject: Héllo there\n\n", ""),
        (0, "- Server meta-data:\n"
            "UID: 2\n"
            "Sequence number: 2\n"
            "Flags: []\n"
            f"Body size: {len(MSG2)}\n"
            "Internal date: 1620284889 2021-05-06 07:08:09 +0000 UTC\n"
            "- Envelope:\n"
            "Date: 1136282400 2006-01-03 10:00:00 +0000 UTC\n"
            "Subject: second\n\n", WARN),
        (1, "", bad),
        (0, "", ""),
        (0, "", ""),
        (1, "", bad),
        (1, "", 'Error: imap: bad sequence set value "1:x"\n'),
        (1, "", 'Error: imap: bad sequence set value "0"\n'),
        (1, "", "Error: No such mailbox\n"),
    ]


def test_flags_copy_move_remove(conf: Path) -> None:
    for i, m in enumerate((MSG1, MSG2, MSG3), 1):
        assert msgs(conf, "add", USER, "INBOX", stdin=m) == (0, f"{i}\n", "")

    assert msgs(conf, "add-flags", USER, "INBOX", "1:2", "\\Flagged", "\\Seen") == (0, "", WARN)
    assert msgs(conf, "rem-flags", "-u", USER, "INBOX", "2,3", "\\Seen") == (0, "", "")
    assert msgs(conf, "set-flags", "--uid", USER, "INBOX", "3:*", "custom") == (0, "", "")
    bad = WARN + "Error: No messages matched\n"
    assert together(
        lambda: flag_lines(conf, "INBOX"),
        lambda: msgs(conf, "add-flags", USER, "INBOX", "1"),
        lambda: msgs(conf, "add-flags", "-u", USER, "INBOX"),
        lambda: msgs(conf, "set-flags", USER, "INBOX", "9", "x"),
        lambda: msgs(conf, "copy", USER, "INBOX", "1,3"),
        lambda: msgs(conf, "copy", "-u", USER, "INBOX", "1", "Nope"),
        lambda: msgs(conf, "move", "-u", USER, "Drafts", "1:*", "Trash"),
        lambda: msgs(conf, "remove", USER, "INBOX", "1", stdin="n\n"),
    ) == [
        ["[\\Flagged \\Seen], 2006-01-02 15:04:05 -0700 -0700",
         "[\\Flagged], 2006-01-03 10:00:00 +0000 UTC",
         "[custom], 0001-01-01 00:00:00 +0000 UTC"],
        (2, "", WARN + "Error: at least once FLAG is required\n"),
        (2, "", "Error: SEQ is required\n"),
        (1, "", bad),
        (2, "", "Error: TGTMAILBOX is required\n"),
        (1, "", "Error: No such mailbox\n"),
        (1, "", "Error: No messages matched\n"),
        (1, "", WARN + "Are you sure you want to delete these messages? [y/N]: Error: Cancelled\n"),
    ]

    # copy by sequence number, move by UID
    assert msgs(conf, "copy", USER, "INBOX", "1,3", "Sent") == (0, "", WARN)
    assert msgs(conf, "move", "-u", USER, "INBOX", "2", "Trash") == (0, "", "")
    (code, out, _), trash, inbox = together(
        lambda: msgs(conf, "list", USER, "Sent"),
        lambda: flag_lines(conf, "Trash"),
        lambda: run_bytes(conf, "imap-msgs", "dump", USER, "INBOX"),
    )
    assert (code, out.count("UID ")) == (0, 2) and "UID 1: Jörg" in out and "UID 2:  <x@example.com> - third" in out
    assert trash == ["[\\Flagged], 2006-01-03 10:00:00 +0000 UTC"]
    assert inbox == (0, MSG1 + MSG3, "")

    # remove: gone whatever the flags
    assert msgs(conf, "remove", "-y", "-u", USER, "INBOX", "3") == (0, "", "")
    assert msgs(conf, "remove", "-u", USER, "Sent", "1:*", stdin="y\n") == (
        0, "", "Are you sure you want to delete these messages? [y/N]: ")
    assert together(
        lambda: run_bytes(conf, "imap-msgs", "dump", USER, "INBOX"),
        lambda: msgs(conf, "list", USER, "Sent"),
        lambda: msgs(conf, "remove", "-y", USER, "Sent", "1"),
    ) == [(0, MSG1, ""), (0, "", ""), (1, "", bad)]


def test_no_subcommand_prints_help(conf: Path) -> None:
    (c1, o1, e1), (c2, o2, e2) = together(lambda: mboxes(conf), lambda: msgs(conf))
    assert (c1, o1, c2, o2) == (2, "", 2, "") and "rename" in e1 and "set-flags" in e2
