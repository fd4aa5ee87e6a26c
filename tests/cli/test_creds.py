"""`pymaddy creds …` and `pymaddy hash` as real processes against maddy's default credentials setup."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from pymaddy.auth import hashes

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (ROOT / "pymaddy" / "tables" / "sql.py").exists(), reason="table.sql_table is not implemented yet"
)

CONF = """state_dir {tmp}/state
runtime_dir {tmp}/run

auth.pass_table local_authdb {{
    table sql_table {{
        driver sqlite3
        dsn credentials.db
        table_name passwords
    }}
}}

auth.plain_separate other {{
}}
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "maddy.conf"
    path.write_text(CONF.format(tmp=tmp_path))
    return path


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MADDY_CFGBLOCK", "MADDY_CONFIG")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def cli(conf: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pymaddy", "-config", str(conf), *args],
        input=stdin, capture_output=True, check=False, text=True, timeout=60, env=_env(env), cwd=conf.parent,
    )


def users(conf: Path) -> list[str]:
    r = cli(conf, "creds", "list")
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def stored(tmp: Path) -> dict[str, str]:
    with sqlite3.connect(tmp / "state" / "credentials.db") as db:
        return dict(db.execute("SELECT key, value FROM passwords").fetchall())


def auth(conf: Path, monkeypatch: pytest.MonkeyPatch, username: str, password: str) -> bool:
    """Authenticate through the configured block, as the server would."""
    from pymaddy.auth.pass_table import PassTable
    from pymaddy.cli.blocks import open_block
    from pymaddy.mail.errors import AuthError

    monkeypatch.chdir(conf.parent)  # open_block chdirs into state_dir; restored after the test
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))

    async def main() -> bool:
        async with open_block(str(conf), "local_authdb", PassTable) as db:
            try:
                await db.auth_plain(username, password)
            except AuthError:
                return False
            return True

    return asyncio.run(main())


def test_list_empty(conf: Path) -> None:
    r = cli(conf, "creds", "list")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "No users.\n")
    assert (conf.parent / "state" / "credentials.db").exists()  # relative dsn → state_dir


def test_create_list_duplicate(conf: Path) -> None:
    r = cli(conf, "creds", "create", "-p", "secret", "Alice@Example.org")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = cli(conf, "creds", "create", "--password", "other", "alice@example.org")
    assert r.returncode == 1
    assert r.stderr == "Error: credentials for alice@example.org already exist\n"
    assert users(conf) == ["alice@example.org"]
    value = stored(conf.parent)["alice@example.org"]
    assert value.startswith("bcrypt:$2a$10$")
    assert bcrypt.checkpw(b"secret", value.removeprefix("bcrypt:").encode())


def test_parallel_creates_all_succeed(conf: Path) -> None:
    names = [f"user{i}@example.org" for i in range(5)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pymaddy", "-config", str(conf), "creds", "create", "-p", "pw", n],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=conf.parent,
        )
        for n in names
    ]
    results = [(p.wait(timeout=60), p.communicate()) for p in procs]
    for code, (_out, err) in results:
        assert code == 0, err
    assert sorted(users(conf)) == names


def test_password_from_stdin_and_prompts(conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = cli(conf, "creds", "create", "bob", stdin="from-stdin\n")
    assert r.returncode == 0, r.stderr
    assert "Enter password for new user: " in r.stderr
    assert auth(conf, monkeypatch, "bob", "from-stdin")
    assert auth(conf, monkeypatch, "BOB", "from-stdin")
    assert not auth(conf, monkeypatch, "bob", "from-stdin\n")
    r = cli(conf, "creds", "password", "bob", stdin="changed\r\n")
    assert r.returncode == 0, r.stderr
    assert "Enter new password: " in r.stderr
    assert auth(conf, monkeypatch, "bob", "changed")
    assert not auth(conf, monkeypatch, "bob", "from-stdin")
    r = cli(conf, "creds", "password", "-p", "again", "bob")
    assert r.returncode == 0, r.stderr
    assert auth(conf, monkeypatch, "bob", "again")


def test_argon2_create(conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = cli(conf, "creds", "create", "--hash", "argon2", "-p", "pw", "carol")
    assert r.returncode == 0, r.stderr
    assert stored(conf.parent)["carol"].startswith("argon2:")
    assert auth(conf, monkeypatch, "carol", "pw")
    r = cli(conf, "creds", "create", "--hash", "md5", "-p", "pw", "dave")
    assert r.returncode == 1
    assert "unknown hash function: md5" in r.stderr
    r = cli(conf, "creds", "create", "--bcrypt-cost", "4", "-p", "pw", "erin")
    assert r.returncode == 0, r.stderr
    assert stored(conf.parent)["erin"].startswith("bcrypt:$2a$04$")


def test_remove(conf: Path) -> None:
    assert cli(conf, "creds", "create", "-p", "pw", "frank").returncode == 0
    r = cli(conf, "creds", "remove", "frank", stdin="n\n")
    assert r.returncode == 1
    assert "Are you sure you want to delete this user account? [y/N]: " in r.stderr
    assert r.stderr.endswith("Error: cancelled\n")
    assert users(conf) == ["frank"]
    r = cli(conf, "creds", "remove", "frank", stdin="y\n")
    assert r.returncode == 0, r.stderr
    assert users(conf) == []
    assert cli(conf, "creds", "create", "-p", "pw", "frank").returncode == 0
    assert cli(conf, "creds", "remove", "-y", "frank").returncode == 0
    assert users(conf) == []


def test_block_selection_errors(conf: Path) -> None:
    r = cli(conf, "creds", "list", "--cfg-block", "nope")
    assert (r.returncode, r.stderr) == (2, "Error: unknown configuration block: nope\n")
    r = cli(conf, "creds", "list", env={"MADDY_CFGBLOCK": "nope2"})
    assert (r.returncode, r.stderr) == (2, "Error: unknown configuration block: nope2\n")
    r = cli(conf, "creds", "list", "--cfg-block", "other")
    assert (r.returncode, r.stderr) == (2, "Error: configuration block other is not a local credentials store\n")
    r = cli(conf, "creds", "create", "-p", "x")
    assert (r.returncode, r.stderr) == (2, "Error: USERNAME is required\n")
    r = cli(conf.parent / "missing.conf", "creds", "list")
    assert r.returncode == 2
    assert r.stderr.startswith("Error: failed to open config:")


def test_errors_in_unrelated_blocks_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "maddy.conf"
    path.write_text(CONF.format(tmp=tmp_path) + "\nauth.plain_separate broken {\n    bogus_directive 1\n}\n")
    assert cli(path, "creds", "list").returncode == 0
    r = cli(path, "creds", "list", "--cfg-block", "broken")
    assert r.returncode == 1
    assert "bogus_directive" in r.stderr


def test_maddy_written_database_authenticates(tmp_path: Path, conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A credentials.db as maddy creates it: sql_table's schema, a Go-style `$2a$` bcrypt value.
    (tmp_path / "state").mkdir(mode=0o700)
    with sqlite3.connect(tmp_path / "state" / "credentials.db") as db:
        db.execute("CREATE TABLE passwords (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)")
        value = "bcrypt:" + bcrypt.hashpw(b"maddy-pass", bcrypt.gensalt(4, prefix=b"2a")).decode()
        db.execute("INSERT INTO passwords VALUES (?, ?)", ("postmaster@example.org", value))
        go_argon2 = (
            "argon2:1:8:1:U0FBQUFBTFQ=:KHUshl3DcpHR3AoVd28ZeBGmZ1Fj1gwJgNn98Ia8DAvGHqI0BvFOMJPxtaAfO8F+"
            "qomm2O3h0P0yV50QGwXI/Q=="
        )
        db.execute("INSERT INTO passwords VALUES (?, ?)", ("go-argon2", go_argon2))
    db.close()
    assert users(conf) == ["go-argon2", "postmaster@example.org"]
    assert auth(conf, monkeypatch, "postmaster@example.org", "maddy-pass")
    assert auth(conf, monkeypatch, "Postmaster@Example.ORG", "maddy-pass")
    assert not auth(conf, monkeypatch, "postmaster@example.org", "wrong")
    assert auth(conf, monkeypatch, "go-argon2", "password")


# -- pymaddy hash -----------------------------------------------------------------------------------


def test_hash_command(conf: Path) -> None:
    r = cli(conf, "hash", "-p", "secret", "--bcrypt-cost", "4")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("bcrypt:$2a$04$")
    assert hashes.check("secret", r.stdout.strip())
    r = cli(conf, "hash", "--hash", "argon2", stdin="pw\n")
    assert r.returncode == 0
    assert r.stdout.startswith("argon2:2:1024:1:")
    assert hashes.check("pw", r.stdout.strip())
    r = cli(conf, "hash", "--hash", "argon2", "--argon2-time", "1", "--argon2-memory", "64",
            "--argon2-threads", "2", "-p", " pw")
    assert r.stdout.startswith("argon2:1:64:2:")
    assert "WARNING: There is leading/trailing whitespace in the string" in r.stderr
    r = cli(conf, "hash", "-p", "", "--bcrypt-cost", "4")
    assert "WARNING: This is the hash of an empty string" in r.stderr
    r = cli(conf, "hash", "-p", "x", "--bcrypt-cost", "3")
    assert (r.returncode, r.stderr) == (2, "Error: too small bcrypt cost\n")
    r = cli(conf, "hash", "-p", "x", "--bcrypt-cost", "32")
    assert (r.returncode, r.stderr) == (2, "Error: too big bcrypt cost\n")
    r = cli(conf, "hash", "-p", "x", "--hash", "sha256")
    assert r.returncode == 2
    assert r.stderr.startswith("Error: Unknown hash function, available:")
