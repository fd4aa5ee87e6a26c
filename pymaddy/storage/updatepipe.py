"""Change notices between processes sharing one imapsql database.

The server listens on a unix socket (RUNTIME/sql-<sha1 of DSN>.sock, where
maddy keeps its own), and each worker process (runtime/workers.py) on
RUNTIME/sql-<sha1>.<pid>.sock. Management commands connect to every one of
them and write one JSON object per line for every change they commit; server
processes keep connections open to each other (`Fanout`). IMAP sessions in
IDLE hear of a change at once. The notices only wake sessions up: the database
stays the truth, and a lost notice costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import glob
import json
import socket
from collections.abc import Callable, Iterable
from typing import Any

from pymaddy.runtime import unixsock
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


def worker_path(path: str, pid: int) -> str:
    """A worker process's socket next to the server's `path`."""
    return f"{path.removesuffix('.sock')}.{pid}.sock"


def peer_paths(path: str) -> list[str]:
    """The sockets of every process serving the database whose server socket is `path`."""
    stem = glob.escape(path.removesuffix(".sock"))
    return [path, *sorted(glob.glob(stem + ".*.sock"))]


def push(path: str, updates: Iterable[Any], timeout: float = 1.0) -> bool:
    """Send notices to every server process of `path`; False when nobody listens (not an error)."""
    data = b"".join(encode(u) for u in updates)
    if not data:
        return True
    sent = False
    for p in peer_paths(path):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                unixsock.connect(s, p)
                s.sendall(data)
        except OSError:
            continue
        sent = True
    return sent


class Fanout:
    """A server process's notices to the other processes of the same database.

    Connections stay open; sending never blocks the event loop. A peer too busy to
    read (its socket buffer full) misses the notice and its sessions poll instead.
    """

    def __init__(self, path: str, own: str) -> None:
        self.conns = unixsock.Peers(lambda: [p for p in peer_paths(path) if p != own])

    def send(self, updates: Iterable[Any]) -> None:
        data = b"".join(encode(u) for u in updates)
        if data:
            self.conns.broadcast(data)

    def close(self) -> None:
        self.conns.close()


IDLE_TIMEOUT = 3600.0  # a peer's kept-open connection; it reconnects when closed


class Listener(UnixSocketServer):
    """The server end: hands each well-formed notice to `on_update`."""

    def __init__(self, path: str, on_update: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(path)
        self.on_update = on_update

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
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
