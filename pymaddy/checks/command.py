"""`check.command`: an external program judges the message (spec §B.4; maddy 0.9.4's internal/check/command).

* `command CMD ARG…`: CMD is found in the libexec directory, then $PATH, at
  start; a missing program refuses the configuration (maddy does it at config time).
* Arguments may hold `{source_ip} {source_host} {source_rdns} {msg_id}
  {auth_user} {sender} {rcpts} {address}`: unknown placeholders stay as written,
  unavailable values become "". `{rcpts}` are the recipients seen so far joined
  with newlines; `{address}` is the stage's address (sender or recipient).
* `run_on conn|sender|rcpt|body` (default body) picks the one stage that runs
  the program. Body stage: stdin is the header and body (otherwise empty).
* stdout must be empty or an RFC 5322 header block (ended by an empty line or
  EOF); its fields are prepended to the message — also when the exit code
  rejects or quarantines. A malformed block is an internal error.
* Exit 0: fine. Any exit code with an action (`code EXIT ACTION…`; defaults
  1 → reject, 2 → quarantine) applies that action to
  `550 5.7.1 Message rejected for due to a local policy` (maddy's wording,
  typo included). Other codes, death by a signal, failure to run: temporary
  reject `450 4.0.0 Internal server error`.
* Beyond maddy (which waits forever): the program gets COMMAND_TIMEOUT seconds,
  then it is killed and the result is the same temporary reject.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from typing import TYPE_CHECKING

from pymaddy.checks.schema import CheckAction
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import OK, Check, CheckResult, CheckState
from pymaddy.runtime.module import Module, ModuleError
from pymaddy.storage.schema import look_path

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

CHECK_NAME = "command"
COMMAND_TIMEOUT = 300.0
MAX_HEADER = 1024 * 1024  # stdout kept for the header block; the rest is read and dropped
_CHUNK = 64 * 1024
_PLACEHOLDER = re.compile(r"\{[a-zA-Z0-9_]+?\}")
_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 §3.6.8 ftext
STAGES = ("conn", "sender", "rcpt", "body")


class MalformedHeader(ValueError):
    """stdout is not a header block."""


def parse_header_block(data: bytes) -> Header:
    """The header fields at the start of `data` (up to an empty line or the end), with CRLF
    line endings. Raises MalformedHeader for a line that is neither a field nor a
    continuation (RFC 5322 §2.2, §2.2.3)."""
    lines: list[bytes] = []
    for raw in data.splitlines():
        if not raw:
            break
        if raw[:1] in (b" ", b"\t"):
            if not lines:
                raise MalformedHeader("malformed header: continuation line without a field")
        else:
            name, colon, _ = raw.partition(b":")
            if not colon or not _FIELD_NAME.match(name.rstrip(b" \t")):
                raise MalformedHeader(f"malformed header line: {raw[:80]!r}")
        lines.append(raw)
    return Header.parse(b"".join(line + b"\r\n" for line in lines))


def internal_error(reason: str, cmd: str, exit_code: int | None = None) -> CheckResult:
    """maddy's `450 Internal server error` (go-smtp fills in the enhanced code 4.0.0)."""
    err = SMTPError(450, (4, 0, 0), "Internal server error", check=CHECK_NAME, reason=reason, cmd=cmd)
    if exit_code is not None:
        err.fields["exit_code"] = exit_code
    return CheckResult(reject=err, reason=err)


class CommandCheck(Module, Check):
    """check.command CMD ARG…; see the module docstring."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.command = str(self.settings["command"])
        self.args: list[str] = [str(a) for a in self.settings.get("args") or []]
        self.stage = str(self.settings.get("run_on") or "body")
        self.actions: dict[int, CheckAction] = dict(self.settings.get("actions") or {})
        self.path = self.command
        self.timeout = COMMAND_TIMEOUT

    async def start(self) -> None:
        libexec = getattr(self.ctx.options, "libexec", "") or ""
        search = os.pathsep.join(p for p in (libexec, os.environ.get("PATH", "")) if p)
        try:
            self.path = look_path(self.command, search)
        except ValueError as e:
            raise ModuleError(f"command: {e}") from None

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)

    def cmdline(self, args: list[str]) -> str:
        return " ".join([self.path, *args])

    async def run(self, args: list[str], header: Header | None = None, body: Body | None = None) -> CheckResult:
        """Run the program (message on stdin when given) and turn its output and exit into a result."""
        cmd = self.cmdline(args)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.path,
                *args,
                stdin=asyncio.subprocess.PIPE if header is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as e:
            return internal_error(str(e), cmd)
        try:
            out, code = await asyncio.wait_for(self._talk(proc, header, body), self.timeout)
        except TimeoutError:
            await _kill(proc)
            return internal_error(f"command did not finish within {self.timeout:g}s", cmd)
        except OSError as e:
            await _kill(proc)
            return internal_error(str(e), cmd)
        try:
            hdr = parse_header_block(out)
        except MalformedHeader as e:
            return internal_error(str(e), cmd)
        res = CheckResult(header=hdr if len(hdr) else None)
        if code == 0:
            return res
        action = self.actions.get(code)
        if action is None:
            return internal_error(f"unexpected exit code {code}", cmd, exit_code=code)
        err = SMTPError(
            550,
            (5, 7, 1),
            "Message rejected for due to a local policy",
            check=CHECK_NAME,
            cmd=cmd,
            exit_code=code,
        )
        if action.override is not None:
            o = action.override
            err = SMTPError(
                o.code, o.enhanced, o.message, check=CHECK_NAME, reason=err.message, cmd=cmd, exit_code=code
            )
        res.reason = err
        if action.reject:
            res.reject = err
        elif action.quarantine:
            res.quarantine = True
        return res

    async def _talk(
        self, proc: asyncio.subprocess.Process, header: Header | None, body: Body | None
    ) -> tuple[bytes, int]:
        """Feed stdin while reading stdout (a full pipe must never stall either side); → (stdout head, exit code)."""
        feeder = asyncio.ensure_future(_feed(proc, header, body)) if header is not None else None
        try:
            assert proc.stdout is not None
            kept = bytearray()
            while chunk := await proc.stdout.read(_CHUNK):
                if len(kept) < MAX_HEADER:
                    kept += chunk[: MAX_HEADER - len(kept)]
            if feeder is not None:
                await feeder
            rc = await proc.wait()
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder
        return bytes(kept), rc if rc >= 0 else -1  # killed by a signal: Go's ExitCode() is -1


async def _feed(proc: asyncio.subprocess.Process, header: Header | None, body: Body | None) -> None:
    """Write header + body to stdin; a program that stops reading early is fine (Go ignores EPIPE)."""
    stdin = proc.stdin
    assert stdin is not None
    try:
        if header is not None:
            stdin.write(header.to_bytes() + b"\r\n")
            await stdin.drain()
        if body is not None:
            with body.open() as f:
                while chunk := await asyncio.to_thread(f.read, _CHUNK):
                    stdin.write(chunk)
                    await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(OSError):
            stdin.close()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Interrupt (as maddy does), then kill if it lingers; always reap."""
    for sig, wait in ((signal.SIGINT, 2.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), wait)
            return


class _State(CheckState):
    def __init__(self, chk: CommandCheck, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta
        self.mail_from = ""
        self.rcpts: list[str] = []

    def expand(self, address: str) -> list[str]:
        """The arguments with placeholders filled in."""
        conn = self.meta.conn
        values = {
            "{auth_user}": conn.auth_user,
            "{source_ip}": "" if conn.is_unix else conn.remote_ip,
            "{source_host}": conn.helo,
            "{source_rdns}": conn.rdns,
            "{msg_id}": self.meta.id,
            "{sender}": self.mail_from,
            "{rcpts}": "\n".join(self.rcpts),
            "{address}": address,
        }
        return [_PLACEHOLDER.sub(lambda m: values.get(m.group(0), m.group(0)), a) for a in self.chk.args]

    async def check_connection(self) -> CheckResult:
        if self.chk.stage != "conn":
            return OK
        return await self.chk.run(self.expand(""))

    async def check_sender(self, mail_from: str) -> CheckResult:
        self.mail_from = mail_from
        if self.chk.stage != "sender":
            return OK
        return await self.chk.run(self.expand(mail_from))

    async def check_rcpt(self, rcpt: str) -> CheckResult:
        self.rcpts.append(rcpt)
        if self.chk.stage != "rcpt":
            return OK
        return await self.chk.run(self.expand(rcpt))

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        if self.chk.stage != "body":
            return OK
        return await self.chk.run(self.expand(""), header, body)


__all__ = ["COMMAND_TIMEOUT", "CommandCheck", "parse_header_block"]
