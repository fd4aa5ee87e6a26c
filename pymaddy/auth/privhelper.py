"""A password checker that keeps root, so the server itself never reads /etc/shadow.

pymaddy drops root after binding its ports. `auth.shadow` and `auth.pam` (pam_unix) need to
read /etc/shadow, which the server user must not be able to do. When the config uses either
of them and the server is about to drop root, the supervisor starts this helper first: a
separate process that stays root and does exactly one thing, answer "does this password belong
to this system user?", over a socketpair only the server holds (privilege separation, as
OpenSSH does it). It reads no config, opens no network socket, and exits when the server's end
of the socket closes.

Protocol: SOCK_SEQPACKET messages, one JSON object each.
    request  {"id": N, "op": "shadow" | "pam", "user": "...", "pass": "...", "service": "maddy"}
    reply    {"id": N, "ok": true} | {"id": N, "ok": false, "temporary": bool, "reason": "..."}

Invariants:
- Only the verdict leaves the helper: never a hash, never file contents.
- Malformed requests get a refusal, never a crash; the helper serves until its socket closes.
- At most WORKERS checks run at once; each is bounded by the libraries' own work (no I/O
  besides /etc/shadow and the PAM stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["PrivHelperClient", "client", "spawn"]

FD_ENV = "PYMADDY_PRIVHELPER_FD"
MAX_MSG = 8192
WORKERS = 2
TIMEOUT = 30.0

_client: PrivHelperClient | None = None


# -- the helper process ------------------------------------------------------------------------------


def _check(req: dict[str, Any]) -> dict[str, Any]:
    from pymaddy.auth.external import PAM_REFUSALS, PAM_SUCCESS, pam_check, shadow_verify

    user, password, op = req.get("user"), req.get("pass"), req.get("op")
    if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
        return {"ok": False, "temporary": False, "reason": "malformed request"}
    if any(c in user + password for c in "\n\x00") or ":" in user or len(user) > 256 or len(password) > 4096:
        return {"ok": False, "temporary": False, "reason": "invalid username or password"}
    try:
        if op == "shadow":
            reason = shadow_verify(user, password)
            return {"ok": True} if reason is None else {"ok": False, "temporary": False, "reason": reason}
        if op == "pam":
            service = req.get("service")
            status, message = pam_check(user, password, service if isinstance(service, str) and service else "maddy")
            if status == PAM_SUCCESS:
                return {"ok": True}
            return {"ok": False, "temporary": status not in PAM_REFUSALS, "reason": message}
    except OSError as e:
        return {"ok": False, "temporary": True, "reason": e.strerror or str(e)}
    return {"ok": False, "temporary": False, "reason": f"unknown operation {op!r}"}


def _serve(sock: socket.socket) -> None:
    lock = threading.Lock()

    def answer(req: dict[str, Any]) -> None:
        try:
            reply = _check(req)
        except Exception as e:  # a bug must not take the helper down
            reply = {"ok": False, "temporary": True, "reason": f"helper error: {type(e).__name__}"}
        reply["id"] = req.get("id")
        with lock, contextlib.suppress(OSError):
            sock.send(json.dumps(reply).encode())

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        while True:
            try:
                data = sock.recv(MAX_MSG)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return  # the server is gone
            try:
                req = json.loads(data)
            except ValueError:
                req = None
            if not isinstance(req, dict):
                continue
            pool.submit(answer, req)


def main() -> int:
    fd = int(os.environ.get(FD_ENV, "-1"))
    if fd < 0:
        print("pymaddy.auth.privhelper is started by `pymaddy run`, not by hand", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=fd)
    with contextlib.suppress(KeyboardInterrupt):
        _serve(sock)
    return 0


# -- the server's side -------------------------------------------------------------------------------


def spawn() -> bool:
    """Start the helper (as the current, root, user); called before the privilege drop.
    False when it could not be started (the modules then say what they cannot do)."""
    global _client
    if _client is not None:
        return True
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ, **{FD_ENV: str(theirs.fileno())})
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pymaddy.auth.privhelper"],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C to the server's group must not kill it first
        )
    except OSError:
        ours.close()
        theirs.close()
        return False
    theirs.close()
    _client = PrivHelperClient(ours, proc)
    return True


def client() -> PrivHelperClient | None:
    """The helper, if this process started one."""
    return _client


class PrivHelperClient:
    """Requests to the helper from the event loop; replies matched by id."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.proc = proc
        self.sock.setblocking(False)
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MSG)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._fail_all("the password helper exited")
                return
            with contextlib.suppress(ValueError):
                reply = json.loads(data)
                if isinstance(reply, dict):
                    fut = self._waiting.pop(reply.get("id", -1), None)
                    if fut is not None and not fut.done():
                        fut.set_result(reply)

    def _fail_all(self, why: str) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result({"ok": False, "temporary": True, "reason": why})
        self._waiting.clear()

    async def check(self, op: str, user: str, password: str, service: str = "") -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self.sock.fileno())
            loop.add_reader(self.sock.fileno(), self._on_readable)
            self._loop = loop
        self._next += 1
        rid = self._next
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting[rid] = fut
        msg = json.dumps({"id": rid, "op": op, "user": user, "pass": password, "service": service}).encode()
        try:
            self.sock.send(msg)
        except OSError as e:
            self._waiting.pop(rid, None)
            return {"ok": False, "temporary": True, "reason": f"password helper unreachable: {e.strerror or e}"}
        try:
            return await asyncio.wait_for(fut, TIMEOUT)
        except TimeoutError:
            self._waiting.pop(rid, None)
            return {"ok": False, "temporary": True, "reason": "password helper timed out"}


if __name__ == "__main__":
    sys.exit(main())
