"""A worker process: serves the supervisor's client endpoints on the sockets it was handed.

Started by runtime/workers.py, never by a user. It compiles the same configuration
file, builds only the imap/smtp/submission/lmtp endpoints and the modules they reach,
and accepts on the inherited listening sockets next to the supervisor.

Invariants:
- Never binds a listening socket: a configuration that no longer matches the
  descriptors it was given (edited between the supervisor's load and ours) makes it
  exit with status 1, and the supervisor's reload brings fresh workers.
- Runs no singleton: modules see `ctx.worker` and leave queue engines (target.queue
  hands its committed entries over), database maintenance, garbage collection and the
  MTA-STS cache refresh to the supervisor.
- Exits 0 once its sessions have drained: after SIGUSR2 (retired by a reload) within the
  endpoints' own drain time, after SIGTERM or when the supervisor is gone (EOF on the
  parent pipe) within STOP_GRACE, so no orphan keeps serving an old configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import traceback

from pymaddy.auth import throttle
from pymaddy.compiler.compile import compile_file
from pymaddy.runtime import metrics, peerbus
from pymaddy.runtime.listeners import Listener
from pymaddy.runtime.log import Logger, LogTargetError, bridge_stdlib_logging, open_targets, stderr_fallback
from pymaddy.runtime.module import RuntimeContext
from pymaddy.runtime.options import RunOptions
from pymaddy.runtime.supervisor import (
    FINAL_STOP_BUDGET,
    STOP_GRACE,
    Generation,
    StartFailure,
    _internal,
    missing_runtimes,
)
from pymaddy.runtime.workers import (
    LISTEN_ENV,
    METRICS_INTERVAL,
    METRICS_REQUEST,
    METRICS_TOPIC,
    PARENT_ENV,
    READY_TOPIC,
    shares,
)


class Worker:
    def __init__(self, opts: RunOptions, generation: int, slot: int, processes: int) -> None:
        self.opts = opts
        self.generation = generation
        self.slot = slot
        self.processes = processes
        self.log = Logger(debug=opts.debug)
        self.stop = asyncio.Event()  # stop accepting and drain
        self.hurry = asyncio.Event()  # ... with STOP_GRACE (SIGTERM, or the supervisor gone)
        self.gen: Generation | None = None

    def _inherited(self) -> dict[int, list[socket.socket]]:
        raw = json.loads(os.environ.get(LISTEN_ENV) or "{}")
        return {int(k): [socket.socket(fileno=int(fd)) for fd in fds] for k, fds in raw.items()}

    async def start(self) -> None:
        res = await asyncio.to_thread(compile_file, self.opts.config)
        if not res.ok or res.graph is None:
            raise StartFailure([str(e) for e in res.errors] or ["configuration could not be loaded"])
        graph = res.graph
        if not self.opts.log:
            targets = list(graph.globals.get("log") or ["stderr"])
            try:
                self.log.set_output(open_targets(targets)).close()
            except LogTargetError as e:
                raise StartFailure([str(e)]) from None
        self.log.debug_enabled = self.opts.debug or bool(graph.globals.get("debug"))
        bridge_stdlib_logging(self.log)
        missing = missing_runtimes(graph)
        if missing:
            raise StartFailure(missing)
        state_dir = str(graph.globals["state_dir"])
        os.chdir(state_dir)
        indexes, closure = shares(graph)
        socks = self._inherited()
        if sorted(socks) != indexes:
            raise StartFailure(["the configuration changed since the supervisor loaded it"])
        ctx = RuntimeContext(options=self.opts, graph=graph, generation=self.generation, logger=self.log,
                             metrics=metrics.REGISTRY, state_dir=state_dir,
                             runtime_dir=str(graph.globals["runtime_dir"]), processes=self.processes,
                             worker=True)
        await peerbus.start(ctx.runtime_dir)
        throttle.join_peer_bus()
        peerbus.subscribe(METRICS_REQUEST, lambda _p: self._send_metrics())
        gen = Generation(self.generation, ctx)
        gen.build(only=closure)
        by_inst = {id(ep.inst): ep for ep in gen.endpoints}
        for i in indexes:
            ep = by_inst[id(graph.endpoints[i])]
            addrs = ep.addresses()
            if len(addrs) != len(socks[i]):
                raise StartFailure(["the configuration changed since the supervisor loaded it"])
            # Our own dup per endpoint, as in the supervisor: closing it stops our accepting only.
            gen.listeners[id(ep)] = [Listener(a, s.dup()) for a, s in zip(addrs, socks[i], strict=True)]
        for group in socks.values():
            for s in group:
                s.close()
        self.gen = gen
        await gen.start()
        await gen.serve()
        peerbus.send_to(os.getppid(), READY_TOPIC, {"pid": os.getpid()})
        self.log.msg("worker started", pid=os.getpid(), slot=self.slot)

    def _parent_gone(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            if os.read(fd, 64):
                return
        asyncio.get_running_loop().remove_reader(fd)
        self.log.msg("supervisor is gone, worker stopping")
        self._hurry()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _l, c: self.log.error(
            "unhandled error", err=_internal(c["exception"]) if c.get("exception") else str(c.get("message"))))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._hurry)
        loop.add_signal_handler(signal.SIGUSR2, self.stop.set)  # retired by a reload: drain as the supervisor does
        loop.add_signal_handler(signal.SIGUSR1, self._reopen)
        parent = int(os.environ.get(PARENT_ENV, "-1"))
        if parent >= 0:
            os.set_blocking(parent, False)
            loop.add_reader(parent, self._parent_gone, parent)
        try:
            await self.start()
        except StartFailure as e:
            for line in e.lines:
                self.log.error("worker failed to start", err=line)
            if self.gen is not None:
                await self.gen.stop()
            return 1
        except Exception as e:
            self.log.error("worker failed to start", err=_internal(e))
            self.log.debug("worker failed to start", traceback=traceback.format_exc())
            if self.gen is not None:
                await self.gen.stop()
            return 1
        reporter = asyncio.ensure_future(self._report_metrics())
        await self.stop.wait()
        gen = self.gen
        assert gen is not None
        await gen.stop_accepting()
        if self.hurry.is_set():
            await gen.drain(STOP_GRACE, close_idle=True)
        else:
            # A reload's retirement: sessions get the endpoints' own drain time, unless a stop
            # signal comes meanwhile.
            drain = asyncio.ensure_future(gen.drain(None, close_idle=False))
            hurry = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if not drain.done():
                await gen.drain(STOP_GRACE, close_idle=True)
                drain.cancel()
        await gen.stop(budget=FINAL_STOP_BUDGET)
        reporter.cancel()
        self._send_metrics()  # the last counts, so the supervisor's totals do not lose them
        await peerbus.stop()
        self.log.debug("worker stopped", pid=os.getpid())
        self.log.output.close()
        return 0

    def _send_metrics(self) -> None:
        peerbus.send_to(os.getppid(), METRICS_TOPIC, {"pid": os.getpid(), "f": metrics.REGISTRY.snapshot()})

    async def _report_metrics(self) -> None:
        """The supervisor's openmetrics endpoint adds the workers' counters to its own."""
        while True:
            self._send_metrics()
            await asyncio.sleep(METRICS_INTERVAL)

    def _hurry(self) -> None:
        self.hurry.set()
        self.stop.set()

    def _reopen(self) -> None:
        try:
            self.log.output.reopen()
        except LogTargetError as e:
            self.log.printf(f"Can't reinitialize logger: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pymaddy-worker", description="A pymaddy worker process (internal).")
    p.add_argument("--config", required=True)
    p.add_argument("--generation", type=int, default=1)
    p.add_argument("--slot", type=int, default=0)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--libexec", default="/usr/lib/maddy")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--log", action="append")
    p.add_argument("--smtp-port", type=int)
    p.add_argument("--dns-override")
    a = p.parse_args(argv)
    if LISTEN_ENV not in os.environ:
        stderr_fallback("Error: pymaddy.runtime.worker is started by the pymaddy server, not by hand")
        return 2
    opts = RunOptions(config=a.config, debug=a.debug, log=a.log, libexec=a.libexec)
    opts.smtp_port, opts.dns_override = a.smtp_port, a.dns_override
    worker = Worker(opts, a.generation, a.slot, a.processes)
    if a.log:
        try:
            worker.log.set_output(open_targets(a.log))
        except LogTargetError as e:
            stderr_fallback(f"Error: {e}")
            return 2
    try:
        return asyncio.run(worker.main())
    except KeyboardInterrupt:
        return 1
    except Exception as e:
        stderr_fallback(f"Error: {_internal(e)}")
        return 70



if __name__ == "__main__":
    sys.exit(main())
