"""`auth.plain_separate`: the username must exist in a `user` table, a `pass` provider checks the password.

As maddy: with no `user` tables every username passes the first step; the
username reaches tables and providers unchanged (auth_map_normalize has
already been applied by the endpoint); the first provider that accepts wins,
otherwise the last provider's error is returned.

Deliberate difference: maddy accepts any password when no `pass` provider is
configured (its loop never sets an error); pymaddy refuses the login then.

As a table, it answers "" for usernames present in any `user` table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymaddy.auth.base import PlainAuth
from pymaddy.mail.errors import AuthError, AuthTemporaryError
from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import Table
from pymaddy.tables.chain import resolve_table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext


def _resolve_auth(ctx: RuntimeContext, inst: ModuleInstance) -> PlainAuth:
    obj = ctx.module(inst)
    if not isinstance(obj, PlainAuth):
        raise ModuleError(f"{inst.label} is not an authentication provider")
    return obj


class PlainSeparate(Module, PlainAuth, Table):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.user_tables: list[Table] = []
        self.pass_auths: list[PlainAuth] = []

    async def start(self) -> None:
        self.user_tables = [resolve_table(self.ctx, i) for i in self.settings.get("user") or [] if i is not None]
        self.pass_auths = [_resolve_auth(self.ctx, i) for i in self.settings.get("pass") or [] if i is not None]

    async def _known(self, username: str) -> bool:
        if not self.user_tables:
            return True
        for tbl in self.user_tables:
            if await tbl.lookup(username) is not None:
                return True
        return False

    async def auth_plain(self, username: str, password: str) -> None:
        try:
            known = await self._known(username)
        except Exception as e:
            self.log.error("user table lookup failed", err=str(e), username=username)
            raise AuthTemporaryError(f"plain_separate: underlying table error: {e}") from None
        if not known:
            raise AuthError("user not found in tables")
        if not self.pass_auths:
            raise AuthError("plain_separate: no pass providers configured")
        last: Exception | None = None
        for p in self.pass_auths:
            try:
                await p.auth_plain(username, password)
            except (AuthError, AuthTemporaryError) as e:
                last = e
                continue
            return
        assert last is not None
        raise last

    async def lookup_multi(self, key: str) -> list[str]:
        try:
            known = await self._known(key)
        except Exception as e:
            raise RuntimeError(f"plain_separate: underlying table error: {e}") from e
        return [""] if known else []


__all__ = ["PlainSeparate"]
