"""`dovecot_sasl`: check passwords with Dovecot's auth service (maddy's internal/auth/dovecot_sasl).

`dovecot_sasl unix:/run/dovecot/auth-client` (or `tcp://host:port`, or an
`endpoint` directive). As maddy, start-up connects once: a server that cannot
be reached or does not speak the protocol refuses the start. Each check then
sends PLAIN (LOGIN when the server offers no PLAIN) with `secured` and
`no-penalty`, pretending the client came over TLS as maddy does.

Differences from maddy, on purpose:
- connections are kept (up to POOL_SIZE idle ones) instead of one per check;
  a kept connection that turns out dead is replaced once, transparently;
- Dovecot's temporary failure (`code=temp_fail`, `temp`) and an unreachable
  server are temporary errors (454 over SMTP), every other FAIL is a refusal;
- `service=smtp` (maddy sends `SMTP`; Dovecot and Postfix use lower case).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import TYPE_CHECKING

from pymaddy.auth import dovecot_proto as dp
from pymaddy.auth.base import PlainAuth
from pymaddy.config.values import Endpoint
from pymaddy.mail.errors import AuthError, AuthTemporaryError
from pymaddy.runtime.module import Module, ModuleError

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD_NAME = "dovecot_sasl"
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 30.0  # Dovecot delays failures (auth_failure_delay, 2 s by default)
POOL_SIZE = 4


class _Conn:
    """One handshaken connection to the auth server; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hs: dp.ServerHandshake) -> None:
        self.reader = reader
        self.writer = writer
        self.handshake = hs
        self.ids = itertools.count(1)

    async def readline(self) -> tuple[str, list[str]]:
        line = await self.reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed by the auth server")
        return dp.decode_line(line)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def connect(ep: Endpoint, timeout: float = CONNECT_TIMEOUT) -> _Conn:
    """Connect and complete the handshake (VERSION/CPID out, VERSION…DONE in)."""

    async def run() -> _Conn:
        if ep.is_unix:
            reader, writer = await asyncio.open_unix_connection(ep.path, limit=dp.MAX_LINE + 2)
        else:
            reader, writer = await asyncio.open_connection(ep.host, int(ep.port), limit=dp.MAX_LINE + 2)
        conn = _Conn(reader, writer, dp.ServerHandshake())
        try:
            await conn.send(dp.client_handshake(os.getpid()))
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    raise ConnectionError("connection closed during the handshake")
                if conn.handshake.feed(line):
                    return conn
        except BaseException:
            conn.close()
            raise

    return await asyncio.wait_for(run(), timeout)


class DovecotSASLAuth(Module, PlainAuth):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.endpoint: Endpoint = self.settings["endpoint"]
        self._idle: list[_Conn] = []

    def log_name(self) -> str:
        return MOD_NAME

    async def start(self) -> None:
        if self.endpoint.is_tls:
            raise ModuleError(f"{MOD_NAME}: tls:// is not supported, use tcp:// or unix://")
        # maddy's Configure dials once to check the server and learn its mechanisms.
        try:
            conn = await connect(self.endpoint)
        except (OSError, TimeoutError, dp.ProtocolError) as e:
            raise ModuleError(f"{MOD_NAME}: unable to contact server: {_why(e)}") from None
        mechs = self._public(conn)
        if "PLAIN" not in mechs and "LOGIN" not in mechs:
            conn.close()
            raise ModuleError(f"{MOD_NAME}: server offers neither PLAIN nor LOGIN (offers: {' '.join(mechs)})")
        self._idle.append(conn)

    async def stop(self) -> None:
        idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    @staticmethod
    def _public(conn: _Conn) -> list[str]:
        return [n for n, m in conn.handshake.mechanisms.items() if not m.private]

    async def auth_plain(self, username: str, password: str) -> None:
        if "\x00" in username or "\x00" in password:
            raise AuthError(f"{MOD_NAME}: NUL in credentials")
        for attempt in (0, 1):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else None
            try:
                if conn is None:
                    conn = await connect(self.endpoint)
                reply = await asyncio.wait_for(self._request(conn, username, password), REPLY_TIMEOUT)
            except (OSError, TimeoutError, EOFError, dp.ProtocolError) as e:
                if conn is not None:
                    conn.close()
                if reused and attempt == 0 and not isinstance(e, TimeoutError):
                    continue  # a kept connection went stale (server restarted): once more, fresh
                self.log.error("auth server unavailable", err=_why(e))
                raise AuthTemporaryError(f"{MOD_NAME}: unable to contact server: {_why(e)}") from None
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            if len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
            else:
                conn.close()
            if reply.kind == "OK":
                return
            reason = reply.params.get("reason", "")
            if reply.temporary:
                raise AuthTemporaryError(f"{MOD_NAME}: temporary failure{': ' + reason if reason else ''}")
            raise AuthError(f"{MOD_NAME}: authentication failed{': ' + reason if reason else ''}")
        raise AssertionError("unreachable")

    async def _request(self, conn: _Conn, username: str, password: str) -> dp.AuthReply:
        mechs = self._public(conn)
        rid = str(next(conn.ids))
        params = {"service": "smtp", "secured": "", "no-penalty": ""}
        if "PLAIN" in mechs:
            # RFC 4616 §2: authzid NUL authcid NUL passwd; the authzid is left empty.
            answers: list[bytes] = []
            req = dp.AuthRequest(rid, "PLAIN", params, b"\x00" + username.encode() + b"\x00" + password.encode())
        elif "LOGIN" in mechs:
            answers = [username.encode(), password.encode()]
            req = dp.AuthRequest(rid, "LOGIN", params)
        else:
            raise AuthTemporaryError(f"{MOD_NAME}: server offers neither PLAIN nor LOGIN")
        await conn.send(req.line())
        while True:
            cmd, args = await conn.readline()
            if cmd not in ("OK", "CONT", "FAIL"):
                continue  # e.g. a late handshake line: not ours
            reply = dp.AuthReply.parse(cmd, args)
            if reply.id != rid:
                raise dp.ProtocolError(f"reply for request {reply.id}, expected {rid}")
            if reply.kind != "CONT":
                return reply
            if not answers:
                raise dp.ProtocolError(f"unexpected challenge for {req.mechanism}")
            await conn.send(dp.encode_line("CONT", rid, dp.b64encode(answers.pop(0))))


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


__all__ = ["DovecotSASLAuth", "connect"]
