"""`table.chain`: feed each step's output into the next table (maddy's internal/table/chain.go)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext
    from pymaddy.tables.schema import ChainStep


def resolve_table(ctx: RuntimeContext, inst: ModuleInstance) -> Table:
    """The runtime Table of a referenced instance (ctx.module_as needs a Module subclass)."""
    obj = ctx.module(inst)
    if not isinstance(obj, Table):
        raise ModuleError(f"{inst.label} is not a table")
    return obj


class ChainTable(Module, Table):
    """Steps run in order on every value the previous step produced (fan-out).

    A miss in a `step` makes the whole lookup miss. A miss in an `optional_step`
    (for any of the current values) skips that step entirely: all current values
    pass through unchanged, as maddy's `continue STEP` does.
    """

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.step_specs: list[ChainStep] = [s for s in self.settings.get("steps") or [] if s.table is not None]
        self.steps: list[tuple[Table, bool]] = []

    async def start(self) -> None:
        self.steps = []
        for spec in self.step_specs:
            assert spec.table is not None
            self.steps.append((resolve_table(self.ctx, spec.table), spec.optional))

    async def lookup_multi(self, key: str) -> list[str]:
        result = [key]
        for table, optional in self.steps:
            new: list[str] = []
            skipped = False
            for k in result:
                values = await table.lookup_multi(k)
                if not values:
                    if optional:
                        skipped = True
                        break
                    return []
                new.extend(values)
            if not skipped:
                result = new
        return result
