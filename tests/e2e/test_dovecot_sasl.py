"""Dovecot's auth protocol on both sides, against the real peers (spec §B.1 dovecot_sasld, §B.7 dovecot_sasl).

- `dovecot_sasl`: Debian's Dovecot runs on loopback with its own config dir
  (auth-client unix socket in a temp dir, passdb passwd-file plus a
  checkpassword passdb that fails temporarily for one user); pymaddy's
  submission endpoint authenticates through it.
- `dovecot_sasld`: Debian's Postfix runs on loopback with its own config dir,
  `smtpd_sasl_type = dovecot` pointing at pymaddy's dovecot_sasld (backed by
  auth.pass_table with a user made by `pymaddy creds create`); clients log in
  to Postfix with smtplib and swaks.

Peers need root (they drop to their own users), so the files live in a
world-traversable directory under /tmp.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, Server, free_port, running, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="the peers need root")]

DOVECOT = shutil.which("dovecot")
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
FAIL2BAN = Path("/work/shared/fixtures/maddy-upstream/dist/fail2ban/filter.d/maddy-auth.conf")
HAVE_POSTFIX = os.path.exists(POSTFIX_MASTER) and shutil.which("postfix") is not None

DOVECOT_CONF = """\
instance_name = pymaddy-test-{tag}
base_dir = {d}/base
state_dir = {d}/state
protocols = none
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
log_path = {d}/dovecot.log
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
passdb {{
  driver = checkpassword
  args = {d}/checkpassword
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener {d}/auth-client {{
    mode = 0666
  }}
  inet_listener {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""

# Dovecot's checkpassword protocol: "user NUL password NUL" on fd 3; 111 = temporary failure.
CHECKPASSWORD = """#!/bin/bash
IFS= read -r -d '' user <&3
[ "$user" = "temp@example.org" ] && exit 111
exit 1
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pymaddy-dv-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Dovecot:
    dir: Path
    conf: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "auth-client"

    def start(self) -> None:
        self.proc = subprocess.Popen([DOVECOT or "dovecot", "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.socket.exists() and _accepts(self.port), what="dovecot auth listeners")

    def stop(self) -> None:
        """Stop master and every child (the auth process would otherwise serve open connections a while)."""
        if self.proc is not None:
            pgid = self.proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
            wait_until(lambda: not _alive_in_group(pgid), what="dovecot processes to exit")
        self.proc = None
        self.socket.unlink(missing_ok=True)


def _alive_in_group(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def dovecot(shared: Path) -> Iterator[Dovecot]:
    if DOVECOT is None:
        pytest.skip("dovecot is not installed")
    d = shared / "dovecot"
    d.mkdir()
    d.chmod(0o755)
    (d / "users").write_text("alice@example.org:{PLAIN}alice-pw::::::\n")
    (d / "checkpassword").write_text(CHECKPASSWORD)
    (d / "checkpassword").chmod(0o755)
    dv = Dovecot(d, d / "dovecot.conf", free_port())
    dv.conf.write_text(DOVECOT_CONF.format(d=d, tag=d.name[-8:], port=dv.port))
    dv.start()
    try:
        yield dv
    finally:
        dv.stop()


def _login(port: int, user: str, password: str, mech: str = "PLAIN") -> tuple[int, str]:
    """(code, text) of AUTH on a fresh connection."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        text: bytes | str
        try:
            if mech == "LOGIN":
                s.user, s.password = user, password
                code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
            else:
                code, text = s.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            code, text = e.smtp_code, e.smtp_error
        return code, text.decode() if isinstance(text, bytes) else str(text)


SUBMISSION = """\
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname mx.example.org
tls off

submission tcp://127.0.0.1:{port} {{
    auth dovecot_sasl unix:{socket}
    deliver_to dummy
}}

submission tcp://127.0.0.1:{port2} {{
    auth dovecot_sasl {{
        endpoint tcp://127.0.0.1:{dport}
    }}
    deliver_to dummy
}}
"""


def test_submission_through_dovecot_auth(dovecot: Dovecot, tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    conf = tmp_path / "maddy.conf"
    conf.write_text(SUBMISSION.format(tmp=tmp_path, port=port, port2=port2, socket=dovecot.socket,
                                      dport=dovecot.port))
    with running(conf) as srv:
        srv.started()
        assert _login(port, "alice@example.org", "alice-pw")[0] == 235
        assert _login(port, "alice@example.org", "wrong") == (535, "5.7.8 Invalid credentials")
        assert _login(port, "nobody@example.org", "alice-pw")[0] == 535
        # Dovecot's temporary failure (code=temp_fail) is a temporary SMTP failure
        assert _login(port, "temp@example.org", "x") == (454, "4.7.0 Temporary authentication failure")
        # several logins reuse kept connections; the TCP listener works the same
        for _ in range(3):
            assert _login(port2, "alice@example.org", "alice-pw")[0] == 235
        assert _login(port2, "alice@example.org", "nope")[0] == 535
        srv.wait_for("authentication failed")
        assert '"username":"alice@example.org"' in srv.output

        dovecot.stop()
        assert _login(port, "alice@example.org", "alice-pw") == (454, "4.7.0 Temporary authentication failure")
        assert _login(port2, "alice@example.org", "alice-pw")[0] == 454
        srv.wait_for("unable to contact server")

        dovecot.start()  # back: the kept (now dead) connections are replaced transparently
        assert _login(port, "alice@example.org", "alice-pw")[0] == 235
        assert _login(port2, "alice@example.org", "alice-pw")[0] == 235


def test_dovecot_unreachable_at_start_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "maddy.conf"
    conf.write_text(SUBMISSION.format(tmp=tmp_path, port=port, port2=free_port(), socket=tmp_path / "no-such-socket",
                                      dport=free_port()))
    srv = Server(conf)
    try:
        assert srv.wait_exit() != 0
        assert "dovecot_sasl: unable to contact server" in srv.output
        assert "Traceback" not in srv.output
    finally:
        srv.close()


# -- dovecot_sasld served to Postfix ---------------------------------------------------------------

SASLD = """\
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname mx.example.org

auth.pass_table local_authdb {{
    table sql_table {{
        driver sqlite3
        dsn credentials.db
        table_name passwords
    }}
}}

dovecot_sasld tcp://127.0.0.1:{sasl} unix://{tmp}/sasld.sock {{
    auth &local_authdb
    sasl_login yes
}}

dovecot_sasld unix://{tmp}/sasld-temp.sock {{
    auth external {{
        helper {tmp}/helper-down
    }}
}}

dovecot_sasld tcp://127.0.0.1:{sasl_map} {{
    auth_map email_localpart
    auth pass_table static {{
        entry "bob" "{bob_hash}"
    }}
}}
"""
BOB_HASH = "bcrypt:$2b$04$8IV3lUonL0DwDNWMXC3.ae4meXvaFDTjkJFq/ioi0gQqcLw5dKunO"  # "secret"

POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.example.org
mydomain = example.org
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtpd_tls_security_level = none
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{sasl}
maillog_file_prefixes = {d}
maillog_file = {d}/postfix.log
"""
POSTFIX_MASTER_CF = """\
127.0.0.1:{smtp} inet n - n - - smtpd
127.0.0.1:{smtp_map} inet n - n - - smtpd -o smtpd_sasl_path=inet:127.0.0.1:{sasl_map}
proxymap  unix - - n - - proxymap
anvil     unix - - n - 1 anvil
rewrite   unix - - n - - trivial-rewrite
cleanup   unix n - n - 0 cleanup
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class Postfix:
    dir: Path
    smtp: int
    smtp_map: int


@pytest.fixture
def postfix(shared: Path) -> Iterator[tuple[Postfix, Server, Path]]:
    if not HAVE_POSTFIX:
        pytest.skip("postfix is not installed")
    tmp = shared / "pymaddy"
    tmp.mkdir()
    sasl, sasl_map = free_port(), free_port()
    (tmp / "helper-down").write_text("#!/bin/sh\necho backend down >&2\nexit 2\n")
    (tmp / "helper-down").chmod(0o755)
    conf = tmp / "maddy.conf"
    conf.write_text(SASLD.format(tmp=tmp, sasl=sasl, sasl_map=sasl_map, bob_hash=BOB_HASH))
    r = subprocess.run([sys.executable, "-m", "pymaddy", "-config", str(conf), "creds", "create", "-p", "alice-pw",
                        "alice@example.org"], cwd=tmp, capture_output=True, text=True, timeout=60, check=False,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), PYMADDY_ALLOW_ROOT="1"))
    assert r.returncode == 0, r.stderr
    srv = Server(conf)
    pf = Postfix(shared / "postfix", free_port(), free_port())
    pf.dir.mkdir()
    (pf.dir / "main.cf").write_text(POSTFIX_MAIN.format(d=pf.dir, sasl=sasl))
    (pf.dir / "master.cf").write_text(POSTFIX_MASTER_CF.format(smtp=pf.smtp, smtp_map=pf.smtp_map, sasl_map=sasl_map))
    (pf.dir / "queue").mkdir()
    (pf.dir / "data").mkdir()
    shutil.chown(pf.dir / "data", "postfix")
    master: subprocess.Popen[bytes] | None = None
    try:
        srv.started()
        # `postfix check` creates the queue directories with Postfix's ownership.
        subprocess.run(["postfix", "-c", str(pf.dir), "check"], capture_output=True, timeout=60, check=False)
        master = subprocess.Popen([POSTFIX_MASTER, "-c", str(pf.dir), "-d"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _accepts(pf.smtp) and _accepts(pf.smtp_map), what="postfix smtpd listeners")
        yield pf, srv, tmp
    finally:
        if master is not None:
            master.terminate()
            try:
                master.wait(10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(5)
        srv.close()


@pytest.mark.skipif(not HAVE_POSTFIX, reason="postfix is not installed")
def test_postfix_authenticates_against_dovecot_sasld(postfix: tuple[Postfix, Server, Path]) -> None:
    pf, srv, _ = postfix
    with smtplib.SMTP("127.0.0.1", pf.smtp, timeout=15) as s:
        s.ehlo("client.test")
        assert s.has_extn("auth")
        assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}  # what dovecot_sasld offers
    assert _login(pf.smtp, "alice@example.org", "alice-pw")[0] == 235
    assert _login(pf.smtp, "Alice@Example.org", "alice-pw")[0] == 235  # auth_map_normalize auto
    assert _login(pf.smtp, "alice@example.org", "alice-pw", mech="LOGIN")[0] == 235
    assert _login(pf.smtp, "alice@example.org", "wrong")[0] == 535
    assert _login(pf.smtp, "alice@example.org", "wrong", mech="LOGIN")[0] == 535
    assert _login(pf.smtp, "mallory@example.org", "alice-pw")[0] == 535
    # pymaddy logs the failure with Postfix's client address (rip; Postfix sends no rport) and
    # maddy's fail2ban filter matches the line
    srv.wait_for("authentication failed")
    line = next(ln for ln in srv.lines if "authentication failed" in ln)
    assert '"src_ip":"127.0.0.1:0"' in line and '"username":"alice@example.org"' in line
    regex = re.search(r"failregex\s*=\s*(.*)", FAIL2BAN.read_text()).group(1)  # type: ignore[union-attr]
    m = re.search(regex.replace("<HOST>", r"(?P<host>\S+)"), line)
    assert m is not None and m.group("host") == "127.0.0.1", line
    # auth_map: Postfix's user `bob@example.org` is checked as `bob`
    assert _login(pf.smtp_map, "bob@example.org", "secret")[0] == 235
    assert _login(pf.smtp_map, "bob@example.org", "wrong")[0] == 535
    assert _login(pf.smtp_map, "bob", "secret")[0] == 535  # no local part@domain: the map misses


@pytest.mark.skipif(shutil.which("swaks") is None or not HAVE_POSTFIX, reason="swaks/postfix not installed")
def test_swaks_through_postfix(postfix: tuple[Postfix, Server, Path]) -> None:
    pf, _, _ = postfix

    def swaks(password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["swaks", "--server", f"127.0.0.1:{pf.smtp}", "--quit-after", "AUTH", "--auth", "PLAIN",
                               "--auth-user", "alice@example.org", "--auth-password", password, "--timeout", "15"],
                              capture_output=True, text=True, timeout=60, check=False)

    ok = swaks("alice-pw")
    assert ok.returncode == 0 and "235 2.7.0 Authentication successful" in ok.stdout, ok.stdout
    bad = swaks("wrong")
    assert bad.returncode != 0 and "535 5.7.8" in bad.stdout, bad.stdout


# -- the protocol as pymaddy's dovecot_sasld speaks it (exact lines) ----------------------------------


class Raw:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(15)
        self.sock.connect(str(path))
        self.buf = b""

    def line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        ln, _, self.buf = self.buf.partition(b"\n")
        return ln.decode()

    def send(self, s: str) -> None:
        self.sock.sendall(s.encode())

    def closed(self) -> bool:
        """True when the server closes the connection (whatever it sent before)."""
        try:
            while self.sock.recv(4096):
                pass
            return True
        except TimeoutError:
            return False
        except OSError:
            return True


def test_sasld_protocol_lines(postfix: tuple[Postfix, Server, Path]) -> None:
    _, _, tmp = postfix
    r = Raw(tmp / "sasld.sock")
    hs = [r.line() for _ in range(7)]
    assert hs[0] == "VERSION\t1\t2"
    assert hs[1:3] == ["MECH\tPLAIN\tplaintext", "MECH\tLOGIN\tplaintext"]
    assert [h.split("\t")[0] for h in hs[3:]] == ["SPID", "CUID", "COOKIE", "DONE"]
    r.send("VERSION\t1\t0\nCPID\t42\n")
    plain = base64.b64encode(b"\0alice@example.org\0alice-pw").decode()
    r.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain}\n")
    assert r.line() == "OK\t1\tuser=alice@example.org"
    r.send("AUTH\t2\tPLAIN\tservice=smtp\n")  # no initial response: an empty challenge
    assert r.line() == "CONT\t2\t"
    r.send("CONT\t2\t" + base64.b64encode(b"\0alice@example.org\0bad").decode() + "\n")
    assert r.line() == "FAIL\t2\tuser=alice@example.org"
    r.send("AUTH\t3\tLOGIN\tservice=smtp\n")
    assert r.line() == "CONT\t3\t" + base64.b64encode(b"Username:").decode()
    r.send("CONT\t3\t" + base64.b64encode(b"alice@example.org").decode() + "\n")
    assert r.line() == "CONT\t3\t" + base64.b64encode(b"Password:").decode()
    r.send("CONT\t3\t" + base64.b64encode(b"alice-pw").decode() + "\n")
    assert r.line() == "OK\t3\tuser=alice@example.org"
    authz = base64.b64encode(b"other\0alice@example.org\0alice-pw").decode()
    r.send(f"AUTH\t4\tPLAIN\tresp={authz}\n")  # authzid differs from authcid: refused
    assert r.line() == "FAIL\t4\tuser=alice@example.org"
    r.send("AUTH\t5\tCRAM-MD5\n")
    assert r.line() == "FAIL\t5\treason=Unsupported authentication mechanism"
    r.send("AUTH\t6\tPLAIN\tresp=!!!\n")  # bad base64: a protocol error closes the connection
    assert r.closed()
    r.sock.close()

    r = Raw(tmp / "sasld.sock")
    r.send("AUTH\t1\tPLAIN\n")  # before VERSION
    assert r.closed()
    r.sock.close()

    # a provider that cannot answer: a temporary FAIL (Dovecot 2.3 and 2.2 spellings)
    r = Raw(tmp / "sasld-temp.sock")
    assert [r.line() for _ in range(6)][-1] == "DONE"
    bare = base64.b64encode(b"\0alice\0alice-pw").decode()  # auth.external without `domains`: no domain
    r.send(f"VERSION\t1\t0\nCPID\t1\nAUTH\t1\tPLAIN\tresp={bare}\n")
    assert r.line() == "FAIL\t1\tuser=alice\tcode=temp_fail\ttemp"
    r.sock.close()
