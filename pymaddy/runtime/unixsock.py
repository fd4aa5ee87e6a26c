"""A unix-socket server that owns its path: the base of the processes' local channels
(storage/updatepipe.py, queue/control.py).

The socket is created 0600 (only the server user and root can talk to it). A newer
generation or process may have replaced the path by the time this one stops, so
stop() removes the file only if it is still the one this server created (same inode).

A socket address holds at most 107 bytes of path, and state under a deep directory
(or a long runtime_dir) exceeds it: `bind`/`connect` then go through the directory's
descriptor (/proc/self/fd/N/name), which the kernel resolves like the full path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

MAX_LINE = 4096
MAX_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def _via_dir(path: str, op: Callable[[str], None]) -> None:
    if len(os.fsencode(path)) <= MAX_SUN_PATH:
        op(path)
        return
    d, name = os.path.split(path)
    fd = os.open(d or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        op(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


def bind(sock: socket.socket, path: str) -> None:
    _via_dir(path, sock.bind)


def connect(sock: socket.socket, path: str) -> None:
    _via_dir(path, sock.connect)


class UnixSocketServer:
    limit = MAX_LINE  # longest line a client may send

    def __init__(self, path: str) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._ino = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket, or the one of the generation this one replaces
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind(sock, self.path)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=self.limit)
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


class Peers:
    """Kept-open connections to other local processes' sockets, written without ever blocking.

    A write that finds the peer's buffer full is dropped whole (the stream stays intact; these
    channels carry hints whose loss costs a poll), a connection the peer closed is opened again
    once, and a line written by halves ends its connection (the reader discards the fragment).
    """

    RESCAN = 1.0  # seconds between looks for peers that started or went away

    def __init__(self, discover: Callable[[], list[str]] | None = None) -> None:
        self.conns: dict[str, socket.socket] = {}
        self.discover = discover  # the peers' socket paths, for broadcast()
        self.peers: list[str] = []
        self._scanned = -self.RESCAN

    def broadcast(self, data: bytes) -> None:
        """`data` to every discovered peer (looked for again at most every RESCAN seconds)."""
        now = time.monotonic()
        if self.discover is not None and now - self._scanned >= self.RESCAN:
            self._scanned = now
            self.peers = self.discover()
            self.keep_only(self.peers)
        for p in self.peers:
            self.send(p, data)

    def rescan_soon(self) -> None:
        """A peer said it started: include it in the next broadcast."""
        self._scanned = -self.RESCAN

    def send(self, path: str, data: bytes, retry: bool = True) -> bool:
        s = self.conns.get(path)
        if s is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                connect(s, path)
            except OSError:
                s.close()
                return False
            self.conns[path] = s
        try:
            n = s.send(data)
        except BlockingIOError:
            return False
        except OSError:
            self.drop(path)  # the peer restarted or closed an idle connection
            return self.send(path, data, retry=False) if retry else False
        if n < len(data):
            self.drop(path)
            return False
        return True

    def keep_only(self, paths: list[str]) -> None:
        for gone in set(self.conns) - set(paths):
            self.drop(gone)

    def drop(self, path: str) -> None:
        s = self.conns.pop(path, None)
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        for p in list(self.conns):
            self.drop(p)
