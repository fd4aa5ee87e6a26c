"""What every bench/ script needs: loopback ports, /proc readings, the server's environment.

Imported by the bench scripts as `benchlib` (they run as `python3 bench/NAME.py`, which puts this
directory on sys.path).
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
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


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (pymaddy's worker processes)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:  # threads come and go
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def server_env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYMADDY_ALLOW_ROOT"] = "1"
    e["PYMADDY_WATCH_CONFIG"] = "0"
    return e


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "—" if v is None else format(v, spec)


class PymaddyProcess:
    """`python -m pymaddy -config CONF run [ARGS]` in `tmp`, its stderr collected by a thread.

    `cli(...)` runs a management command on the same config first (accounts, credentials);
    `start()` returns once the server logs "server started" or raises with the log's tail."""

    def __init__(self, conf: Path, tmp: Path, *, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.conf = conf
        self.tmp = tmp
        self.args = list(args)
        self.env = env if env is not None else server_env()
        self.lines: collections.deque[str] = collections.deque(maxlen=1000)  # a long run logs a lot
        self._started = threading.Event()
        self.proc: subprocess.Popen[str] | None = None

    def cli(self, *args: str, timeout: float = 120) -> None:
        r = subprocess.run([sys.executable, "-m", "pymaddy", "-config", str(self.conf), *args],
                           capture_output=True, text=True, env=self.env, timeout=timeout, check=False, cwd=self.tmp)
        if r.returncode != 0:
            raise RuntimeError(f"pymaddy {' '.join(args[:3])} failed: {r.stderr.strip()[-300:]}")

    def start(self, timeout: float = 30) -> None:
        cmd = [sys.executable, "-m", "pymaddy", "-config", str(self.conf), "run", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._started.wait(timeout):
            self.close()
            raise RuntimeError(f"pymaddy: no 'server started' within {timeout:.0f} s:\n" + self.log_tail())

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "server started" in line:
                self._started.set()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(list(self.lines)[-n:])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

