"""Reload when a configuration file changes, without a signal.

Watches the parent directories (not the files) of the config and every
imported file, because editors and config managers replace files by rename;
a watch on the old inode would miss the new content. Changes are filtered to
exactly those files and debounced so one save triggers one reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable

from pymaddy.runtime.log import Logger

DEBOUNCE_MS = 400  # upper bound for grouping a burst of changes
STEP_MS = 100  # a burst ends after this long without changes


def _norm(path: str) -> set[str]:
    return {os.path.abspath(path), os.path.realpath(path)}


class ConfigWatcher:
    """Calls `on_change(paths)` (on the event loop) after any of `files` changes."""

    def __init__(self, files: Iterable[str], on_change: Callable[[list[str]], None], log: Logger) -> None:
        self.files = sorted({os.path.abspath(f) for f in files if f})
        self._match: set[str] = set().union(*(_norm(f) for f in self.files)) if self.files else set()
        self._on_change = on_change
        self._log = log
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start watching; on return the watch is armed (changes from now on are seen)."""
        if not self.files:
            return
        self._task = asyncio.create_task(self._run(), name="config-watcher")
        # awatch() sets up inotify synchronously in its first step, before it
        # parks in a worker thread; a few loop iterations get it there.
        for _ in range(3):
            await asyncio.sleep(0)
        self._log.debug("watching configuration files", files=self.files)

    def _filter(self, _change: object, path: str) -> bool:
        return bool(_norm(path) & self._match)

    async def _run(self) -> None:
        from watchfiles import awatch

        dirs = sorted({os.path.dirname(f) for f in self.files if os.path.isdir(os.path.dirname(f))})
        if not dirs:
            return
        try:
            async for changes in awatch(
                *dirs,
                watch_filter=self._filter,
                debounce=DEBOUNCE_MS,
                step=STEP_MS,
                stop_event=self._stop,
                recursive=False,
            ):
                if self._stop.is_set():
                    return
                self._on_change(sorted({p for _, p in changes}))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._log.error("config watcher failed, file changes will not trigger reloads", err=e)

    async def stop(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        # The watch thread notices the stop event within STEP_MS.
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
