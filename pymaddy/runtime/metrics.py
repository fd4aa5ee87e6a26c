"""A tiny in-process metrics registry rendered as Prometheus text exposition (0.0.4).

Why not prometheus_client: we need only counters and gauges with labels, the
families maddy exports (spec §B.1), and exact control over names; a hundred
lines avoid a dependency. The registry is process-wide (like Go's default
registry), so counters survive configuration reloads: a module of the new
generation that asks for `maddy_smtp_started_transactions` gets the same
family the old one incremented.

Modules register families once (`REGISTRY.counter(...)` is get-or-create) and
update them from any thread; `render()` is called per scrape.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar

__all__ = ["REGISTRY", "Counter", "Family", "Gauge", "Registry"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def _fmt_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _esc_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _esc_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


class Family:
    """One metric family: a name, a type and a value per label-value tuple."""

    type: ClassVar[str] = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name: {name!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)
        for ln in self.labelnames:
            if not _LABEL.match(ln) or ln.startswith("__"):
                raise ValueError(f"invalid label name: {ln!r}")
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._values[()] = 0.0

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def remove(self, **labels: str) -> None:
        """Forget one child (e.g. a module that no longer exists after a reload)."""
        with self._lock:
            self._values.pop(self._key(labels), None)

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        with self._lock:
            return sorted(self._values.items())

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_esc_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        for key, value in self.samples():
            if key:
                lbl = ",".join(f'{n}="{_esc_label(v)}"' for n, v in zip(self.labelnames, key, strict=True))
                lines.append(f"{self.name}{{{lbl}}} {_fmt_value(value)}")
            else:
                lines.append(f"{self.name} {_fmt_value(value)}")
        return "\n".join(lines) + "\n"


class Counter(Family):
    """Only goes up (until the process restarts)."""

    type = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters can only increase")
        self._add(amount, labels)


class Gauge(Family):
    """Goes up and down, or is set."""

    type = "gauge"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._add(-amount, labels)

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


Collector = Callable[[], Iterable[Family]]


class Registry:
    """Families by name plus collectors computed at scrape time (process stats)."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()

    def _get_or_create(self, cls: type[Family], name: str, help: str, labels: Iterable[str]) -> Family:
        labels = tuple(labels)
        with self._lock:
            fam = self._families.get(name)
            if fam is None:
                fam = cls(name, help, labels)
                self._families[name] = fam
            elif type(fam) is not cls or fam.labelnames != labels:
                raise ValueError(f"metric {name} already registered as {fam.type} with labels {fam.labelnames}")
            return fam

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        fam = self._get_or_create(Counter, name, help, labels)
        assert isinstance(fam, Counter)
        return fam

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        fam = self._get_or_create(Gauge, name, help, labels)
        assert isinstance(fam, Gauge)
        return fam

    def add_collector(self, fn: Collector) -> None:
        with self._lock:
            self._collectors.append(fn)

    def snapshot(self) -> list[Snapshot]:
        """The registered families' values, for another process to add to its own (workers)."""
        with self._lock:
            fams = list(self._families.values())
        return [(f.name, f.type, f.help, list(f.labelnames), [[list(k), v] for k, v in f.samples()]) for f in fams]

    def set_remote(self, fn: Callable[[], Iterable[Snapshot]] | None) -> None:
        """Families of other processes (the workers), summed into ours at each scrape."""
        self._remote = fn

    _remote: Callable[[], Iterable[Snapshot]] | None = None
    _refresh: Callable[[], Awaitable[None]] | None = None

    def set_refresh(self, fn: Callable[[], Awaitable[None]] | None) -> None:
        """Called before a scrape's render: fetch the remote families' current values."""
        self._refresh = fn

    async def refresh(self) -> None:
        if self._refresh is not None:
            await self._refresh()

    def render(self) -> str:
        with self._lock:
            fams = list(self._families.values())
            collectors = list(self._collectors)
        for c in collectors:
            try:
                fams.extend(c())
            except Exception:  # a broken collector must not break the scrape
                continue
        if self._remote is not None:
            fams = _merged(fams, self._remote())
        return "".join(f.render() for f in sorted(fams, key=lambda f: f.name))


Snapshot = tuple[str, str, str, list[str], list[list[Any]]]  # name, type, help, labels, [[key, value]]
_TYPES: dict[str, type[Family]] = {"counter": Counter, "gauge": Gauge}


def _merged(fams: list[Family], remote: Iterable[Snapshot]) -> list[Family]:
    """Copies of `fams` with the remote values added (same name, type and labels); remote-only
    families appear as they are. Mismatching ones are left out rather than misreported."""
    out: dict[str, Family] = {}
    for f in fams:
        copy = type(f)(f.name, f.help, f.labelnames)
        copy._values = dict(f.samples())
        out[f.name] = copy
    for name, typ, help_, labels, samples in remote:
        cls = _TYPES.get(typ)
        if cls is None:
            continue
        fam = out.get(name)
        if fam is None:
            try:
                fam = out[name] = cls(name, help_, labels)
            except ValueError:
                continue
        if type(fam) is not cls or list(fam.labelnames) != list(labels):
            continue
        for key, value in samples:
            k = tuple(str(x) for x in key)
            if len(k) == len(fam.labelnames) and isinstance(value, int | float):
                fam._values[k] = fam._values.get(k, 0.0) + float(value)
    return list(out.values())


REGISTRY = Registry()

# Families the runtime itself maintains.
UP = REGISTRY.gauge("maddy_up", "1 while the server is running its configuration.")
BUILD_INFO = REGISTRY.gauge(
    "pymaddy_build_info", "pymaddy version and the maddy version it mimics.", ("version", "maddy")
)
RELOADS = REGISTRY.counter("pymaddy_config_reloads_total", "Configuration reloads attempted (SIGUSR2 or file change).")
RELOAD_FAILURES = REGISTRY.counter(
    "pymaddy_config_reload_failures_total", "Configuration reloads that failed; the old configuration kept running."
)
LAST_RELOAD_OK = REGISTRY.gauge(
    "pymaddy_config_last_reload_successful", "1 if the last configuration load succeeded, 0 otherwise."
)
LAST_RELOAD_TIME = REGISTRY.gauge(
    "pymaddy_config_last_reload_success_timestamp_seconds", "Unix time of the last successful configuration load."
)


def _proc_stat_start() -> float | None:
    """Process start time from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return int(line.split()[1]) + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return None


_START = _proc_stat_start() or time.time()


def _process_families() -> list[Family]:
    out: list[Family] = []
    t = os.times()
    cpu = Counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.")
    cpu.inc(t.user + t.system)
    out.append(cpu)
    start = Gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.")
    start.set(_START)
    out.append(start)
    try:
        with open("/proc/self/statm", "rb") as f:
            vm, rss = (int(x) for x in f.read().split()[:2])
        page = os.sysconf("SC_PAGE_SIZE")
        g = Gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.")
        g.set(vm * page)
        out.append(g)
        g = Gauge("process_resident_memory_bytes", "Resident memory size in bytes.")
        g.set(rss * page)
        out.append(g)
    except (OSError, ValueError):
        pass
    try:
        g = Gauge("process_open_fds", "Number of open file descriptors.")
        g.set(len(os.listdir("/proc/self/fd")))
        out.append(g)
    except OSError:
        pass
    g = Gauge("process_max_fds", "Maximum number of open file descriptors.")
    g.set(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    out.append(g)
    info = Gauge("python_info", "Python platform information.", ("implementation", "major", "minor", "patchlevel"))
    vi = sys.version_info
    info.set(
        1, implementation=sys.implementation.name, major=str(vi.major), minor=str(vi.minor), patchlevel=str(vi.micro)
    )
    out.append(info)
    return out


REGISTRY.add_collector(_process_families)
