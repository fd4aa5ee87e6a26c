"""Extra server processes that share the supervisor's listeners (the `workers` directive).

Why: one Python process saturates one core. Sessions are independent of each other
except through the database, the queue directory and a few counters, so more processes
accepting on the same sockets spread them over the CPUs (docs/multiprocess.md). Workers
serve the imap, smtp, submission and lmtp endpoints; a queue they write to is delivered
by the supervisor's engine (queue/control.Handoff), and counters that must be shared
travel over runtime/peerbus.py.

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
from dataclasses import dataclass, field
from typing import Any

from pymaddy.compiler.graph import Graph, ModuleInstance, reachable
from pymaddy.runtime.log import Logger
from pymaddy.runtime.metrics import Snapshot
from pymaddy.runtime.options import RunOptions

LISTEN_ENV = "PYMADDY_WORKER_LISTENERS"  # JSON {"<endpoint index>": [fd, ...]}
PARENT_ENV = "PYMADDY_WORKER_PARENT"  # read end of the supervisor's pipe
WORKERS_ENV = "PYMADDY_WORKERS"  # overrides the `workers` directive (tests, benches)

WORKER_ENDPOINTS = frozenset({"imap", "smtp", "submission", "lmtp"})
# Modules that cannot run outside the supervisor: their password helper is a socketpair
# only the supervisor holds (auth/privhelper.py).
SUPERVISOR_ONLY = frozenset({"auth.shadow", "auth.pam"})
READY_TOPIC = "worker_ready"
READY_TIMEOUT = 15.0  # how long start-up and reloads wait for new workers to serve
METRICS_TOPIC = "metrics"
METRICS_INTERVAL = 2.0  # seconds between a worker's metrics snapshots to the supervisor
METRICS_REQUEST = "metrics_request"  # a scrape asks the workers for their counts now
METRICS_WAIT = 0.25  # ... and waits this long for them
START_GRACE = 10.0  # a worker that dies sooner failed to start
MAX_BACKOFF = 60.0


def wanted(graph: Graph) -> int:
    """How many processes the configuration asks for (1 = the supervisor alone)."""
    raw = os.environ.get(WORKERS_ENV) or ""  # empty: the configuration decides
    n = (int(raw) if raw.isdigit() else 1) if raw else int(graph.globals.get("workers") or 0)
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
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # serving, or gone


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
        self.runtime_dir = ""
        self._parent_r, self._parent_w = os.pipe()  # workers hold the read end; EOF = we are gone
        # Metrics: each live worker's last snapshot, and the counters of workers that exited
        # (so a total never goes down when a worker is replaced).
        self.snapshots: dict[int, list[Snapshot]] = {}
        self.retired: dict[tuple[str, str, str, tuple[str, ...]], dict[tuple[str, ...], float]] = {}
        self._dead: list[int] = []
        self._asked: dict[int, asyncio.Future[None]] = {}

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

    async def replace(self, generation: int, count: int, fds: dict[str, list[int]], runtime_dir: str) -> None:
        """Start `count` workers for `generation` with these listener descriptors, then retire
        the previous generation's workers (they drain their sessions and exit)."""
        old, self.current = self.current, []
        self.plan = _Plan(generation, count, fds)
        if count:
            self.runtime_dir = runtime_dir  # where a killed worker's sockets are left
        for slot in range(count):
            w = _Worker(slot, generation)
            self.current.append(w)
            await self._spawn(w)
        # "server started" (and systemd's READY=1) once every process serves, so the first
        # clients meet the configuration as a whole; a worker that cannot start says so itself.
        waits = [asyncio.ensure_future(w.ready.wait()) for w in self.current]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=READY_TIMEOUT)
            for t in pending:
                t.cancel()
            if pending:
                self.log.error("worker processes are slow to start", err=f"{len(pending)} not ready after "
                               f"{READY_TIMEOUT:.0f} s; serving meanwhile")
        for w in old:
            self._retire(w)

    async def _spawn(self, w: _Worker) -> None:
        plan = self.plan
        if plan is None or self.stopping:
            w.ready.set()
            return
        w.ready.clear()
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
            w.ready.set()
            return
        w.started = time.monotonic()
        self.log.debug("worker started", pid=w.proc.pid, slot=w.slot, generation=w.generation)
        w.monitor = asyncio.create_task(self._watch(w))

    # -- metrics ----------------------------------------------------------------------------------

    def on_ready(self, payload: dict[str, Any]) -> None:
        for w in self.current:
            if w.proc is not None and w.proc.pid == payload.get("pid"):
                w.ready.set()

    def on_metrics(self, payload: dict[str, Any]) -> None:
        pid = payload.get("pid")
        fams = payload.get("f")
        if isinstance(pid, int) and isinstance(fams, list) and pid not in self._dead:
            self.snapshots[pid] = [tuple(f) for f in fams if isinstance(f, list) and len(f) == 5]
            fut = self._asked.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def refresh_metrics(self) -> None:
        """Ask every serving worker for its counts and wait briefly for the answers."""
        from pymaddy.runtime import peerbus

        loop = asyncio.get_running_loop()
        futs = []
        for w in self.current:
            if w.proc is not None and w.proc.returncode is None and w.ready.is_set():
                fut = self._asked.get(w.proc.pid)
                if fut is None or fut.done():
                    fut = self._asked[w.proc.pid] = loop.create_future()
                    peerbus.send_to(w.proc.pid, METRICS_REQUEST, {})
                futs.append(fut)
        if futs:
            await asyncio.wait(futs, timeout=METRICS_WAIT)

    def _retire_metrics(self, pid: int) -> None:
        self._dead.append(pid)  # a late snapshot must not count it twice
        del self._dead[:-256]
        for name, typ, help_, labels, samples in self.snapshots.pop(pid, []):
            if typ != "counter":
                continue
            acc = self.retired.setdefault((name, typ, help_, tuple(labels)), {})
            for key, value in samples:
                k = tuple(str(x) for x in key)
                acc[k] = acc.get(k, 0.0) + float(value)

    def remote_metrics(self) -> list[Snapshot]:
        out: list[Snapshot] = [(n, t, h, list(lb), [[list(k), v] for k, v in vals.items()])
                               for (n, t, h, lb), vals in self.retired.items()]
        for snaps in self.snapshots.values():
            out.extend(snaps)
        return out

    # -- watching ----------------------------------------------------------------------------------

    async def _watch(self, w: _Worker) -> None:
        proc = w.proc
        assert proc is not None
        code = await proc.wait()
        w.ready.set()
        self._cleanup(proc.pid)
        from pymaddy.runtime import peerbus

        peerbus.announce_leave(proc.pid)  # its share of `limits` concurrency is free again
        # Its final snapshot arrives just before it exits; give it a moment, then keep its counters.
        asyncio.get_running_loop().call_later(0.5, self._retire_metrics, proc.pid)
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
            for name in os.listdir(self.runtime_dir):
                if name.endswith(suffix):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.runtime_dir, name))

    def signal_all(self, sig: signal.Signals) -> None:
        for w in [*self.current, *self.retiring]:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

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
