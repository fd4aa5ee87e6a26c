"""The interface between the supervisor and module implementations.

A module implementation is the class named by its schema's `runtime`
("package.module:Class"). The supervisor builds one object per configured
`ModuleInstance` of a generation (one compiled configuration), then:

    obj = Class(inst, ctx)        # cheap: read inst.settings, no I/O
    await obj.start()             # open files, databases, connections
    await endpoint.serve(listeners)   # endpoints only: begin accepting
    ...
    await endpoint.stop_accepting()   # reload: the next generation takes the sockets
    await endpoint.drain(timeout, close_idle)  # let sessions finish, then cut them
    await obj.stop()              # release everything; called once, even after a failed start

Modules meet each other only through `ctx.module(inst)`, which returns the
object built for a referenced `ModuleInstance` in the same generation.
Errors meant for the user are raised as `ModuleError`; anything else is a bug
and is reported as an internal error, never as a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pymaddy.config.values import Endpoint as Address
from pymaddy.config.values import parse_endpoint
from pymaddy.runtime.listeners import Listener
from pymaddy.runtime.log import Logger
from pymaddy.runtime.metrics import Registry
from pymaddy.runtime.options import RunOptions

if TYPE_CHECKING:
    from pymaddy.compiler.graph import Graph, ModuleInstance
    from pymaddy.config.schema import Settings

__all__ = [
    "Connection",
    "EndpointModule",
    "Listener",
    "Module",
    "ModuleError",
    "RuntimeContext",
    "SessionClosing",
    "StreamEndpoint",
]

T = TypeVar("T", bound="Module")

DEFAULT_DRAIN_TIMEOUT = 60.0


class ModuleError(Exception):
    """A module cannot be built, started or served; the message is for the user."""


@dataclass(eq=False)
class RuntimeContext:
    """What every module of one generation shares: directories, logging, metrics, options.

    `state_dir` is also the process's working directory, so relative paths in
    settings already resolve against it.
    """

    options: RunOptions
    graph: Graph
    generation: int
    logger: Logger
    metrics: Registry
    state_dir: str
    runtime_dir: str
    objects: dict[int, Module] = field(default_factory=dict)
    # Several processes serve this configuration (the `workers` directive, runtime/workers.py);
    # `worker` is True in the extra ones, which run no singleton (queue engine, maintenance).
    processes: int = 1
    worker: bool = False

    @property
    def globals(self) -> Settings:
        return self.graph.globals

    @property
    def debug(self) -> bool:
        return self.logger.is_debug

    def module(self, inst: ModuleInstance) -> Module:
        """The runtime object of a referenced instance (same generation)."""
        try:
            return self.objects[id(inst)]
        except KeyError:
            raise ModuleError(f"{inst.label} has no runtime object (was it started?)") from None

    def module_as(self, inst: ModuleInstance, cls: type[T]) -> T:
        obj = self.module(inst)
        if not isinstance(obj, cls):
            raise ModuleError(f"{inst.label} is not a {cls.__name__}")
        return obj


class Module:
    """Base of every implementation: holds its instance, settings, logger and context."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        self.inst = inst
        self.ctx = ctx
        self.settings: Settings = inst.settings
        self.log = ctx.logger.sub(self.log_name(), debug=bool(inst.settings.get("debug") or False))

    def log_name(self) -> str:
        """The `name: ` prefix of this module's log lines (maddy uses the module name)."""
        return self.inst.schema.name

    async def start(self) -> None:
        """Acquire resources. Raise ModuleError to refuse starting."""

    async def stop(self) -> None:
        """Release resources. Must not raise for a module whose start failed half-way."""


class EndpointModule(Module):
    """A module that accepts connections on listen addresses."""

    def addresses(self) -> list[Address]:
        """Listen addresses: the compiled `listen` setting, else the inline arguments."""
        listen = self.settings.get("listen")
        if listen:
            return list(listen)
        return [parse_endpoint(a) for a in self.inst.inline_args]

    @property
    def drain_timeout(self) -> float:
        """How long old sessions may continue after a reload (smtp's `shutdown_timeout`)."""
        v = self.settings.get("shutdown_timeout")
        return float(v) if v is not None else DEFAULT_DRAIN_TIMEOUT

    async def serve(self, listeners: Sequence[Listener]) -> None:  # pragma: no cover - interface
        """Begin accepting on `listeners`; the sockets are dups this endpoint owns and closes."""
        raise NotImplementedError

    async def stop_accepting(self) -> None:  # pragma: no cover - interface
        """Close the listening dups; sessions in progress continue."""
        raise NotImplementedError

    async def drain(self, timeout: float, close_idle: bool) -> None:  # pragma: no cover - interface
        """Wait up to `timeout` for sessions to end, then end them. With close_idle,
        idle sessions (waiting for the client) end at once."""
        raise NotImplementedError


class SessionClosing(Exception):
    """Raised into a session that tries to wait for its client while its endpoint shuts down."""


class Connection:
    """One accepted stream connection of a `StreamEndpoint`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: Listener) -> None:
        self.reader = reader
        self.writer = writer
        self.listener = listener
        self.is_idle = False
        self.closing = False
        peer = writer.get_extra_info("peername")
        self.peer: Any = peer
        self.remote = _fmt_addr(peer)

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Mark a wait for the client's next command/request: shutdown may end the session here."""
        if self.closing:
            raise SessionClosing
        self.is_idle = True
        try:
            yield
        finally:
            self.is_idle = False


def host_port(host: str, port: int) -> str:
    """`host:port`, IPv6 in brackets, as maddy logs addresses (and fail2ban expects)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _fmt_addr(a: Any) -> str:
    if isinstance(a, tuple) and len(a) >= 2:
        return host_port(str(a[0]), a[1])
    return str(a or "unix")


class StreamEndpoint(EndpointModule):
    """An endpoint on asyncio streams: one task per connection, tracked for drain.

    Subclasses implement `handle(conn)` and wrap every wait for the client in
    `with conn.idle():` so shutdown can end idle sessions at once while busy
    ones finish their current command.

    Accepting is done here rather than by `asyncio.Server`: a connection is
    registered as a session in the same callback that accept()s it, so a
    stop_accepting() at any moment can neither lose nor orphan a connection
    (asyncio.Server silently drops ones accepted just before close()).
    """

    stream_limit = 64 * 1024
    supports_tls = False
    accept_batch = 64

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self._listening: list[Listener] = []
        self._sessions: dict[asyncio.Task[None], Connection | None] = {}
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self._closing_idle = False

    async def handle(self, conn: Connection) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def start(self) -> None:
        if not self.supports_tls:
            for addr in self.addresses():
                if addr.is_tls:
                    raise ModuleError(f"{self.inst.schema.name}: TLS is not supported yet")

    def ssl_context(self, listener: Listener) -> ssl.SSLContext | None:
        """TLS for `tls://` listeners; endpoints with `supports_tls` override this."""
        return None

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def serve(self, listeners: Sequence[Listener]) -> None:
        loop = asyncio.get_running_loop()
        for lst in listeners:
            tls = self.ssl_context(lst)
            lst.sock.setblocking(False)
            loop.add_reader(lst.sock.fileno(), self._accept, lst, tls)
            self._listening.append(lst)
            self.log.printf(f"listening on {lst.bound}")

    def _accept(self, lst: Listener, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.accept_batch):
            try:
                sock, _addr = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors/memory: back off instead of spinning on a ready socket.
                    self.log.error("accept failed, pausing for a second", err=e.strerror or str(e))
                    loop.remove_reader(lst.sock.fileno())
                    loop.call_later(1.0, self._resume, lst, tls)
                    return
                continue  # ECONNABORTED and friends: that client is gone, try the next
            task = loop.create_task(self._session(sock, lst, tls))
            self._sessions[task] = None
            self._no_sessions.clear()

    def _resume(self, lst: Listener, tls: ssl.SSLContext | None) -> None:
        if lst in self._listening:
            asyncio.get_running_loop().add_reader(lst.sock.fileno(), self._accept, lst, tls)

    async def _session(self, sock: socket.socket, lst: Listener, tls: ssl.SSLContext | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        writer: asyncio.StreamWriter | None = None
        remote = _fmt_addr(_peer(sock))
        try:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=self.stream_limit)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=sock, ssl=tls)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            conn = Connection(reader, writer, lst)
            conn.closing = self._closing_idle
            self._sessions[task] = conn
            await self.handle(conn)
        except (asyncio.CancelledError, SessionClosing):
            pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as e:
            self.log.debug("connection error", reason=str(e) or type(e).__name__, src=remote)
        except Exception as e:
            self.log.error("session failed", err=f"internal error: {type(e).__name__}: {e}", src=remote)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
            else:
                sock.close()
            self._sessions.pop(task, None)
            if not self._sessions:
                self._no_sessions.set()

    async def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        listening, self._listening = self._listening, []
        for lst in listening:
            loop.remove_reader(lst.sock.fileno())
            lst.sock.close()

    async def drain(self, timeout: float, close_idle: bool) -> None:
        if close_idle:
            self._closing_idle = True
            for task, conn in list(self._sessions.items()):
                if conn is not None:
                    conn.closing = True
                    if conn.is_idle:
                        task.cancel()
        if self._sessions and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_sessions.wait(), timeout)
        rest = list(self._sessions)
        for task in rest:
            task.cancel()
        if rest:
            await asyncio.wait(rest, timeout=1.0)

    async def stop(self) -> None:
        await self.stop_accepting()
        await self.drain(0, close_idle=True)


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None
