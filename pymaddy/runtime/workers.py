"""Extra server processes that share the supervisor's IMAP listeners (the `workers` directive).

Why: one Python process saturates one core; IMAP sessions are independent of each
other except through the database, so more processes accepting on the same sockets
spread them over the CPUs (docs/multiprocess.md). SMTP endpoints stay in the
supervisor for now: their queue engines are singletons.

Invariants:
- The supervisor keeps serving every endpoint itself, so a worker that is starting,
  draining or dead never makes a connection fail: the kernel hands it to a process
  that accepts.
- Workers get the listening sockets by descriptor (`pass_fds`), never bind one, and
  run with the supervisor's (already dropped) privileges.
- A worker that cannot start is not respawned until the next reload; one that dies
  later is respawned with a growing delay. Every exit is logged.
- Workers exit when the supervisor goes away: they hold the read end of a pipe whose
  only write end the supervisor holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pymaddy.compiler.graph import Graph, ModuleInstance, reachable
from pymaddy.runtime.log import Logger
from pymaddy.runtime.options import RunOptions

LISTEN_ENV = "PYMADDY_WORKER_LISTENERS"  # JSON {"<endpoint index>": [fd, ...]}
PARENT_ENV = "PYMADDY_WORKER_PARENT"  # read end of the supervisor's pipe
WORKERS_ENV = "PYMADDY_WORKERS"  # overrides the `workers` directive (tests, benches)

WORKER_ENDPOINTS = frozenset({"imap"})
# Modules that cannot run outside the supervisor: their password helper is a socketpair
# only the supervisor holds (auth/privhelper.py).
SUPERVISOR_ONLY = frozenset({"auth.shadow", "auth.pam"})
START_GRACE = 10.0  # a worker that dies sooner failed to start
MAX_BACKOFF = 60.0


def wanted(graph: Graph) -> int:
    """How many processes the configuration asks for (1 = the supervisor alone)."""
    raw = os.environ.get(WORKERS_ENV)
    n = int(graph.globals.get("workers") or 0) if raw is None else (int(raw) if raw.isdigit() else 1)
    if n == 0:  # auto
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n)


def shares(graph: Graph) -> tuple[list[int], set[int]]:
    """The endpoints a worker serves (indexes into graph.endpoints) and the ids of every
    instance it must build for them."""
    idx = [i for i, e in enumerate(graph.endpoints) if e.schema.name in WORKER_ENDPOINTS]
    closure = reachable([graph.endpoints[i] for i in idx], graph.globals)
    return idx, closure


def blocker(graph: Graph, closure: set[int]) -> ModuleInstance | None:
    """A module in the workers' share that only the supervisor can run."""
    from pymaddy.runtime.supervisor import unique_instances

    for inst in unique_instances(graph):
        if id(inst) in closure and inst.schema.name in SUPERVISOR_ONLY and not inst.settings.get("use_helper"):
            return inst
    return None


@dataclass(eq=False)
class _Worker:
    slot: int
    generation: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    retiring: bool = False
    monitor: asyncio.Task[None] | None = None
    backoff: float = 1.0


@dataclass
class _Plan:
    generation: int
    count: int  # extra processes
    fds: dict[str, list[int]] = field(default_factory=dict)


class WorkerPool:
    """The supervisor's worker processes for the current generation, and the retiring ones."""

    def __init__(self, opts: RunOptions, config_path: str, launch_cwd: str, log: Logger) -> None:
        self.opts = opts
        self.config_path = config_path
        self.launch_cwd = launch_cwd
        self.log = log
        self.plan: _Plan | None = None
        self.current: list[_Worker] = []
        self.retiring: list[_Worker] = []
        self.stopping = False
        self._parent_r, self._parent_w = os.pipe()  # workers hold the read end; EOF = we are gone

    # -- planning -----------------------------------------------------------------------------

    def processes_for(self, graph: Graph, blocked_reason: str | None = None) -> int:
        """Processes the generation will run (supervisor included), logging why it is fewer."""
        n = wanted(graph)
        if n <= 1:
            return 1
        idx, closure = shares(graph)
        if not idx:
            return 1
        if blocked_reason:
            self.log.msg(f"workers {n} requested, running one process: {blocked_reason}")
            return 1
        inst = blocker(graph, closure)
        if inst is not None:
            self.log.msg(f"workers {n} requested, running one process: {inst.schema.name} at "
                         f"{inst.node.file}:{inst.node.line} needs the supervisor's password helper")
            return 1
        return n

    # -- life cycle -----------------------------------------------------------------------------

    async def replace(self, generation: int, count: int, fds: dict[str, list[int]]) -> None:
        """Start `count` workers for `generation` with these listener descriptors, then retire
        the previous generation's workers (they drain their sessions and exit)."""
        old, self.current = self.current, []
        self.plan = _Plan(generation, count, fds)
        for slot in range(count):
            w = _Worker(slot, generation)
            self.current.append(w)
            await self._spawn(w)
        for w in old:
            self._retire(w)

    async def _spawn(self, w: _Worker) -> None:
        plan = self.plan
        if plan is None or self.stopping:
            return
        fds = sorted({fd for group in plan.fds.values() for fd in group})
        env = dict(os.environ)
        env[LISTEN_ENV] = json.dumps(plan.fds)
        env[PARENT_ENV] = str(self._parent_r)
        # The worker imports pymaddy from wherever this process did.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        args = [sys.executable, "-m", "pymaddy.runtime.worker", "--config", self.config_path,
                "--generation", str(plan.generation), "--slot", str(w.slot),
                "--processes", str(plan.count + 1), "--libexec", self.opts.libexec]
        if self.opts.debug:
            args.append("--debug")
        for target in self.opts.log or []:
            args += ["--log", target]
        if self.opts.smtp_port is not None:
            args += ["--smtp-port", str(self.opts.smtp_port)]
        if self.opts.dns_override:
            args += ["--dns-override", self.opts.dns_override]
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, pass_fds=[*fds, self._parent_r],
                cwd=self.launch_cwd, env=env)
        except OSError as e:
            self.log.error("cannot start a worker process", err=e)
            return
        w.started = time.monotonic()
        self.log.debug("worker started", pid=w.proc.pid, slot=w.slot, generation=w.generation)
        w.monitor = asyncio.create_task(self._watch(w))

    async def _watch(self, w: _Worker) -> None:
        proc = w.proc
        assert proc is not None
        code = await proc.wait()
        self._cleanup(proc.pid)
        if w.retiring or self.stopping:
            self.log.debug("worker exited", pid=proc.pid, status=code)
            return
        lived = time.monotonic() - w.started
        if code == 1 and lived < START_GRACE:
            self.log.error("worker process could not start; serving from fewer processes until the next reload",
                           err=f"exit status {code}", pid=proc.pid)
            if w in self.current:
                self.current.remove(w)
            return
        w.backoff = 1.0 if lived > MAX_BACKOFF else min(MAX_BACKOFF, w.backoff * 2)
        self.log.error("worker process exited, restarting it", err=f"exit status {code}", pid=proc.pid,
                       delay=w.backoff)
        await asyncio.sleep(w.backoff)
        if w in self.current and not self.stopping:
            await self._spawn(w)

    def _retire(self, w: _Worker, sig: signal.Signals = signal.SIGUSR2) -> None:
        """SIGUSR2: drain as a reload's old generation does; SIGTERM: stop soon."""
        w.retiring = True
        if w not in self.retiring:
            self.retiring.append(w)
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    def _cleanup(self, pid: int) -> None:
        """Remove the per-process sockets a killed worker could not (imapsql's update socket)."""
        for w in [*self.retiring]:
            if w.proc is not None and w.proc.pid == pid:
                self.retiring.remove(w)
        if self.plan is None:
            return
        suffix = f".{pid}.sock"
        with contextlib.suppress(OSError):
            for d in self._runtime_dirs:
                for name in os.listdir(d):
                    if name.endswith(suffix):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(d, name))

    _runtime_dirs: tuple[str, ...] = ()

    def set_runtime_dir(self, path: str) -> None:
        self._runtime_dirs = (path,)

    def signal_all(self, sig: signal.Signals) -> None:
        for w in [*self.current, *self.retiring]:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.current if w.proc is not None and w.proc.returncode is None]

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker; SIGKILL the ones still running after `timeout`."""
        self.stopping = True
        everyone = [*self.current, *self.retiring]
        for w in everyone:
            self._retire(w, signal.SIGTERM)
        procs = [w.proc for w in everyone if w.proc is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in procs if p.returncode is None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                for p in procs:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
                await asyncio.wait(pending, timeout=1.0)
        for w in everyone:
            if w.monitor is not None and not w.monitor.done():
                w.monitor.cancel()
        self.current, self.retiring = [], []
        for fd in (self._parent_r, self._parent_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def listener_fds(indexes: Iterable[int], listeners: list[list[int]]) -> dict[str, list[int]]:
    """{"<endpoint index>": [fd, ...]} for the worker's environment."""
    return {str(i): fds for i, fds in zip(indexes, listeners, strict=True)}
