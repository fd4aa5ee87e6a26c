"""End-to-end delivery through smtp/lmtp into storage.imapsql, read back from the blob store.

maddy's TestImapsqlDelivery (Received/Return-Path), TestSMTPEndpoint_LargeMessage,
_FileBuffer and _Autobuffer. Accounts are made with `pymaddy imap-acct create`.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, Server, free_port, wait_until

pytestmark = pytest.mark.e2e

CONFIG = """
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname maddy.test
tls off

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

smtp tcp://127.0.0.1:{ram} {{
    buffer ram
    deliver_to &local_mailboxes
}}

smtp tcp://127.0.0.1:{fs} {{
    buffer fs
    deliver_to &local_mailboxes
}}

smtp tcp://127.0.0.1:{auto} {{
    buffer auto 5b
    deliver_to &local_mailboxes
}}

lmtp tcp://127.0.0.1:{lmtp} {{
    deliver_to &local_mailboxes
}}
"""


class Env:
    def __init__(self, tmp: Path, srv: Server, ports: dict[str, int]) -> None:
        self.tmp = tmp
        self.srv = srv
        self.ports = ports

    def blobs(self) -> dict[str, bytes]:
        d = self.tmp / "state" / "messages"
        if not d.is_dir():
            return {}
        out = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}
        db = self.tmp / "state" / "imapsql.db"
        if db.exists():  # bodies up to storage.imapsql.INLINE_MAX are stored in the index
            import sqlite3

            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                out.update({k: bytes(v) for k, v in conn.execute("SELECT key, data FROM blobs WHERE data IS NOT NULL")})
            finally:
                conn.close()
        return out

    def deliver(self, port: int, rcpts: list[str], msg: bytes) -> bytes:
        """Send one message; return the stored copy of it (found by a marker in the body)."""
        before = set(self.blobs())
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("localhost")
            s.sendmail("sender@maddy.test", rcpts, msg)
        new: dict[str, bytes] = {}

        def arrived() -> bool:
            new.update({k: v for k, v in self.blobs().items() if k not in before})
            return bool(new)

        wait_until(arrived, what="the stored message")
        return next(iter(new.values()))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("deliv")
    ports = {k: free_port() for k in ("ram", "fs", "auto", "lmtp")}
    conf = tmp / "maddy.conf"
    conf.write_text(CONFIG.format(tmp=tmp, **ports))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYMADDY_ALLOW_ROOT="1")
    r = subprocess.run(
        [sys.executable, "-m", "pymaddy", "-config", str(conf), "imap-acct", "create", "testusr@maddy.test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"imap-acct create is not available: {r.stderr.strip()[:200]}")
    srv = Server(conf)
    try:
        srv.started(timeout=20)
        yield Env(tmp, srv, ports)
    finally:
        srv.close()


def test_delivery_headers(env: Env) -> None:
    stored = env.deliver(env.ports["ram"], ["testusr@maddy.test"], b"Subject: hello\r\n\r\nmarker-1\r\n")
    text = stored.decode()
    lines = text.split("\r\n")
    assert "Return-Path: <sender@maddy.test>" in lines
    i = next(n for n, ln in enumerate(lines) if ln.startswith("Received: "))
    assert re.fullmatch(r"Received: from localhost \((\S+ )?\[127\.0\.0\.1\]\) by maddy\.test", lines[i]), lines[i]
    assert re.match(r" \(envelope-sender <sender@maddy\.test>\) with ESMTP id [0-9a-f]{8};", lines[i + 1]), lines[i + 1]
    assert all(len(ln) <= 76 for ln in lines[i : i + 3])
    assert text.endswith("Subject: hello\r\n\r\nmarker-1\r\n")


def test_unknown_recipient(env: Env) -> None:
    with smtplib.SMTP("127.0.0.1", env.ports["ram"], timeout=20) as s:
        s.ehlo("localhost")
        s.mail("sender@maddy.test")
        code, msg = s.rcpt("nobody@maddy.test")
        assert code == 501 and re.fullmatch(rb"5\.1\.1 User does not exist \(msg ID = [0-9a-f]{8}\)", msg)


def test_large_message_fs_buffer(env: Env) -> None:
    body = b"".join(b"%04d " % i + b"x" * 494 + b"\r\n" for i in range(3000))  # ~1.44 MiB
    stored = env.deliver(env.ports["fs"], ["testusr@maddy.test"], b"Subject: large\r\n\r\n" + body)
    assert stored.endswith(b"Subject: large\r\n\r\n" + body)
    assert not [p for p in (env.tmp / "state" / "buffer").glob("*")]  # spool files are removed


@pytest.mark.parametrize("body", [b"0123456789abcdef\r\n", b"", b"ab\r\n"], ids=["larger", "empty", "smaller"])
def test_autobuffer(env: Env, body: bytes) -> None:
    msg = b"Subject: auto\r\nX-Len: %d\r\n\r\n" % len(body) + body
    stored = env.deliver(env.ports["auto"], ["testusr@maddy.test"], msg)
    assert stored.endswith(msg)


def test_lmtp_delivery(env: Env) -> None:
    lm = smtplib.LMTP("127.0.0.1", env.ports["lmtp"], timeout=20)
    try:
        lm.ehlo_or_helo_if_needed()
        refused = lm.sendmail("sender@maddy.test", ["testusr@maddy.test"], b"Subject: lmtp\r\n\r\nmarker-lmtp\r\n")
        assert refused == {}
    finally:
        lm.quit()
    wait_until(lambda: any(b"marker-lmtp" in v for v in env.blobs().values()), what="the LMTP message")
    stored = next(v for v in env.blobs().values() if b"marker-lmtp" in v)
    assert b"Received:" not in stored  # the LMTP path adds no Received (spec §B.1)


def test_quota_refuses_mail_for_a_full_mailbox(env: Env) -> None:
    """An account over its quota (imap-acct quota) gets 552 5.2.2: at RCPT when SIZE= says the message
    will not fit, and per recipient over LMTP; the other recipients still get the message."""
    pyenv = dict(os.environ, PYTHONPATH=str(ROOT), PYMADDY_ALLOW_ROOT="1")
    conf = env.tmp / "maddy.conf"
    for args in (["imap-acct", "create", "small@maddy.test"], ["imap-acct", "quota", "small@maddy.test", "-v", "2K"]):
        r = subprocess.run([sys.executable, "-m", "pymaddy", "-config", str(conf), *args],
                           capture_output=True, text=True, env=pyenv, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
    big = b"Subject: big\r\n\r\n" + b"y" * 3000 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", env.ports["ram"], timeout=20) as s:
        s.ehlo("localhost")
        s.mail("sender@maddy.test", [f"SIZE={len(big)}"])
        code, msg = s.rcpt("small@maddy.test")
        assert code == 552 and msg.startswith(b"5.2.2 Mailbox is full"), msg
        assert s.rcpt("testusr@maddy.test")[0] == 250
    lm = smtplib.LMTP("127.0.0.1", env.ports["lmtp"], timeout=20)
    try:
        lm.ehlo("localhost")
        refused = lm.sendmail("sender@maddy.test", ["small@maddy.test", "testusr@maddy.test"], big)
    finally:
        lm.close()
    assert set(refused) == {"small@maddy.test"}
    code, msg = refused["small@maddy.test"]
    assert code == 552 and msg.startswith(b"5.2.2 Mailbox is full")
    # a message that fits is still delivered
    stored = env.deliver(env.ports["ram"], ["small@maddy.test"], b"Subject: small\r\n\r\nfits\r\n")
    assert stored.endswith(b"fits\r\n")
