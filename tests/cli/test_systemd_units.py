"""The shipped unit files pass `systemd-analyze verify` (installed by .ci/run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


NO_SYSTEMD = shutil.which("systemd-analyze") is None
CASES = [("pymaddy.service", "pymaddy.service"), ("pymaddy@.service", "pymaddy@mx.service")]


@pytest.mark.skipif(NO_SYSTEMD, reason="systemd-analyze not installed (.ci/run installs it)")
@pytest.mark.parametrize(("unit", "name"), CASES)
def test_unit_verifies(tmp_path: Path, unit: str, name: str) -> None:
    exe = shutil.which("pymaddy", path=str(Path(sys.executable).parent)) or shutil.which("pymaddy")
    assert exe, "pymaddy is installed (pip install -e .)"
    text = (UNITS / unit).read_text()
    assert "ExecReload=/bin/kill -USR2 $MAINPID" in text and "Type=notify" in text and "User=maddy" in text
    # verify checks that ExecStart exists; point it at this checkout's installed script.
    (tmp_path / name).write_text(text.replace("/usr/local/bin/pymaddy", exe))
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if name in ln or "pymaddy" in ln]
    assert r.returncode == 0 and problems == [], r.stdout + r.stderr
