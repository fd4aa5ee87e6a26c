"""The message pipeline grammar (spec §D.1), validated into a typed routing tree.

Three levels: root (global checks/modifiers, source selection), source blocks
(destination selection) and recipient blocks (deliver_to / reroute / reject).
When a level has no selection rules, the level itself is the default block, so
`smtp … { deliver_to &x }` works without `default_source`/`default_destination`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import Ctx
from pymaddy.config.values import validate_domain

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance


@dataclass(frozen=True)
class RejectSpec:
    """An SMTP error given by `reject [CODE [ENH [MSG]]]`."""

    code: int = 554
    enhanced: tuple[int, int, int] = (5, 7, 0)
    message: str = "Message rejected due to a local policy"


@dataclass
class RcptBlock:
    node: Node | None
    checks: list[ModuleInstance] = field(default_factory=list)
    modifiers: list[ModuleInstance] = field(default_factory=list)
    targets: list[ModuleInstance | Pipeline] = field(default_factory=list)
    reject: RejectSpec | None = None


@dataclass
class SourceBlock:
    node: Node | None
    checks: list[ModuleInstance] = field(default_factory=list)
    modifiers: list[ModuleInstance] = field(default_factory=list)
    rcpt_in: list[tuple[ModuleInstance, RcptBlock]] = field(default_factory=list)
    per_rcpt: dict[str, RcptBlock] = field(default_factory=dict)
    default_rcpt: RcptBlock | None = None


@dataclass
class Pipeline:
    node: Node | None
    checks: list[ModuleInstance] = field(default_factory=list)
    modifiers: list[ModuleInstance] = field(default_factory=list)
    source_in: list[tuple[ModuleInstance, SourceBlock]] = field(default_factory=list)
    per_source: dict[str, SourceBlock] = field(default_factory=dict)
    default_source: SourceBlock | None = None
    dmarc: bool = False


def parse_pipeline(node: Node, ctx: Ctx) -> Pipeline:
    """A pipeline written as a block: `msgpipeline x { … }`, `reroute { … }`, `bounce { … }`."""
    return parse_pipeline_nodes(node, list(node.children or []), ctx)


@dataclass(frozen=True)
class _Level:
    """What differs between the root level (sources) and a source block (destinations)."""

    kind: str  # source | destination
    table_directive: str  # source_in | destination_in
    default_directive: str  # default_source | default_destination
    attrs: tuple[str, str, str]  # the block's (tables list, per-rule dict, default) attributes
    handling: tuple[str, ...]  # directives that, without rules, form the implied default block
    no_rules: str
    mixed: str
    missing_default: str
    empty: str


_ROOT = _Level(
    "source",
    "source_in",
    "default_source",
    ("source_in", "per_source", "default_source"),
    ("deliver_to", "reroute", "destination_in", "destination", "default_destination", "reject"),
    "expected at least one source matching rule",
    "can't put handling directives together with source rules, did you mean to put it into "
    "'default_source' block or into all source blocks?",
    "missing or empty default source block, use default_source { reject } to reject messages",
    "empty pipeline configuration, use 'reject' to reject messages",
)
_SOURCE = _Level(
    "destination",
    "destination_in",
    "default_destination",
    ("rcpt_in", "per_rcpt", "default_rcpt"),
    ("deliver_to", "reroute", "reject"),
    "expected at least one destination match rule",  # sic: maddy words the two differently
    "can't put handling directives together with destination rules, did you mean to put it into "
    "'default' block or into all recipient blocks?",
    "missing or empty default destination block, use default_destination { reject } to reject messages",
    "empty source block, use 'reject' to reject messages",
)


def parse_pipeline_nodes(owner: Node, nodes: list[Node], ctx: Ctx) -> Pipeline:
    pipe = Pipeline(owner)
    rest = []
    for n in nodes:
        if n.name == "dmarc":  # root level only
            try:
                pipe.dmarc = _dmarc(n, ctx)
            except ConfigError as e:
                ctx.errors.add(e)
        else:
            rest.append(n)
    _select(pipe, owner, rest, ctx, lv=_ROOT, sub=_source)
    return pipe


def _source(owner: Node, nodes: list[Node], ctx: Ctx) -> SourceBlock:
    src = SourceBlock(owner)
    _select(src, owner, nodes, ctx, lv=_SOURCE, sub=_rcpt)
    return src


def _select(
    block: Pipeline | SourceBlock,
    owner: Node,
    nodes: list[Node],
    ctx: Ctx,
    *,
    lv: _Level,
    sub: Callable[[Node, list[Node], Ctx], Any],
) -> None:
    """One selection level of §D.1: checks, modifiers, rule blocks, a default block, or the
    handling directives themselves as the implied default."""
    tables: list[tuple[ModuleInstance, Any]] = getattr(block, lv.attrs[0])
    per_rule: dict[str, Any] = getattr(block, lv.attrs[1])
    default_nodes: list[Node] | None = None
    others: list[Node] = []
    for n in nodes:
        try:
            if n.name == "check":
                block.checks.extend(_group(n, ctx, "checks", "checks_group"))
            elif n.name == "modify":
                block.modifiers.extend(_group(n, ctx, "modifiers", "modifiers_group"))
            elif n.name == lv.table_directive:
                table = _inline_table(n, ctx)
                inner = sub(n, list(n.children or []), ctx)
                if table is not None:
                    tables.append((table, inner))
            elif n.name == lv.kind:
                inner = sub(n, list(n.children or []), ctx)
                if not n.args:
                    ctx.errors.at(n, lv.no_rules)
                for rule in _rules(n, ctx, lv.kind):
                    # The first block naming a rule wins; later duplicates are ignored.
                    per_rule.setdefault(rule, inner)
            elif n.name == lv.default_directive:
                if default_nodes is not None:
                    ctx.errors.at(n, f"duplicate '{lv.default_directive}' block")
                    continue
                default_nodes = list(n.children or [])
            elif n.name in lv.handling:
                others.append(n)
            else:
                ctx.errors.at(n, f"unknown pipeline directive: {n.name}")
        except ConfigError as e:
            ctx.errors.add(e)

    if not per_rule and not default_nodes:
        if not others:
            ctx.errors.at(owner, lv.empty)
            return
        setattr(block, lv.attrs[2], sub(owner, others, ctx))
        return
    if others:
        ctx.errors.at(others[0], lv.mixed)
    if not default_nodes:
        ctx.errors.at(nodes[0] if nodes else owner, lv.missing_default)
        return
    setattr(block, lv.attrs[2], sub(owner, default_nodes, ctx))


def _rcpt(owner: Node, nodes: list[Node], ctx: Ctx) -> RcptBlock:
    rcpt = RcptBlock(owner)
    for n in nodes:
        try:
            if n.name == "check":
                rcpt.checks.extend(_group(n, ctx, "checks", "checks_group"))
            elif n.name == "modify":
                rcpt.modifiers.extend(_group(n, ctx, "modifiers", "modifiers_group"))
            elif n.name == "deliver_to":
                if rcpt.reject is not None:
                    ctx.errors.at(n, "can't use 'reject' and 'deliver_to' together")
                    continue
                if not n.args:
                    ctx.errors.at(n, "required at least one argument")
                    continue
                target = ctx.module(n, n.args, "target", "delivery_target")
                if target is not None:
                    rcpt.targets.append(target)
            elif n.name == "reroute":
                if not n.children:
                    ctx.errors.at(n, "missing or empty reroute pipeline configuration")
                    continue
                rcpt.targets.append(parse_pipeline(n, ctx))
            elif n.name == "reject":
                if rcpt.targets:
                    ctx.errors.at(n, "can't use 'reject' and 'deliver_to' together")
                    continue
                rcpt.reject = parse_reject(n)
            else:
                ctx.errors.at(n, "invalid directive")
        except ConfigError as e:
            ctx.errors.add(e)
    return rcpt


def _group(n: Node, ctx: Ctx, kind: str, role: str) -> list[ModuleInstance]:
    inst = ctx.group(n, kind, role)
    return [] if inst is None else [inst]


def _inline_table(n: Node, ctx: Ctx) -> ModuleInstance | None:
    # The block after source_in/destination_in is the routing block, not the table's.
    head = Node(n.name, list(n.args), None, n.file, n.line)
    return ctx.module(head, n.args, "table", "table")


def _dmarc(n: Node, ctx: Ctx) -> bool:
    if not n.args:
        return True
    if len(n.args) == 1:
        if n.args[0] == "yes":
            return True
        if n.args[0] == "no":
            return False
        raise ConfigError.at(n, "invalid argument for dmarc")
    return False


def _rules(n: Node, ctx: Ctx, kind: str) -> list[str]:
    out = []
    for raw in n.args:
        try:
            out.append(normalize_rule(raw))
        except ValueError as e:
            ctx.errors.at(n, f"invalid {kind} match rule: {raw}: {e}")
    return out


def normalize_rule(rule: str) -> str:
    """Case-fold and NFC an address or domain rule; domains in U-label form."""
    if rule.lower() == "postmaster":
        return "postmaster"
    if "@" in rule:
        local, _, domain = rule.rpartition("@")
        if not local or not domain:
            raise ValueError("invalid address")
        return unicodedata.normalize("NFC", local).casefold() + "@" + _domain_for_lookup(domain)
    return _domain_for_lookup(rule)


def _domain_for_lookup(domain: str) -> str:
    d = unicodedata.normalize("NFC", domain).rstrip(".").lower()
    validate_domain(d)
    if "xn--" in d:
        try:
            d = d.encode("ascii").decode("idna")
        except UnicodeError:
            raise ValueError("invalid A-label") from None
    return d


def parse_enhanced_code(s: str) -> tuple[int, int, int]:
    parts = s.split(".")
    if len(parts) != 3:
        raise ValueError("wrong amount of enhanced code parts")
    try:
        a, b, c = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"invalid enhanced code: {s}") from None
    return a, b, c


def parse_reject(n: Node) -> RejectSpec:
    """`reject [CODE [ENH [MSG]]]`; with only CODE the enhanced code stays 5.7.0 (maddy)."""
    args = n.args
    if len(args) > 3:
        raise ConfigError.at(n, "invalid count of arguments")
    spec = RejectSpec()
    code, enh, msg = spec.code, spec.enhanced, spec.message
    if len(args) == 3:
        msg = args[2]
        if not msg:
            raise ConfigError.at(n, "message can't be empty")
    if len(args) >= 2:
        try:
            enh = parse_enhanced_code(args[1])
        except ValueError as e:
            raise ConfigError.at(n, str(e)) from None
        if enh[0] not in (4, 5):
            raise ConfigError.at(n, "enhanced code should use either 4 or 5 as a first number")
    if len(args) >= 1:
        try:
            code = int(args[0])
        except ValueError:
            raise ConfigError.at(n, f"invalid error code integer: {args[0]}") from None
        if code // 100 not in (4, 5):
            raise ConfigError.at(n, "error code should start with either 4 or 5")
    return RejectSpec(code, enh, msg)
