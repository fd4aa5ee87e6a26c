"""Listening sockets owned by the supervisor, handed over across reloads.

Why: a reload must not close port 25 even for a millisecond. The supervisor
keeps one master socket per address; every generation that listens there
gets a `dup()` of it. An endpoint closing its dup (stop accepting) leaves the
master listening, and connections that arrive meanwhile wait in the kernel's
backlog until the next generation accepts them. Masters are closed only when
no generation holds them any more.

Keys: tcp:// and tls:// share one key per (IP, port) (TLS is a protocol on
top of a TCP socket); a unix socket is keyed by its absolute path. Port 0
sockets are distinct per use (the n-th `:0` of a host in a generation) so two
endpoints never share an ephemeral socket by accident, yet a reload keeps
the port the kernel picked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field

from pymaddy.config.values import Endpoint as Address

BACKLOG = 1024

Key = tuple[str, ...]


class ListenError(OSError):
    """An address that cannot be listened on; the message names it."""


@dataclass(eq=False)
class Listener:
    """What an endpoint serves on: the configured address and a socket it owns (a dup).

    The dup shares its file description (and O_NONBLOCK) with the supervisor's
    master and with other generations' dups: never make it blocking.
    """

    address: Address
    sock: socket.socket

    @property
    def bound(self) -> str:
        """The address as configured, with the port the kernel picked for `:0` filled in."""
        a = self.address
        if a.is_unix or a.port != "0":
            return str(a)
        port = self.sock.getsockname()[1]
        h = f"[{a.host}]" if ":" in a.host else a.host
        return f"{a.scheme}://{h}:{port}"


@dataclass(eq=False)
class _Master:
    key: Key
    sock: socket.socket
    path: str | None = None  # unix sockets: the file we created (removed on close)
    holders: set[int] = field(default_factory=set)


def _tcp_key(addr: Address, zero_index: int) -> Key:
    try:
        host = ipaddress.ip_address(addr.host.split("%")[0]).compressed if addr.host else ""
    except ValueError:
        host = addr.host
    port = str(int(addr.port))
    return ("tcp", host, port, str(zero_index) if port == "0" else "")


def _open_tcp(addr: Address) -> socket.socket:
    host = addr.host
    port = int(addr.port)
    try:
        ip = ipaddress.ip_address(host.split("%")[0]) if host else None
    except ValueError:
        raise ListenError(f"listen tcp {host}:{port}: not an IP address") from None
    wildcard = ip is None or ip.is_unspecified
    # Like Go (and so maddy), a wildcard address accepts IPv4 and IPv6 alike.
    if wildcard and socket.has_dualstack_ipv6():
        return socket.create_server(("::", port), family=socket.AF_INET6, backlog=BACKLOG, dualstack_ipv6=True)
    family = socket.AF_INET6 if (ip is not None and ip.version == 6) else socket.AF_INET
    return socket.create_server((host or "0.0.0.0", port), family=family, backlog=BACKLOG)


def _open_unix(path: str) -> socket.socket:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"listen unix {path}: file exists and is not a socket")
        # A socket file left by a crashed process: remove it only if nobody answers.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            raise ListenError(f"listen unix {path}: address already in use")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class ListenerRegistry:
    """Master sockets with the generations that hold them."""

    def __init__(self) -> None:
        self._masters: dict[Key, _Master] = {}

    def key_of(self, addr: Address, zero_index: int = 0) -> Key:
        if addr.is_unix:
            return ("unix", os.path.abspath(addr.path))
        return _tcp_key(addr, zero_index)

    def acquire(self, addr: Address, holder: int, zero_index: int = 0) -> Listener:
        """A dup of the master socket for `addr`, creating (binding) it if needed."""
        key = self.key_of(addr, zero_index)
        master = self._masters.get(key)
        if master is None:
            try:
                if addr.is_unix:
                    sock = _open_unix(key[1])
                    master = _Master(key, sock, path=key[1])
                else:
                    master = _Master(key, _open_tcp(addr))
            except ListenError:
                raise
            except OSError as e:
                reason = os.strerror(e.errno) if e.errno else str(e)
                raise ListenError(f"listen {addr}: {reason}") from None
            # Non-blocking from birth: socket.dup() copies the Python-level timeout
            # onto the shared file description, so a blocking master would make
            # every endpoint's dup blocking too (and an accept() hang the loop).
            master.sock.setblocking(False)
            self._masters[key] = master
        master.holders.add(holder)
        return Listener(addr, master.sock.dup())

    def fileno(self, key: Key) -> int:
        """The master's descriptor, to pass to a worker process (runtime/workers.py)."""
        return self._masters[key].sock.fileno()

    def release(self, holder: int) -> list[str]:
        """Drop `holder`'s claims; close masters nobody holds. Returns the closed keys, for the log."""
        closed: list[str] = []
        for key, master in list(self._masters.items()):
            master.holders.discard(holder)
            if not master.holders:
                self._close(master)
                del self._masters[key]
                closed.append(":".join(k for k in key if k))
        return closed

    def close_all(self) -> None:
        for master in self._masters.values():
            self._close(master)
        self._masters.clear()

    @staticmethod
    def _close(master: _Master) -> None:
        if master.path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(master.path).st_mode):
                    os.unlink(master.path)
        master.sock.close()

    def __len__(self) -> int:
        return len(self._masters)
