"""What every bench/ script needs: loopback ports, /proc readings, the server's environment.

Imported by the bench scripts as `benchlib` (they run as `python3 bench/NAME.py`, which puts this
directory on sys.path).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def vm_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """user+sys CPU time of a process so far (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def server_env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYMADDY_ALLOW_ROOT"] = "1"
    e["PYMADDY_WATCH_CONFIG"] = "0"
    return e


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "—" if v is None else format(v, spec)
