"""Pieces of auth.external / auth.pam / auth.shadow: domain rules, the helper protocol, PAM, shadow files.

Helpers are real programs (shell scripts); PAM runs through the real libpam with
throw-away services in /etc/pam.d (pam_permit / pam_deny), created and removed here.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymaddy.auth import external as ext
from pymaddy.mail.errors import AuthError, AuthTemporaryError

# maddy's TestCheckDomainAuth cases: (username, perdomain, domains) → account or None
DOMAIN_CASES = [
    ("username", False, None, "username"),
    ("username", False, ["example.org"], "username"),
    ("username@example.org", False, ["example.org"], "username"),
    ("username@example.com", False, ["example.org"], None),
    ("username", True, ["example.org"], None),
    ("username@example.com", True, ["example.org"], None),
    ("username@EXAMPLE.Org", True, ["exaMPle.org"], "username@EXAMPLE.Org"),
    ("username@example.org", True, ["example.org"], "username@example.org"),
    # and the rest of maddy's code paths
    ("username@example.org", False, None, None),  # a domain must be listed
    ("a@b@example.org", True, ["example.org"], None),
    ("a@b@example.org", False, ["example.org"], None),  # pymaddy: refused (maddy: "a", unchecked)
    ("username@", False, ["example.org"], "username"),  # empty domain counts as none
]


@pytest.mark.parametrize(("user", "perdomain", "domains", "account"), DOMAIN_CASES)
def test_check_domain_auth(user: str, perdomain: bool, domains: list[str] | None, account: str | None) -> None:
    assert ext.check_domain_auth(user, perdomain, domains) == account


def _script(tmp: Path, body: str) -> str:
    p = tmp / f"helper-{uuid.uuid4().hex[:6]}"
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)
    return str(p)


def test_helper_protocol(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    ok = _script(tmp_path, f'IFS= read -r u; IFS= read -r p; printf "%s|%s" "$u" "$p" > {seen}; exit 0\n')
    asyncio.run(ext.run_helper(ok, "alice", "pass word"))
    assert seen.read_text() == "alice|pass word"

    with pytest.raises(AuthError):
        asyncio.run(ext.run_helper(_script(tmp_path, "exit 1\n"), "a", "b"))
    with pytest.raises(AuthTemporaryError, match="exit status 3: ldap down"):
        asyncio.run(ext.run_helper(_script(tmp_path, "echo ldap down >&2; exit 3\n"), "a", "b"))
    with pytest.raises(AuthTemporaryError, match="signal 9"):
        asyncio.run(ext.run_helper(_script(tmp_path, "kill -9 $$\n"), "a", "b"))
    with pytest.raises(AuthTemporaryError, match="did not answer"):
        asyncio.run(ext.run_helper(_script(tmp_path, "exec sleep 30\n"), "a", "b", timeout=0.3))
    with pytest.raises(AuthTemporaryError, match="process start"):
        asyncio.run(ext.run_helper(str(tmp_path / "missing"), "a", "b"))
    # a LF would let the username choose the password line: refused before the helper runs
    with pytest.raises(AuthError):
        asyncio.run(ext.run_helper(ok, "alice\nother", "x"))
    with pytest.raises(AuthError):
        asyncio.run(ext.run_helper(ok, "alice", "x\x00y"))


def test_helper_that_ignores_stdin_and_exits(tmp_path: Path) -> None:
    """A helper may exit before reading everything: its status still counts."""
    asyncio.run(ext.run_helper(_script(tmp_path, "exit 0\n"), "a" * 100_000, "b"))


# -- shadow -------------------------------------------------------------------------------------


def test_parse_shadow_line() -> None:
    e = ext.parse_shadow_line("alice:$6$s$h:19000:0:99999:7:::\n")
    assert e == ext.ShadowEntry("alice", "$6$s$h", 19000, 99999, -1, -1)
    assert ext.parse_shadow_line("short:x") is None
    assert ext.parse_shadow_line("bad:x:notanumber::::::") is None
    old = ext.ShadowEntry("a", "h", last_change=100, max_age=10, inactivity=5, expiry=200)
    assert old.password_valid(114) and not old.password_valid(115)
    assert old.account_valid(199) and not old.account_valid(200)


def test_shadow_verify(tmp_path: Path) -> None:
    sha512 = ext.crypt_hash("right", "$6$saltsalt$")
    assert sha512 is not None and sha512.startswith("$6$saltsalt$")
    yescrypt = ext.crypt_hash("right", "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$")
    shadow = tmp_path / "shadow"
    lines = [
        f"alice:{sha512}:19000:0:99999:7:::",
        f"yes:{yescrypt or '*'}:19000:0:99999:7:::",
        f"locked:!{sha512}:19000:0:99999:7:::",
        "empty::19000:0:99999:7:::",
        f"expired:{sha512}:19000:0:99999:7::1:",
        "weird:$9$unknown$:19000:0:99999:7:::",
    ]
    shadow.write_text("\n".join(lines) + "\n")
    assert ext.shadow_verify("alice", "right", str(shadow)) is None
    assert ext.shadow_verify("alice", "wrong", str(shadow)) == "wrong password"
    if yescrypt is not None:  # Debian's default hash, when libcrypt has it
        assert ext.shadow_verify("yes", "right", str(shadow)) is None
        assert ext.shadow_verify("yes", "wrong", str(shadow)) == "wrong password"
    assert ext.shadow_verify("locked", "right", str(shadow)) == "locked password"
    assert ext.shadow_verify("empty", "", str(shadow)) == "null password"
    assert ext.shadow_verify("expired", "right", str(shadow)) == "account is expired"
    assert ext.shadow_verify("weird", "right", str(shadow)) == "unsupported password hash"
    assert ext.shadow_verify("nobody-here", "right", str(shadow)) == "no such user"
    with pytest.raises(OSError):
        ext.shadow_verify("alice", "right", str(tmp_path / "missing"))


# -- PAM through libpam ---------------------------------------------------------------------------


@pytest.fixture
def pam_services() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0 or not os.path.isdir("/etc/pam.d"):
        pytest.skip("needs root to write /etc/pam.d services")
    tag = uuid.uuid4().hex[:8]
    permit, deny = f"pymaddy-test-permit-{tag}", f"pymaddy-test-deny-{tag}"
    paths = [Path("/etc/pam.d") / permit, Path("/etc/pam.d") / deny]
    paths[0].write_text("auth required pam_permit.so\naccount required pam_permit.so\n")
    paths[1].write_text("auth required pam_deny.so\naccount required pam_permit.so\n")
    try:
        yield permit, deny
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def test_pam_check(pam_services: tuple[str, str]) -> None:
    permit, deny = pam_services
    assert ext.pam_check("anyone", "pw", service=permit) == (0, "")
    status, message = ext.pam_check("anyone", "pw", service=deny)
    assert status in ext.PAM_REFUSALS and message.startswith("pam_authenticate: ")
