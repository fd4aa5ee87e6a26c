"""Tables without configuration: identity, email_localpart(_optional), email_with_domain."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymaddy.mail.address import AddressError, split
from pymaddy.runtime.module import Module
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

# RFC 5322 "specials" without the dot, plus space: any of them makes a local part quoted.
_MBOX_SPECIALS = frozenset('()<>[]:;@\\," ')


def quote_mbox(mbox: str) -> str:
    """maddy's address.QuoteMbox: quote (escaping `\\` and `"`) only when a special character occurs."""
    out: list[str] = []
    quoted = False
    for ch in mbox:
        if ch in _MBOX_SPECIALS:
            if ch in '\\"':
                out.append("\\")
            quoted = True
        out.append(ch)
    return '"' + "".join(out) + '"' if quoted else mbox


class IdentityTable(Module, Table):
    """Every key maps to itself."""

    async def lookup_multi(self, key: str) -> list[str]:
        return [key]


class EmailLocalpartTable(Module, Table):
    """`user@domain` → `user` (as written, no unquoting); a key that is not an address misses."""

    allow_non_email = False

    async def lookup_multi(self, key: str) -> list[str]:
        try:
            mbox, _domain = split(key)
        except AddressError:
            return [key] if self.allow_non_email else []
        return [mbox]


class EmailLocalpartOptionalTable(EmailLocalpartTable):
    """Like email_localpart, but a key that is not an address is returned unchanged."""

    allow_non_email = True


class EmailWithDomainTable(Module, Table):
    """`key` → `key@DOMAIN` for every configured domain (the local part quoted if needed)."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.domains: list[str] = list(self.settings.get("domains") or [])

    async def lookup_multi(self, key: str) -> list[str]:
        mbox = quote_mbox(key)
        return [f"{mbox}@{d}" for d in self.domains]
