"""`pymaddy imap-acct` as a user runs it: real processes, exit codes and output (maddy's wording)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


def write_conf(tmp: Path) -> Path:
    conf = tmp / "maddy.conf"
    conf.write_text(
        f"state_dir {tmp}/state\n"
        f"runtime_dir {tmp}/run\n"
        "hostname mx.example.org\n"
        "tls off\n"
        "storage.imapsql local_mailboxes {\n"
        "    driver sqlite3\n"
        "    dsn imapsql.db\n"
        "}\n"
        "auth.pass_table not_storage {\n"
        "    table sql_table {\n"
        "        driver sqlite3\n"
        "        dsn credentials.db\n"
        "        table_name passwords\n"
        "    }\n"
        "}\n"
        "submission tcp://127.0.0.1:0 {\n"
        "    auth &not_storage\n"
        "    deliver_to &local_mailboxes\n"
        "}\n"
    )
    return conf


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    return write_conf(tmp_path)


def acct(conf: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = subprocess.run(
        [sys.executable, "-m", "pymaddy", "-config", str(conf), "imap-acct", *args],
        check=False,
        capture_output=True,
        text=True,
        input=stdin,
        env=dict(os.environ, **(env or {})),
        timeout=60,
    )
    return r.returncode, r.stdout, r.stderr


def mailboxes(conf: Path, user: str) -> list[tuple[str, str | None]]:
    conn = sqlite3.connect(conf.parent / "state" / "imapsql.db")
    try:
        return conn.execute(
            "SELECT m.name, m.special_use FROM mailboxes m JOIN accounts a ON a.id = m.account_id "
            "WHERE a.name = ? ORDER BY m.id",
            (user,),
        ).fetchall()
    finally:
        conn.close()


def test_list_create_remove(conf: Path) -> None:
    assert acct(conf, "list") == (0, "", "No users.\n")
    assert acct(conf, "create", "Alice@Example.org") == (0, "", "")
    assert acct(conf, "create", "--no-specialuse", "bob@example.org") == (0, "", "")
    assert acct(conf, "list") == (0, "alice@example.org\nbob@example.org\n", "")
    assert mailboxes(conf, "alice@example.org") == [
        ("INBOX", None),
        ("Sent", "\\Sent"),
        ("Trash", "\\Trash"),
        ("Junk", "\\Junk"),
        ("Drafts", "\\Drafts"),
        ("Archive", "\\Archive"),
    ]
    assert mailboxes(conf, "bob@example.org") == [("INBOX", None)]

    assert acct(conf, "create", "alice@example.org") == (1, "", "Error: imap: user already exists\n")

    code, out, err = acct(conf, "remove", "alice@example.org", stdin="n\n")
    assert (code, out, err) == (1, "", "Are you sure you want to delete this user account? [y/N]: Error: Cancelled\n")
    assert acct(conf, "remove", "alice@example.org", stdin="y\n")[0] == 0
    assert acct(conf, "remove", "-y", "bob@example.org") == (0, "", "")
    assert acct(conf, "remove", "--yes", "bob@example.org") == (1, "", "Error: imap: user doesn't exists\n")
    assert acct(conf, "list") == (0, "", "No users.\n")


def test_create_folder_names(conf: Path) -> None:
    code, _, err = acct(conf, "create", "--sent-name", "Outbox", "--trash-name", "", "-junk-name", "Spam",
                        "--drafts-name", "INBOX", "c@example.org")
    assert code == 0
    assert err == "Failed to create drafts folder: Mailbox already exists\n"
    assert mailboxes(conf, "c@example.org") == [
        ("INBOX", None),
        ("Outbox", "\\Sent"),
        ("Spam", "\\Junk"),
        ("Archive", "\\Archive"),
    ]


def test_appendlimit(conf: Path) -> None:
    assert acct(conf, "create", "alice@example.org")[0] == 0
    assert acct(conf, "appendlimit", "alice@example.org") == (0, "No limit\n", "")
    assert acct(conf, "appendlimit", "-v", "1024", "alice@example.org") == (0, "", "")
    assert acct(conf, "appendlimit", "alice@example.org") == (0, "1024\n", "")
    assert acct(conf, "appendlimit", "--value", "-1", "alice@example.org") == (0, "", "")
    assert acct(conf, "appendlimit", "alice@example.org") == (0, "No limit\n", "")
    assert acct(conf, "appendlimit", "nobody@example.org") == (1, "", "Error: imap: user doesn't exists\n")


def test_usage_errors(conf: Path) -> None:
    assert acct(conf, "create") == (2, "", "Error: USERNAME is required\n")
    assert acct(conf, "remove", "-y") == (2, "", "Error: USERNAME is required\n")
    assert acct(conf, "appendlimit") == (2, "", "Error: USERNAME is required\n")
    assert acct(conf, "list", "--cfg-block", "nope") == (2, "", "Error: unknown configuration block: nope\n")
    assert acct(conf, "list", "--cfg-block", "not_storage") == (
        2,
        "",
        "Error: configuration block not_storage is not an IMAP storage\n",
    )
    assert acct(conf, "list", env={"MADDY_CFGBLOCK": "nope"}) == (
        2,
        "",
        "Error: unknown configuration block: nope\n",
    )


def test_state_dir_is_created_and_db_is_shared_with_delivery(conf: Path) -> None:
    assert acct(conf, "create", "alice@example.org")[0] == 0
    state = conf.parent / "state"
    assert (state / "imapsql.db").exists() and (state / "messages").is_dir()
    assert (conf.parent / "run").is_dir()


def test_no_subcommand_prints_help(conf: Path) -> None:
    code, out, err = acct(conf)
    assert code == 2 and out == "" and "appendlimit" in err
