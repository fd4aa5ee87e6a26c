"""`auth.pass_table`: password hashes kept in a table (maddy's internal/auth/pass_table).

The key is the username after PRECIS UsernameCaseMapped (`Foo`, `FOO` and its full-width
form are the same user); the value is `ALGO:DATA` (see `pymaddy.auth.hashes`). When the
table is mutable (`sql_table`, `sql_query` with add/set/del/list), `pymaddy
creds` manages users through `list_users`, `create_user`, `set_user_password`
and `delete_user`. Hashing and verifying run in a worker thread.

As a table, pass_table answers with the stored hash for a username (so it can
be used as `user` table of plain_separate, or to test that an account exists).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymaddy.auth import hashes
from pymaddy.auth.base import PlainAuth
from pymaddy.auth.normalize import NormalizeError, precis_casefold
from pymaddy.mail.errors import AuthError, AuthTemporaryError
from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import MutableTable, Table
from pymaddy.tables.chain import resolve_table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD_NAME = "auth.pass_table"


class UserDBError(Exception):
    """A user-management operation failed; the message is for the user."""


class PassTable(Module, PlainAuth, MutableTable):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self._table: Table | None = None

    async def start(self) -> None:
        ref = self.settings.get("table")
        if ref is None:
            raise ModuleError(f"{MOD_NAME}: no table configured")
        self._table = resolve_table(self.ctx, ref)

    async def stop(self) -> None:
        self._table = None

    @property
    def table(self) -> Table:
        if self._table is None:
            raise ModuleError(f"{MOD_NAME}: not started")
        return self._table

    def _mutable(self) -> MutableTable:
        tbl = self.table
        if not isinstance(tbl, MutableTable):
            raise UserDBError(f"{MOD_NAME}: table is not mutable, no management functionality available")
        return tbl

    # -- PlainAuth ------------------------------------------------------------------------------

    async def auth_plain(self, username: str, password: str) -> None:
        try:
            key = precis_casefold(username)
        except NormalizeError as e:
            raise AuthError(f"{MOD_NAME}: {e}") from None
        try:
            stored = await self.table.lookup(key)
        except Exception as e:
            self.log.error("table lookup failed", err=str(e), username=key)
            raise AuthTemporaryError(f"{MOD_NAME}: auth plain {key}: {e}") from None
        if stored is None:
            raise AuthError("unknown credentials")
        try:
            await hashes.verify_async(password, stored)
        except hashes.HashMismatch:
            raise AuthError("invalid credentials") from None
        except hashes.HashError as e:
            self.log.error("unusable password hash", err=f"{MOD_NAME}: auth plain {key}: {e}", username=key)
            raise AuthError(f"{MOD_NAME}: auth plain {key}: {e}") from None

    # -- Table (username → stored hash) ------------------------------------------------------------

    async def lookup_multi(self, key: str) -> list[str]:
        try:
            norm = precis_casefold(key)
        except NormalizeError:
            return []
        return await self.table.lookup_multi(norm)

    async def keys(self) -> list[str]:
        return await self._mutable().keys()

    async def set_key(self, key: str, value: str) -> None:
        await self._mutable().set_key(key, value)

    async def remove_key(self, key: str) -> None:
        await self._mutable().remove_key(key)

    # -- user management (pymaddy creds) -----------------------------------------------------------

    @staticmethod
    def _key(username: str, what: str) -> str:
        try:
            return precis_casefold(username)
        except NormalizeError as e:
            raise UserDBError(f"{MOD_NAME}: {what} {username} (raw): {e}") from None

    async def list_users(self) -> list[str]:
        tbl = self._mutable()
        try:
            return list(await tbl.keys())
        except Exception as e:
            raise UserDBError(f"{MOD_NAME}: list users: {e}") from None

    async def create_user(
        self, username: str, password: str, algo: str = hashes.DEFAULT_HASH, opts: hashes.HashOpts | None = None
    ) -> None:
        """Add a user; UserDBError when it exists (`credentials for KEY already exist`)."""
        tbl = self._mutable()
        if algo not in hashes.COMPUTE:
            raise UserDBError(f"{MOD_NAME}: unknown hash function: {algo}")
        key = self._key(username, "create user")
        try:
            exists = await tbl.lookup(key) is not None
        except Exception as e:
            raise UserDBError(f"{MOD_NAME}: create user {key}: {e}") from None
        if exists:
            raise UserDBError(f"credentials for {key} already exist")
        try:
            stored = await hashes.compute_async(algo, password, opts)
        except hashes.HashError as e:
            raise UserDBError(f"{MOD_NAME}: create user {key}: hash generation: {e}") from None
        try:
            await tbl.set_key(key, stored)
        except Exception as e:
            raise UserDBError(f"{MOD_NAME}: create user {key}: {e}") from None

    async def set_user_password(self, username: str, password: str) -> None:
        """Replace the password (always bcrypt, default cost, as maddy)."""
        tbl = self._mutable()
        key = self._key(username, "set password")
        try:
            stored = await hashes.compute_async(hashes.HASH_BCRYPT, password)
        except hashes.HashError as e:
            raise UserDBError(f"{MOD_NAME}: set password {key}: hash generation: {e}") from None
        try:
            await tbl.set_key(key, stored)
        except Exception as e:
            raise UserDBError(f"{MOD_NAME}: set password {key}: {e}") from None

    async def delete_user(self, username: str) -> None:
        tbl = self._mutable()
        key = self._key(username, "del user")
        try:
            await tbl.remove_key(key)
        except Exception as e:
            raise UserDBError(f"{MOD_NAME}: del user {key}: {e}") from None


__all__ = ["PassTable", "UserDBError"]
