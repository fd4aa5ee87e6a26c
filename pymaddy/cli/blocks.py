"""Open one configuration block for a management command (`creds`, `imap-acct`, …).

maddy's management commands read the whole config, set up the directories
like the server does, and then initialise only the selected top-level block
(and what it references), so they work while the server runs. Usage:

    async with open_block(config_path, "local_authdb", PassTable, what="a local credentials store") as db:
        await db.list_users()

Failures raise `BlockError(message, exit_code)`; the command prints
`Error: MESSAGE` and exits with the code:

* compile errors in the globals or in the selected block's modules → 1
  (errors inside blocks the command does not use are ignored, as maddy
  configures blocks lazily; so are "unused block" / "no endpoint");
* `unknown configuration block: NAME` → 2; a block of the wrong kind
  (`configuration block NAME is not WHAT`) → 2;
* directories, module start failures → 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar

from pymaddy.compiler.compile import compile_file
from pymaddy.compiler.globals import DEFAULT_LIBEXEC_DIR
from pymaddy.compiler.graph import Graph, ModuleInstance
from pymaddy.config.ir import Node
from pymaddy.runtime import metrics
from pymaddy.runtime.log import Logger
from pymaddy.runtime.module import Module, ModuleError, RuntimeContext
from pymaddy.runtime.options import RunOptions

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
STOP_TIMEOUT = 5.0

# Errors about the config as a whole server, meaningless for one block.
_SERVER_ONLY = ("unused configuration block", "at least one endpoint should be configured")


class BlockError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def references(value: Any) -> Iterable[ModuleInstance]:
    """Every ModuleInstance directly inside a settings value (lists, dicts, dataclasses, nested blocks)."""
    if isinstance(value, ModuleInstance):
        yield value
    elif isinstance(value, dict):  # Settings included
        for v in value.values():
            yield from references(v)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from references(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from references(getattr(value, f.name))


def dependencies(inst: ModuleInstance) -> list[ModuleInstance]:
    """`inst` and every module it reaches, each once, dependencies before their users."""
    out: list[ModuleInstance] = []
    seen: set[int] = set()

    def visit(i: ModuleInstance) -> None:
        if id(i) in seen:
            return
        seen.add(id(i))
        for ref in references(i.settings):
            visit(ref)
        out.append(i)

    visit(inst)
    return out


def _locations(node: Node) -> set[tuple[str, int]]:
    out = {(node.file, node.line)}
    for c in node.children or []:
        out |= _locations(c)
    return out


def _relevant_errors(errors: Iterable[Any], graph: Graph | None, used: list[ModuleInstance]) -> list[str]:
    """Compile errors that concern the globals or the modules the command will use."""
    ignored: set[tuple[str, int]] = set()
    if graph is not None:
        used_ids = {id(i) for i in used}
        for other in [*graph.endpoints, *graph.blocks.values()]:
            if id(other) not in used_ids:
                ignored |= _locations(other.node)
        for i in used:
            ignored -= _locations(i.node)
    out = []
    for e in errors:
        msg = str(e)
        if any(s in msg for s in _SERVER_ONLY):
            continue
        if (getattr(e, "file", ""), getattr(e, "line", 0)) in ignored:
            continue
        out.append(msg)
    return out


def _load_class(spec: str) -> type[Module]:
    from pymaddy.runtime.supervisor import load_class

    return load_class(spec)


def _init_dirs(graph: Graph, libexec: str) -> None:
    """The supervisor's directory set-up (create 0700, write-test, chdir into state_dir), then
    libexec on PATH; errors become BlockError."""
    from pymaddy.runtime.supervisor import StartFailure, init_dirs

    state_dir, runtime_dir = str(graph.globals["state_dir"]), str(graph.globals["runtime_dir"])
    try:
        init_dirs(state_dir, runtime_dir, libexec)
    except StartFailure as e:
        raise BlockError("; ".join(e.lines)) from None
    path = os.environ.get("PATH", "")
    if not path.startswith(libexec + os.pathsep):
        os.environ["PATH"] = libexec + os.pathsep + path


def _where(inst: ModuleInstance) -> str:
    return f"{inst.node.file}:{inst.node.line}"


@contextlib.asynccontextmanager
async def open_block(
    config_path: str,
    name: str,
    cls: type[T],
    *,
    what: str = "",
    libexec: str | None = None,
    debug: bool = False,
    logger: Logger | None = None,
) -> AsyncIterator[T]:
    """Compile the config, prepare the directories, build and start block `name` and its
    dependencies; yield its runtime object (an instance of `cls`); stop them all afterwards."""
    if not name:
        raise BlockError("cfg-block is required", EXIT_USAGE)
    if not os.path.exists(config_path):
        raise BlockError(f"failed to open config: open {config_path}: no such file or directory", EXIT_USAGE)
    config_path = os.path.abspath(config_path)
    res = await asyncio.to_thread(compile_file, config_path)
    graph = res.graph
    if graph is None:
        raise BlockError("; ".join(str(e) for e in res.errors) or "configuration could not be loaded")
    inst = graph.blocks.get(name)
    if inst is None:
        # Errors may be why the block is missing (a syntax error before it): report them first.
        errs = _relevant_errors(res.errors, graph, [])
        if errs:
            raise BlockError("\n".join(errs))
        raise BlockError(f"unknown configuration block: {name}", EXIT_USAGE)
    used = dependencies(inst)
    errs = _relevant_errors(res.errors, graph, used)
    if errs:
        raise BlockError("\n".join(errs))
    missing = [f"{_where(i)}: module {i.schema.name} is not implemented yet" for i in used if i.schema.runtime is None]
    if missing:
        raise BlockError("\n".join(missing))

    log = logger or Logger(debug=debug or bool(graph.globals.get("debug")))
    libexec = libexec or DEFAULT_LIBEXEC_DIR
    ctx = RuntimeContext(
        options=RunOptions(config=config_path, debug=debug, libexec=libexec, management=True),
        graph=graph,
        generation=0,
        logger=log,
        metrics=metrics.REGISTRY,
        state_dir=str(graph.globals["state_dir"]),
        runtime_dir=str(graph.globals["runtime_dir"]),
    )
    objs: list[Module] = []
    for i in used:
        spec = i.schema.runtime
        assert spec is not None
        try:
            obj = _load_class(spec)(i, ctx)
        except ModuleError as e:
            raise BlockError(f"{_where(i)}: {e}") from None
        except Exception as e:
            raise BlockError(f"{_where(i)}: {i.label}: internal error: {type(e).__name__}: {e}") from None
        ctx.objects[id(i)] = obj
        objs.append(obj)
    target = ctx.objects[id(inst)]
    if not isinstance(target, cls):
        raise BlockError(f"configuration block {name} is not {what or 'a ' + cls.__name__}", EXIT_USAGE)

    _init_dirs(graph, libexec)
    started: list[Module] = []
    try:
        for obj in objs:
            try:
                await obj.start()
            except ModuleError as e:
                raise BlockError(f"{_where(obj.inst)}: {e}") from None
            except BlockError:
                raise
            except Exception as e:
                raise BlockError(
                    f"{_where(obj.inst)}: {obj.inst.label}: internal error: {type(e).__name__}: {e}"
                ) from None
            started.append(obj)
        yield target
    finally:
        for obj in reversed(started):
            try:
                await asyncio.wait_for(obj.stop(), STOP_TIMEOUT)
            except Exception as e:  # a failed stop must not hide the command's own result
                log.error("failed to stop module", err=str(e), module=obj.inst.label)


__all__ = ["BlockError", "dependencies", "open_block", "references"]
