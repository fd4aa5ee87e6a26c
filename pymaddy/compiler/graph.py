"""The compiled configuration: module instances wired to each other."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

from pymaddy.config.ir import Node
from pymaddy.config.schema import ModuleSchema, Settings


@dataclass(eq=False)
class ModuleInstance:
    """One configured module.

    Top-level blocks have an instance name and are configured lazily on first
    reference (so forward references and cycles work, as in maddy); inline
    definitions have instance == "".
    """

    schema: ModuleSchema
    instance: str
    node: Node
    inline_args: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    state: str = "registered"  # registered → configuring → configured
    used: bool = False

    @property
    def name(self) -> str:
        return self.schema.name

    @property
    def label(self) -> str:
        """How logs and errors name it: `instance (module)` or just the module."""
        return f"{self.instance} ({self.name})" if self.instance else self.name

    def __repr__(self) -> str:
        return f"<ModuleInstance {self.label} at {self.node.where}>"


@dataclass
class Graph:
    """A whole server: global settings, endpoints and every module they reach."""

    globals: Settings
    endpoints: list[ModuleInstance]
    blocks: dict[str, ModuleInstance]
    instances: list[ModuleInstance]
    files: list[str]

    def walk(self) -> list[ModuleInstance]:
        return list(self.instances)


def reachable(roots: list[ModuleInstance], extra: object = None) -> set[int]:
    """ids of `roots` and of every instance their settings (and `extra`, e.g. the globals)
    reference, directly or through nested values: what a process serving only `roots` must build."""
    seen: set[int] = set()
    stack: list[object] = [*roots, extra]
    visited: set[int] = set()  # containers already walked (settings may share values)
    while stack:
        v = stack.pop()
        if isinstance(v, ModuleInstance):
            if id(v) in seen:
                continue
            seen.add(id(v))
            stack.append(v.settings)
        elif isinstance(v, dict):
            if id(v) not in visited:
                visited.add(id(v))
                stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            if id(v) not in visited:
                visited.add(id(v))
                stack.extend(v)
        elif is_dataclass(v) and not isinstance(v, type) and id(v) not in visited:
            visited.add(id(v))
            stack.extend(getattr(v, f.name) for f in fields(v))
    return seen
