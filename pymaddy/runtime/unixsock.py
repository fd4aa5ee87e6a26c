"""A unix-socket server that owns its path: the base of the processes' local channels
(storage/updatepipe.py, queue/control.py).

The socket is created 0600 (only the server user and root can talk to it). A newer
generation or process may have replaced the path by the time this one stops, so
stop() removes the file only if it is still the one this server created (same inode).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

MAX_LINE = 4096


class UnixSocketServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._ino = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket, or the one of the generation this one replaces
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_LINE)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
            self._ino = os.stat(self.path).st_ino

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
            self._server = None
        with contextlib.suppress(OSError):
            if self._ino and os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
