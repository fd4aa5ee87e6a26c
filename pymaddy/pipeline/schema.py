"""Schemas of the pipeline module and the module groups (spec §B.2)."""

from __future__ import annotations

from dataclasses import dataclass

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import Bool, Ctx, Directive, Domain, ModuleSchema, Settings, roles
from pymaddy.config.values import parse_duration, parse_int


def _members(namespace: str, role: str) -> object:
    """Each child of a group block defines one module inline: `check { spf { … }; dkim }`."""

    def children(owner: Node | None, nodes: list[Node], settings: Settings, ctx: Ctx) -> None:
        members = settings.setdefault("members", [])
        for n in nodes:
            try:
                inst = ctx.module(n, [n.name, *n.args], namespace, role)
            except ConfigError as e:
                ctx.errors.add(e)
                continue
            if inst is not None:
                members.append(inst)

    return children


def _group_schema(name: str, namespace: str, member_role: str, doc: str) -> ModuleSchema:
    return ModuleSchema(
        name=name,
        roles=roles(f"{name}_group"),
        directives=(),
        children=_members(namespace, member_role),  # type: ignore[arg-type]
        validate=lambda s, n, c: s.setdefault("members", []) and None,
        runtime=None,
        doc=doc,
    )


def _mx_auth_children(owner: Node | None, nodes: list[Node], settings: Settings, ctx: Ctx) -> None:
    members = settings.setdefault("members", [])
    seen: set[str] = set()
    for n in nodes:
        if n.name in seen:
            ctx.errors.at(n, f"duplicate policy block: {n.name}")
            continue
        seen.add(n.name)
        try:
            inst = ctx.module(n, [n.name, *n.args], "mx_auth", "mx_auth_policy")
        except ConfigError as e:
            ctx.errors.add(e)
            continue
        if inst is not None:
            members.append(inst)


@dataclass(frozen=True)
class LimitRule:
    """`SCOPE rate BURST [PERIOD]` or `SCOPE concurrency MAX`."""

    scope: str  # all | ip | source | destination
    kind: str  # rate | concurrency
    value: int  # burst (0 = unlimited) or max concurrency
    period: float = 1.0


LIMIT_SCOPES = ("all", "ip", "source", "destination")


def _limit_rules(owner: Node | None, nodes: list[Node], settings: Settings, ctx: Ctx) -> None:
    rules = settings.setdefault("rules", [])
    for n in nodes:
        try:
            rules.append(_limit_rule(n))
        except (ConfigError, ValueError) as e:
            ctx.errors.add(e if isinstance(e, ConfigError) else ConfigError.at(n, str(e)))


def _limit_rule(n: Node) -> LimitRule:
    if not n.args:
        raise ConfigError.at(n, "at least two arguments are required")
    kind, rest = n.args[0], n.args[1:]
    if kind == "rate":
        if not rest:
            raise ConfigError.at(n, "at least burst size is needed")
        if len(rest) > 2:
            raise ConfigError.at(n, "too many arguments")
        burst = parse_int(rest[0])
        period = parse_duration([rest[1]]) if len(rest) == 2 else 1.0
        rule = LimitRule(n.name, kind, burst, period)
    elif kind == "concurrency":
        if len(rest) != 1:
            raise ConfigError.at(n, "max concurrency value is needed")
        rule = LimitRule(n.name, kind, parse_int(rest[0]))
    else:
        raise ConfigError.at(n, f"unknown limit kind: {kind}")
    if n.name not in LIMIT_SCOPES:
        raise ConfigError.at(n, f"unknown limit scope: {n.name}")
    return rule


def _msgpipeline_children(owner: Node | None, nodes: list[Node], settings: Settings, ctx: Ctx) -> None:
    from pymaddy.pipeline.config import parse_pipeline_nodes

    assert owner is not None
    settings["pipeline"] = parse_pipeline_nodes(owner, nodes, ctx)


def _msgpipeline_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if "pipeline" not in settings:
        _msgpipeline_children(node, [], settings, ctx)


SCHEMAS: list[ModuleSchema] = [
    ModuleSchema(
        name="msgpipeline",
        roles=roles("delivery_target"),
        directives=(
            Directive("hostname", Domain(), None, inherit=True, required=True),
            Directive("debug", Bool(), False, inherit=True),
        ),
        children=_msgpipeline_children,
        validate=_msgpipeline_validate,
        doc="a message pipeline usable wherever a delivery target is expected",
    ),
    _group_schema("checks", "check", "check", "a group of checks, run in parallel"),
    _group_schema("modifiers", "modify", "modifier", "a group of modifiers, applied in order"),
    _group_schema("imap_filters", "imap.filter", "imap_filter", "IMAP filters: first folder wins, flags add up"),
    ModuleSchema(
        name="mx_auth",
        roles=roles("mx_auth_group"),
        directives=(Directive("debug", Bool(), False, inherit=True),),
        children=_mx_auth_children,
        doc="MX authentication policies for target.remote",
    ),
    ModuleSchema(
        name="limits",
        roles=roles("limits_group"),
        children=_limit_rules,
        validate=lambda s, n, c: s.setdefault("rules", []) and None,
        doc="rate and concurrency limits per all / ip / source / destination",
    ),
    ModuleSchema(
        name="dummy",
        roles=roles("delivery_target", "auth", "table"),
        doc="accepts and discards mail, accepts any password, never matches as a table",
    ),
]
