"""The compiler: validates every block against its module schema and wires references.

Invariants:
- Every error is collected with its FILE:LINE; compiling never stops at the first.
- Top-level module blocks are configured on first reference (maddy's lazy init),
  so forward references and cycles work; a block nobody references is an error
  ("unused configuration block"), but it is still validated so check-config
  reports the errors inside it too.
- Nothing below the compiler sees raw nodes: modules get `Settings`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from pymaddy.compiler.globals import GLOBAL_DIRECTIVES
from pymaddy.compiler.graph import Graph, ModuleInstance
from pymaddy.compiler.registry import registry
from pymaddy.config.errors import ConfigError, ErrorList
from pymaddy.config.expand import Loaded, load_file
from pymaddy.config.ir import Node
from pymaddy.config.schema import Directive, ModuleSchema, Settings


@dataclass
class CompileResult:
    graph: Graph | None
    errors: ErrorList
    files: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.graph is not None


class Compiler:
    """Implements `pymaddy.config.schema.Ctx` for the value types."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.errors = ErrorList()
        self.modules = registry()
        self.blocks: dict[str, ModuleInstance] = {}
        self.instances: list[ModuleInstance] = []
        self._globals = Settings()

    @property
    def globals(self) -> Settings:
        return self._globals

    # -- the whole config ---------------------------------------------------

    def run(self) -> Graph:
        endpoint_nodes: list[Node] = []
        global_nodes: list[Node] = []
        gmap = {d.name: d for d in GLOBAL_DIRECTIVES}
        for node in self.loaded.nodes:
            schema = self.modules.get(node.name)
            if node.name in gmap:
                global_nodes.append(node)
            elif schema is not None and "endpoint" in schema.roles:
                endpoint_nodes.append(node)
            elif schema is not None:
                self._register(node, schema)
            else:
                self.errors.at(node, f"unknown module or global directive: {node.name}")

        self._globals = self._parse_block(None, global_nodes, GLOBAL_DIRECTIVES, Settings(), owner_label="")

        endpoints: list[ModuleInstance] = []
        for node in endpoint_nodes:
            inst = ModuleInstance(self.modules[node.name], "", node, inline_args=list(node.args))
            inst.used = True
            self._configure(inst)
            endpoints.append(inst)
        if not endpoint_nodes and not self._fatal_parse_errors():
            self.errors.add(ConfigError("", 0, "at least one endpoint should be configured"))

        # Unreferenced blocks are an error in maddy; configure them anyway so
        # that the errors inside them are reported in the same run.
        for inst in list(self.blocks.values()):
            if not inst.used and inst.state == "registered":
                self.errors.at(inst.node, f"unused configuration block {inst.instance} ({inst.name})")
                self._configure(inst)

        return Graph(self._globals, endpoints, dict(self.blocks), self.instances, list(self.loaded.files))

    def _fatal_parse_errors(self) -> bool:
        return bool(self.loaded.errors)

    def _register(self, node: Node, schema: ModuleSchema) -> None:
        names = list(node.args) or [schema.name]
        instance = schema.name if schema.reports_module_name else names[0]
        if instance in self.blocks:
            self.errors.at(node, f"config block named {instance} already exists")
            return
        inst = ModuleInstance(schema, instance, node, aliases=names[1:])
        self.blocks[instance] = inst
        # maddy 0.9.x rejects every alias through a bug (spec §A.8.4); the
        # documented behaviour, several names for one block, is what we do.
        for alias in names[1:]:
            if alias in self.blocks:
                self.errors.at(node, f"config block named {alias} already exists")
            else:
                self.blocks[alias] = inst

    # -- one module -----------------------------------------------------------

    def _configure(self, inst: ModuleInstance) -> None:
        inst.state = "configuring"
        self.instances.append(inst)
        schema = inst.schema
        node = inst.node
        children = list(node.children or [])
        synthetic: list[Node] = []
        if inst.inline_args or (schema.inline_owns_block and node.children is not None and inst.instance == ""):
            if schema.inline is None:
                if inst.inline_args:
                    self.errors.at(node, f"{schema.name}: inline arguments are not used")
            else:
                owned = node.children if schema.inline_owns_block else None
                head = Node(schema.name, list(inst.inline_args), owned, node.file, node.line)
                try:
                    synthetic = schema.inline(head, self)
                except (ConfigError, ValueError) as e:
                    self._report(node, e)
                if schema.inline_owns_block:
                    children = []
        settings = self._parse_block(
            node, synthetic + children, schema.directives, Settings(), owner_label=schema.name, free=schema.children
        )
        if schema.validate is not None:
            try:
                schema.validate(settings, node, self)
            except (ConfigError, ValueError) as e:
                self._report(node, e)
        inst.settings = settings
        inst.state = "configured"

    def _parse_block(
        self,
        owner: Node | None,
        nodes: list[Node],
        directives: Sequence[Directive],
        out: Settings,
        *,
        owner_label: str,
        free: object = None,
    ) -> Settings:
        dmap = {d.name: d for d in directives}
        unknown: list[Node] = []
        out.node = owner
        for child in nodes:
            d = dmap.get(child.name)
            if d is None:
                unknown.append(child)
                continue
            if child.name in out.present and not d.repeat:
                self.errors.at(child, f"duplicate directive: {child.name}")
                continue
            try:
                value = d.type(child, self)
            except (ConfigError, ValueError) as e:
                self._report(child, e)
                out.present.add(child.name)
                out.failed.add(child.name)
                # Keys always exist, so code reading settings never meets a hole.
                if d.name not in out:
                    out[d.name] = [] if d.repeat else self._default(d)
                continue
            if d.repeat:
                out.setdefault(d.name, []).append(value)
            else:
                out[d.name] = value
            out.present.add(child.name)
            out.nodes.setdefault(child.name, child)
        if unknown:
            if callable(free):
                try:
                    free(owner, unknown, out, self)
                except (ConfigError, ValueError) as e:
                    self._report(owner or unknown[0], e)
            else:
                for child in unknown:
                    self.errors.at(child, f"unexpected directive: {child.name}")
        for d in directives:
            if d.name in out.present:
                continue
            if d.inherit and d.name in self._globals.present:
                out[d.name] = self._globals.get(d.name)
                if d.name in self._globals.failed:
                    out.failed.add(d.name)
            elif d.required:
                if owner is not None:
                    self.errors.at(owner, f"missing required directive: {d.name}")
                else:
                    self.errors.add(ConfigError("", 0, f"missing required directive: {d.name}"))
            if d.name not in out:
                out[d.name] = self._default(d)
        return out

    @staticmethod
    def _default(d: Directive) -> object:
        if callable(d.default):
            return d.default()
        if d.repeat and d.default is None:
            return []
        return d.default

    def _report(self, node: Node, e: Exception) -> None:
        if isinstance(e, ConfigError):
            self.errors.add(e)
        else:
            self.errors.at(node, str(e))

    # -- Ctx: what value types call back into -----------------------------------

    def block(self, node: Node, directives: Sequence[Directive], owner: str) -> Settings:
        return self._parse_block(node, list(node.children or []), directives, Settings(), owner_label=owner)

    def module(self, node: Node, args: Sequence[str], namespace: str, role: str) -> ModuleInstance | None:
        if not args:
            raise ConfigError.at(node, "at least one argument is required")
        if args[0].startswith("&"):
            if len(args) != 1 or node.children is not None:
                raise ConfigError.at(node, "exactly one argument is required to use existing config block")
            return self.reference(node, args[0][1:], role)
        schema = self._lookup(args[0], namespace)
        if schema is None:
            raise ConfigError.at(node, f"unknown module: {args[0]} (namespace: {namespace})")
        if role not in schema.roles:
            raise ConfigError.at(node, f"module {schema.name} () doesn't implement {role} interface")
        inst = ModuleInstance(schema, "", node, inline_args=list(args[1:]))
        inst.used = True
        self._configure(inst)
        return inst

    def reference(self, node: Node, name: str, role: str) -> ModuleInstance:
        inst = self.blocks.get(name)
        if inst is None:
            raise ConfigError.at(node, f"unknown configuration block: {name}")
        if role not in inst.schema.roles:
            raise ConfigError.at(node, f"module {inst.name} ({inst.instance}) doesn't implement {role} interface")
        inst.used = True
        if inst.state == "registered":
            self._configure(inst)
        return inst

    def group(self, node: Node, kind: str, role: str) -> ModuleInstance | None:
        args = list(node.args) or [kind]
        return self.module(node, args, "", role)

    def _lookup(self, name: str, namespace: str) -> ModuleSchema | None:
        if "." not in name and namespace:
            found = self.modules.get(f"{namespace}.{name}")
            if found is not None:
                return found
        return self.modules.get(name)


def compile_loaded(loaded: Loaded) -> CompileResult:
    comp = Compiler(loaded)
    errors = ErrorList()
    errors.extend(loaded.errors)
    graph = comp.run()
    errors.extend(comp.errors)
    return CompileResult(graph, errors, loaded.files, loaded.nodes)


def compile_file(path: str, environ: dict[str, str] | None = None) -> CompileResult:
    loaded = load_file(path, environ if environ is not None else dict(os.environ))
    return compile_loaded(loaded)
