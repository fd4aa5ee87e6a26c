"""Module schemas as data: which directives a module takes, their types and defaults.

Every module declares a `ModuleSchema` next to its code (e.g. `pymaddy/checks/spf.py`).
The compiler validates a block against the schema and hands the module a `Settings`
mapping of typed values, so no module ever reads raw config nodes.

Value types mirror maddy's framework/config/map.go (spec §A.6). Types that name
other modules (`ModuleRef`, `Group`) call back into the compiler through `Ctx`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pymaddy.config import values as V
from pymaddy.config.errors import ConfigError, ErrorList
from pymaddy.config.ir import Node

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance


class Ctx(Protocol):
    """What a value type may ask of the compiler while it parses a directive."""

    errors: ErrorList

    @property
    def globals(self) -> Settings: ...

    def module(self, node: Node, args: Sequence[str], namespace: str, role: str) -> ModuleInstance | None:
        """Resolve `&name` or define a module inline from `args` (name + inline args) and node's block."""

    def group(self, node: Node, kind: str, role: str) -> ModuleInstance | None:
        """Resolve `check &x` / `check {…}` style group directives."""

    def block(self, node: Node, directives: Sequence[Directive], owner: str) -> Settings:
        """Validate a nested block (e.g. `tls_client {…}`) against a list of directives."""


class Settings(dict[str, Any]):
    """Typed, validated values of one block, keyed by directive name.

    `present` lists the directives actually written (not defaulted or inherited),
    `failed` those whose value was rejected (already reported: validators skip
    checks that depend on them, so one mistake gives one error), `nodes` keeps
    their nodes for runtime errors that must point at the config.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.present: set[str] = set()
        self.failed: set[str] = set()
        self.nodes: dict[str, Node] = {}
        self.node: Node | None = None


class ValueType:
    """Parses one directive node into a typed value; raises ConfigError or ValueError."""

    block_ok = False

    def parse(self, node: Node, ctx: Ctx) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, node: Node, ctx: Ctx) -> Any:
        # maddy tests len(Children) != 0: an empty block after a plain directive is fine.
        if node.children and not self.block_ok:
            raise ConfigError.at(node, "can't declare block here")
        return self.parse(node, ctx)


class Bool(ValueType):
    def parse(self, node: Node, ctx: Ctx) -> bool:
        if not node.args:
            return True
        if len(node.args) != 1:
            raise ConfigError.at(node, "expected exactly 1 argument")
        return V.parse_bool(node.args[0])


class Duration(ValueType):
    """Seconds (float)."""

    def parse(self, node: Node, ctx: Ctx) -> float:
        if not node.args:
            raise ConfigError.at(node, "at least one argument is required")
        return V.parse_duration(node.args)


class DataSize(ValueType):
    """Bytes (int)."""

    def parse(self, node: Node, ctx: Ctx) -> int:
        if not node.args:
            raise ConfigError.at(node, "at least one argument is required")
        return V.parse_data_size(node.args)


@dataclass
class Int(ValueType):
    min: int | None = None
    max: int | None = None

    def parse(self, node: Node, ctx: Ctx) -> int:
        if len(node.args) != 1:
            raise ConfigError.at(node, "expected 1 argument")
        v = V.parse_int(node.args[0])
        if self.min is not None and v < self.min:
            raise ConfigError.at(node, f"value must be at least {self.min}")
        if self.max is not None and v > self.max:
            raise ConfigError.at(node, f"value must be at most {self.max}")
        return v


class Float(ValueType):
    def parse(self, node: Node, ctx: Ctx) -> float:
        if len(node.args) != 1:
            raise ConfigError.at(node, "expected 1 argument")
        return V.parse_float(node.args[0])


class String(ValueType):
    def parse(self, node: Node, ctx: Ctx) -> str:
        if len(node.args) != 1:
            raise ConfigError.at(node, "expected 1 argument")
        return node.args[0]


class StringList(ValueType):
    def parse(self, node: Node, ctx: Ctx) -> list[str]:
        if not node.args:
            raise ConfigError.at(node, "expected at least one argument")
        return list(node.args)


class Domain(ValueType):
    """A host or domain name (IDNs allowed)."""

    def parse(self, node: Node, ctx: Ctx) -> str:
        if len(node.args) != 1:
            raise ConfigError.at(node, "expected 1 argument")
        return V.validate_domain(node.args[0])


@dataclass
class Enum(ValueType):
    choices: tuple[str, ...]

    def parse(self, node: Node, ctx: Ctx) -> str:
        if len(node.args) != 1:
            raise ConfigError.at(node, "expected exactly one argument")
        if node.args[0] not in self.choices:
            raise ConfigError.at(node, f"invalid argument, valid values are: [{' '.join(self.choices)}]")
        return node.args[0]


@dataclass
class EnumList(ValueType):
    choices: tuple[str, ...]

    def parse(self, node: Node, ctx: Ctx) -> list[str]:
        if not node.args:
            raise ConfigError.at(node, "expected at least one argument")
        for a in node.args:
            if a not in self.choices:
                raise ConfigError.at(node, f"invalid argument, valid values are: [{' '.join(self.choices)}]")
        return list(node.args)


@dataclass
class Endpoints(ValueType):
    """One or more network addresses (tcp://, tls://, unix://)."""

    listen: bool = False  # listeners need IP literals (spec §A.7)

    def parse(self, node: Node, ctx: Ctx) -> list[V.Endpoint]:
        if not node.args:
            raise ConfigError.at(node, "expected at least one argument")
        return [parse_endpoint_at(node, a, self.listen) for a in node.args]


def parse_endpoint_at(node: Node, addr: str, listen: bool) -> V.Endpoint:
    try:
        ep = V.parse_endpoint(addr)
    except ValueError as e:
        raise ConfigError.at(node, f"{addr}: {e}") from None
    if listen and not ep.is_unix and ep.host and not V.is_ip_literal(ep.host):
        raise ConfigError.at(node, f"{addr}: listen address must be an IP literal, not a host name")
    return ep


@dataclass
class ModuleRef(ValueType):
    """A module given inline (`table file /x`) or by reference (`&name`).

    namespace: prefix tried first for bare inline names (`file` → `table.file`).
    role: the interface the module must implement (see `ROLES`).
    """

    namespace: str
    role: str
    block_ok = True

    def parse(self, node: Node, ctx: Ctx) -> ModuleInstance | None:
        return ctx.module(node, node.args, self.namespace, self.role)


@dataclass
class Group(ValueType):
    """`check {…}`, `modify &name`, `limits {…}`, `mx_auth {…}`, `imap_filter {…}`."""

    kind: str  # default group module: checks, modifiers, limits, mx_auth, imap_filters
    role: str
    block_ok = True

    def parse(self, node: Node, ctx: Ctx) -> ModuleInstance | None:
        return ctx.group(node, self.kind, self.role)


@dataclass
class Block(ValueType):
    """A nested block validated against its own directives (`tls_client {…}`)."""

    directives: tuple[Directive, ...]
    allow_args: bool = False
    block_ok = True

    def parse(self, node: Node, ctx: Ctx) -> Settings:
        if node.args and not self.allow_args:
            raise ConfigError.at(node, "no arguments expected")
        return ctx.block(node, self.directives, node.name)


@dataclass
class Custom(ValueType):
    """Anything with its own syntax: the function gets the node and the context."""

    fn: Callable[[Node, Ctx], Any]
    allow_block: bool = False

    def __post_init__(self) -> None:
        self.block_ok = self.allow_block

    def parse(self, node: Node, ctx: Ctx) -> Any:
        return self.fn(node, ctx)


_NO_DEFAULT: Any = object()


@dataclass(frozen=True)
class Directive:
    """One directive a block accepts.

    default: the typed value used when absent (a callable is called to make it).
    inherit: take the same-named global directive when absent (spec legend `G`).
    repeat: may appear several times (maddy's callback directives, `cb`);
            the value is then the list of each occurrence's parsed value.
    """

    name: str
    type: ValueType
    default: Any = None
    inherit: bool = False
    required: bool = False
    repeat: bool = False
    doc: str = ""


InlineFn = Callable[[Node, Ctx], list[Node]]
ChildrenFn = Callable[[Node, list[Node], Settings, Ctx], None]
ValidateFn = Callable[[Settings, Node, Ctx], None]


@dataclass(frozen=True)
class ModuleSchema:
    """Everything the compiler needs to know about one registered module name.

    roles: interfaces it implements (`ROLES`); a reference is accepted only where
        the expected role is among them.
    inline: turns inline arguments (`deliver_to queue /dir {…}` → ['/dir']) into
        directive nodes merged before the block's own; None means the module
        takes no inline arguments.
    inline_owns_block: the block after inline arguments configures the module
        named inline (`auth pass_table static { entry … }`), not this one; the
        inline function then receives it in `node.children`.
    children: for free-form blocks (groups, pipelines, dnsbl lists): gets the
        children no directive claimed; without it they are "unexpected directive".
    validate: cross-directive checks after all directives are parsed.
    runtime: "package.module:Class" of the implementation, once it exists;
        `pymaddy run` refuses a config that uses a module without one.
    reports_module_name: maddy's quirk (spec §A.8.10): the block registers under
        the module name, whatever instance name is written.
    """

    name: str
    roles: frozenset[str]
    directives: tuple[Directive, ...] = ()
    inline: InlineFn | None = None
    inline_owns_block: bool = False
    children: ChildrenFn | None = None
    validate: ValidateFn | None = None
    runtime: str | None = None
    reports_module_name: bool = False
    doc: str = ""
    directive_map: dict[str, Directive] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.directive_map.update({d.name: d for d in self.directives})


# Interfaces a module can implement; the compiler checks references against them.
ROLES = frozenset(
    {
        "endpoint",
        "delivery_target",
        "check",
        "modifier",
        "table",
        "mutable_table",
        "auth",
        "storage",
        "blob_store",
        "tls_loader",
        "mx_auth_policy",
        "imap_filter",
        "dns_provider",
        "checks_group",
        "modifiers_group",
        "limits_group",
        "mx_auth_group",
        "imap_filters_group",
    }
)


def roles(*names: str) -> frozenset[str]:
    unknown = set(names) - ROLES
    if unknown:
        raise ValueError(f"unknown roles {unknown}")
    return frozenset(names)


def inline_to(directive: str, min_args: int = 1, max_args: int | None = None) -> InlineFn:
    """Inline arguments become one directive: `file PATH` → `file PATH` inside the block."""

    def fn(node: Node, ctx: Ctx) -> list[Node]:
        if not node.args:
            return []
        if len(node.args) < min_args or (max_args is not None and len(node.args) > max_args):
            raise ConfigError.at(node, f"{node.name}: unexpected number of inline arguments")
        return [node.synth(directive, list(node.args))]

    return fn


# -- inline arguments kept for a validator ---------------------------------------
# Some inline arguments only supply defaults that the block may override, or need
# parsing together with other directives. They travel as a hidden directive that
# no config text can spell ('@' is not a directive-name character) and the
# module's `validate` takes them out again.

INLINE_ARGS = "@inline"


def _raw_args(node: Node, ctx: Ctx) -> list[str]:
    return list(node.args)


INLINE_ARGS_DIRECTIVE = Directive(INLINE_ARGS, Custom(_raw_args), None, doc="inline arguments (internal, not writable)")


def keep_inline_args(head: Node, ctx: Ctx) -> list[Node]:
    """Inline arguments become the hidden directive, interpreted by the module's `validate`."""
    return [head.synth(INLINE_ARGS, list(head.args))] if head.args else []


def ignore_inline_args(head: Node, ctx: Ctx) -> list[Node]:
    """maddy accepts and silently ignores inline arguments for this module."""
    return []


def reject_inline_args(prefix: str) -> InlineFn:
    """Inline arguments are an error worded as maddy words it (`pam: inline arguments are not used`)."""

    def fn(head: Node, ctx: Ctx) -> list[Node]:
        if head.args:
            raise ConfigError.at(head, f"{prefix}: inline arguments are not used")
        return []

    return fn


def take_inline_args(settings: Settings) -> list[str]:
    """The inline arguments kept by `keep_inline_args`, removed from the settings."""
    value = settings.pop(INLINE_ARGS, None)
    settings.present.discard(INLINE_ARGS)
    settings.nodes.pop(INLINE_ARGS, None)
    return list(value) if value else []
