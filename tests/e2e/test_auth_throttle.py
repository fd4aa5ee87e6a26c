"""auth_throttle: repeated failed logins are refused for a while, on SMTP AUTH and IMAP alike,
and every failure is logged in the line fail2ban's maddy-auth filter (dist/fail2ban) matches.

Clients connect from different loopback addresses (127.0.0.2, .3, …) to play different hosts.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.harness import ROOT, Server, free_port
from tests.e2e.imap_helpers import login_from

pytestmark = pytest.mark.timeout(90)

FAIL2BAN_FILTER = ROOT.parent / "shared/fixtures/maddy-upstream/dist/fail2ban/filter.d/maddy-auth.conf"

CONFIG = """
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname mx.example.org
tls off

auth_throttle {{
    delay_after 100
    ip_failures 4
    user_failures 3
    lockout 10m
}}

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

submission tcp://127.0.0.1:{smtp} {{
    insecure_auth yes
    auth &local_authdb
    deliver_to dummy
}}

imap tcp://127.0.0.1:{imap} {{
    insecure_auth yes
    auth &local_authdb
    storage &local_mailboxes
}}

imap tcp://127.0.0.1:{imap_off} {{
    insecure_auth yes
    auth &local_authdb
    storage &local_mailboxes
    auth_throttle off
}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, int]]]:
    tmp = tmp_path_factory.mktemp("throttle")
    ports = {"smtp": free_port(), "imap": free_port(), "imap_off": free_port()}
    conf = tmp / "maddy.conf"
    conf.write_text(CONFIG.format(tmp=tmp, **ports))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYMADDY_ALLOW_ROOT="1")
    for user in ("alice@example.org", "bob@example.org", "carol@example.org"):
        r = subprocess.run([sys.executable, "-m", "pymaddy", "-config", str(conf), "creds", "create", "-p", "secret",
                            user], capture_output=True, text=True, env=env, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
    srv = Server(conf).started()
    try:
        yield srv, ports
    finally:
        srv.close()


def smtp_login(port: int, source: str, user: str, password: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as s:
        s.ehlo()
        try:
            code, msg = s.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error.decode() if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
        return code, msg.decode()


def imap_login(port: int, source: str, user: str, password: str) -> str:
    return login_from(port, source, user, password)


def test_username_lockout_spares_the_owners_address(server: tuple[Server, dict[str, int]]) -> None:
    _srv, ports = server
    port = ports["smtp"]
    assert smtp_login(port, "127.0.0.2", "alice@example.org", "secret")[0] == 235  # the owner's machine
    for _ in range(3):
        assert smtp_login(port, "127.0.0.3", "alice@example.org", "guess")[0] == 535
    # locked: even the right password from elsewhere is refused, without a password check
    code, msg = smtp_login(port, "127.0.0.4", "alice@example.org", "secret")
    assert (code, msg) == (454, "4.7.0 Too many failed logins, try again later")
    # the address that logged in before still gets in
    assert smtp_login(port, "127.0.0.2", "alice@example.org", "secret")[0] == 235
    # the lockout is per username: other users are unaffected
    assert smtp_login(port, "127.0.0.4", "carol@example.org", "secret")[0] == 235


def test_address_lockout_covers_smtp_and_imap(server: tuple[Server, dict[str, int]]) -> None:
    _srv, ports = server
    for i in range(4):  # different usernames, so only the address limit (4) is reached
        assert imap_login(ports["imap"], "127.0.0.5", f"nobody{i}@example.org", "x").startswith(
            "NO [AUTHENTICATIONFAILED]"
        )
    assert imap_login(ports["imap"], "127.0.0.5", "bob@example.org", "secret") == (
        "NO [UNAVAILABLE] Too many failed logins, try again later"
    )
    assert smtp_login(ports["smtp"], "127.0.0.5", "bob@example.org", "secret")[0] == 454
    assert imap_login(ports["imap"], "127.0.0.6", "bob@example.org", "secret").startswith("OK")
    # an endpoint with `auth_throttle off` does not refuse
    assert imap_login(ports["imap_off"], "127.0.0.5", "bob@example.org", "secret").startswith("OK")


def test_failures_are_logged_for_fail2ban(server: tuple[Server, dict[str, int]]) -> None:
    srv, ports = server
    imap_login(ports["imap"], "127.0.0.7", "carol@example.org", "wrong")
    smtp_login(ports["smtp"], "127.0.0.7", "carol@example.org", "wrong")
    srv.wait_for('"username":"carol@example.org"', count=2)
    text = FAIL2BAN_FILTER.read_text()
    failregex = re.search(r"failregex\s*=\s*(.+)", text)
    assert failregex is not None
    pattern = re.compile(failregex.group(1).strip().replace("<HOST>", r"(?P<host>[0-9a-fA-F.:\[\]]+)"))
    hosts = [m.group("host") for line in srv.output.splitlines() if (m := pattern.search(line))]
    assert hosts.count("127.0.0.7") == 2
    assert "127.0.0.3" in hosts  # the guesses of the first test
