"""auth.ldap / table.ldap against a real slapd, through the real server's IMAP and submission endpoints.

The directory is shaped like LLDAP (tests/ldapserver.py). The `local_authdb`
block is the seed's, with its URL and admin DN/password filled in; `storage_map
email_localpart_optional` maps a login by uid (`alice`) and by mail
(`alice@example.org`) to the same mailbox, as maddy's shared-credentials recipe.
Further endpoints use ldaps:// (with a dead URL first: failover), STARTTLS and
dn_template, and the MX accepts only recipients that table.ldap finds.
"""

from __future__ import annotations

import base64
import imaplib
import smtplib
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import Server, free_port
from tests.e2e.imap_helpers import Transcript
from tests.ldapserver import ADMIN_DN, ADMIN_PASSWORD, PEOPLE_DN, LDAPServer, available

pytestmark = pytest.mark.skipif(not available(), reason="slapd (Debian package slapd) not installed")

CONFIG = r"""
$(hostname) = mx.example.org
$(primary_domain) = example.org
$(local_domains) = $(primary_domain)
hostname $(hostname)
state_dir {tmp}/state
runtime_dir {tmp}/run
tls off
# Many refused logins from one address on purpose: no brute-force delays (a pymaddy extension).
auth_throttle off

auth.ldap local_authdb {{
    urls ldap://127.0.0.1:{ldap_port}
    bind plain "{admin_dn}" "{admin_pw}"
    base_dn "dc=example,dc=org"
    filter "(&(|(uid={{username}})(mail={{username}}))(objectClass=person))"
    starttls off
    connect_timeout 1m
}}

auth.ldap ldaps_authdb {{
    urls ldap://127.0.0.1:{dead_port} {ldaps_url}
    bind plain "{admin_dn}" "{admin_pw}"
    base_dn "dc=example,dc=org"
    filter "(&(uid={{username}})(objectClass=person))"
    tls_client {{
        root_ca {ca}
    }}
    connect_timeout 5s
    request_timeout 10s
}}

auth.ldap starttls_authdb {{
    urls ldap://127.0.0.1:{ldap_port}
    starttls yes
    tls_client {{
        root_ca {ca}
    }}
    dn_template "uid={{username}},{people}"
}}

auth.ldap external_authdb {{
    urls {ldaps_url}
    bind external
    base_dn "dc=example,dc=org"
    filter "(&(mail={{username}})(objectClass=person))"
    tls_client {{
        root_ca {ca}
        cert {client_cert}
        key {client_key}
    }}
}}

table.ldap ldap_mail {{
    urls ldap://127.0.0.1:{ldap_port}
    bind plain "{admin_dn}" "{admin_pw}"
    base_dn "dc=example,dc=org"
    filter "(&(mail={{username}})(objectClass=person))"
}}

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
    delivery_map email_localpart_optional
}}

smtp tcp://127.0.0.1:{mx} {{
    destination_in &ldap_mail {{
        deliver_to &local_mailboxes
    }}
    default_destination {{
        reject 550 5.1.1 "User doesn't exist"
    }}
}}

submission tcp://127.0.0.1:{sub} {{
    auth &local_authdb
    source $(local_domains) {{
        destination $(local_domains) {{
            deliver_to &local_mailboxes
        }}
        default_destination {{
            reject 550 5.7.0 "Local delivery only"
        }}
    }}
    default_source {{
        reject 501 5.1.8 "Non-local sender domain"
    }}
}}

imap tcp://127.0.0.1:{imap} {{
    auth &local_authdb
    storage &local_mailboxes
    storage_map email_localpart_optional
}}

imap tcp://127.0.0.1:{imap_tls} {{
    auth &ldaps_authdb
    storage &local_mailboxes
}}

imap tcp://127.0.0.1:{imap_external} {{
    auth &external_authdb
    storage &local_mailboxes
}}

imap tcp://127.0.0.1:{imap_starttls} {{
    auth &starttls_authdb
    storage &local_mailboxes
}}
"""


@dataclass
class Env:
    ldap: LDAPServer
    server: Server
    ports: dict[str, int]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="pymaddy-ldap-") as d:
        tmp = Path(d)
        ldap = LDAPServer(tmp / "slapd", ldaps=True).start()
        try:
            ldap.add_user("alice", "alice-pw", "alice@example.org")
            ldap.add_user("bob", "bob-pw", "bob@example.org")
            ports = {k: free_port() for k in ("mx", "sub", "imap", "imap_tls", "imap_starttls", "imap_external",
                                            "dead_port")}
            cfg = tmp / "maddy.conf"
            cfg.write_text(CONFIG.format(
                tmp=tmp, ldap_port=ldap.port, ldaps_url=ldap.ldaps_url, ca=ldap.ca_file, people=PEOPLE_DN,
                client_cert=ldap.client_cert, client_key=ldap.client_key,
                admin_dn=ADMIN_DN, admin_pw=ADMIN_PASSWORD, **ports))
            srv = Server(cfg)
            try:
                srv.started(timeout=30)
                yield Env(ldap, srv, ports)
            finally:
                srv.close()
        finally:
            ldap.close()


def quoted(s: str) -> str:
    """An IMAP quoted string (RFC 3501 §4.3): imaplib sends the username as given."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def imap_login(port: int, user: str, password: str) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", port, timeout=15)
    try:
        c.login(quoted(user), password)
    except BaseException:
        c.shutdown()
        raise
    return c


def imap_refusal(port: int, user: str, password: str) -> str:
    """The text of a refused LOGIN (fails the test when the login succeeds)."""
    try:
        c = imap_login(port, user, password)
    except imaplib.IMAP4.error as e:
        assert "command error: BAD" not in str(e)
        return str(e)
    c.logout()
    raise AssertionError(f"IMAP login {user!r} succeeded")


def smtp_auth(port: int, user: str, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.example.org")
        try:
            return s.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            text = e.smtp_error
            return e.smtp_code, text if isinstance(text, bytes) else text.encode()


def test_login_by_uid_and_by_mail_reaches_one_mailbox(env: Env) -> None:
    for user in ("alice", "alice@example.org"):
        assert smtp_auth(env.ports["sub"], user, "alice-pw")[0] == 235
    # The first IMAP login creates the account (imapsql delivers only to existing accounts).
    imap_login(env.ports["imap"], "alice", "alice-pw").logout()
    with smtplib.SMTP("127.0.0.1", env.ports["sub"], timeout=15) as s:
        s.login("alice", "alice-pw")
        s.sendmail("alice@example.org", ["alice@example.org"],
                   b"From: alice@example.org\r\nTo: alice@example.org\r\nSubject: via uid login\r\n\r\nhi\r\n")
    by_uid = imap_login(env.ports["imap"], "alice", "alice-pw")
    by_mail = imap_login(env.ports["imap"], "alice@example.org", "alice-pw")
    for c in (by_uid, by_mail):
        typ, _ = c.select("INBOX")
        assert typ == "OK"
        typ, found = c.search(None, "SUBJECT", '"via uid login"')
        assert typ == "OK" and found[0]
        c.logout()


def test_wrong_and_empty_passwords_are_refused(env: Env) -> None:
    for pw in ("wrong", "ALICE-PW", "bob-pw"):
        assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap"], "alice", pw)
        assert smtp_auth(env.ports["sub"], "alice", pw)[0] == 535
    # RFC 4513 §5.1.2: an empty password would be an unauthenticated bind that slapd accepts.
    assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap"], "alice", "")
    assert smtp_auth(env.ports["sub"], "alice", "")[0] == 535
    assert smtp_auth(env.ports["sub"], "nobody", "whatever")[0] == 535


@pytest.mark.parametrize("user", ["*", "alic*", "*)(uid=*", "alice)(objectClass=*", "a*)(|(uid=*",
                                  "alice\\2a", "bob)(description=prefix*"])
def test_injection_usernames_are_refused(env: Env, user: str) -> None:
    assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap"], user, "alice-pw")
    assert smtp_auth(env.ports["sub"], user, "alice-pw")[0] == 535


def test_special_characters_match_exactly(env: Env) -> None:
    env.ldap.add_user("st*r(1)\\x+y", "star-pw", "star@example.org")
    try:
        imap_login(env.ports["imap"], "st*r(1)\\x+y", "star-pw").logout()
        # dn_template: the same name DN-escaped (RFC 4514), over STARTTLS
        imap_login(env.ports["imap_starttls"], "st*r(1)\\x+y", "star-pw").logout()
        assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap"], "st*", "star-pw")
        assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap_starttls"], "st*r(1)\\x+y,ou=people", "star-pw")
    finally:
        env.ldap.delete_user("st*r(1)\\x+y")
    # Non-ASCII names and passwords (UTF-8 on the wire; imaplib and smtplib only send ASCII).
    env.ldap.add_user("jörg", "pässwörd", "joerg@example.org")
    try:
        with Transcript(env.ports["imap"]) as t:
            r = t.cmd('LOGIN "jörg" "pässwörd"'.encode())
            assert r.ok, r.text()
        with Transcript(env.ports["imap"]) as t:
            r = t.cmd('LOGIN "jörg" "pass\x07word"'.encode())
            assert r.status == "NO" and "[AUTHENTICATIONFAILED]" in r.text()
        with smtplib.SMTP("127.0.0.1", env.ports["sub"], timeout=15) as s:
            s.ehlo("client.example.org")
            plain = base64.b64encode("\0joerg@example.org\0pässwörd".encode()).decode()
            assert s.docmd("AUTH", "PLAIN " + plain)[0] == 235
    finally:
        env.ldap.delete_user("jörg")


def test_added_user_logs_in_at_once_and_removed_user_cannot(env: Env) -> None:
    env.ldap.add_user("carol", "carol-pw", "carol@example.org")
    c = imap_login(env.ports["imap"], "carol@example.org", "carol-pw")
    _, listed = c.list()
    assert any(b"INBOX" in x for x in listed if isinstance(x, bytes))
    assert c.select("INBOX")[0] == "OK"
    c.logout()
    assert smtp_auth(env.ports["sub"], "carol", "carol-pw")[0] == 235
    env.ldap.delete_user("carol")
    assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap"], "carol", "carol-pw")
    assert smtp_auth(env.ports["sub"], "carol@example.org", "carol-pw")[0] == 535


def test_ldaps_with_failover_and_starttls_dn_template(env: Env) -> None:
    imap_login(env.ports["imap_tls"], "bob", "bob-pw").logout()
    imap_login(env.ports["imap_starttls"], "bob", "bob-pw").logout()
    assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap_tls"], "bob", "alice-pw")
    assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap_starttls"], "bob", "")


def test_sasl_external_service_bind_with_a_client_certificate(env: Env) -> None:
    # The search needs the admin's rights (anonymous may only bind): EXTERNAL maps the certificate to it.
    imap_login(env.ports["imap_external"], "bob@example.org", "bob-pw").logout()
    assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap_external"], "bob@example.org", "nope")
    assert "[AUTHENTICATIONFAILED]" in imap_refusal(env.ports["imap_external"], "bob", "bob-pw")


def test_table_ldap_accepts_only_directory_recipients(env: Env) -> None:
    with smtplib.SMTP("127.0.0.1", env.ports["mx"], timeout=15) as s:
        s.ehlo("mx.example.net")
        s.mail("someone@example.net")
        assert s.rcpt("bob@example.org")[0] == 250
        assert s.rcpt("nobody@example.org")[0] == 550
        assert s.rcpt("*@example.org")[0] == 550
    c = imap_login(env.ports["imap"], "bob", "bob-pw")
    c.logout()


def test_directory_restart_costs_no_failed_login(env: Env) -> None:
    # Several pooled connections (concurrent logins), all broken by the restart.
    with ThreadPoolExecutor(4) as ex:
        for c in ex.map(lambda _: imap_login(env.ports["imap"], "alice", "alice-pw"), range(8)):
            c.logout()
    env.ldap.restart()
    imap_login(env.ports["imap"], "alice", "alice-pw").logout()
    assert smtp_auth(env.ports["sub"], "bob", "bob-pw")[0] == 235


def test_directory_down_is_a_temporary_failure_and_recovery_needs_no_restart(env: Env) -> None:
    imap_login(env.ports["imap"], "alice", "alice-pw").logout()  # pooled connections exist
    env.ldap.stop()
    try:
        assert "[UNAVAILABLE]" in imap_refusal(env.ports["imap"], "alice", "alice-pw")
        code, text = smtp_auth(env.ports["sub"], "alice", "alice-pw")
        assert code == 454 and b"4.7.0" in text
        with smtplib.SMTP("127.0.0.1", env.ports["mx"], timeout=15) as s:
            s.ehlo("mx.example.net")
            s.mail("someone@example.net")
            # As maddy: a failed destination_in lookup is logged and skipped (default_destination answers).
            assert s.rcpt("bob@example.org")[0] == 550
        env.server.wait_for("all directory servers are unreachable")
    finally:
        env.ldap.start()
    imap_login(env.ports["imap"], "alice", "alice-pw").logout()
    assert smtp_auth(env.ports["sub"], "alice@example.org", "alice-pw")[0] == 235
    imap_login(env.ports["imap_tls"], "bob", "bob-pw").logout()
    assert env.server.proc.poll() is None
