"""Change notices between processes sharing one imapsql database.

The server listens on a unix socket (RUNTIME/sql-<sha1 of DSN>.sock, where
maddy keeps its own); management commands run in other processes connect and
write one JSON object per line for every change they commit, so IMAP sessions
in IDLE hear of it at once. The notices only wake sessions up: the database
stays the truth, and a lost notice costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterable
from typing import Any

from pymaddy.runtime.unixsock import UnixSocketServer


def encode(update: Any) -> bytes:
    return json.dumps({"kind": update.kind, "account": update.account, "mailbox": update.mailbox,
                       "uid": update.uid}).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("account"), str) or not isinstance(obj.get("kind"), str):
        return None
    return obj


def push(path: str, updates: Iterable[Any], timeout: float = 1.0) -> bool:
    """Send notices to the server listening at `path`; False when nobody listens (not an error)."""
    data = b"".join(encode(u) for u in updates)
    if not data:
        return True
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(data)
    except OSError:
        return False
    return True


class Listener(UnixSocketServer):
    """The server end: hands each well-formed notice to `on_update`."""

    def __init__(self, path: str, on_update: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(path)
        self.on_update = on_update

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), 30)
                except (ValueError, asyncio.LimitOverrunError, TimeoutError):
                    return
                if not line:
                    return
                obj = decode(line)
                if obj is not None:
                    self.on_update(obj)
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
