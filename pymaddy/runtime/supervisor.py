"""The server process: start a compiled configuration, reload it, stop it (spec §H).

A *generation* is one compiled configuration brought to life: one runtime
object per configured module, plus the listening sockets of its endpoints.
The supervisor runs exactly one current generation, replaces it on reload
(SIGUSR2 or a changed config file) and lets replaced ones drain.

Invariants:
- Exactly one generation accepts connections once start-up succeeded; during
  a reload the old one stops accepting only after the new one has started
  (modules started, sockets bound), and the new one accepts right after.
- A listen address present before and after a reload is never closed: the
  supervisor's `ListenerRegistry` owns the sockets and endpoints only get
  dups, so clients connecting mid-reload wait in the kernel backlog.
- Reloads run one at a time. A failed reload (config error, bind error, a
  module refusing to start) changes nothing: the current generation keeps
  its sockets, log output and working directory; every error is logged.
- Connections accepted by a generation finish on that generation; it is
  stopped after its sessions end or its drain timeout passes.
- Exit status: 0 after a graceful stop, 1 for configuration or start-up
  errors and for a forced stop (second signal), 2 for a bad --log target,
  70 for an internal error. A user never sees a traceback: errors are
  single `Error: ...` lines on stderr before start-up, log lines after.
- Never serves as root: started as root it prepares what needs root (dirs,
  log files, sockets below 1024), then drops to $PYMADDY_USER / maddy /
  nobody before any module starts (`privileges`); PYMADDY_ALLOW_ROOT=1 opts out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Iterable
from typing import Any

from pymaddy import __version__
from pymaddy.compiler.compile import CompileResult, compile_file
from pymaddy.compiler.graph import Graph, ModuleInstance
from pymaddy.compiler.registry import registry
from pymaddy.config.values import Endpoint as Address
from pymaddy.runtime import metrics, peerbus, privileges, sdnotify
from pymaddy.runtime.listeners import Listener, ListenerRegistry, ListenError
from pymaddy.runtime.log import (
    Logger,
    LogTargetError,
    MultiOutput,
    Output,
    bridge_stdlib_logging,
    open_targets,
    stderr_fallback,
)
from pymaddy.runtime.module import EndpointModule, Module, ModuleError, RuntimeContext
from pymaddy.runtime.options import RunOptions
from pymaddy.runtime.privileges import PrivilegeError, Target
from pymaddy.runtime.watch import ConfigWatcher
from pymaddy.runtime.workers import METRICS_TOPIC, READY_TOPIC, WorkerPool, shares

__all__ = ["RunOptions", "StartFailure", "Supervisor", "run"]

VERSION = __version__
# SIGTERM budget, worst case ~5 s in all (systemd's TimeoutStopSec is 7 s): sessions get
# STOP_GRACE, cut ones 1 s to close, old drains 0.5 s, module stop()s FINAL_STOP_BUDGET.
STOP_GRACE = 2.5
MODULE_STOP_TIMEOUT = 1.0  # per module stop(), so a stuck module cannot hold the exit
FINAL_STOP_BUDGET = 1.0  # SIGTERM: all modules' stop() together, after the drain
EX_SOFTWARE = 70

LOG_KEYWORDS = ("stderr", "stderr_ts", "syslog", "off")

SIGNAL_NAMES = {  # Go's names, as maddy logs them
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupt",
    signal.SIGHUP: "hangup",
    signal.SIGUSR1: "user defined signal 1",
    signal.SIGUSR2: "user defined signal 2",
}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StartFailure(Exception):
    """A configuration that cannot run; `lines` are user-facing messages (FILE:LINE: ...)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = list(dict.fromkeys(lines))  # each message once, in order
        super().__init__("; ".join(self.lines))


def _where(inst: ModuleInstance) -> str:
    return f"{inst.node.file}:{inst.node.line}"


def _internal(e: BaseException) -> str:
    return f"internal error: {type(e).__name__}: {e}"


def unique_instances(graph: Graph) -> list[ModuleInstance]:
    """Endpoints and every module they reach, each once, in configuration order."""
    seen: set[int] = set()
    out: list[ModuleInstance] = []
    for inst in [*graph.endpoints, *graph.instances]:
        if id(inst) not in seen:
            seen.add(id(inst))
            out.append(inst)
    return out


def missing_runtimes(graph: Graph) -> list[str]:
    """`FILE:LINE: module NAME is not implemented yet` for every module without an implementation."""
    return [_not_implemented(i) for i in unique_instances(graph) if i.schema.runtime is None]


def _not_implemented(inst: ModuleInstance) -> str:
    from pymaddy.compiler.runtimes import UNSUPPORTED

    why = UNSUPPORTED.get(inst.schema.name)
    if why is not None:
        return f"{_where(inst)}: module {inst.schema.name} is not supported by pymaddy: {why}"
    return f"{_where(inst)}: module {inst.schema.name} is not implemented yet"


def load_class(spec: str) -> type[Module]:
    """Import "package.module:Class" and check it is a runtime Module."""
    modname, _, attr = spec.partition(":")
    mod = importlib.import_module(modname)
    cls = getattr(mod, attr)
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TypeError(f"{spec} is not a pymaddy.runtime.module.Module")
    return cls


def init_dirs(state_dir: str, runtime_dir: str, libexec: str) -> None:
    """Create and write-test state_dir and runtime_dir (0700), then chdir into state_dir."""
    for path, what in ((state_dir, "statedir"), (runtime_dir, "runtimedir"), (libexec, "-libexec")):
        if not os.path.isabs(path):
            raise StartFailure([f"{what} should be absolute"])
    for path, what in ((state_dir, "state_dir"), (runtime_dir, "runtime_dir")):
        try:
            os.makedirs(path, 0o700, exist_ok=True)
            # A name of its own per process: the CLI may start while the server does.
            fd, test = tempfile.mkstemp(prefix="writeable-test-", dir=path)
            os.close(fd)
            os.unlink(test)
        except OSError as e:
            raise StartFailure([f"{what} {path} is not a writable directory: {e.strerror or e}"]) from None
    try:
        os.chdir(state_dir)
    except OSError as e:
        raise StartFailure([f"chdir {state_dir}: {e.strerror or e}"]) from None


class Generation:
    """One configuration's module objects and sockets."""

    def __init__(self, number: int, ctx: RuntimeContext) -> None:
        self.number = number
        self.ctx = ctx
        self.graph = ctx.graph
        self.log = ctx.logger
        self.modules: list[Module] = []  # non-endpoints, in start order (dependencies first)
        self.endpoints: list[EndpointModule] = []
        self.listeners: dict[int, list[Listener]] = {}
        self.keys: dict[int, list[tuple[str, ...]]] = {}  # endpoint id -> registry keys, in address order
        self.started: list[Module] = []
        self.stopped = False

    # -- bring up --------------------------------------------------------------------

    def build(self, only: set[int] | None = None) -> None:
        """Construct every module object (or those whose id is in `only`, a worker's share);
        all failures are reported together."""
        errors: list[str] = []
        endpoint_ids = {id(e) for e in self.graph.endpoints}
        others = [i for i in unique_instances(self.graph) if id(i) not in endpoint_ids]
        endpoints = self.graph.endpoints
        if only is not None:
            others = [i for i in others if id(i) in only]
            endpoints = [e for e in endpoints if id(e) in only]
        # The compiler lists a module before the modules it references; start those first.
        for inst in [*reversed(others), *endpoints]:
            spec = inst.schema.runtime
            if spec is None:
                errors.append(_not_implemented(inst))
                continue
            try:
                obj = load_class(spec)(inst, self.ctx)
            except ModuleError as e:
                errors.append(f"{_where(inst)}: {e}")
                continue
            except Exception as e:
                errors.append(f"{_where(inst)}: {inst.label}: {_internal(e)}")
                continue
            self.ctx.objects[id(inst)] = obj
            if id(inst) in endpoint_ids:
                if not isinstance(obj, EndpointModule):
                    errors.append(f"{_where(inst)}: {inst.label}: {spec} is not an endpoint implementation")
                    continue
                self.endpoints.append(obj)
            else:
                self.modules.append(obj)
        if errors:
            raise StartFailure(errors)

    def acquire(self, registry: ListenerRegistry) -> None:
        """Bind (or reuse) every endpoint's sockets; on failure nothing new stays open."""
        used: dict[tuple[str, ...], EndpointModule] = {}
        zero: dict[str, int] = {}
        errors: list[str] = []
        for ep in self.endpoints:
            mine: list[Listener] = []
            self.listeners[id(ep)] = mine
            try:
                addrs: list[Address] = ep.addresses()
            except ValueError as e:
                errors.append(f"{_where(ep.inst)}: {ep.inst.schema.name}: malformed endpoint: {e}")
                continue
            for addr in addrs:
                idx = 0
                if not addr.is_unix and addr.port == "0":
                    idx = zero.get(addr.host, 0)
                    zero[addr.host] = idx + 1
                key = registry.key_of(addr, idx)
                other = used.get(key)
                if other is not None:
                    errors.append(
                        f"{_where(ep.inst)}: {ep.inst.schema.name}: {addr} is already used by "
                        f"{other.inst.schema.name} at {_where(other.inst)}"
                    )
                    continue
                try:
                    mine.append(registry.acquire(addr, self.number, idx))
                except ListenError as e:
                    errors.append(f"{_where(ep.inst)}: {ep.inst.schema.name}: {e}")
                    continue
                used[key] = ep
                self.keys.setdefault(id(ep), []).append(key)
        if errors:
            self.close_listeners()
            registry.release(self.number)
            raise StartFailure(errors)

    async def start(self) -> None:
        """start() every module, dependencies first; on failure stop what started."""
        for obj in [*self.modules, *self.endpoints]:
            try:
                await obj.start()
            except ModuleError as e:
                err = f"{_where(obj.inst)}: {e}"
            except Exception as e:
                self.log.debug("start failed", module=obj.inst.label, traceback=traceback.format_exc())
                err = f"{_where(obj.inst)}: {obj.inst.label}: {_internal(e)}"
            else:
                self.started.append(obj)
                continue
            await self.stop()
            raise StartFailure([err])

    async def serve(self) -> None:
        for ep in self.endpoints:
            try:
                await ep.serve(self.listeners[id(ep)])
            except ModuleError as e:
                raise StartFailure([f"{_where(ep.inst)}: {e}"]) from None
            except OSError as e:
                raise StartFailure([f"{_where(ep.inst)}: {ep.inst.schema.name}: {e.strerror or e}"]) from None
            except Exception as e:
                raise StartFailure([f"{_where(ep.inst)}: {ep.inst.label}: {_internal(e)}"]) from None

    def reacquire(self, registry: ListenerRegistry) -> None:
        """Fresh dups of this generation's sockets, to serve again after a failed hand-over."""
        self.close_listeners()
        for ep in self.endpoints:
            self.listeners[id(ep)] = []
        self.acquire(registry)

    # -- wind down ---------------------------------------------------------------------

    async def stop_accepting(self) -> None:
        for ep in self.endpoints:
            await self._guard(ep, ep.stop_accepting(), "stop accepting failed")

    async def drain(self, timeout: float | None, close_idle: bool) -> None:
        """Let sessions finish (each endpoint's own drain timeout unless `timeout` is given)."""
        await asyncio.gather(
            *(
                self._guard(ep, ep.drain(ep.drain_timeout if timeout is None else timeout, close_idle), "drain failed")
                for ep in self.endpoints
            )
        )

    async def stop(self, budget: float | None = None) -> None:
        """stop() what started, dependents first; each bounded by MODULE_STOP_TIMEOUT,
        all together by `budget` (so SIGTERM exits in time however many modules hang)."""
        if self.stopped:
            return
        self.stopped = True
        deadline = None if budget is None else time.monotonic() + budget
        for obj in reversed(self.started):
            limit = MODULE_STOP_TIMEOUT
            if deadline is not None:
                limit = max(0.01, min(limit, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(obj.stop(), limit)
            except TimeoutError:
                self.log.msg("module did not stop in time", module=obj.inst.label)
            except Exception as e:
                reason = str(e) if isinstance(e, ModuleError) else _internal(e)
                self.log.error("module stop failed", err=reason, module=obj.inst.label)
        self.close_listeners()

    def close_listeners(self) -> None:
        """Close our dups (endpoints normally did already); masters stay with the registry."""
        for lst in self.listeners.values():
            for item in lst:
                item.sock.close()

    async def _guard(self, ep: EndpointModule, aw: Awaitable[None], what: str) -> None:
        try:
            await aw
        except Exception as e:
            self.log.error(what, err=_internal(e), module=ep.inst.label)


class Supervisor:
    """Runs generations; reacts to signals and config file changes."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.launch_cwd = os.getcwd()
        self.config_path = os.path.abspath(opts.config)
        self.log = Logger(debug=opts.debug)
        self.registry = ListenerRegistry()
        self.current: Generation | None = None
        self.retiring: dict[asyncio.Task[None], Generation] = {}
        self.counter = 0
        self.log_targets: list[str] | None = None
        self.stopping = False
        self.reload_pending = False
        self.wake = asyncio.Event()  # a stop or reload request is waiting
        self.watcher: ConfigWatcher | None = None
        self.path_set = False
        self.background: set[asyncio.Task[Any]] = set()
        self.target: Target | None = None  # the user to become when started as root
        self.new_logs: list[str] = []  # log files created at start-up (as root)
        self.pool = WorkerPool(opts, self.config_path, self.launch_cwd, self.log)
        self.workers_blocked: str | None = None  # why extra processes cannot run (found at start-up)

    # -- helpers -------------------------------------------------------------------------

    def notify(self, state: str | None, status: str | None = None) -> None:
        sdnotify.notify(state, status, on_error=self.log.printf)
        self.log.debug("systemd notify", state=state or "", status=status or "")

    def _missing_log_files(self, targets: Iterable[str]) -> list[str]:
        paths = [os.path.normpath(os.path.join(self.launch_cwd, t)) for t in targets if t not in LOG_KEYWORDS]
        return privileges.missing_files(paths)

    def _compile(self) -> CompileResult:
        return compile_file(self.config_path)

    def _apply_log_targets(self, graph: Graph) -> tuple[MultiOutput | None, list[str] | None]:
        """The output the config asks for (None: keep the current one); --log always wins."""
        if self.opts.log:
            return None, self.log_targets
        targets = list(graph.globals.get("log") or ["stderr"])
        if targets == self.log_targets:
            return None, targets
        try:
            return open_targets(targets, cwd=self.launch_cwd), targets
        except LogTargetError as e:
            raise StartFailure([str(e)]) from None

    def _context(self, graph: Graph, number: int) -> RuntimeContext:
        return RuntimeContext(
            options=self.opts,
            graph=graph,
            generation=number,
            logger=self.log,
            metrics=metrics.REGISTRY,
            state_dir=str(graph.globals["state_dir"]),
            runtime_dir=str(graph.globals["runtime_dir"]),
            processes=self.pool.processes_for(graph, self.workers_blocked),
        )

    async def _join_peer_bus(self, runtime_dir: str) -> None:
        try:
            await peerbus.start(runtime_dir)
        except OSError as e:
            self.log.error("cannot listen for events from the worker processes", err=e)
            return
        from pymaddy.auth import throttle

        throttle.join_peer_bus(hand_over=True)
        peerbus.subscribe(METRICS_TOPIC, self.pool.on_metrics)
        peerbus.subscribe(READY_TOPIC, self.pool.on_ready)
        metrics.REGISTRY.set_remote(self.pool.remote_metrics)
        metrics.REGISTRY.set_refresh(self.pool.refresh_metrics)

    async def _start_workers(self, gen: Generation) -> None:
        """Hand the generation's IMAP listeners to its worker processes (replacing older ones)."""
        n = gen.ctx.processes
        fds: dict[str, list[int]] = {}
        if n > 1:
            await self._join_peer_bus(gen.ctx.runtime_dir)
            indexes, _ = shares(gen.graph)
            by_inst = {id(ep.inst): ep for ep in gen.endpoints}
            for i in indexes:
                ep = by_inst[id(gen.graph.endpoints[i])]
                fds[str(i)] = [self.registry.fileno(k) for k in gen.keys.get(id(ep), [])]
        await self.pool.replace(gen.number, n - 1, fds, gen.ctx.runtime_dir)

    def _check(self, res: CompileResult) -> Graph:
        if not res.ok or res.graph is None:
            raise StartFailure([str(e) for e in res.errors] or ["configuration could not be loaded"])
        missing = missing_runtimes(res.graph)
        if missing:
            raise StartFailure(missing)
        return res.graph

    def _prepend_libexec(self) -> None:
        if not self.path_set:
            os.environ["PATH"] = self.opts.libexec + os.pathsep + os.environ.get("PATH", "")
            self.path_set = True

    # -- start-up ------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Compile, prepare, start generation 1; raises StartFailure for the user."""
        self.log.msg("loading configuration...")
        if privileges.must_drop():
            try:
                self.target = privileges.resolve_target()
            except PrivilegeError as e:
                raise StartFailure([str(e)]) from None
        graph = self._check(await asyncio.to_thread(self._compile))
        if not self.opts.log:
            self.new_logs += self._missing_log_files(graph.globals.get("log") or [])
        out, targets = self._apply_log_targets(graph)
        if out is not None:
            self.log.set_output(out).close()
            self.log_targets = targets
        self.log.debug_enabled = self.opts.debug or bool(graph.globals.get("debug"))
        bridge_stdlib_logging(self.log)
        init_dirs(str(graph.globals["state_dir"]), str(graph.globals["runtime_dir"]), self.opts.libexec)
        if self.target is not None:
            for path in (str(graph.globals["state_dir"]), str(graph.globals["runtime_dir"])):
                privileges.chown_dir(path, self.target)
            for path in self.new_logs:
                privileges.chown_new_file(path, self.target)
        self._prepend_libexec()
        self.log.msg("configuration loaded")
        self.counter += 1
        gen = Generation(self.counter, self._context(graph, self.counter))
        try:
            gen.build()
            gen.acquire(self.registry)
            self._drop_privileges(graph, gen)
            if self.workers_blocked and gen.ctx.processes > 1:
                gen.ctx.processes = self.pool.processes_for(graph, self.workers_blocked)
            await gen.start()
            await gen.serve()
        except BaseException:
            await gen.stop()
            self.registry.release(gen.number)
            raise
        self.current = gen
        await self._start_workers(gen)
        await self._watch(graph)
        metrics.UP.set(1)
        metrics.LAST_RELOAD_OK.set(1)
        metrics.LAST_RELOAD_TIME.set(time.time())
        self.log.msg("server started", version=VERSION)
        self.notify(sdnotify.READY, "Configuration running.")

    def _start_password_helper(self, graph: Graph) -> None:
        """auth.shadow / auth.pam read /etc/shadow: leave that to a helper that keeps root
        (pymaddy/auth/privhelper.py) rather than to the server user."""
        names = {"auth.shadow", "auth.pam"}
        if not any(i.schema.name in names and not i.settings.get("use_helper") for i in unique_instances(graph)):
            return
        from pymaddy.auth import privhelper

        if privhelper.spawn():
            self.log.msg("started the privileged password helper for auth.shadow / auth.pam")
        else:
            self.log.error("could not start the privileged password helper", err="see the modules' own errors")

    def _drop_privileges(self, graph: Graph, gen: Generation) -> None:
        """Started as root: become the target user now that the sockets are bound."""
        target = self.target
        if target is None:
            if privileges.running_as_root():
                self.log.msg(f"running as root: {privileges.ALLOW_ROOT_ENV}=1 is set, privileges are not dropped")
            return
        for listeners in gen.listeners.values():
            for item in listeners:
                if item.address.is_unix:
                    privileges.chown_socket(self.registry.key_of(item.address)[1], target)
        # Modules a reload may need, loaded while every file is readable (the Python
        # installation may live where the target user cannot look, e.g. under /root).
        runtimes = [s.runtime.partition(":")[0] for s in registry().values() if s.runtime]
        watch = privileges.WATCHER_MODULES if os.environ.get("PYMADDY_WATCH_CONFIG", "1") != "0" else ()
        failures = privileges.preload([*privileges.LAZY_STDLIB, *runtimes, *watch])
        failures += privileges.preload_trees(privileges.PRELOAD_TREES)
        for name, err in failures:
            self.log.debug("could not preload module", module=name, reason=err)
        import_paths = [p for p in sys.path if p and os.path.exists(p)]
        self._start_password_helper(graph)
        try:
            res = privileges.drop(target)
        except PrivilegeError as e:
            raise StartFailure([str(e)]) from None
        self.log.msg("dropped privileges", gid=target.gid, uid=target.uid, user=target.name)
        blocked = privileges.unreadable_import_paths(import_paths)
        if blocked:
            self.workers_blocked = f"Python's installation is not readable by user {target.name}"
            self.log.msg(
                f"Python's installation is not readable by user {target.name}: the modules pymaddy needs were "
                "loaded before dropping privileges; install pymaddy where that user can read it",
                paths=blocked,
            )
        if not res.bind_cap:
            self.log.error(
                "could not keep CAP_NET_BIND_SERVICE: a reload that adds a port below 1024 will fail",
                err=res.cap_error or "unknown error",
            )
        elif not res.ambient:
            self.log.debug("CAP_NET_BIND_SERVICE kept, but not as an ambient capability")
        who = f"user {target.name} (uid {target.uid})"
        files = [os.path.join(self.launch_cwd, f) for f in graph.files] or [self.config_path]
        bad = privileges.unreadable(files)
        if bad:
            raise StartFailure(
                f"configuration file {path} is not readable by {who}, which pymaddy runs as after dropping "
                f"root privileges: {why}; make it readable by that user or its group "
                f"(or choose the user with {privileges.USER_ENV})"
                for path, why in bad
            )
        try:
            init_dirs(str(graph.globals["state_dir"]), str(graph.globals["runtime_dir"]), self.opts.libexec)
        except StartFailure as e:
            raise StartFailure(f"{line} (as {who})" for line in e.lines) from None

    async def _watch(self, graph: Graph) -> None:
        if os.environ.get("PYMADDY_WATCH_CONFIG", "1") == "0":
            return
        files = [os.path.join(self.launch_cwd, f) for f in graph.files]
        if self.watcher is not None and self.watcher.files == sorted({os.path.abspath(f) for f in files}):
            return
        old, self.watcher = self.watcher, ConfigWatcher(files, self._files_changed, self.log)
        if old is not None:
            task = asyncio.create_task(old.stop())
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        await self.watcher.start()

    # -- events --------------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        name = SIGNAL_NAMES.get(sig, sig.name)
        if sig == signal.SIGUSR1:
            self.log.printf(f"signal received ({name}), rotating logs")
            self.notify(sdnotify.RELOADING, "Reopening logs...")
            try:
                self.log.output.reopen()
            except LogTargetError as e:
                self.log.printf(f"Can't reinitialize logger: {e}")
            self.pool.signal_all(signal.SIGUSR1)
            self.notify(sdnotify.READY, "Listening for incoming connections...")
            return
        if sig == signal.SIGUSR2:
            if self.stopping:
                self.log.printf(f"signal received ({name}), ignored: server is stopping")
                return
            self.log.printf(f"signal received ({name}), reloading configuration")
            self.reload_pending = True
            self.wake.set()
            return
        if self.stopping:
            self.log.printf(f"forced shutdown due to signal ({name})!")
            self.log.output.close()
            os._exit(1)
        self.stopping = True
        self.log.printf(f"signal received ({name}), next signal will force immediate shutdown.")
        self.wake.set()

    def _files_changed(self, paths: list[str]) -> None:
        if self.stopping:
            return
        self.log.msg("configuration file changed, reloading configuration", files=paths)
        self.reload_pending = True
        self.wake.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        text = _internal(exc) if exc is not None else str(context.get("message", "unknown error"))
        self.log.error("unhandled error", err=text)
        if exc is not None:
            self.log.debug("unhandled error", traceback="".join(traceback.format_exception(exc)))

    # -- reload ------------------------------------------------------------------------------------

    async def reload(self) -> None:
        old = self.current
        assert old is not None
        metrics.RELOADS.inc()
        self.log.msg("reloading server...")
        self.notify(sdnotify.RELOADING, "Reloading server...")
        self.log.msg("loading new configuration...")
        cwd = os.getcwd()
        new_out: Output | None = None
        gen: Generation | None = None
        try:
            res = await asyncio.to_thread(self._compile)
            graph = self._check(res)
            new_out, targets = self._apply_log_targets(graph)
            init_dirs(str(graph.globals["state_dir"]), str(graph.globals["runtime_dir"]), self.opts.libexec)
            self.log.msg("configuration loaded")
            self.counter += 1
            gen = Generation(self.counter, self._context(graph, self.counter))
            gen.build()
            gen.acquire(self.registry)
            self.log.msg("starting new server")
            await gen.start()
            await old.stop_accepting()
            try:
                await gen.serve()
            except StartFailure:
                await gen.stop_accepting()
                old.reacquire(self.registry)
                await old.serve()
                raise
        except StartFailure as e:
            await self._reload_failed(e.lines, gen, new_out, cwd)
            return
        except Exception as e:
            self.log.debug("reload failed", traceback=traceback.format_exc())
            await self._reload_failed([_internal(e)], gen, new_out, cwd)
            return

        self.current = gen
        await self._start_workers(gen)
        for key in self.registry.release(old.number):
            self.log.debug("closed listener", address=key)
        if new_out is not None:
            self.log.set_output(new_out).close()
            self.log_targets = targets
        self.log.debug_enabled = self.opts.debug or bool(graph.globals.get("debug"))
        bridge_stdlib_logging(self.log)
        await self._watch(graph)
        metrics.LAST_RELOAD_OK.set(1)
        metrics.LAST_RELOAD_TIME.set(time.time())
        self.log.msg("new server started", version=VERSION)
        self.notify(sdnotify.READY, "Configuration running.")
        task = asyncio.create_task(self._retire(old))
        self.retiring[task] = old
        task.add_done_callback(lambda t: self.retiring.pop(t, None))

    async def _reload_failed(self, lines: list[str], gen: Generation | None, out: Output | None, cwd: str) -> None:
        for line in lines:
            self.log.error("failed to load new configuration", err=line)
        if gen is not None:
            await gen.stop()
            self.registry.release(gen.number)
        if out is not None:
            out.close()
        with contextlib.suppress(OSError):
            os.chdir(cwd)
        metrics.RELOAD_FAILURES.inc()
        metrics.LAST_RELOAD_OK.set(0)
        self.notify(sdnotify.READY, "Configuration running. Reload failed, see the log.")

    async def _retire(self, gen: Generation) -> None:
        self.log.msg("stopping old server")
        await gen.drain(None, close_idle=False)
        await gen.stop()
        self.log.msg("old server stopped")

    # -- main -----------------------------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        bridge_stdlib_logging(self.log)
        for sig in (*STOP_SIGNALS, signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.opts.log:
            self.new_logs += self._missing_log_files(self.opts.log)
            try:
                self.log.set_output(open_targets(self.opts.log, cwd=self.launch_cwd))
            except LogTargetError as e:
                stderr_fallback(f"Error: {e}")
                return 2
            self.log_targets = list(self.opts.log)
        code = await self._run_startup()
        if code is not None:
            return code
        while not self.stopping:
            await self.wake.wait()
            self.wake.clear()
            # Requests that arrive during a reload collapse into one more reload.
            if self.reload_pending and not self.stopping:
                self.reload_pending = False
                await self.reload()
        return await self.shutdown()

    async def _run_startup(self) -> int | None:
        """Start-up, abandoned if a stop signal arrives first. None: running."""
        task = asyncio.create_task(self.startup())
        while not task.done() and not self.stopping:
            waiter = asyncio.create_task(self.wake.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            self.wake.clear()
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            self.registry.close_all()
            self.log.msg("server stopped")
            return 0
        except StartFailure as e:
            for line in e.lines:
                stderr_fallback(f"Error: {line}")
            self.notify(None, e.lines[0] if e.lines else "start-up failed")
            return 1
        if self.reload_pending or self.stopping:
            self.wake.set()
        return None

    async def shutdown(self) -> int:
        self.log.msg("server stopping...")
        self.notify(sdnotify.STOPPING, "Waiting for old configuration to stop...")
        if self.current is not None:
            await self.current.stop_accepting()
        gens = [*self.retiring.values(), *([self.current] if self.current is not None else [])]
        # Draining again with close_idle hurries the old generations' own drains too.
        await asyncio.gather(
            *(g.drain(STOP_GRACE, close_idle=True) for g in gens),
            *([self.watcher.stop()] if self.watcher is not None else []),
            self.pool.stop(STOP_GRACE + 1.5),
        )
        if self.retiring:
            await asyncio.wait(list(self.retiring), timeout=0.5)
        self.notify(sdnotify.STOPPING, "Waiting for current configuration to stop...")
        await asyncio.gather(*(g.stop(budget=FINAL_STOP_BUDGET) for g in gens))
        self.registry.close_all()
        await peerbus.stop()
        if self.background:
            await asyncio.wait(list(self.background), timeout=0.5)
        metrics.UP.set(0)
        self.log.msg("server stopped")
        self.log.output.close()
        return 0


def run(opts: RunOptions) -> int:
    """Run the server until a stop signal; returns the process exit status."""
    metrics.BUILD_INFO.set(1, version=VERSION, maddy="0.9.4")
    sup = Supervisor(opts)
    try:
        return asyncio.run(sup.main())
    except KeyboardInterrupt:
        return 1
    except Exception as e:
        stderr_fallback(f"Error: {_internal(e)}")
        if opts.debug:
            stderr_fallback(traceback.format_exc())
        return EX_SOFTWARE


def main(argv: list[str] | None = None) -> int:
    """Development entry point (`python -m pymaddy.runtime.supervisor`) until the CLI lands."""
    p = argparse.ArgumentParser(prog="pymaddy-run", description="Run the pymaddy server.")
    p.add_argument("--config", "-config", default=os.environ.get("MADDY_CONFIG", "/etc/maddy/maddy.conf"))
    p.add_argument("--debug", "-debug", action="store_true")
    p.add_argument("--log", "-log", action="append")
    p.add_argument("--libexec", "-libexec", default="/usr/lib/maddy")
    p.add_argument("--debug.smtpport", "-debug.smtpport", dest="smtp_port", type=int)
    p.add_argument("--debug.dnsoverride", "-debug.dnsoverride", dest="dns_override")
    a = p.parse_args(argv)
    opts = RunOptions(config=a.config, debug=a.debug, log=a.log, libexec=a.libexec)
    opts.smtp_port, opts.dns_override = a.smtp_port, a.dns_override
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
