"""End to end: target.smtp / target.lmtp between two pymaddy processes (spec §B.3, §J).

Instance A (example.org) takes authenticated submissions from msmtp, DKIM-signs
them and forwards with `deliver_to smtp tcp://…` (STARTTLS on, B's self-signed
certificate trusted through the global `tls_client`). Instance B (example.net)
runs `check { spf; dkim }` with `dmarc yes` and stores into storage.imapsql;
its Authentication-Results show that it verified A's signature and the
loopback IP published in the SPF record. A second route goes through
target.lmtp into B's LMTP endpoint, where an unknown recipient is refused on
its own while the other is delivered.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pymaddy.dkim.keys import dns_record, write_new_key
from pymaddy.mail.message import Header
from pymaddy.tls.loaders import make_self_signed
from tests.dnsserver import DNSServer
from tests.e2e.harness import Server, free_port, wait_until
from tests.e2e.scenario_helpers import MailEnv, Stored

pytestmark = pytest.mark.e2e

PASSWORD = "alice-secret"

CONFIG_A = """
hostname mx.example.org
state_dir {tmp}/a/state
runtime_dir {tmp}/a/run
tls off
tls_client {{
    root_ca {tmp}/b-cert.pem
}}

auth.pass_table local_authdb {{
    table sql_table {{
        driver sqlite3
        dsn credentials.db
        table_name passwords
    }}
}}

target.lmtp to_b_lmtp {{
    targets tcp://127.0.0.1:{b_lmtp}
}}

submission tcp://127.0.0.1:{a_sub} {{
    auth &local_authdb
    modify {{
        dkim example.org sel {{
            key_path {tmp}/a-dkim.key
        }}
    }}
    destination lmtp.example.net {{
        deliver_to &to_b_lmtp
    }}
    destination fwd.example.net {{
        deliver_to smtp tcp://127.0.0.1:{b_sub} {{
            auth forward
        }}
    }}
    default_destination {{
        deliver_to smtp tcp://127.0.0.1:{b_smtp}
    }}
}}
"""

CONFIG_B = """
hostname mx.example.net
state_dir {tmp}/b/state
runtime_dir {tmp}/b/run
tls file {tmp}/b-cert.pem {tmp}/b-key.pem

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

smtp tcp://127.0.0.1:{b_smtp} {{
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

lmtp tcp://127.0.0.1:{b_lmtp} {{
    deliver_to &local_mailboxes
}}

auth.pass_table local_authdb {{
    table sql_table {{
        driver sqlite3
        dsn credentials.db
        table_name passwords
    }}
}}

submission tcp://127.0.0.1:{b_sub} {{
    auth &local_authdb
    deliver_to &local_mailboxes
}}
"""


@dataclass
class Env:
    a: MailEnv
    b: MailEnv
    a_sub: int
    servers: list[Server]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("fwd")
    for d in ("a", "b"):
        (tmp / d).mkdir()
    pair = make_self_signed(["127.0.0.1", "localhost"])
    (tmp / "b-cert.pem").write_bytes(pair.chain_pem)
    (tmp / "b-key.pem").write_bytes(pair.key_pem)
    key, _ = write_new_key(str(tmp / "a-dkim.key"), "ed25519")
    dns = DNSServer()
    dns.add_txt("example.org", "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt("sel._domainkey.example.org", dns_record(key))
    dns.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    ports = {k: free_port() for k in ("a_sub", "b_smtp", "b_lmtp", "b_sub")}
    conf_a, conf_b = tmp / "a" / "maddy.conf", tmp / "b" / "maddy.conf"
    conf_a.write_text(CONFIG_A.format(tmp=tmp, **ports))
    conf_b.write_text(CONFIG_B.format(tmp=tmp, **ports))
    a, b = MailEnv(tmp / "a", conf_a), MailEnv(tmp / "b", conf_b)
    for side in (a, b):
        r = side.cli("creds", "create", "-p", PASSWORD, "alice@example.org")
        assert r.returncode == 0, r.stderr
    for acct in ("bob@example.net", "carol@lmtp.example.net", "dave@fwd.example.net"):
        r = b.cli("imap-acct", "create", acct)
        assert r.returncode == 0, r.stderr
    servers: list[Server] = []
    with dns:
        try:
            for conf in (conf_b, conf_a):
                servers.append(Server(conf, args=("-debug.dnsoverride", dns.override)))
                servers[-1].started(timeout=20)
            yield Env(a, b, ports["a_sub"], servers)
        finally:
            for s in servers:
                s.close()


def stored(env: MailEnv, marker: str) -> Stored:
    found: list[Stored] = []

    def arrived() -> bool:
        found[:] = [s for s in env.stored() if f"Subject: {marker}\r\n".encode() in s.data]
        return bool(found)

    wait_until(arrived, what=f"message {marker}")
    [one] = found
    return one


def test_msmtp_to_a_is_signed_forwarded_and_verified_by_b(env: Env) -> None:
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp is not installed")
    cmd = [
        "msmtp",
        "--host=127.0.0.1",
        f"--port={env.a_sub}",
        "--auth=plain",
        "--user=alice@example.org",
        f"--passwordeval=echo {PASSWORD}",
        "--tls=off",
        "--domain=client.example.org",
        "--from=alice@example.org",
        "bob@example.net",
    ]
    body = "".join(f".line {i}\n" for i in range(50))
    msg = (
        "From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: forwarded\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0000\nMessage-ID: <fwd@example.org>\n\n" + body
    ).encode()
    r = subprocess.run(cmd, input=msg, capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    got = stored(env.b, "forwarded")
    assert (got.account, got.mailbox) == ("bob@example.net", "INBOX")
    head, _, text = got.data.partition(b"\r\n\r\n")
    assert text == body.replace("\n", "\r\n").encode()  # dot-stuffing undone exactly once
    hdr = Header.parse(head + b"\r\n")
    [sig] = hdr.get_all("DKIM-Signature")
    assert "d=example.org" in sig.replace(" ", "") and "s=sel" in sig.replace(" ", "")
    [ar] = hdr.get_all("Authentication-Results")
    host, *entries = ar.split("; ")
    assert host == "mx.example.net"
    assert entries[-1] == "dmarc=pass header.from=example.org"
    assert sorted(entries[:-1]) == [
        "dkim=pass header.d=example.org header.i=@example.org",
        'spf=pass reason="matched ip" smtp.helo=mx.example.org smtp.mailfrom=example.org',
    ]
    # B's Received says the hop from A was ESMTPS (STARTTLS was mandatory and done)
    assert any("with ESMTPS" in v for v in hdr.get_all("Received"))


def test_lmtp_route_reports_recipients_separately(env: Env) -> None:
    msg = (
        b"From: alice@example.org\r\nTo: carol@lmtp.example.net\r\nSubject: via-lmtp\r\n"
        b"Message-ID: <lmtp@example.org>\r\n\r\nhello\r\n"
    )
    with smtplib.SMTP("127.0.0.1", env.a_sub, timeout=30) as s:
        s.login("alice@example.org", PASSWORD)
        refused = s.sendmail("alice@example.org", ["carol@lmtp.example.net", "nobody@lmtp.example.net"], msg)
    assert list(refused) == ["nobody@lmtp.example.net"]
    code, text = refused["nobody@lmtp.example.net"]
    assert code // 100 == 5, text
    got = stored(env.b, "via-lmtp")
    assert (got.account, got.mailbox) == ("carol@lmtp.example.net", "INBOX")


def test_auth_forward_reuses_the_submitters_credentials(env: Env) -> None:
    msg = b"From: alice@example.org\r\nTo: dave@fwd.example.net\r\nSubject: via-forward\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", env.a_sub, timeout=30) as s:
        s.login("alice@example.org", PASSWORD)
        try:
            s.sendmail("alice@example.org", ["dave@fwd.example.net"], msg)
        except smtplib.SMTPException as e:
            raise AssertionError("\n".join(srv.output for srv in env.servers)) from e
    got = stored(env.b, "via-forward")
    assert (got.account, got.mailbox) == ("dave@fwd.example.net", "INBOX")
    hdr = Header.parse(got.data.partition(b"\r\n\r\n")[0] + b"\r\n")
    # B's submission offers AUTH only after STARTTLS: the hop was TLS and authenticated as alice
    assert any("mx.example.net" in v and "with ESMTPS" in v for v in hdr.get_all("Received"))
    b_log = env.servers[0].output
    assert any(
        "submission: incoming message" in ln and '"username":"alice@example.org"' in ln for ln in b_log.splitlines()
    )
