"""`table.static`: key → values written in the configuration (maddy's internal/table/static.go)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymaddy.runtime.module import Module
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext


class StaticTable(Module, Table):
    """`entry KEY VALUE…`; a later entry for the same key replaces the earlier one (the schema folds them)."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        entries: dict[str, list[str]] = self.settings.get("entries") or {}
        self.entries = {k: list(v) for k, v in entries.items()}

    async def lookup_multi(self, key: str) -> list[str]:
        return list(self.entries.get(key, ()))
