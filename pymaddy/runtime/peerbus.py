"""Events between the server's processes (the `workers` directive), for state they must share.

Why: with several processes, a count kept in one of them (auth_throttle's failed logins)
would let a client spread its attempts over the processes. Instead of asking one owner
on every login, each process keeps its own copy and tells the others what happened;
they apply the event as if it had happened to them. Lag is one local socket write.

Each process listens on RUNTIME/peers.<pid>.sock and keeps connections open to the
others (found by glob); a process that joins says hello to every other, which then
include it at once and may hand it their state (`on_join`, `send_bulk`). Sending
never blocks the event loop. Handlers are registered per topic and get the payload
dict. With one process nothing is started and publish() does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from pymaddy.runtime import unixsock
from pymaddy.runtime.unixsock import UnixSocketServer

Handler = Callable[[dict[str, Any]], None]
JoinHook = Callable[[int], None]

_handlers: dict[str, Handler] = {}
_join_hooks: list[JoinHook] = []
_leave_hooks: list[JoinHook] = []
_bus: Bus | None = None


def subscribe(topic: str, handler: Handler) -> None:
    _handlers[topic] = handler


def active() -> bool:
    return _bus is not None


def on_leave(hook: JoinHook) -> None:
    """Call `hook(pid)` when a process has gone (the supervisor announces a worker's exit), so
    what it held in shared counts is let go."""
    if hook not in _leave_hooks:
        _leave_hooks.append(hook)


def announce_leave(pid: int) -> None:
    """The supervisor: `pid` exited. Every process (this one too) runs its leave hooks."""
    _left(pid)
    publish(LEFT, {"pid": pid})


def _left(pid: int) -> None:
    for hook in list(_leave_hooks):
        with contextlib.suppress(Exception):
            hook(pid)


def on_join(hook: JoinHook) -> None:
    """Call `hook(pid)` when another process joins (to hand it the state it missed)."""
    if hook not in _join_hooks:
        _join_hooks.append(hook)


def send_to(pid: int, topic: str, payload: dict[str, Any]) -> None:
    """One event to one process (e.g. a worker's metrics to the supervisor)."""
    if _bus is not None:
        _bus.send_one(pid, {"t": topic, "p": payload})


def send_bulk(pid: int, topic: str, payloads: list[dict[str, Any]]) -> None:
    """Send many events to one process, over a connection of their own and without blocking."""
    if _bus is not None and payloads:
        _bus.send_bulk(pid, [{"t": topic, "p": p} for p in payloads])


def publish(topic: str, payload: dict[str, Any]) -> None:
    if _bus is not None:
        _bus.send({"t": topic, "p": payload})


def _dispatch(line: bytes) -> None:
    try:
        obj = json.loads(line)
    except ValueError:
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("p"), dict):
        return
    topic = str(obj.get("t"))
    if topic == LEFT:
        pid = obj["p"].get("pid")
        if isinstance(pid, int):
            _left(pid)
        return
    if topic == HELLO:
        pid = obj["p"].get("pid")
        if _bus is not None and isinstance(pid, int):
            _bus.joined(pid)
        return
    handler = _handlers.get(topic)
    if handler is not None:
        with contextlib.suppress(Exception):  # a malformed event must not hurt the receiver
            handler(obj["p"])


class _Listener(UnixSocketServer):
    limit = 1 << 20  # a metrics snapshot is one line; peers are this server's own processes
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    return
                if not line:
                    return
                _dispatch(line)
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()


HELLO = "hello"
LEFT = "left"


class Bus:

    def __init__(self, runtime_dir: str) -> None:
        self.dir = runtime_dir
        self.own = self.path(os.getpid())
        self.listener = _Listener(self.own)
        pattern = os.path.join(glob.escape(runtime_dir), "peers.*.sock")
        self.conns = unixsock.Peers(lambda: [p for p in glob.glob(pattern) if p != self.own])
        self._bulk: set[asyncio.Task[None]] = set()

    def path(self, pid: int) -> str:
        return os.path.join(self.dir, f"peers.{pid}.sock")

    def send_one(self, pid: int, obj: dict[str, Any]) -> None:
        self.conns.send(self.path(pid), json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def joined(self, pid: int) -> None:
        self.conns.rescan_soon()  # include the newcomer in the next send
        for hook in list(_join_hooks):
            with contextlib.suppress(Exception):
                hook(pid)

    def send_bulk(self, pid: int, objs: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objs)
        task = asyncio.get_running_loop().create_task(self._send_bulk(self.path(pid), data))
        self._bulk.add(task)
        task.add_done_callback(self._bulk.discard)

    async def _send_bulk(self, path: str, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            unixsock.connect(s, path)
            await asyncio.wait_for(loop.sock_sendall(s, data), 10)
        except (OSError, TimeoutError):
            pass
        finally:
            s.close()

    def send(self, obj: dict[str, Any]) -> None:
        self.conns.broadcast(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    async def close(self) -> None:
        self.conns.close()
        for t in list(self._bulk):
            t.cancel()
        await self.listener.stop()


async def start(runtime_dir: str) -> None:
    """Join the bus (idempotent); the supervisor and each worker call this when there are
    several processes."""
    global _bus
    if _bus is not None:
        if _bus.dir == runtime_dir:
            return
        await stop()  # a reload moved runtime_dir
    bus = Bus(runtime_dir)
    await bus.listener.start()
    _bus = bus
    bus.send({"t": HELLO, "p": {"pid": os.getpid()}})


async def stop() -> None:
    global _bus
    bus, _bus = _bus, None
    if bus is not None:
        await bus.close()
