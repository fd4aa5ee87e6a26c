"""End to end: a real server with `dmarc yes`, check.spf and check.dkim, every DNS query answered
by the loopback DNS server through `-debug.dnsoverride` (spec §D.4, §I.2, §I.4).

Aligned mail is delivered with `spf=…; dkim=…; dmarc=pass` results; unaligned mail ends as the
From domain's policy says: rejected with `550 5.7.1`, filed into Junk, or delivered.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pymaddy.dkim.core import SignOptions, sign
from pymaddy.dkim.keys import dns_record, generate_key
from pymaddy.mail.message import Header
from tests.dnsserver import DNSServer
from tests.e2e.harness import Server, free_port, wait_until
from tests.e2e.scenario_helpers import MailEnv, Stored

pytestmark = pytest.mark.e2e

KEY = generate_key("ed25519")

CONFIG = """
hostname mx.example.net
state_dir {tmp}/state
runtime_dir {tmp}/run
tls off

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

smtp tcp://127.0.0.1:{port} {{
    dmarc yes
    check {{
        dkim
        spf
    }}
    default_source {{
        default_destination {{
            deliver_to &local_mailboxes
        }}
    }}
}}
"""


@dataclass
class Env:
    mail: MailEnv
    srv: Server
    port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("dmarc")
    dns = DNSServer()
    for d in ("example.org", "example.net", "example.com", "nodmarc.test"):
        dns.add_txt(d, "v=spf1 ip4:127.0.0.1 -all")
        dns.add_txt(f"sel._domainkey.{d}", dns_record(KEY))
    dns.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    dns.add_txt("_dmarc.example.net", "v=DMARC1; p=quarantine")
    dns.add_txt("_dmarc.example.com", "v=DMARC1; p=none")
    port = free_port()
    conf = tmp / "maddy.conf"
    conf.write_text(CONFIG.format(tmp=tmp, port=port))
    mail = MailEnv(tmp, conf, {"mx": port})
    r = mail.cli("imap-acct", "create", "bob@example.net")
    assert r.returncode == 0, r.stderr
    with dns:
        srv = Server(conf, args=("-debug.dnsoverride", dns.override))
        try:
            srv.started(timeout=20)
            yield Env(mail, srv, port)
        finally:
            srv.close()


def message(marker: str, from_addr: str, dkim_domain: str | None = None) -> bytes:
    head = (
        f"From: Alice <{from_addr}>\r\nTo: bob@example.net\r\nSubject: {marker}\r\n"
        f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{marker}@example>\r\n"
    ).encode()
    body = f"{marker}\r\n".encode()
    if dkim_domain is not None:
        opts = SignOptions(dkim_domain, "sel", KEY, ["From", "To", "Subject", "Date"], identifier="@" + dkim_domain)
        head = sign(Header.parse(head), body, opts) + head
    return head + b"\r\n" + body


def send(env: Env, mail_from: str, msg: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", env.port, timeout=20) as s:
        s.ehlo("client.example.org")
        s.sendmail(mail_from, ["bob@example.net"], msg)


def stored(env: Env, marker: str) -> Stored:
    found: list[Stored] = []

    def arrived() -> bool:
        found[:] = [s for s in env.mail.stored() if f"Subject: {marker}\r\n".encode() in s.data]
        return bool(found)

    wait_until(arrived, what=f"message {marker}")
    [one] = found
    return one


def auth_results(data: bytes) -> str:
    hdr = Header.parse(data.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    [value] = hdr.get_all("Authentication-Results")
    return value


def test_aligned_mail_is_delivered_with_results_in_order(env: Env) -> None:
    send(env, "alice@example.org", message("aligned", "alice@example.org", "example.org"))
    got = stored(env, "aligned")
    assert (got.account, got.mailbox) == ("bob@example.net", "INBOX")
    host, *entries = auth_results(got.data).split("; ")
    assert host == "mx.example.net"
    assert entries[-1] == "dmarc=pass header.from=example.org"
    assert sorted(entries[:-1]) == [
        "dkim=pass header.d=example.org header.i=@example.org",
        'spf=pass reason="matched ip" smtp.helo=client.example.org smtp.mailfrom=example.org',
    ]


def test_unaligned_mail_with_p_reject_is_refused(env: Env) -> None:
    with pytest.raises(smtplib.SMTPDataError) as ei:
        send(env, "mallory@example.com", message("rejected", "alice@example.org", "example.com"))
    assert ei.value.smtp_code == 550
    err = ei.value.smtp_error
    text = err.decode() if isinstance(err, bytes) else err
    assert re.fullmatch(r"5\.7\.1 DMARC check failed \(msg ID = [0-9a-f]{8}\)", text), text
    assert not [s for s in env.mail.stored() if b"Subject: rejected\r\n" in s.data]


def test_unaligned_mail_with_p_quarantine_lands_in_junk(env: Env) -> None:
    send(env, "mallory@example.com", message("quarantined", "alice@example.net"))
    got = stored(env, "quarantined")
    assert (got.account, got.mailbox) == ("bob@example.net", "Junk")
    entries = auth_results(got.data).split("; ")
    assert "dkim=none " in entries
    assert entries[-1] == 'dmarc=fail reason="No aligned identifiers" header.from=example.net'


def test_p_none_and_no_record_are_delivered(env: Env) -> None:
    send(env, "mallory@example.org", message("policy-none", "alice@example.com"))
    send(env, "mallory@example.org", message("no-record", "alice@nodmarc.test"))
    none_ = stored(env, "policy-none")
    norec = stored(env, "no-record")
    assert none_.mailbox == norec.mailbox == "INBOX"
    assert auth_results(none_.data).endswith('; dmarc=fail reason="No aligned identifiers" header.from=example.com')
    assert auth_results(norec.data).endswith("; dmarc=none header.from=nodmarc.test")
