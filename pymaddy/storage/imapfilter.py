"""IMAP filters: `imap.filter.command` and the `imap_filters` group (spec §B.9).

storage.imapsql asks its `imap_filter` for every delivered (not quarantined)
recipient which folder the copy goes to and which flags it gets. A command
filter runs a program with the message on stdin: the first line of its output
names the folder (empty: no opinion), further lines are flags. A group asks its
members in order: the first folder wins, flags add up. Failures are logged and
ignored, so a broken filter never costs a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.runtime.module import Module

COMMAND_TIMEOUT = 60.0
MAX_OUTPUT = 64 * 1024
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")


@dataclass
class FilterInput:
    meta: MsgMeta
    account: str  # the storage account the copy is for
    rcpt: str  # the recipient after rewriting
    original_rcpt: str  # as the client gave it in RCPT TO
    header: Header
    body: Body


@dataclass
class FilterResult:
    folder: str = ""
    flags: tuple[str, ...] = ()


@runtime_checkable
class IMAPFilter(Protocol):
    async def filter(self, inp: FilterInput) -> FilterResult: ...


def _subject(header: Header) -> str:
    try:
        return header.get("Subject") or ""
    except Exception:
        return ""


def expand(arg: str, inp: FilterInput) -> str:
    """check.command's placeholders plus {account_name} {rcpt_to} {original_rcpt_to} {subject}; unknown ones
    stay as written, unavailable values become ""."""
    conn = inp.meta.conn
    values = {
        "{source_ip}": getattr(conn, "remote_ip", "") or "" if conn else "",
        "{source_host}": getattr(conn, "hostname", "") or "" if conn else "",
        "{source_rdns}": getattr(conn, "rdns", "") or "" if conn else "",
        "{msg_id}": inp.meta.id,
        "{auth_user}": getattr(conn, "auth_user", "") or "" if conn else "",
        "{sender}": inp.meta.original_from,
        "{account_name}": inp.account,
        "{rcpt_to}": inp.rcpt,
        "{original_rcpt_to}": inp.original_rcpt,
        "{subject}": _subject(inp.header),
    }
    return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(0), m.group(0))), arg)


class CommandFilter(Module):
    """imap.filter.command CMD ARGS…"""

    def log_name(self) -> str:
        return "imap.filter.command"

    async def filter(self, inp: FilterInput) -> FilterResult:
        cmd = str(self.settings["command"])
        args = [expand(a, inp) for a in self.settings.get("args") or []]
        try:
            proc = await asyncio.create_subprocess_exec(
                cmd, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
        except OSError as e:
            self.log.error("cannot run filter command", err=e, cmd=cmd)
            return FilterResult()
        data = inp.header.to_bytes() + inp.body.read_all()
        try:
            out, _ = await asyncio.wait_for(proc.communicate(data), COMMAND_TIMEOUT)
        except (TimeoutError, OSError) as e:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
            self.log.error("filter command failed", err=str(e) or type(e).__name__, cmd=cmd)
            return FilterResult()
        if proc.returncode != 0:
            self.log.error("filter command failed", err=f"exit status {proc.returncode}", cmd=cmd,
                           msg_id=inp.meta.id)
            return FilterResult()
        lines = out[:MAX_OUTPUT].decode("utf-8", "replace").splitlines()
        folder = lines[0].strip() if lines else ""
        flags = tuple(f.strip() for f in lines[1:] if f.strip() and " " not in f.strip())
        return FilterResult(folder, flags)


class FilterGroup(Module):
    """imap_filters NAME { … } / imap_filter { … }: members in order, first folder wins, flags add up."""

    def log_name(self) -> str:
        return self.inst.instance or "imap_filters"

    async def filter(self, inp: FilterInput) -> FilterResult:
        folder = ""
        flags: list[str] = []
        for i in self.settings.get("members") or []:
            m = self.ctx.module(i)
            if not isinstance(m, IMAPFilter):
                continue
            r = await m.filter(inp)
            if r.folder and not folder:
                folder = r.folder
            flags.extend(f for f in r.flags if f not in flags)
        return FilterResult(folder, tuple(flags))
