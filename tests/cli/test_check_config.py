"""`pymaddy check-config` as a user runs it: a real process, its exit code and its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FIX = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "maddy-upstream"


def pymaddy(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pymaddy", *args],
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


def test_valid_default_config() -> None:
    r = pymaddy("-config", str(FIX / "default" / "maddy.conf"), "check-config")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "No errors detected\n")


def test_verify_config_alias_and_flag_after_command() -> None:
    r = pymaddy("verify-config", "--config", str(FIX / "default" / "maddy.conf"))
    assert r.returncode == 0


def test_every_error_reported_with_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "maddy.conf"
    conf.write_text(
        "hostname mx.example.org\n"
        "tls off\n"
        "smtp tcp://127.0.0.1:25 {\n"
        "    max_message_size 32k\n"  # lower-case suffix: maddy refuses it
        "    read_timeout 1d\n"  # no 'd' unit in Go durations
        "    deliver_to &nowhere\n"
        "}\n"
        "table.chain unused_one {\n"
        "    step identity\n"
        "}\n"
        "frobnicate yes\n"
    )
    r = pymaddy("-config", str(conf), "check-config")
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines == [
        f"{conf}:4: unknown unit suffix: k",
        f'{conf}:5: time: invalid duration "1d"',
        f"{conf}:6: unknown configuration block: nowhere",
        f"{conf}:8: unused configuration block unused_one (table.chain)",
        f"{conf}:11: unknown module or global directive: frobnicate",
        "5 errors found",
    ]
    assert "Traceback" not in r.stderr


def test_syntax_only_skips_module_validation(tmp_path: Path) -> None:
    conf = tmp_path / "maddy.conf"
    conf.write_text("frobnicate yes\n")
    assert pymaddy("-config", str(conf), "check-config", "--syntax-only").returncode == 0
    conf.write_text("a {\n")
    r = pymaddy("-config", str(conf), "check-config", "--syntax-only")
    assert r.returncode == 2
    assert r.stderr.startswith(f"{conf}:1: Error during parsing: unexpected EOF when looking for }}")


def test_print_shows_expanded_config_with_origins(tmp_path: Path) -> None:
    (tmp_path / "tls.conf").write_text("tls off\n")
    conf = tmp_path / "maddy.conf"
    conf.write_text(
        "$(h) = mx.{env:DOMAIN}\nhostname $(h)\nimport tls\n"
        "(s) {\n  deliver_to dummy\n}\n"
        "smtp tcp://127.0.0.1:25 {\n  import s\n}\n"
    )
    r = pymaddy("-config", str(conf), "check-config", "--print", env={"DOMAIN": "example.org"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"hostname mx.example.org  # {conf}:2",
        f"tls off  # {tmp_path / 'tls.conf'}:1",
        f"smtp tcp://127.0.0.1:25 {{  # {conf}:7",
        f"    deliver_to dummy  # {conf}:5",
        "}",
    ]


def test_default_path_and_env(tmp_path: Path) -> None:
    r = pymaddy("check-config", env={"MADDY_CONFIG": ""})
    assert r.returncode == 2
    assert "/etc/maddy/maddy.conf" in r.stderr
    conf = tmp_path / "x.conf"
    conf.write_text("hostname a.org\ntls off\nsmtp tcp://127.0.0.1:25 {\n deliver_to dummy\n}\n")
    assert pymaddy("check-config", env={"MADDY_CONFIG": str(conf)}).returncode == 0


def test_binary_garbage_gets_an_error_not_a_traceback(tmp_path: Path) -> None:
    conf = tmp_path / "maddy.conf"
    conf.write_bytes(b"\xff\xfe\x00garbage {\n\x00\x01}")
    r = pymaddy("-config", str(conf), "check-config")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith(str(conf))


def test_version_and_help() -> None:
    r = pymaddy("version")
    assert r.returncode == 0 and r.stdout.startswith("pymaddy ") and "default config: /etc/maddy/maddy.conf" in r.stdout
    assert pymaddy("--help").returncode == 0
    bad = pymaddy("no-such-command")
    assert bad.returncode == 2 and "Error:" in bad.stderr
