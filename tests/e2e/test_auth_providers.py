"""auth.external, auth.pam and auth.shadow behind a real server (spec §B.7), logged into with smtplib.

Helpers speak maddy's protocol (`user\\npass\\n` on stdin; exit 0 ok, 1 refused,
else error); the fake ones here are shell scripts that record what they were
given. PAM and shadow run against a system user the tests create (and delete)
and a /etc/pam.d/maddy the tests write (only when none exists). The PAM
servers are started as root without PYMADDY_ALLOW_ROOT, so they check
passwords after dropping privileges, as in production: to a user in group
`shadow`, and to `nobody`; both work, through the privileged password helper
that keeps root while the server does not.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Server, free_port, running

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="creates system users and PAM files")]

TEST_USER = "pymaddy-authtest"
TEST_PASSWORD = "Unix-pw-42"
SERVER_USER = "pymaddy-authsrv"
PAM_FILE = Path("/etc/pam.d/maddy")

HELPER = """#!/bin/bash
IFS= read -r user
IFS= read -r pass
printf '%s\\n' "$user" >> {log}
case "$user:$pass" in
  "alice:alice-pw"|"alice@example.org:alice-pw") exit 0 ;;
  temp*) echo "backend down" >&2; exit 2 ;;
esac
exit 1
"""


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A directory the unprivileged server user can traverse (0755, under /tmp)."""
    d = Path(tempfile.mkdtemp(prefix="pymaddy-auth-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def unix_user() -> Iterator[str]:
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not available")
    subprocess.run(["userdel", TEST_USER], capture_output=True, check=False)
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", TEST_USER], check=True, capture_output=True)
    try:
        subprocess.run(["chpasswd"], input=f"{TEST_USER}:{TEST_PASSWORD}\n", text=True, check=True,
                       capture_output=True)
        yield TEST_USER
    finally:
        subprocess.run(["userdel", TEST_USER], capture_output=True, check=False)


@pytest.fixture(scope="module")
def pam_service() -> Iterator[Path]:
    if PAM_FILE.exists():
        pytest.skip(f"{PAM_FILE} exists; not overwriting it")
    PAM_FILE.write_text("auth required pam_unix.so nodelay\naccount required pam_unix.so\n")
    try:
        yield PAM_FILE
    finally:
        PAM_FILE.unlink(missing_ok=True)


def _helper(path: Path, log: Path) -> Path:
    path.write_text(HELPER.format(log=log))
    path.chmod(0o755)
    return path


def login(port: int, user: str, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.test")
        try:
            code, _ = s.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            code = e.smtp_code
        return code


HEAD = """\
state_dir {d}/state
runtime_dir {d}/run
hostname mx.example.org
tls off
"""

PROVIDERS = HEAD + """
auth.external ext_strip {{
    helper {d}/helper
    domains example.org
}}
auth.external ext_perdomain {{
    helper {d}/helper
    perdomain yes
    domains EXAMPLE.org example.net
}}
auth.external ext_nodomains {{
    helper {d}/helper
}}
submission tcp://127.0.0.1:{p[strip]} {{
    auth &ext_strip
    deliver_to dummy
}}
submission tcp://127.0.0.1:{p[perdomain]} {{
    auth &ext_perdomain
    deliver_to dummy
}}
submission tcp://127.0.0.1:{p[nodomains]} {{
    auth &ext_nodomains
    deliver_to dummy
}}
submission tcp://127.0.0.1:{p[default]} {{
    auth external
    deliver_to dummy
}}
submission tcp://127.0.0.1:{p[pam_helper]} {{
    auth pam {{
        use_helper yes
    }}
    deliver_to dummy
}}
submission tcp://127.0.0.1:{p[shadow_helper]} {{
    auth shadow {{
        use_helper yes
    }}
    deliver_to dummy
}}
submission tcp://127.0.0.1:{p[shadow]} {{
    auth shadow
    deliver_to dummy
}}
"""


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_external_and_helpers(shared: Path, unix_user: str) -> None:
    d = shared / "providers"
    d.mkdir()
    libexec = d / "libexec"
    libexec.mkdir()
    log = d / "calls"
    _helper(d / "helper", log)
    for name in ("maddy-auth-helper", "maddy-pam-helper", "maddy-shadow-helper"):
        _helper(libexec / name, d / name)
    p = {k: free_port() for k in ("strip", "perdomain", "nodomains", "default", "pam_helper", "shadow_helper",
                                  "shadow")}
    conf = d / "maddy.conf"
    conf.write_text(PROVIDERS.format(d=d, p=p))
    with running(conf, args=("-libexec", str(libexec))) as srv:
        srv.started()
        # without perdomain the domain is stripped and must be listed
        assert login(p["strip"], "alice@example.org", "alice-pw") == 235
        assert login(p["strip"], "Alice@EXAMPLE.org", "alice-pw") == 235  # auth_map_normalize auto
        assert login(p["strip"], "alice", "alice-pw") == 235
        assert login(p["strip"], "alice@example.org", "wrong") == 535
        assert _calls(log) == ["alice", "alice", "alice", "alice"]
        assert login(p["strip"], "alice@other.org", "alice-pw") == 535  # not asked: domain not listed
        assert login(p["strip"], "alice@example.org@example.org", "alice-pw") == 535
        assert len(_calls(log)) == 4
        # a helper error (exit 2) is a temporary failure; its stderr reaches the log
        assert login(p["strip"], "temp@example.org", "x") == 454
        srv.wait_for("backend down")
        log.unlink()

        # perdomain: the full address goes to the helper; the domain must be listed (any case)
        assert login(p["perdomain"], "alice@example.org", "alice-pw") == 235
        assert login(p["perdomain"], "alice", "alice-pw") == 535
        assert login(p["perdomain"], "alice@example.com", "alice-pw") == 535
        assert _calls(log) == ["alice@example.org"]
        log.unlink()

        # no `domains`: only bare usernames pass
        assert login(p["nodomains"], "alice", "alice-pw") == 235
        assert login(p["nodomains"], "alice@example.org", "alice-pw") == 535
        assert _calls(log) == ["alice"]

        # helpers found in the libexec directory
        assert login(p["default"], "alice", "alice-pw") == 235
        assert _calls(d / "maddy-auth-helper") == ["alice"]
        assert login(p["pam_helper"], "alice@example.org", "alice-pw") == 235
        assert login(p["pam_helper"], "alice@example.org", "bad") == 535
        assert _calls(d / "maddy-pam-helper") == ["alice@example.org", "alice@example.org"]
        assert login(p["shadow_helper"], "alice", "alice-pw") == 235
        assert _calls(d / "maddy-shadow-helper") == ["alice"]

        # auth.shadow reading /etc/shadow itself: only because this server keeps root
        assert login(p["shadow"], unix_user, TEST_PASSWORD) == 235
        assert login(p["shadow"], unix_user, "wrong") == 535
        assert login(p["shadow"], "no-such-user-here", TEST_PASSWORD) == 535
        assert "Traceback" not in srv.output


@pytest.fixture(scope="module")
def server_user() -> Iterator[str]:
    """An account for the server to drop to, in group `shadow` as pam_unix/auth.shadow need."""
    subprocess.run(["userdel", SERVER_USER], capture_output=True, check=False)
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", "-G", "shadow", SERVER_USER], check=True,
                   capture_output=True)
    try:
        yield SERVER_USER
    finally:
        subprocess.run(["userdel", SERVER_USER], capture_output=True, check=False)


def test_pam_and_shadow_after_dropping_root(shared: Path, unix_user: str, pam_service: Path,
                                            server_user: str) -> None:
    d = shared / "pam"
    d.mkdir()
    pam, shadow = free_port(), free_port()
    conf = d / "maddy.conf"
    conf.write_text(HEAD.format(d=d) + f"""
submission tcp://127.0.0.1:{pam} {{
    auth pam
    deliver_to dummy
}}
submission tcp://127.0.0.1:{shadow} {{
    auth shadow
    deliver_to dummy
}}
""")
    with running(conf, allow_root=False, env={"PYMADDY_USER": server_user}) as srv:
        srv.started()
        assert f'"user":"{server_user}"' in srv.output  # really dropped
        assert login(pam, unix_user, TEST_PASSWORD) == 235
        assert login(pam, unix_user, "wrong") == 535
        assert login(pam, "no-such-user-here", "x") == 535
        assert login(shadow, unix_user, TEST_PASSWORD) == 235
        assert login(shadow, unix_user, "wrong") == 535
        assert "Traceback" not in srv.output


def _uids(pid: int) -> tuple[int, str]:
    """(real uid, command line) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
    return uid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_pam_and_shadow_as_nobody_through_the_privileged_helper(shared: Path, unix_user: str,
                                                                pam_service: Path) -> None:
    """Dropped to `nobody`, the server cannot read /etc/shadow, and Linux-PAM's unix_chkpwd checks
    only its caller's own password; both work anyway, because a helper that kept root answers the
    checks (pymaddy/auth/privhelper.py) — and it is the only process of the server that is root."""
    d = shared / "pam-nobody"
    d.mkdir()
    pam, shadow = free_port(), free_port()
    conf = d / "maddy.conf"
    conf.write_text(HEAD.format(d=d) + f"""
submission tcp://127.0.0.1:{pam} {{
    auth pam
    deliver_to dummy
}}
submission tcp://127.0.0.1:{shadow} {{
    auth shadow
    deliver_to dummy
}}
""")
    with running(conf, allow_root=False, env={"PYMADDY_USER": "nobody"}) as srv:
        srv.started()
        assert "started the privileged password helper" in srv.output
        assert login(pam, unix_user, TEST_PASSWORD) == 235
        assert login(pam, unix_user, "wrong") == 535
        assert login(shadow, unix_user, TEST_PASSWORD) == 235
        assert login(shadow, unix_user, "wrong") == 535
        assert login(shadow, "no-such-user-here", TEST_PASSWORD) == 535
        server_uid, _ = _uids(srv.proc.pid)
        assert server_uid == pwd.getpwnam("nobody").pw_uid
        children = [int(p) for p in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()]
        helpers = [_uids(c) for c in children if "pymaddy.auth.privhelper" in _uids(c)[1]]
        assert [uid for uid, _ in helpers] == [0]
        assert "Traceback" not in srv.output


@pytest.mark.parametrize(
    ("block", "allow_root", "expected"),
    [
        ("auth.external e {\n helper /nonexistent/helper\n}", True, "auth.external: /nonexistent/helper doesn't exist"),
        ("auth.external e {\n}", True, "maddy-auth-helper doesn't exist"),
        ("auth.pam e {\n use_helper yes\n}", True, "pam: no helper binary (maddy-pam-helper) found in"),
        ("auth.shadow e {\n use_helper yes\n}", True, "shadow: no helper binary (maddy-shadow-helper) found"),
    ],
)
def test_start_refused(shared: Path, block: str, allow_root: bool, expected: str) -> None:
    d = Path(tempfile.mkdtemp(dir=shared))
    d.chmod(0o755)
    (d / "libexec").mkdir()
    conf = d / "maddy.conf"
    conf.write_text(HEAD.format(d=d) + block + f"\nsubmission tcp://127.0.0.1:{free_port()} {{\n auth &e\n"
                    " deliver_to dummy\n}\n")
    srv = Server(conf, args=("-libexec", str(d / "libexec")), allow_root=allow_root)
    try:
        assert srv.wait_exit() != 0
        assert expected in srv.output
        assert "Traceback" not in srv.output
    finally:
        with contextlib.suppress(Exception):
            srv.close()
