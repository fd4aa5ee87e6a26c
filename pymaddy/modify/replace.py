"""`modify.replace_rcpt` / `modify.replace_sender`: rewrite addresses through a table
(maddy's internal/modify/replace_addr.go).

The address is normalized (`for_lookup`) and looked up whole. Without a result
its local part is looked up and each value is re-attached to the (normalized)
domain — unless the value contains `@` and is not quoted, then it is used whole.
Recipients may expand 1:N; the sender takes the first value. A whole-address
replacement, or a local-part one used whole, must be a valid address. The result
is not looked up again (not recursive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymaddy.mail.address import AddressError, for_lookup, split
from pymaddy.pipeline.interfaces import Modifier, ModifierState
from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import Table
from pymaddy.tables.chain import resolve_table
from pymaddy.tables.schema import valid_domain

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.mail.message import MsgMeta
    from pymaddy.runtime.module import RuntimeContext


_GRAPHIC = frozenset("!#$%&'*+-/=?^_`{|}~.")


def _unquote_mbox(mbox: str) -> str | None:
    """maddy's address.UnquoteMbox; None when malformed."""
    out: list[str] = []
    quoted = escaped = terminated = False
    for ch in mbox:
        if terminated:
            return None
        if ch == '"' and not escaped:
            quoted = not quoted
            terminated = not quoted
            continue
        if ch == "\\" and not escaped:
            if not quoted:
                return None
            escaped = True
            continue
        if ch == "@" and not quoted:
            return None
        escaped = False
        out.append(ch)
    return "".join(out) or None


def valid_mailbox_name(mbox: str) -> bool:
    """maddy's address.ValidMailboxName: lenient dot placement, any non-ASCII allowed."""
    if mbox.startswith('"'):
        raw = _unquote_mbox(mbox)
        return raw is not None and all(ch >= " " and ch != "\x7f" for ch in raw)
    return all(ch in _GRAPHIC or (ch.isascii() and ch.isalnum()) or ord(ch) > 0x7F for ch in mbox)


def valid_address(addr: str) -> bool:
    """maddy's address.Valid (RFC 5321 forward-path, `postmaster` allowed)."""
    if len(addr.encode("utf-8", errors="surrogatepass")) > 320:
        return False
    try:
        mbox, domain = split(addr)
    except AddressError:
        return False
    if domain == "":
        return True
    return valid_mailbox_name(mbox) and valid_domain(domain)


class RewriteError(Exception):
    """The address cannot be rewritten (malformed input, invalid replacement, table failure)."""


class _ReplaceAddr(Module, Modifier, ModifierState):
    """Stateless: the module is its own per-message state."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.table_inst: ModuleInstance | None = self.settings.get("table")
        self._table: Table | None = None

    async def start(self) -> None:
        if self.table_inst is None:
            raise ModuleError(f"{self.inst.schema.name}: no table configured")
        self._table = resolve_table(self.ctx, self.table_inst)

    @property
    def table(self) -> Table:
        if self._table is None:
            raise RewriteError(f"{self.inst.schema.name}: not started")
        return self._table

    async def state_for_msg(self, meta: MsgMeta) -> ModifierState:
        return self

    async def rewrite(self, addr: str) -> list[str]:
        """Every replacement of `addr`, or [addr] itself when the table has none."""
        try:
            norm = for_lookup(addr) if addr else ""  # "" is the null return-path
        except AddressError as e:
            reason = str(e).removeprefix("malformed address: ")
            raise RewriteError(f"malformed address: {reason}") from None
        table = self.table
        values = await table.lookup_multi(norm)
        if values:
            for v in values:
                if not valid_address(v):
                    raise RewriteError(f"refusing to replace recipient with the invalid address {v}")
            return list(values)
        try:
            mbox, domain = split(norm)
        except AddressError:
            return [addr]
        values = await table.lookup_multi(mbox)
        if not values:
            return [addr]
        out: list[str] = []
        for v in values:
            if "@" in v and not v.startswith('"') and not v.endswith('"'):
                if not valid_address(v):
                    raise RewriteError(f"refusing to replace recipient with invalid address {v}")
                out.append(v)
            else:
                out.append(f"{v}@{domain}")
        return out


class ReplaceRcpt(_ReplaceAddr):
    async def rewrite_rcpt(self, rcpt: str) -> list[str]:
        return await self.rewrite(rcpt)


class ReplaceSender(_ReplaceAddr):
    async def rewrite_sender(self, mail_from: str) -> str:
        return (await self.rewrite(mail_from))[0]
