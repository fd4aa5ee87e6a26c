"""Start the real server as a subprocess and watch it the way a user would.

Every wait is bounded and polls; nothing sleeps blindly. The command line is
`python -m pymaddy -config FILE run` once `pymaddy/__main__.py` exists (the
CLI), else the supervisor's development entry point; PYMADDY_E2E_ENTRY=cli or
=supervisor forces one.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_command(config: Path, extra: tuple[str, ...] = ()) -> list[str]:
    entry = os.environ.get("PYMADDY_E2E_ENTRY")
    if entry == "cli" or (entry is None and (ROOT / "pymaddy" / "__main__.py").exists()):
        return [sys.executable, "-m", "pymaddy", "-config", str(config), "run", *extra]
    return [sys.executable, "-m", "pymaddy.runtime.supervisor", "--config", str(config), *extra]


def wait_until(pred: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def metrics_config(tmp: Path, *ports: int, extra: str = "", block: str = "") -> str:
    """A config with one openmetrics endpoint on 127.0.0.1 ports."""
    addrs = " ".join(f"tcp://127.0.0.1:{p}" for p in ports)
    body = f" {{\n{block}\n}}" if block else ""
    return f"state_dir {tmp}/state\nruntime_dir {tmp}/run\n{extra}openmetrics {addrs}{body}\n"


class Server:
    """One server process with its stderr collected line by line."""

    def __init__(
        self,
        config: Path,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        watch: bool = False,
        allow_root: bool = True,
    ) -> None:
        self.config = config
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PYMADDY_ALLOW_ROOT")}
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
        e["PYMADDY_WATCH_CONFIG"] = "1" if watch else "0"
        if allow_root:
            e["PYMADDY_ALLOW_ROOT"] = "1"
        e.update(env or {})
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            server_command(config, args),
            cwd=config.parent,
            env=e,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in ln for ln in self.lines)

    def wait_for(self, text: str, *, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Until `text` appears in `count` stderr lines; fails with the output so far."""
        deadline = time.monotonic() + timeout
        seen, pos = 0, 0
        with self._cond:
            while True:
                seen += sum(text in ln for ln in self.lines[pos:])
                pos = len(self.lines)
                if seen >= count:
                    return
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{text!r} x{count} not seen; stderr:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.1))

    def started(self, timeout: float = DEFAULT_TIMEOUT) -> Server:
        self.wait_for("server started", timeout=timeout)
        return self

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit within {timeout}s; stderr:\n{self.output}") from None
        self._reader.join(2)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def running(config: Path, **kw: object) -> Iterator[Server]:
    srv = Server(config, **kw)  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.close()


def get(port: int, path: str = "/metrics", timeout: float = 5.0) -> tuple[int, str]:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[str] = []

    def wait_for(self, state: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The next message containing `state` (messages before it are kept in `messages`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {state} notification; got {self.messages}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(msg)
            if state in msg.split("\n"):
                return msg

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(self.address)
