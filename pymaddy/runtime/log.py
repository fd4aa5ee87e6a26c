"""maddy's log format and outputs (spec §H, framework/log).

A line is ``<module>[/sub]: <message>\\t{json}``: JSON keys sorted, the TAB always
written (lines without fields end with it), root messages without a module
prefix, ``[debug] `` before debug lines. ``stderr_ts`` and files prefix a UTC
``2006-01-02T15:04:05.000Z `` timestamp; plain ``stderr`` has none; ``syslog``
sends to facility MAIL with tag ``maddy``. Log parsers (fail2ban, logparser)
depend on this exact shape, so it is kept byte for byte.

Every output serialises its own writes (modules log from worker threads too)
and never raises: a failing log write is reported once on stderr, not
propagated into the code that was logging.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BridgeHandler",
    "LogTargetError",
    "Logger",
    "Output",
    "format_fields",
    "go_duration",
    "open_targets",
]


class LogTargetError(ValueError):
    """A `log` directive or `--log` flag that cannot be opened."""


# -- formatting -----------------------------------------------------------------


def go_duration(td: _dt.timedelta | float) -> str:
    """Go's time.Duration.String(): 1h2m3.5s, 150ms, 0s; maddy logs durations this way."""
    ns = round((td.total_seconds() if isinstance(td, _dt.timedelta) else td) * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1_000_000)}ms"
    h, rem = divmod(ns, 3_600_000_000_000)
    m, rem = divmod(rem, 60_000_000_000)
    s = _trim(rem / 1e9)
    out = f"{h}h{m}m{s}s" if h else (f"{m}m{s}s" if m else f"{s}s")
    return sign + out


def _trim(v: float) -> str:
    return f"{v:.9f}".rstrip("0").rstrip(".")


def _plain(v: Any) -> Any:
    """What Go's marshalOrderedJSON would make of a value."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, _dt.datetime):
        return v.strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}"
    if isinstance(v, _dt.timedelta):
        return go_duration(v)
    if isinstance(v, BaseException):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set | frozenset):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


# Go's encoding/json escapes these for HTML safety; keep logs identical to maddy's.
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def format_fields(fields: Mapping[str, Any]) -> str:
    """Fields as maddy writes them: compact JSON, keys sorted, Go's escaping."""
    text = json.dumps(
        {k: _plain(v) for k, v in fields.items()}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return text.translate(_GO_ESCAPES)


def _timestamp(stamp: float) -> str:
    t = time.gmtime(stamp)
    ms = int((stamp % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms:03d}Z "


# -- outputs -----------------------------------------------------------------------


class Output:
    """Where formatted lines go. `reopen` is for SIGUSR1 (logrotate)."""

    def write(self, stamp: float, debug: bool, msg: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def reopen(self) -> None:
        """Re-create the underlying file, if any (its old one was renamed away)."""

    def close(self) -> None:
        """Release the underlying file, if any."""


def _report_failure(what: str, err: BaseException) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"!!! Failed to write message to {what}: {err}\n".encode())


class FdOutput(Output):
    """An already open descriptor (stderr): one write(2) per line, so lines never interleave."""

    def __init__(self, fd: int, timestamps: bool) -> None:
        self.fd = fd
        self.timestamps = timestamps
        self._lock = threading.Lock()

    def write(self, stamp: float, debug: bool, msg: str) -> None:
        line = (_timestamp(stamp) if self.timestamps else "") + ("[debug] " if debug else "") + msg + "\n"
        data = line.encode("utf-8", "replace")
        with self._lock:
            try:
                while data:
                    n = os.write(self.fd, data)
                    data = data[n:]
            except BlockingIOError:
                pass
            except OSError as e:
                if self.fd != 2:
                    _report_failure("log", e)


class FileOutput(FdOutput):
    """A log file: appended to, created 0666 minus umask, timestamped, reopened on SIGUSR1."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open(), timestamps=True)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise LogTargetError(f"failed to create log file: open {self.path}: {e.strerror or e}") from None

    def reopen(self) -> None:
        fd = self._open()
        with self._lock:
            old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class SyslogOutput(Output):
    """The local syslog daemon, facility MAIL, tag `maddy`; debug lines at DEBUG priority."""

    def __init__(self) -> None:
        import syslog

        self._syslog = syslog
        syslog.openlog("maddy", syslog.LOG_PID, syslog.LOG_MAIL)

    def write(self, stamp: float, debug: bool, msg: str) -> None:
        prio = self._syslog.LOG_DEBUG if debug else self._syslog.LOG_INFO
        try:
            self._syslog.syslog(prio, msg)
        except (OSError, ValueError) as e:
            _report_failure("syslog daemon", e)


class NopOutput(Output):
    """`log off`."""

    def write(self, stamp: float, debug: bool, msg: str) -> None:
        return None


class MultiOutput(Output):
    """Several targets at once (`log stderr /var/log/maddy.log`)."""

    def __init__(self, outputs: Sequence[Output], targets: Sequence[str]) -> None:
        self.outputs = list(outputs)
        self.targets = list(targets)

    def write(self, stamp: float, debug: bool, msg: str) -> None:
        for out in self.outputs:
            out.write(stamp, debug, msg)

    def reopen(self) -> None:
        """Reopen every output; one that fails keeps its old file and is reported after the rest."""
        failed: LogTargetError | None = None
        for out in self.outputs:
            try:
                out.reopen()
            except LogTargetError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def close(self) -> None:
        for out in self.outputs:
            out.close()


def open_targets(targets: Sequence[str], cwd: str | None = None) -> MultiOutput:
    """Open `log` targets: stderr, stderr_ts, syslog, off, or file paths.

    Relative file paths are made absolute against `cwd` (the directory the
    server was started in), so they stay put after the chdir into state_dir
    and across reloads.
    """
    if not targets:
        raise LogTargetError("expected at least 1 argument")
    if "off" in targets:
        if len(targets) != 1:
            raise LogTargetError("'off' can't be combined with other log targets")
        return MultiOutput([NopOutput()], ["off"])
    outs: list[Output] = []
    names: list[str] = []
    try:
        for t in targets:
            if t == "stderr":
                outs.append(FdOutput(2, timestamps=False))
            elif t == "stderr_ts":
                outs.append(FdOutput(2, timestamps=True))
            elif t == "syslog":
                outs.append(SyslogOutput())
            else:
                path = os.path.normpath(os.path.join(cwd or os.getcwd(), t))
                outs.append(FileOutput(path))
                t = path  # noqa: PLW2901 - the absolute path is what reopen() and the log show
            names.append(t)
    except LogTargetError:
        for o in outs:
            o.close()
        raise
    return MultiOutput(outs, names)


class _Sink:
    """The root's output holder: swapped atomically on reload, shared by every sub-logger."""

    def __init__(self, out: Output) -> None:
        self.out = out


class Logger:
    """maddy's Logger: a name, a debug flag, an output shared with its root.

    Sub-loggers are cheap (`log.sub("remote")`); one is debug when it or any
    ancestor is. Messages are single lines: newlines in text are escaped by the
    JSON part or belong to the caller's message.
    """

    def __init__(
        self,
        name: str = "",
        out: Output | None = None,
        *,
        debug: bool = False,
        parent: Logger | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.debug_enabled = debug
        self.parent = parent
        self.fields = dict(fields or {})
        self._sink: _Sink = (
            parent._sink if parent is not None else _Sink(out if out is not None else FdOutput(2, timestamps=False))
        )

    # -- plumbing -------------------------------------------------------------------

    @property
    def output(self) -> Output:
        return self._sink.out

    def set_output(self, out: Output) -> Output:
        """Swap the output of the whole logger tree; returns the previous one (caller closes it)."""
        old, self._sink.out = self._sink.out, out
        return old

    def sub(self, name: str, *, debug: bool = False, fields: Mapping[str, Any] | None = None) -> Logger:
        full = f"{self.name}/{name}" if self.name and name else (name or self.name)
        return Logger(full, debug=debug, parent=self, fields=fields)

    @property
    def is_debug(self) -> bool:
        return self.debug_enabled or (self.parent is not None and self.parent.is_debug)

    def _emit(self, debug: bool, text: str, fields: Mapping[str, Any] | None) -> None:
        allf = {**(fields or {}), **self.fields}
        line = text + "\t" + (format_fields(allf) if allf else "")
        if self.name:
            line = f"{self.name}: {line}"
        self._sink.out.write(time.time(), debug, line)

    # -- maddy's API ----------------------------------------------------------------------

    def msg(self, message: str, /, **fields: Any) -> None:
        """An event: `message\\t{fields}`."""
        self._emit(False, message, fields)

    def error(self, message: str, /, err: BaseException | str, **fields: Any) -> None:
        """An error event; `reason` is the error text unless the error carries its own fields.

        Pass the error as `err=` (ruff's PLE1205 mistakes a positional one for
        a logging format argument).
        """
        efields: dict[str, Any] = {}
        get = getattr(err, "fields", None)
        if callable(get):
            with contextlib.suppress(Exception):  # a bad fields() must not hide the error
                efields.update(get())
        efields.setdefault("reason", str(err))
        efields.update(fields)
        self._emit(False, message, efields)

    def debug(self, message: str, /, **fields: Any) -> None:
        """A `[debug] ` event, written only when debug logging is on for this logger."""
        if self.is_debug:
            self._emit(True, message, fields)

    def printf(self, text: str) -> None:
        """Free text (maddy's Println); still gets the trailing TAB."""
        self._emit(False, text, None)

    def debugf(self, text: str) -> None:
        if self.is_debug:
            self._emit(True, text, None)


class BridgeHandler(logging.Handler):
    """Routes Python `logging` records (asyncio, watchfiles, libraries) into maddy's format.

    Without it, a library warning would reach stderr as a bare line in another
    format, or with a traceback.
    """

    def __init__(self, logger: Logger) -> None:
        super().__init__()
        self.target = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        fields: dict[str, Any] = {}
        if record.exc_info and record.exc_info[1] is not None:
            fields["reason"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        sub = self.target.sub(record.name)
        if record.levelno >= logging.WARNING:
            sub.msg(text, **fields)
        else:
            sub.debug(text, **fields)


def bridge_stdlib_logging(logger: Logger) -> None:
    """Install `BridgeHandler` as the only root handler; INFO and below only in debug mode."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(BridgeHandler(logger))
    root.setLevel(logging.DEBUG if logger.is_debug else logging.WARNING)


def stderr_fallback(message: str) -> None:
    """Last-resort line on stderr for errors that happen before any logger exists."""
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
