"""Shared pieces of the end-to-end scenarios: a maddy-default-style config, accounts, stored mail.

The config is conf.d/dev.conf (maddy's default configuration shrunk to one box)
with free loopback ports, a temporary state directory and `example.org` as the
primary domain. Stored mail is read straight from the imapsql SQLite index and
the fs blob directory, the way docs/storage.md lays them out: a message is
`messages.prefix || STATE/messages/<blob_key>`.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import ROOT, Server, free_port

PASSWORDS = {
    "user@example.org": "user-secret-1",
    "other@example.org": "other-secret-2",
}
ACCOUNTS = ("postmaster@example.org", "user@example.org", "other@example.org")
ALIASES = """\
# table.file: "alias: target, target"
info@example.org: user@example.org
team@example.org: user@example.org, other@example.org
"""

CONFIG = r"""
$(hostname) = mx.example.org
$(primary_domain) = example.org
$(local_domains) = $(primary_domain)

hostname $(hostname)

state_dir {tmp}/state
runtime_dir {tmp}/run

tls self_signed $(hostname) localhost 127.0.0.1

auth.pass_table local_authdb {{
    table sql_table {{
        driver sqlite3
        dsn credentials.db
        table_name passwords
    }}
}}

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

table.chain local_rewrites {{
    optional_step regexp "(.+)\+(.+)@(.+)" "$1@$3"
    optional_step static {{
        entry postmaster postmaster@$(primary_domain)
    }}
    optional_step file {tmp}/aliases
}}

msgpipeline local_routing {{
    destination postmaster $(local_domains) {{
        modify {{
            replace_rcpt &local_rewrites
        }}
        deliver_to &local_mailboxes
    }}
    default_destination {{
        reject 550 5.1.1 "User doesn't exist"
    }}
}}

smtp tcp://127.0.0.1:{mx} {{
    limits {{
        all rate {rate} 1s
        all concurrency 10
    }}
    source $(local_domains) {{
        reject 501 5.1.8 "Use Submission for outgoing SMTP"
    }}
    default_source {{
        destination postmaster $(local_domains) {{
            deliver_to &local_routing
        }}
        default_destination {{
            reject 550 5.1.1 "User doesn't exist"
        }}
    }}
}}

submission tls://127.0.0.1:{subtls} tcp://127.0.0.1:{sub} {{
    auth &local_authdb
    source $(local_domains) {{
        check {{
            authorize_sender {{
                prepare_email &local_rewrites
                user_to_email identity
            }}
        }}
        destination postmaster $(local_domains) {{
            deliver_to &local_routing
        }}
        default_destination {{
            reject 550 5.7.0 "Outbound delivery is not implemented yet"
        }}
    }}
    default_source {{
        reject 501 5.1.8 "Non-local sender domain"
    }}
}}

lmtp tcp://127.0.0.1:{lmtp} {{
    deliver_to &local_mailboxes
}}

imap tls://127.0.0.1:{imaps} tcp://127.0.0.1:{imap} {{
    auth &local_authdb
    storage &local_mailboxes
}}
"""


@dataclass
class Stored:
    """One stored copy: which account and mailbox, and the full bytes (prefix + blob)."""

    account: str
    mailbox: str
    uid: int
    data: bytes


@dataclass
class MailEnv:
    tmp: Path
    conf: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def cli(self, *args: str, timeout: float = 30, input_: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYMADDY_ALLOW_ROOT="1")
        return subprocess.run(
            [sys.executable, "-m", "pymaddy", "-config", str(self.conf), *args],
            input=input_,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
            cwd=self.tmp,
        )

    def server(self) -> Server:
        return Server(self.conf)

    def stored(self) -> list[Stored]:
        """Every message in every mailbox (read-only; safe while the server runs: WAL)."""
        db = self.state / "imapsql.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                "SELECT a.name, mb.name, m.uid, m.prefix, m.blob_key, b.data FROM messages m "
                "JOIN mailboxes mb ON mb.id = m.mailbox_id JOIN accounts a ON a.id = mb.account_id "
                "JOIN blobs b ON b.key = m.blob_key "
                "ORDER BY a.name, mb.name, m.uid"
            ).fetchall()
        finally:
            conn.close()
        blobs = self.state / "messages"
        return [Stored(a, mb, uid, bytes(prefix) + (bytes(data) if data is not None else (blobs / key).read_bytes()))
                for a, mb, uid, prefix, key, data in rows]

    def inbox(self, account: str) -> list[Stored]:
        return [s for s in self.stored() if s.account == account and s.mailbox == "INBOX"]

    def integrity(self, name: str) -> str:
        conn = sqlite3.connect(str(self.state / name), timeout=5)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()


def make_env(tmp: Path, *, rate: int = 20) -> MailEnv:
    """Write the config and aliases, create the credentials and IMAP accounts with the CLI."""
    ports = {k: free_port() for k in ("mx", "sub", "subtls", "lmtp", "imap", "imaps")}
    (tmp / "aliases").write_text(ALIASES)
    conf = tmp / "maddy.conf"
    conf.write_text(CONFIG.format(tmp=tmp, rate=rate, **ports))
    env = MailEnv(tmp, conf, ports)
    for user, pw in PASSWORDS.items():
        r = env.cli("creds", "create", "-p", pw, user)
        assert r.returncode == 0, f"creds create {user}: {r.stderr}"
    for acct in ACCOUNTS:
        r = env.cli("imap-acct", "create", acct)
        assert r.returncode == 0, f"imap-acct create {acct}: {r.stderr}"
    return env


class RawClient:
    """A minimal line-level SMTP/LMTP client for exact replies (smtplib reads one DATA reply only)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def _line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed; pending: " + repr(self.buf))
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def reply(self) -> str:
        """The last line of the next (possibly multi-line) reply."""
        line = self._line()
        while len(line) >= 4 and line[3] == "-":
            line = self._line()
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()
