"""`pymaddy queue list|show ID|flush [ID]|remove ID` (a pymaddy addition; maddy has no queue command).

`list` and `show` read the queue directory (maddy's format, pymaddy/queue/store.py)
and so also work on a directory maddy wrote. `flush` and `remove` talk to the
running server over the queue's control socket (pymaddy/queue/control.py), so it
retries or drops the entry at once; with no server running they act on the files:
`remove` deletes them, `flush` rewinds the entry's last attempt so it is due as
soon as the server starts (after post_init_delay).

The config is compiled (never started) only to find the queues and their
directories; with several `target.queue` modules, `--queue NAME` (the block
name, or the directory of an inline queue) selects one.
Exit codes: 0 done; 1 failure (unknown entry, unreadable files, config errors);
2 usage (unknown queue, several queues and no --queue).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymaddy.queue.store import QueueMeta, Store

EXIT_FAIL = 1
EXIT_USAGE = 2


class CLIExit(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    top = sub.add_parser("queue", help="inspect and manage the delivery queue (target.queue)",
                         description="List, show, retry (flush) or remove messages in a target.queue directory. "
                                     "flush/remove reach a running server through its control socket.")
    add_globals(top)
    top.set_defaults(func=_help(top))
    q = top.add_subparsers(dest="queue_command", metavar="COMMAND", parser_class=type(top))

    def common(p: argparse.ArgumentParser) -> None:
        add_globals(p)
        p.add_argument("--queue", "-queue", dest="queue", default=os.environ.get("MADDY_QUEUE") or None,
                       metavar="NAME", help="which target.queue (block name or inline directory) when there are "
                                            "several (env MADDY_QUEUE)")

    p = q.add_parser("list", help="list queued messages")
    common(p)
    p.set_defaults(func=_run(cmd_list))

    p = q.add_parser("show", help="show one queued message: envelope, per-recipient state, header")
    common(p)
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=_run(cmd_show))

    p = q.add_parser("flush", help="attempt delivery now (one message, or all)")
    common(p)
    p.add_argument("id", metavar="ID", nargs="?")
    p.set_defaults(func=_run(cmd_flush))

    p = q.add_parser("remove", help="drop a queued message without a DSN")
    common(p)
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=_run(cmd_remove))


def _help(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace, str], int]:
    def show(ns: argparse.Namespace, config_path: str) -> int:
        p.print_help(sys.stderr)
        return EXIT_USAGE

    return show


@dataclass
class QueueRef:
    name: str
    location: str
    runtime_dir: str
    initial_retry: float
    retry_scale: float

    def store(self) -> Store:
        from pymaddy.queue.store import Store

        return Store(self.location)

    @property
    def socket(self) -> str:
        from pymaddy.queue.control import socket_path

        return socket_path(self.runtime_dir, self.location)


def _run(fn: Callable[[QueueRef, argparse.Namespace], int]) -> Callable[[argparse.Namespace, str], int]:
    def run(ns: argparse.Namespace, config_path: str) -> int:
        try:
            ref = find_queue(config_path, ns.queue)
            return fn(ref, ns)
        except CLIExit as e:
            for line in e.message.splitlines() or [""]:
                sys.stderr.write(f"Error: {line}\n")
            return e.code
        except OSError as e:
            sys.stderr.write(f"Error: {e.strerror or e}: {e.filename or ''}\n")
            return EXIT_FAIL

    return run


def find_queue(config_path: str, name: str | None) -> QueueRef:
    from pymaddy.cli.blocks import _relevant_errors
    from pymaddy.compiler.compile import compile_file
    from pymaddy.queue.target import resolve_location

    if not os.path.exists(config_path):
        raise CLIExit(f"failed to open config: open {config_path}: no such file or directory", EXIT_USAGE)
    res = compile_file(os.path.abspath(config_path))
    graph = res.graph
    if graph is None:
        raise CLIExit("\n".join(str(e) for e in res.errors) or "configuration could not be loaded")
    queues = [i for i in graph.instances if i.schema.name == "target.queue"]
    state_dir = os.path.abspath(str(graph.globals["state_dir"]))
    runtime_dir = os.path.abspath(str(graph.globals["runtime_dir"]))

    def label(i: Any) -> str:
        return str(i.instance or i.settings.get("location") or "")

    if not queues:
        raise CLIExit("no target.queue in the configuration", EXIT_USAGE)
    if name is None:
        if len(queues) > 1:
            names = ", ".join(label(i) for i in queues)
            raise CLIExit(f"several queues are configured ({names}): use --queue NAME", EXIT_USAGE)
        inst = queues[0]
    else:
        found = [i for i in queues if name in (i.instance, *i.aliases, str(i.settings.get("location") or ""))]
        if not found:
            raise CLIExit(f"unknown queue: {name}", EXIT_USAGE)
        inst = found[0]
    errs = _relevant_errors(res.errors, graph, [inst])
    if errs:
        raise CLIExit("\n".join(errs))
    s = inst.settings
    return QueueRef(
        name=label(inst),
        location=resolve_location(str(s.get("location") or ""), state_dir),
        runtime_dir=runtime_dir,
        initial_retry=float(s.get("initial_retry_time") or 900.0),
        retry_scale=float(s.get("retry_time_scale") or 1.25),
    )


# -- reading -------------------------------------------------------------------------------------


def _fmt_time(ts: float) -> str:
    if ts <= 0:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ids(st: Store) -> tuple[list[str], list[str]]:
    from pymaddy.queue.store import BROKEN, META

    try:
        names = os.listdir(st.location)
    except FileNotFoundError:
        return [], []
    ids = sorted(n[: -len(META)] for n in names if n.endswith(META))
    broken = sorted(n[: -len(BROKEN)] for n in names if n.endswith(BROKEN))
    return ids, broken


def _next_attempt(ref: QueueRef, m: QueueMeta) -> float:
    from pymaddy.queue.schedule import next_attempt

    return next_attempt(m.last_attempt, m.tries, ref.initial_retry, ref.retry_scale)


def cmd_list(ref: QueueRef, ns: argparse.Namespace) -> int:
    from pymaddy.queue.store import MetaError

    st = ref.store()
    ids, broken = _ids(st)
    rows = []
    for entry_id in ids:
        try:
            m = st.read_meta(entry_id)
        except FileNotFoundError:
            continue  # delivered meanwhile
        except MetaError as e:
            rows.append((entry_id, "-", "-", "-", f"(unreadable meta-data: {e})", ""))
            continue
        tries = max(m.tries.values(), default=0)
        rows.append((entry_id, _fmt_time(m.first_attempt), _fmt_time(_next_attempt(ref, m)), str(tries),
                     m.mail_from or "<>", ", ".join(m.to)))
    for entry_id in broken:
        rows.append((entry_id, "-", "-", "-", "(broken: never retried)", ""))
    if not rows:
        print(f"queue {ref.name} is empty")
        return 0
    print(f"{'ID':<10} {'QUEUED':<23} {'NEXT ATTEMPT':<23} {'TRIES':>5}  FROM -> TO")
    for r in rows:
        route = f"{r[4]} -> {r[5]}" if r[5] else r[4]
        print(f"{r[0]:<10} {r[1]:<23} {r[2]:<23} {r[3]:>5}  {route}")
    return 0


def _valid(entry_id: str) -> str:
    from pymaddy.queue.store import valid_id

    if not valid_id(entry_id):
        raise CLIExit(f"invalid queue entry ID: {entry_id}", EXIT_USAGE)
    return entry_id


def cmd_show(ref: QueueRef, ns: argparse.Namespace) -> int:
    from pymaddy.queue.store import HEADER, MetaError

    st = ref.store()
    entry_id = _valid(ns.id)
    try:
        m = st.read_meta(entry_id)
    except FileNotFoundError:
        raise CLIExit(f"no such queue entry: {entry_id}") from None
    except MetaError as e:
        raise CLIExit(f"{entry_id}: unreadable meta-data: {e}") from None
    out = [
        f"ID: {entry_id}",
        f"From: {m.mail_from or '<>'}",
        f"Queued: {_fmt_time(m.first_attempt)}",
        f"Last attempt: {_fmt_time(m.last_attempt)}",
        f"Next attempt: {_fmt_time(_next_attempt(ref, m))}",
    ]
    try:
        out.append(f"Size: {os.path.getsize(st.path(entry_id, '.body'))} bytes (body)")
    except OSError:
        out.append("Size: body file missing")
    out.append("Pending recipients:")
    for rcpt in m.to:
        line = f"  {rcpt}: tries {m.tries.get(rcpt, 0)}"
        err = m.rcpt_errs.get(rcpt)
        if err is not None:
            line += f", last error: {err.code} {'.'.join(map(str, err.enhanced))} {err.message}"
        out.append(line)
    failed = [r for r in m.rcpt_errs if r not in m.to]
    if failed:
        out.append("Failed or earlier errors:")
        for rcpt in failed:
            err = m.rcpt_errs[rcpt]
            out.append(f"  {rcpt}: {err.code} {'.'.join(map(str, err.enhanced))} {err.message}")
    out.append("")
    try:
        with open(st.path(entry_id, HEADER), "rb") as f:
            header = f.read()
        out.append(header.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n"))
    except OSError:
        out.append("(header file missing)")
    print("\n".join(out))
    return 0


# -- changing ------------------------------------------------------------------------------------


def _ask_server(ref: QueueRef, req: dict[str, Any]) -> dict[str, Any] | None:
    """The server's reply, or None when no server runs this queue."""
    from pymaddy.queue.control import NotRunning, request

    try:
        return request(ref.socket, req)
    except NotRunning:
        return None


def cmd_flush(ref: QueueRef, ns: argparse.Namespace) -> int:
    entry_id = _valid(ns.id) if ns.id else None
    reply = _ask_server(ref, {"op": "flush", "id": entry_id} if entry_id else {"op": "flush"})
    if reply is not None:
        if not reply.get("ok"):
            raise CLIExit(f"{reply.get('error') or 'failed'}{': ' + entry_id if entry_id else ''}")
        print(f"{reply.get('count', 0)} message(s) scheduled for delivery now")
        return 0
    # No server: make the entries due; the server tries them post_init_delay after it starts.
    from pymaddy.queue.schedule import retry_delay, smallest_tries
    from pymaddy.queue.store import MetaError

    st = ref.store()
    ids = [entry_id] if entry_id else _ids(st)[0]
    n = 0
    for i in ids:
        try:
            m = st.read_meta(i)
        except FileNotFoundError:
            if entry_id:
                raise CLIExit(f"no such queue entry: {i}") from None
            continue
        except MetaError as e:
            sys.stderr.write(f"Error: {i}: unreadable meta-data: {e}\n")
            continue
        if m.tries:
            delay = retry_delay(smallest_tries(m.tries), ref.initial_retry, ref.retry_scale)
            if delay != float("inf"):
                m.last_attempt = min(m.last_attempt, time.time() - delay)
                st.write_meta(i, m)
        n += 1
    print(f"server not running: {n} message(s) will be attempted when it starts")
    return 0


def cmd_remove(ref: QueueRef, ns: argparse.Namespace) -> int:
    from pymaddy.queue.store import BROKEN, META

    entry_id = _valid(ns.id)
    st = ref.store()
    reply = _ask_server(ref, {"op": "remove", "id": entry_id})
    if reply is not None and not reply.get("ok") and os.path.exists(st.path(entry_id, BROKEN)):
        reply = None  # broken entries are not scheduled: the files are all there is
    if reply is not None:
        if not reply.get("ok"):
            raise CLIExit(f"{reply.get('error') or 'failed'}: {entry_id}")
        print(f"removed {entry_id}" + (" (its attempt in progress is the last)" if reply.get("in_flight") else ""))
        return 0
    if not os.path.exists(st.path(entry_id, META)) and not os.path.exists(st.path(entry_id, BROKEN)):
        raise CLIExit(f"no such queue entry: {entry_id}")
    st.remove(entry_id)
    if os.path.exists(st.path(entry_id, BROKEN)):
        os.unlink(st.path(entry_id, BROKEN))
    print(f"removed {entry_id}")
    return 0
