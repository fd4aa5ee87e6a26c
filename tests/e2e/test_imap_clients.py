"""Real IMAP clients against the running server: imaplib, imapclient, mbsync (isync) and mutt.

Mail arrives the way it does in production (SMTP on the MX port, into
storage.imapsql); the clients connect over implicit TLS (993-style) or STARTTLS
and trust the server's self-signed certificate by pinning it, as a user would.
"""

from __future__ import annotations

import email
import imaplib
import os
import smtplib
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.e2e.harness import Server, wait_until
from tests.e2e.imap_helpers import message
from tests.e2e.scenario_helpers import MailEnv, make_env

pytestmark = pytest.mark.timeout(120)

USER = "user@example.org"
PASSWORD = "user-secret-1"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MailEnv, Server, Path]]:
    tmp = tmp_path_factory.mktemp("imapclients")
    e = make_env(tmp)
    srv = e.server().started()
    try:
        pem = ssl.get_server_certificate(("127.0.0.1", e.ports["imaps"]))
        cert = tmp / "server.pem"
        cert.write_text(pem)
        yield e, srv, cert
    finally:
        srv.close()


def unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def deliver(e: MailEnv, rcpt: str, subject: str, body: str = "Hello, world!\r\n") -> None:
    with smtplib.SMTP("127.0.0.1", e.ports["mx"], timeout=10) as s:
        s.sendmail("sender@example.net", [rcpt], message(subject, body=body, to=rcpt))


def imaps(e: MailEnv, user: str = USER, password: str = PASSWORD) -> imaplib.IMAP4_SSL:
    c = imaplib.IMAP4_SSL("127.0.0.1", e.ports["imaps"], ssl_context=unverified(), timeout=10)
    c.login(user, password)
    return c


def empty_mailbox(c: imaplib.IMAP4, name: str = "INBOX") -> None:
    c.select(name)
    c.store("1:*", "+FLAGS.SILENT", r"(\Deleted)")
    c.expunge()


def test_imaplib_over_starttls_and_implicit_tls(env: tuple[MailEnv, Server, Path]) -> None:
    e, _, _ = env
    deliver(e, USER, "via smtp")
    # STARTTLS on the plain port, as `imaplib.IMAP4.starttls` does it.
    c = imaplib.IMAP4("127.0.0.1", e.ports["imap"], timeout=10)
    c.starttls(ssl_context=unverified())
    assert c.login(USER, PASSWORD)[0] == "OK"
    typ, data = c.select("INBOX")
    assert typ == "OK" and int(data[0] or b"0") >= 1
    typ, data = c.search(None, "SUBJECT", '"via smtp"')
    assert typ == "OK" and data[0]
    num = cast(Any, data)[0].split()[0].decode()
    typ, fetched = c.fetch(num, "(RFC822)")
    msg = email.message_from_bytes(cast(Any, fetched[0])[1])
    assert msg["Subject"] == "via smtp" and msg["Delivered-To"] == USER
    assert msg.get_payload() == "Hello, world!\r\n"
    typ, flags = c.fetch(num, "(FLAGS)")
    assert b"\\Seen" in flags[0]  # type: ignore[operator]
    c.logout()

    c2 = imaps(e)
    assert c2.create("Imaplib")[0] == "OK"
    appended = cast(Any, c2.append("Imaplib", r"(\Flagged)", None, message("appended")))
    assert appended[0] == "OK" and b"APPENDUID" in appended[1][0]
    c2.select("Imaplib")
    assert c2.copy("1", "INBOX")[0] == "OK"
    assert c2.uid("MOVE", "1", "Trash")[0] == "OK"
    assert c2.status("Imaplib", "(MESSAGES)")[1] == [b"Imaplib (MESSAGES 0)"]
    _, names = c2.list()
    listed = b"\n".join(n for n in names if isinstance(n, bytes))
    assert b'(\\HasNoChildren \\Trash) "." Trash' in listed and b"Imaplib" in listed
    c2.logout()


def test_imapclient_parses_envelope_bodystructure_and_idles(env: tuple[MailEnv, Server, Path]) -> None:
    import imapclient
    e, _, _ = env
    mixed = (
        b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.net>\r\nTo: a@example.org, Team: b@example.org;\r\n"
        b"Subject: =?utf-8?b?w5xiZXJzaWNodA==?=\r\nDate: Tue, 24 Nov 2026 08:00:00 +0100\r\n"
        b"Message-ID: <mixed@example.net>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe\r\nline two\r\n"
        b"--b1\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; "
        b"filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
    )
    with imapclient.IMAPClient("127.0.0.1", port=e.ports["imaps"], ssl=True, ssl_context=unverified(),
                               timeout=10) as c:
        c.login(USER, PASSWORD)
        c.create_folder("Client")
        c.append("Client", mixed, flags=[b"$Label1"])
        c.select_folder("Client")
        uids = c.search(["FROM", "joerg"])
        assert len(uids) == 1
        data = c.fetch(uids, ["ENVELOPE", "BODYSTRUCTURE", "FLAGS", "BODY.PEEK[1]"])[uids[0]]
        env_ = data[b"ENVELOPE"]
        assert env_.subject == b"=?utf-8?b?w5xiZXJzaWNodA==?="
        assert env_.from_[0].mailbox == b"joerg" and env_.from_[0].host == b"example.net"
        assert env_.message_id == b"<mixed@example.net>"
        bs = data[b"BODYSTRUCTURE"]
        assert bs.is_multipart and bs[1].lower() == b"mixed"
        text_part, pdf_part = bs[0]
        assert (text_part[0].lower(), text_part[1].lower(), text_part[5].lower()) == (b"text", b"plain", b"8bit")
        assert text_part[6] == 17 and text_part[7] == 2  # octets and lines of the part
        assert (pdf_part[0].lower(), pdf_part[1].lower()) == (b"application", b"pdf")
        assert pdf_part[8][0].lower() == b"attachment" and pdf_part[8][1][1] == b"r.pdf"
        assert data[b"BODY[1]"] == b"Gr\xc3\xbc\xc3\x9fe\r\nline two"
        assert data[b"FLAGS"] == (b"$Label1",)
        assert c.search(["SUBJECT", "Übersicht"], charset="UTF-8") == uids
        assert c.search(["TEXT", "grüße"], charset="UTF-8") == uids

        # IDLE: another client's APPEND and flag change arrive as untagged responses.
        c.idle()
        try:
            other = imaps(e)
            other.select("Client")
            other.store("1", "+FLAGS", r"(\Flagged)")
            other.append("Client", None, None, message("second"))
            got: list[tuple[object, ...]] = []
            for _ in range(20):
                got += c.idle_check(timeout=1)
                if any(b"EXISTS" in r for r in got) and any(b"FETCH" in r for r in got):
                    break
            other.logout()
        finally:
            c.idle_done()
        assert (2, b"EXISTS") in got
        fetches = [cast(Any, r) for r in got if len(r) > 2 and r[1] == b"FETCH"]
        assert any(b"\\Flagged" in r[2][r[2].index(b"FLAGS") + 1] for r in fetches)
        c.move([uids[0]], "INBOX")
        assert c.folder_status("Client", ["MESSAGES"])[b"MESSAGES"] == 1


def test_mbsync_syncs_both_ways(env: tuple[MailEnv, Server, Path], tmp_path: Path) -> None:
    e, _, cert = env
    user, pw = "other@example.org", "other-secret-2"
    for i in range(3):
        deliver(e, user, f"sync {i}")
    maildir = tmp_path / "Mail"
    maildir.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount pym
Host 127.0.0.1
Port {e.ports['imaps']}
User {user}
Pass {pw}
SSLType IMAPS
CertificateFile {cert}

IMAPStore remote
Account pym

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel pym
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
""")

    def sync() -> None:
        r = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True, timeout=60,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr

    sync()
    inbox = sorted((maildir / "INBOX" / "new").iterdir()) + sorted((maildir / "INBOX" / "cur").iterdir())
    assert len(inbox) == 3
    assert (maildir / "Sent").is_dir() and (maildir / "Trash").is_dir()  # the account's special folders
    # Locally: mark one read, delete another, file a new message into a new folder.
    first, second = inbox[0], inbox[1]
    cur = maildir / "INBOX" / "cur"
    first.rename(cur / (first.name.split(":")[0] + ":2,S"))
    second.rename(cur / (second.name.split(":")[0] + ":2,T"))
    (maildir / "Local" / "cur").mkdir(parents=True)
    (maildir / "Local" / "new").mkdir()
    (maildir / "Local" / "tmp").mkdir()
    (maildir / "Local" / "new" / "1700000000.1.host").write_bytes(message("made locally"))
    sync()
    c = imaps(e, user, pw)
    c.select("INBOX", readonly=True)
    _, data = c.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    rows = [d for d in data if isinstance(d, tuple)]
    assert len(rows) == 2
    assert sum(b"\\Seen" in r[0] for r in rows) == 1
    c.select("Local", readonly=True)
    _typ, data = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"made locally" in data[0][1]  # type: ignore[index,operator]
    c.logout()
    # And back: the server side changes, mbsync brings it down.
    deliver(e, user, "fresh")
    sync()
    subjects = [email.message_from_bytes(p.read_bytes())["Subject"]
                for d in ("new", "cur") for p in (maildir / "INBOX" / d).iterdir()]
    assert "fresh" in subjects and len(subjects) == 3


def test_mutt_reads_and_moves_a_message(env: tuple[MailEnv, Server, Path], tmp_path: Path) -> None:
    e, _, cert = env
    user, pw = "postmaster@example.org", "pm-secret"
    r = e.cli("creds", "create", "-p", pw, user)
    assert r.returncode == 0, r.stderr
    deliver(e, user, "for mutt")
    rc = tmp_path / "muttrc"
    rc.write_text(f"""
set folder="imaps://{user.replace('@', '%40')}@127.0.0.1:{e.ports['imaps']}/"
set spoolfile="+INBOX"
set imap_pass="{pw}"
set certificate_file="{tmp_path}/certs"
set ssl_verify_host=no
set ssl_verify_dates=no
set confirmappend=no
set confirmcreate=no
set delete=yes
set mail_check=0
set imap_passive=no
set header_cache=""
set message_cachedir=""
""")
    (tmp_path / "certs").write_text(cert.read_text())
    keys = "<save-message>=Archive<enter><sync-mailbox><exit>"
    cmd = f"mutt -n -F {rc} -e 'push \"{keys}\"'"
    envv = dict(os.environ, TERM="xterm", HOME=str(tmp_path))
    done = threading.Event()
    proc = subprocess.Popen(["script", "-qec", cmd, "/dev/null"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=envv)
    try:
        out, _ = proc.communicate(timeout=45)
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
    c = imaps(e, user, pw)

    def moved() -> bool:
        return c.status("Archive", "(MESSAGES)")[1] == [b"Archive (MESSAGES 1)"]

    wait_until(moved, timeout=10, what="mutt's move")
    assert c.status("INBOX", "(MESSAGES)")[1] == [b"INBOX (MESSAGES 0)"], out[-2000:]
    c.select("Archive")
    _typ, data = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"for mutt" in data[0][1]  # type: ignore[index,operator]
    c.logout()
