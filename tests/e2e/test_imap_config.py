"""The imap endpoint's directives: auth_map, storage_map, proxy_protocol, io_debug; imapsql disable_recent.

Modelled on maddy's tests/imap_test.go (TestIMAPEndpointAuthMap, TestIMAPEndpointStorageMap).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, Server, free_port
from tests.e2e.imap_helpers import Transcript, message

pytestmark = pytest.mark.timeout(60)

CONFIG = """
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname mx.example.org
tls off

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
    disable_recent no
}}

imap tcp://127.0.0.1:{mapped} {{
    auth &local_authdb
    storage &local_mailboxes
    auth_map email_localpart
    storage_map email_localpart
    sasl_login yes
}}

imap tcp://127.0.0.1:{proxied} {{
    auth &local_authdb
    storage &local_mailboxes
    io_debug yes
    debug yes
    proxy_protocol {{
        trust 127.0.0.1
    }}
}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, int], Path]]:
    tmp = tmp_path_factory.mktemp("imapconf")
    ports = {"mapped": free_port(), "proxied": free_port()}
    conf = tmp / "maddy.conf"
    conf.write_text(CONFIG.format(tmp=tmp, **ports))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYMADDY_ALLOW_ROOT="1")
    r = subprocess.run([sys.executable, "-m", "pymaddy", "-config", str(conf), "creds", "create", "-p", "123",
                        "user"], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    srv = Server(conf).started()
    try:
        yield srv, ports, tmp
    finally:
        srv.close()


def test_auth_map_and_storage_map_share_one_account(server: tuple[Server, dict[str, int], Path]) -> None:
    _srv, ports, _ = server
    with Transcript(ports["mapped"]) as a:
        assert a.cmd('LOGIN "user@example.org" "123"').ok
        r = a.cmd("SELECT INBOX")
        assert r.ok and len(r.untagged) == 6, r.text()
        assert a.cmd("CREATE testbox").ok
    with Transcript(ports["mapped"]) as b:
        assert b.cmd('LOGIN "user@example.com" "123"').ok
        r = b.cmd('LIST "" "*"')
        assert r.untagged == [b'* LIST (\\HasNoChildren) "." INBOX', b'* LIST (\\HasNoChildren) "." testbox']
    with Transcript(ports["mapped"]) as c:
        assert b"AUTHENTICATIONFAILED" in c.cmd('LOGIN "nobody@example.org" "123"').tagged


def test_recent_is_given_to_the_first_session_only(server: tuple[Server, dict[str, int], Path]) -> None:
    _, ports, _ = server
    with Transcript(ports["mapped"]) as a, Transcript(ports["mapped"]) as b:
        assert a.cmd('LOGIN "user@example.org" "123"').ok
        assert b.cmd('LOGIN "user@example.net" "123"').ok
        a.cmd("CREATE Recent")
        a.cmd("APPEND Recent", message("r1"))
        r = a.cmd("SELECT Recent")
        assert b"* 1 RECENT" in r.untagged
        assert a.cmd("FETCH 1 (FLAGS)").untagged == [b"* 1 FETCH (FLAGS (\\Recent))"]
        r = b.cmd("SELECT Recent")
        assert b"* 0 RECENT" in r.untagged
        assert a.cmd("STATUS Recent (RECENT)").untagged == [b"* STATUS Recent (RECENT 0)"]
        # A message arriving while both have it selected is recent for the first one told of it only.
        with Transcript(ports["mapped"]) as c:
            assert c.cmd('LOGIN "user@example.org" "123"').ok
            assert c.cmd("APPEND Recent", message("r2")).ok
        r = a.cmd("NOOP")
        assert r.untagged[:2] == [b"* 2 EXISTS", b"* 2 RECENT"], r.untagged
        assert a.cmd("FETCH 2 (FLAGS)").untagged == [b"* 2 FETCH (FLAGS (\\Recent))"]
        r = b.cmd("NOOP")
        assert r.untagged[:2] == [b"* 2 EXISTS", b"* 0 RECENT"], r.untagged
        assert b.cmd("FETCH 2 (FLAGS)").untagged == [b"* 2 FETCH (FLAGS ())"]


def test_proxy_protocol_source_address_and_io_debug(server: tuple[Server, dict[str, int], Path]) -> None:
    srv, ports, _ = server
    import socket

    s = socket.create_connection(("127.0.0.1", ports["proxied"]), timeout=10)
    s.sendall(b"PROXY TCP4 10.1.2.3 127.0.0.1 4242 143\r\n")
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK [CAPABILITY ")
    s.sendall(b'a LOGIN "user" "wrong"\r\n')
    assert f.readline().startswith(b"a NO [AUTHENTICATIONFAILED]")
    srv.wait_for('"src_ip":"10.1.2.3:4242"')  # ip:port, as fail2ban's maddy-auth filter expects
    s.sendall(b"b NOOP\r\n")
    assert f.readline() == b"b OK NOOP completed\r\n"
    srv.wait_for("C: b NOOP")  # io_debug logs the commands (never the LOGIN arguments)
    assert "wrong" not in srv.output
    f.close()
    s.close()


def test_stopping_the_server_says_bye_to_idle_sessions(tmp_path: Path) -> None:
    import signal

    port = free_port()
    conf = tmp_path / "maddy.conf"
    conf.write_text(CONFIG.format(tmp=tmp_path, mapped=port, proxied=free_port()))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYMADDY_ALLOW_ROOT="1")
    r = subprocess.run([sys.executable, "-m", "pymaddy", "-config", str(conf), "creds", "create", "-p", "123",
                        "user"], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    srv = Server(conf).started()
    try:
        with Transcript(port) as t:
            assert t.cmd('LOGIN "user@example.org" "123"').ok
            t.cmd("SELECT INBOX")
            t.send(b"i IDLE\r\n")
            assert t.line() == b"+ idling"
            srv.signal(signal.SIGTERM)
            assert t.line() == b"* BYE Server shutting down"
        assert srv.wait_exit() == 0
    finally:
        srv.close()


def test_sasl_login_mechanism(server: tuple[Server, dict[str, int], Path]) -> None:
    import base64

    _, ports, _ = server
    with Transcript(ports["mapped"]) as t:
        caps = t.cmd("CAPABILITY").lines("* CAPABILITY")[0].split()
        assert "AUTH=LOGIN" in caps and "AUTH=PLAIN" in caps  # tls off: plaintext auth is allowed
        t.send(b"a AUTHENTICATE LOGIN\r\n")
        assert t.line() == b"+ " + base64.b64encode(b"Username:")
        t.send(base64.b64encode(b"user@example.org") + b"\r\n")
        assert t.line() == b"+ " + base64.b64encode(b"Password:")
        t.send(base64.b64encode(b"123") + b"\r\n")
        assert t.until("a").ok
