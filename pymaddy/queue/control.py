"""The control channel between `pymaddy queue` and a running server.

The queue engine of a directory listens on `RUNTIME/queue-<hash of the directory's
real path>.sock` (mode 0600). A client writes one JSON request line and reads one
JSON reply line:

    {"op": "flush", "id": "1a2b3c4d"}  →  {"ok": true, "count": 1}
    {"op": "flush"}                    →  {"ok": true, "count": 12}   (every entry)
    {"op": "remove", "id": "1a2b3c4d"} →  {"ok": false, "error": "no such queue entry"}

(updatepipe.py only carries one-way notices; a command needs an answer.)
No socket, or nobody listening, means no server runs that queue: the CLI then
works on the files directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from pymaddy.runtime import unixsock
from pymaddy.runtime.unixsock import MAX_LINE, UnixSocketServer

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(runtime_dir: str, location: str) -> str:
    key = hashlib.sha1(os.path.realpath(location).encode(), usedforsecurity=False).hexdigest()[:16]
    return os.path.join(runtime_dir, f"queue-{key}.sock")


class NotRunning(Exception):
    """No server listens for this queue."""


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request; raises NotRunning when nobody listens."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            unixsock.connect(s, path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < MAX_LINE:
                chunk = s.recv(MAX_LINE)
                if not chunk:
                    break
                buf += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning from None
    except OSError as e:
        raise NotRunning(str(e)) from None
    try:
        reply = json.loads(buf)
    except ValueError:
        return {"ok": False, "error": "bad reply from the server"}
    return reply if isinstance(reply, dict) else {"ok": False, "error": "bad reply from the server"}


class Server(UnixSocketServer):
    """The engine's end of the channel."""

    def __init__(self, path: str, handler: Handler) -> None:
        super().__init__(path)
        self.handler = handler

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests, one JSON object per line, until the client closes. A request with
        "noreply" (a worker handing over entries, several per connection) gets no answer."""
        timeout: float | None = 10  # the CLI's one request; a worker's connection stays open
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), timeout)
                if not line:
                    return
                try:
                    req = json.loads(line)
                except ValueError:
                    req = None
                if isinstance(req, dict):
                    try:
                        reply = await self.handler(req)
                    except Exception as e:
                        reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
                    if req.get("noreply"):
                        timeout = None
                        continue
                else:
                    reply = {"ok": False, "error": "malformed request"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), 10)
        except (ConnectionError, OSError, TimeoutError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


class Handoff:
    """A worker process's channel to the supervisor's engine: "this entry is committed,
    deliver it". Never blocks the event loop; an entry whose notice is lost is found by the
    engine's periodic scan (Config.rescan) — it is on disk either way."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = unixsock.Peers()

    def send(self, entry_id: str, helo: str) -> bool:
        data = json.dumps({"op": "new", "id": entry_id, "helo": helo, "noreply": True}).encode() + b"\n"
        return self.conn.send(self.path, data)

    def close(self) -> None:
        self.conn.close()
