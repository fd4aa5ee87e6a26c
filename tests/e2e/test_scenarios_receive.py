"""Receiving mail, end to end: numbered user scenarios against the real server process.

Each scenario starts `pymaddy run` on free 127.0.0.1 ports with a config modelled
on maddy's default one (tests/e2e/scenario_helpers.py: conf.d/dev.conf with
`example.org`, `tls self_signed`), accounts made with `pymaddy creds create` and
`pymaddy imap-acct create`, and looks at the result the way a user would: the
SMTP replies, the exit status of real clients (msmtp, swaks), and the stored
messages read back from the imapsql index and blob directory.

Scenarios 1-4 and 6 share one prepared state directory (a fresh server process
each); scenario 5 has its own.
"""

from __future__ import annotations

import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import wait_until
from tests.e2e.scenario_helpers import PASSWORDS, MailEnv, RawClient, Stored, make_env

pytestmark = pytest.mark.e2e

MSGID = r" \(msg ID = [0-9a-f]{8}\)"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> MailEnv:
    return make_env(tmp_path_factory.mktemp("scenarios"))


@pytest.fixture
def env(prepared: MailEnv) -> Iterator[MailEnv]:
    srv = prepared.server()
    try:
        srv.started(timeout=20)
        yield prepared
    finally:
        srv.close()


def marker() -> str:
    return "marker-" + uuid.uuid4().hex


def with_marker(env: MailEnv, account: str, mark: str, timeout: float = 10.0) -> list[Stored]:
    """The copies in `account`'s INBOX carrying `mark`, once at least one is there."""
    found: list[Stored] = []

    def arrived() -> bool:
        found[:] = [s for s in env.inbox(account) if mark.encode() in s.data]
        return bool(found)

    wait_until(arrived, timeout=timeout, what=f"a message with {mark} in {account}")
    return found


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--helo", "mail.outside.test", "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


# -- 1 ----------------------------------------------------------------------------------------


def test_01_remote_mta_delivers_to_postmaster(env: MailEnv) -> None:
    """A remote MTA (smtplib, no auth) hands a message for postmaster@example.org to the MX port.

    It sees `250 2.0.0 OK: queued`; the postmaster account's INBOX then holds the message
    with Delivered-To, Return-Path and a Received field naming the MX host, above the
    original header and body, byte for byte.

    The bare RFC 5321 §4.1.1.3 form `RCPT TO:<postmaster>` is accepted (go-smtp 0.21.3, so
    maddy 0.9, refuses it with `501 5.5.2`, which the RFC forbids) and reaches
    postmaster@example.org through the `postmaster` static entry of `local_rewrites`.
    """
    mark = marker()
    msg = f"From: alice@outside.test\r\nTo: postmaster@example.org\r\nSubject: hello\r\n\r\n{mark}\r\n".encode()
    with smtplib.SMTP("127.0.0.1", env.ports["mx"], timeout=10) as s:
        s.ehlo("mail.outside.test")
        assert s.mail("alice@outside.test")[0] == 250
        assert s.rcpt("postmaster@example.org")[0] == 250
        assert s.data(msg) == (250, b"2.0.0 OK: queued")
    (got,) = with_marker(env, "postmaster@example.org", mark)
    text = got.data.decode()
    lines = text.split("\r\n")
    assert lines[0] == "Delivered-To: postmaster@example.org"
    assert lines[1] == "Return-Path: <alice@outside.test>"
    assert re.match(r"Received: from mail\.outside\.test \((\S+ )?\[127\.0\.0\.1\]\) by mx\.example\.org", lines[2])
    assert "(envelope-sender <alice@outside.test>) with ESMTP id" in text
    assert got.data.endswith(msg)

    # the bare postmaster
    mark2 = marker()
    with smtplib.SMTP("127.0.0.1", env.ports["mx"], timeout=10) as s:
        s.ehlo("mail.outside.test")
        s.mail("alice@outside.test")
        code, reply = s.rcpt("Postmaster")  # RCPT TO:<Postmaster>, any case
        assert code == 250, reply
        assert s.data(f"Subject: bare\r\n\r\n{mark2}\r\n".encode())[0] == 250
    (got,) = with_marker(env, "postmaster@example.org", mark2)
    assert got.data.startswith(b"Delivered-To: postmaster@example.org\r\n")


# -- 2 ----------------------------------------------------------------------------------------


def _msmtp(env: MailEnv, tmp: Path, port: int, starttls: bool, body_mark: str) -> subprocess.CompletedProcess[bytes]:
    rc = tmp / ("msmtprc-starttls" if starttls else "msmtprc-tls")
    rc.write_text(
        "account default\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        "from user@example.org\n"
        "auth on\n"
        "user user@example.org\n"
        f"password {PASSWORDS['user@example.org']}\n"
        "tls on\n"
        f"tls_starttls {'on' if starttls else 'off'}\n"
        "tls_certcheck off\n"
    )
    rc.chmod(0o600)
    msg = (
        "From: User <user@example.org>\n"
        "To: Other <other@example.org>\n"
        f"Subject: msmtp {'starttls' if starttls else 'implicit tls'}\n"
        "\n"
        f"{body_mark}\n"
    )
    try:
        return subprocess.run(
            ["msmtp", "-C", str(rc), "-t"], input=msg.encode(), capture_output=True, timeout=8, check=False
        )
    except subprocess.TimeoutExpired:
        pass
    # msmtp's own `timeout` does not cover the TLS handshake: a server that never answers the
    # ClientHello leaves it waiting forever.
    pytest.fail(f"msmtp (tls_starttls {'on' if starttls else 'off'}, port {port}) hung for 8 s")


def test_02_user_sends_with_msmtp(env: MailEnv, tmp_path: Path) -> None:
    """A user sends with msmtp through submission, STARTTLS on the plain port and implicit TLS on the
    tls:// port, with AUTH and a typical msmtprc (`tls_certcheck off` for the self-signed cert).

    msmtp exits 0 every time; other@example.org receives each message (Message-ID and Date
    as msmtp set them, no `from` clause in Received). Five messages each way: a server that
    loses the client's TLS ClientHello arriving right after `220 Ready to start TLS` makes
    msmtp hang on some of them (it answers instantly, unlike Python's ssl module).
    """
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp is not installed (apt-get install msmtp)")
    for starttls, port in [(True, env.ports["sub"])] * 5 + [(False, env.ports["subtls"])] * 5:
        mark = marker()
        r = _msmtp(env, tmp_path, port, starttls, mark)
        assert r.returncode == 0, (r.stdout + r.stderr).decode()
        (got,) = with_marker(env, "other@example.org", mark)
        head = got.data.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("Delivered-To: other@example.org\r\nReturn-Path: <user@example.org>\r\n")
        assert re.search(r"^Received: by mx\.example\.org", head, re.M), head
        assert "with ESMTPS id" in head.replace("\r\n ", " ")
        assert re.search(r"^Message-I[Dd]: <", head, re.M) and re.search(r"^Date: ", head, re.M)
        assert got.data.endswith(f"\r\n\r\n{mark}\r\n".encode())


# -- 3 ----------------------------------------------------------------------------------------


def test_03_swaks_to_the_mx(env: MailEnv) -> None:
    """Someone outside tests the MX with swaks.

    * `user+tag@example.org` is accepted and lands in user@example.org (sub-addressing);
    * `team@example.org` (aliases file: user, other) lands once in each of the two accounts;
    * an unknown local user is refused by the storage: `501 5.1.1 User does not exist` (maddy's
      imapsql code; the configured `550 5.1.1 "User doesn't exist"` is for other domains);
    * an open-relay attempt (a foreign sender to `someone@elsewhere.test`) gets the configured
      `550 5.1.1 User doesn't exist`;
    * a foreign client claiming a local sender gets the configured `501 5.1.8 Use Submission for
      outgoing SMTP` (at RCPT: defer_sender_reject).
    """
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    mx = env.ports["mx"]

    mark = marker()
    r = swaks(mx, "--from", "bob@outside.test", "--to", "user+tag@example.org", "--body", mark)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<-  250 2.0.0 OK: queued" in r.stdout
    (got,) = with_marker(env, "user@example.org", mark)
    assert got.data.startswith(b"Delivered-To: user@example.org\r\n")
    assert b"\r\nTo: user+tag@example.org\r\n" in got.data  # the header is not rewritten

    mark = marker()
    r = swaks(mx, "--from", "bob@outside.test", "--to", "team@example.org", "--body", mark)
    assert r.returncode == 0, r.stdout + r.stderr
    (a,) = with_marker(env, "user@example.org", mark)
    (b,) = with_marker(env, "other@example.org", mark)
    assert a.data.startswith(b"Delivered-To: user@example.org\r\n")
    assert b.data.startswith(b"Delivered-To: other@example.org\r\n")
    assert a.data.split(b"\r\n", 1)[1] == b.data.split(b"\r\n", 1)[1]  # one blob, two index rows

    r = swaks(mx, "--from", "bob@outside.test", "--to", "nobody@example.org")
    assert r.returncode != 0
    assert re.search(r"<\*\* 501 5\.1\.1 User does not exist" + MSGID, r.stdout), r.stdout

    r = swaks(mx, "--from", "spammer@outside.test", "--to", "someone@elsewhere.test")
    assert r.returncode != 0
    assert re.search(r"<\*\* 550 5\.1\.1 User doesn't exist" + MSGID, r.stdout), r.stdout

    r = swaks(mx, "--from", "user@example.org", "--to", "other@example.org")
    assert r.returncode != 0
    assert re.search(r"<\*\* 501 5\.1\.8 Use Submission for outgoing SMTP" + MSGID, r.stdout), r.stdout
    assert not env.inbox("someone@elsewhere.test")


# -- 4 ----------------------------------------------------------------------------------------


def _submit(env: MailEnv) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", env.ports["sub"], timeout=10)
    s.ehlo("laptop")
    s.starttls(context=no_verify())
    s.ehlo("laptop")
    s.login("user@example.org", PASSWORDS["user@example.org"])
    return s


def test_04_authorize_sender(env: MailEnv) -> None:
    """user@example.org, logged in on submission, tries different sender addresses.

    * other@example.org (someone else's): `553 5.7.0 Unauthorized use of sender address`
      (at RCPT, as maddy defers sender errors); the same From header with an own envelope
      sender is refused at the end of DATA;
    * user@example.org (own), user+lists@example.org and info@example.org (an alias of user
      in the aliases file, mapped by `prepare_email &local_rewrites`): accepted and delivered.
    """
    s = _submit(env)
    try:
        assert s.mail("other@example.org")[0] == 250
        code, reply = s.rcpt("other@example.org")
        assert code == 553 and re.fullmatch(rb"5\.7\.0 Unauthorized use of sender address" + MSGID.encode(), reply)
        s.rset()
        assert s.mail("user@example.org")[0] == 250
        assert s.rcpt("other@example.org")[0] == 250
        code, reply = s.data(b"From: other@example.org\r\nTo: other@example.org\r\nSubject: forged\r\n\r\nx\r\n")
        assert code == 553 and re.fullmatch(rb"5\.7\.0 Unauthorized use of sender address" + MSGID.encode(), reply)

        for sender in ("user@example.org", "user+lists@example.org", "info@example.org"):
            mark = marker()
            msg = f"From: {sender}\r\nTo: other@example.org\r\nSubject: as {sender}\r\n\r\n{mark}\r\n".encode()
            assert s.sendmail(sender, ["other@example.org"], msg) == {}
            (got,) = with_marker(env, "other@example.org", mark)
            assert f"\r\nReturn-Path: <{sender}>\r\n".encode() in got.data
    finally:
        s.quit()


# -- 5 ----------------------------------------------------------------------------------------


def test_05_crash_during_concurrent_delivery(tmp_path: Path) -> None:
    """Ten remote MTAs deliver concurrently when the server is killed with SIGKILL.

    After a restart on the same state directory the server starts cleanly; every message that
    got `250` is stored exactly once with its original bytes; a message that got no reply
    is stored at most once; both SQLite databases pass `PRAGMA integrity_check`.
    """
    env = make_env(tmp_path, rate=10000)
    rcpt = "user@example.org"
    acked: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + 15

    def client(n: int) -> None:
        i = 0
        try:
            with smtplib.SMTP("127.0.0.1", env.ports["mx"], timeout=10) as s:
                s.ehlo(f"mta{n}.outside.test")
                while not stop.is_set() and time.monotonic() < deadline and i < 40:
                    mid = f"{n}.{i}.{uuid.uuid4().hex}@outside.test"
                    msg = (
                        f"From: mta{n}@outside.test\r\nTo: {rcpt}\r\nMessage-ID: <{mid}>\r\n"
                        f"Subject: load {n}/{i}\r\n\r\nunique body line {mid}\r\n" + "filler line\r\n" * (i % 7)
                    ).encode()
                    with lock:
                        attempted[mid] = msg
                    s.sendmail(f"mta{n}@outside.test", [rcpt], msg)
                    with lock:
                        acked[mid] = msg
                    i += 1
        except (smtplib.SMTPException, OSError) as e:
            if not stop.is_set():
                errors.append(repr(e))

    srv = env.server()
    try:
        srv.started(timeout=20)
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(10)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acked) >= 80, timeout=10, what="80 accepted messages")
        stop.set()
        srv.proc.kill()  # SIGKILL mid-run: the other clients are between commands or inside DATA
        srv.wait_exit(timeout=5)
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
    finally:
        srv.close()
    assert not errors, errors

    srv = env.server()
    try:
        srv.started(timeout=20)
        stored = env.inbox(rcpt)
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(timeout=10) == 0, srv.output
        bad = [ln for ln in srv.lines if "Traceback" in ln or "error" in ln.lower()]
        assert not bad, srv.output
    finally:
        srv.close()

    by_id: dict[str, list[bytes]] = {}
    for s in stored:
        m = re.search(rb"\r\nunique body line (\S+)\r\n", s.data)
        assert m is not None, s.data[:300]
        by_id.setdefault(m.group(1).decode(), []).append(s.data)
    assert set(by_id) <= set(attempted), set(by_id) - set(attempted)
    twice = {k: len(v) for k, v in by_id.items() if len(v) > 1}
    assert not twice, twice
    missing = set(acked) - set(by_id)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"
    for mid, (data,) in by_id.items():
        assert data.startswith(f"Delivered-To: {rcpt}\r\nReturn-Path: <".encode())
        assert data.endswith(attempted[mid]), mid
    print(f"\ncrash: attempted={len(attempted)} acked={len(acked)} stored={len(by_id)}")
    assert env.integrity("imapsql.db") == "ok"
    assert env.integrity("credentials.db") == "ok"


# -- 6 ----------------------------------------------------------------------------------------


def test_06_lmtp_per_recipient_replies(env: MailEnv) -> None:
    """An MDA-style client (as Postfix' lmtp transport) hands one message for three recipients
    to the LMTP endpoint, which delivers straight into storage.

    The unknown one is refused at RCPT (`501 5.1.1 User does not exist`); after DATA there is
    one reply per accepted recipient, in order; each account receives one copy, without
    Received (LMTP path) but with Delivered-To and Return-Path.
    """
    mark = marker()
    with RawClient(env.ports["lmtp"]) as c:
        assert c.reply() == "220 mx.example.org LMTP Service Ready"
        assert c.cmd("LHLO mx.example.org").startswith("250 ")
        assert c.cmd("MAIL FROM:<carol@outside.test>").startswith("250 ")
        assert c.cmd("RCPT TO:<user@example.org>").startswith("250 ")
        assert re.fullmatch("501 5.1.1 User does not exist" + MSGID, c.cmd("RCPT TO:<ghost@example.org>"))
        assert c.cmd("RCPT TO:<Other@Example.org>").startswith("250 ")
        assert c.cmd("DATA").startswith("354 ")
        c.send(f"Subject: lmtp\r\n\r\n{mark}\r\n.\r\n".encode())
        assert c.reply() == "250 2.0.0 <user@example.org> OK: queued"
        assert c.reply() == "250 2.0.0 <Other@Example.org> OK: queued"
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    for acct in ("user@example.org", "other@example.org"):
        (got,) = with_marker(env, acct, mark)
        assert (
            got.data
            == (
                f"Delivered-To: {acct}\r\nReturn-Path: <carol@outside.test>\r\nSubject: lmtp\r\n\r\n{mark}\r\n"
            ).encode()
        )
    assert not [
        s
        for s in env.stored()
        if s.account not in ("user@example.org", "other@example.org") and mark.encode() in s.data
    ]
