"""Build and start real module objects from config text, as the supervisor does, without a server.

    async with Runtime(text, tmp_path) as rt:
        table = rt.block("local_rewrites", Table)
        mod = rt.first("modify.replace_rcpt", ReplaceRcpt)

Only the modules reachable from `roots` are built (default: every configured
module), so a test needs only the implementations it exercises. The compile
errors a lone block always gets (unused block, no endpoint) are ignored; any
other error fails the test. Objects are constructed and started dependencies
first and stopped in reverse, inside `state_dir` as the working directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

from pymaddy.compiler.graph import Graph, ModuleInstance
from pymaddy.config.ir import Node
from pymaddy.runtime import metrics
from pymaddy.runtime.log import Logger, NopOutput, Output
from pymaddy.runtime.module import Module, RuntimeContext
from pymaddy.runtime.options import RunOptions
from pymaddy.runtime.supervisor import load_class
from pymaddy.tables.base import Table
from tests.confhelp import STANDALONE_NOISE, compile_text

T = TypeVar("T")


class MemoryOutput(Output):
    """Collects log lines (`[debug] ` prefixed for debug ones)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, stamp: float, debug: bool, msg: str) -> None:
        self.lines.append(("[debug] " if debug else "") + msg)


def referenced(value: Any, out: list[ModuleInstance]) -> None:
    """Every ModuleInstance inside a settings value (lists, dicts, dataclasses)."""
    if isinstance(value, ModuleInstance):
        out.append(value)
    elif isinstance(value, Node):
        return
    elif isinstance(value, dict):
        for v in value.values():
            referenced(v, out)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            referenced(v, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            referenced(getattr(value, f.name), out)


def dependency_order(roots: Sequence[ModuleInstance]) -> list[ModuleInstance]:
    """Roots and what they reference, each after everything it references."""
    seen: set[int] = set()
    order: list[ModuleInstance] = []

    def visit(inst: ModuleInstance) -> None:
        if id(inst) in seen:
            return
        seen.add(id(inst))
        deps: list[ModuleInstance] = []
        referenced(dict(inst.settings), deps)
        for d in deps:
            visit(d)
        order.append(inst)

    for r in roots:
        visit(r)
    return order


def compile_graph(text: str, environ: dict[str, str] | None = None, *, strict: bool = False) -> Graph:
    """The graph of `text`; any compile error fails the test (with `strict`, also the ones a lone
    block always gets)."""
    res = compile_text(text, environ=environ)
    errs = [str(e) for e in res.errors if strict or not any(n in str(e) for n in STANDALONE_NOISE)]
    assert not errs, errs
    assert res.graph is not None
    return res.graph


def bare_context(
    graph: Graph,
    state_dir: str | os.PathLike[str] = "/nonexistent",
    runtime_dir: str | os.PathLike[str] | None = None,
    *,
    logger: Logger | None = None,
    **options: Any,
) -> RuntimeContext:
    """A RuntimeContext whose `objects` the test fills itself (for checks and targets built by hand);
    `options` go to RunOptions (`dns_override`, `libexec`…)."""
    return RuntimeContext(
        options=RunOptions(config="maddy.conf", **options),
        graph=graph,
        generation=1,
        logger=logger or Logger(out=NopOutput()),
        metrics=metrics.Registry(),
        state_dir=os.fspath(state_dir),
        runtime_dir=os.fspath(runtime_dir if runtime_dir is not None else state_dir),
    )


class Runtime:
    """One generation's worth of module objects for the selected part of a config."""

    def __init__(
        self,
        text: str,
        state_dir: str | os.PathLike[str],
        roots: Sequence[str] | None = None,
        *,
        environ: dict[str, str] | None = None,
        debug: bool = False,
        chdir: bool = True,
    ) -> None:
        """`roots`: block names (`local_rewrites`) or module names (`modify.replace_rcpt`: all of them)."""
        self.graph = compile_graph(text, environ)
        self.state_dir = os.fspath(state_dir)
        self.output = MemoryOutput()
        self.logger = Logger(out=self.output, debug=debug)
        self.ctx = RuntimeContext(
            options=RunOptions(config=os.path.join(self.state_dir, "maddy.conf"), debug=debug),
            graph=self.graph,
            generation=1,
            logger=self.logger,
            metrics=metrics.REGISTRY,
            state_dir=self.state_dir,
            runtime_dir=self.state_dir,
        )
        self.instances = dependency_order(self._roots(roots))
        self.objects: list[Module] = []
        self.started: list[Module] = []
        self._chdir = chdir
        self._old_cwd: str | None = None

    def _roots(self, roots: Sequence[str] | None) -> list[ModuleInstance]:
        if roots is None:
            return list(self.graph.instances)
        out: list[ModuleInstance] = []
        for r in roots:
            if r in self.graph.blocks:
                out.append(self.graph.blocks[r])
                continue
            found = [i for i in self.graph.instances if i.schema.name == r]
            assert found, f"no block or module named {r!r}"
            out.extend(found)
        return out

    # -- life cycle -----------------------------------------------------------------------

    def build(self) -> None:
        for inst in self.instances:
            spec = inst.schema.runtime
            assert spec is not None, f"{inst.label} has no runtime"
            obj = load_class(spec)(inst, self.ctx)
            self.ctx.objects[id(inst)] = obj
            self.objects.append(obj)

    async def start(self) -> None:
        for obj in self.objects:
            await obj.start()
            self.started.append(obj)

    async def stop(self) -> None:
        while self.started:
            await self.started.pop().stop()

    async def __aenter__(self) -> Runtime:
        if self._chdir:
            self._old_cwd = os.getcwd()
            os.chdir(self.state_dir)
        try:
            self.build()
            await self.start()
        except BaseException:
            await self.stop()
            self._restore()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stop()
        finally:
            self._restore()

    def _restore(self) -> None:
        if self._old_cwd is not None:
            os.chdir(self._old_cwd)
            self._old_cwd = None

    # -- access -----------------------------------------------------------------------------

    def obj(self, inst: ModuleInstance, cls: type[T]) -> T:
        o = self.ctx.module(inst)
        assert isinstance(o, cls), f"{inst.label} is a {type(o).__name__}, not a {cls.__name__}"
        return o

    def block(self, name: str, cls: type[T]) -> T:
        """The object of the top-level block `name`."""
        return self.obj(self.graph.blocks[name], cls)

    def table(self, name: str) -> Table:
        """The Table object of the top-level block `name` (mypy refuses abstract classes for `block`)."""
        o = self.ctx.module(self.graph.blocks[name])
        assert isinstance(o, Table), f"{name} is not a table"
        return o

    def all(self, module: str, cls: type[T]) -> list[T]:
        """Objects of every built instance of module `module`, in configuration order."""
        order = {id(i): n for n, i in enumerate(self.graph.instances)}
        insts = sorted((i for i in self.instances if i.schema.name == module), key=lambda i: order.get(id(i), 0))
        return [self.obj(i, cls) for i in insts]

    def first(self, module: str, cls: type[T]) -> T:
        found = self.all(module, cls)
        assert found, f"no {module} was built"
        return found[0]

    @property
    def log_lines(self) -> list[str]:
        return list(self.output.lines)
