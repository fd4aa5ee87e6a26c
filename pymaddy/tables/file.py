"""`table.file`: an aliases-style text file, re-read when it changes (maddy's internal/table/file.go).

Format, one entry per line:

    key: value1, value2
    key                 # alone: the value is ""

Repeated keys accumulate values; lines whose *first character* is `#` are
comments (an indented `#` is not); blank lines are ignored; an empty key is an
error that rejects the whole file. A missing file is an empty table.

Every `reload_interval` seconds the file is stat()ed; it is re-read when its
mtime differs from the one loaded and is at least half an interval old (so a
file still being written is not read half-way). A failed re-read keeps the old
contents and is logged; a file that disappeared empties the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from typing import TYPE_CHECKING

from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD = "table.file"


class FileParseError(ValueError):
    """`PATH:LINE: message`, worded as maddy words it."""


def parse_text(path: str, text: str) -> dict[str, list[str]]:
    """Parse the aliases format (see the module docstring)."""
    out: dict[str, list[str]] = {}
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        key, _, rest = line.partition(":")
        key = key.strip()
        if not key:
            raise FileParseError(f"{path}:{lineno}: empty address before colon")
        out.setdefault(key, []).extend(v.strip() for v in rest.split(","))
    return out


def read_file(path: str) -> dict[str, list[str]]:
    """Read and parse `path`; OSError (FileNotFoundError included) and FileParseError propagate."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_text(path, data.decode("utf-8", errors="replace"))


def go_os_error(op: str, path: str, e: OSError) -> str:
    """`open PATH: permission denied`, like Go's *PathError."""
    text = e.strerror or str(e)
    if e.errno is not None and e.errno in errno.errorcode:
        text = os.strerror(e.errno)
    return f"{op} {path}: {text[:1].lower()}{text[1:]}"


class FileTable(Module, Table):
    reload_interval = 15.0  # seconds; tests shorten it

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.file: str = self.settings.get("file") or ""
        # Relative paths are relative to the working directory, which is state_dir.
        self.path = os.path.join(ctx.state_dir, self.file) if self.file else ""
        self.data: dict[str, list[str]] = {}
        self.stamp: int | None = None  # st_mtime_ns of the loaded contents
        self._task: asyncio.Task[None] | None = None

    def log_name(self) -> str:
        return MOD

    async def start(self) -> None:
        try:
            st = os.stat(self.path) if self.path else None
            self.data = await asyncio.to_thread(read_file, self.path)
            self.stamp = st.st_mtime_ns if st is not None else None
        except FileNotFoundError:
            self.log.printf(f"ignoring non-existent file: {self.file}")
        except FileParseError as e:
            raise ModuleError(str(e)) from None
        except OSError as e:
            raise ModuleError(go_os_error("open", self.file, e)) from None
        self._task = asyncio.get_running_loop().create_task(self._reloader())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _reloader(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                await self.reload()
            except Exception as e:  # never let the reloader die
                self.log.error("reload failed", err=e)

    async def reload(self) -> None:
        """One reloader tick (also callable directly)."""
        try:
            st = os.stat(self.path) if self.path else None
        except FileNotFoundError:
            st = None
        except OSError as e:
            self.log.error("os stat", err=go_os_error("stat", self.file, e))
            return
        if st is None:
            self.data = {}
            self.stamp = None
            return
        if st.st_mtime_ns == self.stamp:
            return
        age = time.time() - st.st_mtime
        if age < self.reload_interval / 2:
            return  # may still be being written: wait for the next tick
        self.log.debugf("reloading")
        try:
            new = await asyncio.to_thread(read_file, self.path)
        except FileNotFoundError:
            self.log.printf(f"ignoring non-existent file: {self.file}")
            return
        except FileParseError as e:
            self.log.printf(str(e))
            return
        except OSError as e:
            self.log.printf(go_os_error("open", self.file, e))
            return
        try:
            st2 = os.stat(self.path)
        except OSError as e:
            self.log.printf(go_os_error("stat", self.file, e))
            return
        if st2.st_mtime_ns != st.st_mtime_ns:
            return  # changed while we read it: the next tick takes the final version
        self.data = new
        self.stamp = st.st_mtime_ns

    async def lookup_multi(self, key: str) -> list[str]:
        # The dict is replaced on reload, never modified: no lock needed.
        return list(self.data.get(key, ()))
