"""`dovecot_sasld`: Dovecot's auth-client protocol served from pymaddy's providers (maddy's dovecot_sasld).

So that Postfix (`smtpd_sasl_type = dovecot`, `smtpd_sasl_path = inet:…` or a
unix socket) or chasquid can check SMTP AUTH against pymaddy's credentials.

    dovecot_sasld unix:///run/maddy/auth-client tcp://127.0.0.1:12345 {
        auth &local_authdb      # repeatable, tried in order
        sasl_login yes          # also offer LOGIN
        auth_map …              # as the smtp endpoint
        auth_map_normalize auto
    }

Mechanisms: PLAIN (RFC 4616), and LOGIN with `sasl_login`; none at all when
no `auth` is configured (as maddy). The username is normalized by
`auth_map_normalize` and mapped by `auth_map` before each provider sees it.
Failures are logged as `authentication failed` with `username` and, when the
client sent `rip`/`rport` (Postfix does), `src_ip`.

Differences from maddy, on purpose (maddy's go-dovecot-sasl server has bugs):
- `OK` carries `user=<the SASL username>`; Postfix refuses an OK without it
  ("missing Dovecot server OK username field"), so maddy's server cannot
  serve Postfix;
- exactly one reply per request (maddy can send FAIL then OK); a temporary
  provider failure is `FAIL … code=temp_fail temp`;
- several requests may be in flight on one connection (ids keep them apart).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymaddy.auth import dovecot_proto as dp
from pymaddy.auth import normalize
from pymaddy.auth.base import PlainAuth
from pymaddy.auth.normalize import NormalizeError
from pymaddy.auth.sasl import SASLCredentials
from pymaddy.auth.throttle import throttle_for
from pymaddy.mail.errors import AuthTemporaryError
from pymaddy.pipeline.runner import module_of
from pymaddy.runtime.module import Connection, ModuleError, StreamEndpoint
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

__all__ = ["DovecotSASLD"]

MOD_NAME = "dovecot_sasld"
READ_TIMEOUT = 600.0  # an idle client connection (Postfix keeps one per smtpd process)
MAX_PENDING = 16  # multi-step requests waiting for CONT on one connection
LOGIN_USER, LOGIN_PASS = b"Username:", b"Password:"


@dataclass
class _Pending:
    """A multi-step request waiting for the client's next CONT."""

    req: dp.AuthRequest
    username: bytes | None = None  # LOGIN: the answer to "Username:"


class DovecotSASLD(SASLCredentials, StreamEndpoint):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.sasl_login = bool(s.get("sasl_login"))
        try:
            self.auth_normalize = normalize.get(str(s.get("auth_map_normalize") or "auto"))
        except NormalizeError as e:
            raise ModuleError(f"{MOD_NAME}: {e}") from None
        self.auth: list[PlainAuth] = []
        self.throttle = throttle_for(self.settings.get("auth_throttle"))
        self.auth_map: Table | None = None
        self._cuid = 0

    def log_name(self) -> str:
        return MOD_NAME

    async def start(self) -> None:
        await super().start()
        s = self.settings
        self.auth = [module_of(self.ctx, i, PlainAuth) for i in (s.get("auth") or [])]  # type: ignore[type-abstract]
        if s.get("auth_map") is not None:
            self.auth_map = module_of(self.ctx, s["auth_map"], Table)  # type: ignore[type-abstract]

    @property
    def mechanisms(self) -> list[str]:
        if not self.auth:
            return []
        return ["PLAIN", "LOGIN"] if self.sasl_login else ["PLAIN"]

    # -- the connection --------------------------------------------------------------------------

    async def handle(self, conn: Connection) -> None:
        self._cuid += 1
        hs = dp.ServerHandshake(
            spid=str(os.getpid()),
            cuid=str(self._cuid),
            cookie=secrets.token_hex(16),
            mechanisms={m: dp.Mechanism(m, frozenset({"plaintext"})) for m in self.mechanisms},
        )
        conn.writer.write(hs.lines())
        await conn.writer.drain()
        pending: dict[str, _Pending] = {}
        got_version = False
        while True:
            with conn.idle():
                try:
                    line = await asyncio.wait_for(conn.reader.readuntil(b"\n"), READ_TIMEOUT)
                except asyncio.IncompleteReadError:
                    return  # client closed
                except asyncio.LimitOverrunError:
                    self.log.msg("protocol error", reason="line too long", src=conn.remote)
                    return
            try:
                cmd, args = dp.decode_line(line)
                if cmd == "VERSION":
                    dp.parse_client_version(args)
                    got_version = True
                elif not got_version:
                    raise dp.ProtocolError(f"expected VERSION, got {cmd}")
                elif cmd == "CPID":
                    pass
                elif cmd == "AUTH":
                    await self._auth(conn, dp.AuthRequest.parse(args), pending)
                elif cmd == "CONT":
                    rid, data = dp.parse_cont(args)
                    p = pending.pop(rid, None)
                    if p is None:
                        raise dp.ProtocolError(f"CONT for unknown request {rid}")
                    await self._step(conn, p, data, pending)
                else:
                    raise dp.ProtocolError(f"unknown command {cmd}")
            except dp.ProtocolError as e:
                self.log.msg("protocol error", reason=str(e), src=conn.remote)
                return

    async def _reply(self, conn: Connection, reply: dp.AuthReply) -> None:
        conn.writer.write(reply.line())
        await conn.writer.drain()

    async def _fail(self, conn: Connection, rid: str, reason: str = "", user: str = "") -> None:
        params = {"user": user} if user else {}
        if reason:
            params["reason"] = reason
        await self._reply(conn, dp.AuthReply("FAIL", rid, params))

    async def _auth(self, conn: Connection, req: dp.AuthRequest, pending: dict[str, _Pending]) -> None:
        if req.id in pending:
            raise dp.ProtocolError(f"duplicate request id {req.id}")
        if req.mechanism not in self.mechanisms:
            await self._fail(conn, req.id, "Unsupported authentication mechanism")
            return
        p = _Pending(req)
        if req.initial is None:
            await self._challenge(conn, p, b"" if req.mechanism == "PLAIN" else LOGIN_USER, pending)
            return
        await self._step(conn, p, req.initial, pending)

    async def _challenge(self, conn: Connection, p: _Pending, data: bytes, pending: dict[str, _Pending]) -> None:
        if len(pending) >= MAX_PENDING:
            pending.pop(next(iter(pending)))  # the oldest abandoned exchange goes
        pending[p.req.id] = p
        await self._reply(conn, dp.AuthReply("CONT", p.req.id, data=data))

    async def _step(self, conn: Connection, p: _Pending, data: bytes, pending: dict[str, _Pending]) -> None:
        rid = p.req.id
        if p.req.mechanism == "LOGIN":
            if p.username is None:
                p.username = data
                await self._challenge(conn, p, LOGIN_PASS, pending)
                return
            await self._login(conn, p, p.username, data)
            return
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd
        fields = data.split(b"\x00")
        if len(fields) != 3:
            await self._fail(conn, rid, "Invalid PLAIN response")
            return
        authz, user_b, pass_b = fields
        user = user_b.decode("utf-8", "replace")
        if authz and authz != user_b:
            # maddy refuses a different authorization identity without logging it
            await self._fail(conn, rid, user=user)
            return
        await self._verify(conn, p.req, user, user, pass_b.decode("utf-8", "replace"))

    async def _login(self, conn: Connection, p: _Pending, user_b: bytes, pass_b: bytes) -> None:
        user = user_b.decode("utf-8", "replace")
        try:
            log_user = await self.username_for_auth(user)  # LOGIN logs the mapped name (maddy)
        except Exception:
            await self._fail(conn, p.req.id, user=user)
            return
        await self._verify(conn, p.req, user, log_user, pass_b.decode("utf-8", "replace"))

    async def _verify(self, conn: Connection, req: dp.AuthRequest, user: str, log_user: str, password: str) -> None:
        err = await self.check_password(user, password, req.params.get("rip", ""))
        if err is None:
            await self._reply(conn, dp.AuthReply("OK", req.id, {"user": user}))
            return
        fields = {"reason": str(err), "username": log_user}
        if req.remote:
            fields["src_ip"] = req.remote
        self.log.msg("authentication failed", **fields)
        if isinstance(err, AuthTemporaryError):
            await self._reply(conn, dp.AuthReply("FAIL", req.id, {"user": user, "code": "temp_fail", "temp": ""}))
        else:
            await self._fail(conn, req.id, user=user)
