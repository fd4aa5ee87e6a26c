"""Schemas of the delivery targets and MX-authentication policies (spec §B.3, §E).

target.remote, target.queue, target.smtp / target.lmtp and the mx_auth.*
policies, as maddy 0.9.4's Configure() code accepts them (code beats docs).
The groups that hold policies and limits (`mx_auth`, `limits`) live in
pymaddy/pipeline/schema.py; they are referenced here through `Group` types.

Where maddy lets inline arguments *default* a directive that may still be
written in the block (queue `location`, smtp `targets`), the inline function
emits a hidden `@inline` node (no config text can spell that name) and the
validator merges it, so the block's own directive is not a duplicate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    INLINE_ARGS,
    INLINE_ARGS_DIRECTIVE,
    Bool,
    Ctx,
    Custom,
    Directive,
    Duration,
    Enum,
    Float,
    Group,
    InlineFn,
    Int,
    ModuleRef,
    ModuleSchema,
    Settings,
    String,
    ValidateFn,
    ignore_inline_args,
    keep_inline_args,
    parse_endpoint_at,
    roles,
    take_inline_args,
)
from pymaddy.config.values import FALSE_WORDS, TRUE_WORDS, Endpoint
from pymaddy.tls.schema import TLS_CLIENT


def _refuse_inline(message: str) -> InlineFn:
    def fn(head: Node, ctx: Ctx) -> list[Node]:
        raise ConfigError.at(head, message)

    return fn




DEBUG = Directive("debug", Bool(), False, inherit=True)
HOSTNAME = Directive("hostname", String(), None, inherit=True, required=True, doc="EHLO / Reporting-MTA name")
TLS_CLIENT_DIRECTIVE = Directive("tls_client", TLS_CLIENT, None, inherit=True, doc="client TLS settings")
FIVE_MINUTES = 300.0


# -- target.remote ------------------------------------------------------------


def _local_ip_validate(settings: Settings, node: Node) -> None:
    """maddy resolves `LOCAL_IP:0` as a TCP address, so a bare IPv6 literal fails there."""
    value = settings.get("local_ip")
    if not value:
        return
    addr = value + ":0"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigError.at(node, f"remote: failed to parse local IP: address {addr}: missing ']' in address")
        if end != len(value) - 1:
            raise ConfigError.at(node, f"remote: failed to parse local IP: address {addr}: unexpected ']' in address")
    elif ":" in value:
        raise ConfigError.at(node, f"remote: failed to parse local IP: address {addr}: too many colons in address")


def _remote_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    where = settings.nodes.get("local_ip", node)
    _local_ip_validate(settings, where)


TARGET_REMOTE = ModuleSchema(
    name="target.remote",
    roles=roles("delivery_target"),
    directives=(
        HOSTNAME,
        Directive("local_ip", String(), None, doc="source address of outbound connections"),
        Directive("force_ipv4", Bool(), False),
        DEBUG,
        TLS_CLIENT_DIRECTIVE,
        Directive("mx_auth", Group("mx_auth", "mx_auth_group"), None, doc="MX auth policies; none = opportunistic TLS"),
        Directive("limits", Group("limits", "limits_group"), None),
        Directive("requiretls_override", Bool(), True, doc="honour 'TLS-Required: No'"),
        Directive("relaxed_requiretls", Bool(), True, doc="drop REQUIRETLS when the MX lacks it"),
        Directive("conn_reuse_limit", Int(), 10),
        Directive("connect_timeout", Duration(), FIVE_MINUTES),
        Directive("command_timeout", Duration(), FIVE_MINUTES),
        Directive("submission_timeout", Duration(), FIVE_MINUTES, doc="code default 5m (docs: 12m)"),
        Directive("conn_max_idle_count", Int(), 5, doc="code default 5 (docs: 10)"),
        Directive("conn_max_idle_time", Int(), 150, doc="seconds"),
    ),
    inline=_refuse_inline("remote: inline arguments are not used"),
    validate=_remote_validate,
    runtime=None,
    doc="delivers to the MX servers of each recipient domain",
)


# -- mx_auth policies -----------------------------------------------------------

MX_AUTH_POLICIES = [
    ModuleSchema(
        name="mx_auth.mtasts",
        roles=roles("mx_auth_policy"),
        directives=(
            Directive("cache", Enum(("ram", "fs")), "fs"),
            Directive("fs_dir", String(), "mtasts_cache", doc="relative to state_dir"),
        ),
        inline=ignore_inline_args,
        runtime=None,
        doc="MTA-STS (RFC 8461) policy with a cached policy store",
    ),
    ModuleSchema(
        name="mx_auth.dane",
        roles=roles("mx_auth_policy"),
        directives=(DEBUG,),
        inline=ignore_inline_args,
        runtime=None,
        doc="DANE (RFC 7672) TLSA verification of MX certificates",
    ),
    ModuleSchema(
        name="mx_auth.dnssec",
        roles=roles("mx_auth_policy"),
        directives=(),
        inline=ignore_inline_args,
        runtime=None,
        doc="an MX RRset authenticated by DNSSEC raises the MX level to dnssec",
    ),
    ModuleSchema(
        name="mx_auth.local_policy",
        roles=roles("mx_auth_policy"),
        directives=(
            Directive("min_tls_level", Enum(("none", "encrypted", "authenticated")), "encrypted"),
            Directive("min_mx_level", Enum(("none", "mtasts", "dnssec")), "none"),
        ),
        inline=ignore_inline_args,  # docs show `local_policy off`; the code ignores it
        runtime=None,
        doc="minimum TLS and MX authentication levels (failures are temporary)",
    ),
    ModuleSchema(
        name="mx_auth.sts_preload",
        roles=roles("mx_auth_policy"),
        directives=(
            Directive("source", String(), "eff"),
            Directive("enforce_testing", Bool(), True),
        ),
        inline=ignore_inline_args,
        runtime=None,
        doc="deprecated no-op (the STS preload list expired)",
    ),
]


# -- target.queue ---------------------------------------------------------------

QUEUE = "target.queue"


def _bounce(node: Node, ctx: Ctx) -> Any:
    from pymaddy.pipeline.config import parse_pipeline

    return parse_pipeline(node, ctx)


def _queue_inline(head: Node, ctx: Ctx) -> list[Node]:
    if len(head.args) > 1:
        # Reported here; the first argument still stands in for the location so
        # that this one mistake gives one error.
        ctx.errors.at(head, "queue: wrong amount of inline arguments")
    return [head.synth(INLINE_ARGS, head.args[:1])]


def _queue_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    inline = take_inline_args(settings)
    if "location" not in settings.present and inline:
        settings["location"] = inline[0]
    bounce = settings.get("bounce") is not None
    if bounce and not settings.get("autogenerated_msg_domain") and "autogenerated_msg_domain" not in settings.failed:
        ctx.errors.at(node, "queue: autogenerated_msg_domain is required if bounce {} is specified")
    if not settings.get("location"):
        if "location" in settings.failed:
            return
        # Only top-level blocks have an instance name (or fall back to the module name);
        # their node is the block itself, named by the fully qualified module name.
        if node.name != QUEUE:
            raise ConfigError.at(node, "queue: need explicit location directive or inline argument if defined inline")
        instance = node.args[0] if node.args else QUEUE
        state_dir = ctx.globals.get("state_dir")
        settings["location"] = os.path.join(state_dir, instance) if state_dir else instance


TARGET_QUEUE = ModuleSchema(
    name=QUEUE,
    roles=roles("delivery_target"),
    directives=(
        INLINE_ARGS_DIRECTIVE,
        Directive("target", ModuleRef("target", "delivery_target"), None, required=True),
        Directive("location", String(), None, doc="queue directory; default STATE/<instance name>"),
        Directive("max_tries", Int(), 20),
        Directive("max_parallelism", Int(), 16),
        Directive("post_init_delay", Duration(), 10.0),
        Directive("initial_retry_time", Duration(), 900.0),
        Directive("retry_time_scale", Float(), 1.25, doc="code default 1.25 (docs: 1.2)"),
        HOSTNAME,
        Directive("autogenerated_msg_domain", String(), None, inherit=True, doc="required with bounce"),
        Directive("bounce", Custom(_bounce, allow_block=True), None, doc="pipeline for DSNs; none = no DSNs"),
        Directive(
            "delay_notify_after",
            Duration(),
            None,
            doc="pymaddy extension: one 'delayed' DSN (RFC 3464 Action: delayed) once a message has waited "
            "this long; default off, as maddy never sends them",
        ),
        DEBUG,
    ),
    inline=_queue_inline,
    validate=_queue_validate,
    runtime=None,
    doc="persistent queue with retries and DSNs in front of another target",
)


# -- target.smtp / target.lmtp ---------------------------------------------------


@dataclass(frozen=True)
class SASLAuth:
    """How target.smtp authenticates to the downstream server (`auth off` is None)."""

    mechanism: str  # plain | login | forward | external
    username: str = ""
    password: str = ""


def _sasl_auth(node: Node, ctx: Ctx) -> SASLAuth | None:
    if not node.args:
        raise ConfigError.at(node, "at least one argument required")
    mech, rest = node.args[0], node.args[1:]
    if mech == "off":
        return None
    if mech in ("forward", "external"):
        if rest:
            raise ConfigError.at(node, "no additional arguments required")
        return SASLAuth(mech)
    if mech in ("plain", "login"):
        if len(rest) != 2:
            raise ConfigError.at(node, "two additional arguments are required (username, password)")
        return SASLAuth(mech, rest[0], rest[1])
    raise ConfigError.at(node, f"unknown authentication mechanism: {mech}")


def _attempt_starttls(node: Node, ctx: Ctx) -> bool:
    # A callback directive in maddy: repeatable, its block (if any) ignored.
    if not node.args:
        return True
    if len(node.args) != 1:
        raise ConfigError.at(node, "expected exactly 1 argument")
    word = node.args[0].lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError.at(node, "bool argument should be 'yes' or 'no'")


def _ignored(node: Node, ctx: Ctx) -> None:
    return None


def _downstream_validator(name: str) -> ValidateFn:
    def validate(settings: Settings, node: Node, ctx: Ctx) -> None:
        _downstream_validate(name, settings, node, ctx)

    return validate


def _downstream_validate(name: str, settings: Settings, node: Node, ctx: Ctx) -> None:
    attempts = settings.get("attempt_starttls") or []
    if attempts:
        settings["starttls"] = attempts[-1]
    inline = take_inline_args(settings) or []
    endpoints: list[Endpoint] = list(settings.get("targets") or [])
    failed = "targets" in settings.failed
    for addr in inline:
        try:
            endpoints.append(parse_endpoint_at(node, addr, listen=False))
        except ConfigError as e:
            ctx.errors.add(e)
            failed = True
    settings["targets"] = endpoints
    if not endpoints and not failed:
        raise ConfigError.at(node, f"{name}: at least one target endpoint is required")


def _outbound_endpoints(node: Node, ctx: Ctx) -> list[Endpoint]:
    if not node.args:
        raise ConfigError.at(node, "expected at least one argument")
    return [parse_endpoint_at(node, a, listen=False) for a in node.args]


def _downstream_schema(name: str) -> ModuleSchema:
    lmtp = name == "target.lmtp"
    directives = (
        INLINE_ARGS_DIRECTIVE,
        DEBUG,
        Directive("require_tls", Custom(_ignored, allow_block=True), None, repeat=True, doc="deprecated, ignored"),
        Directive(
            "attempt_starttls",
            Custom(_attempt_starttls, allow_block=True),
            None,
            repeat=True,
            doc="deprecated alias of starttls; the last one wins over starttls",
        ),
        Directive("starttls", Bool(), not lmtp, doc="STARTTLS is mandatory when on"),
        HOSTNAME,
        Directive("targets", Custom(_outbound_endpoints), None, doc="tcp://, tls:// or unix:// addresses"),
        Directive("auth", Custom(_sasl_auth), None, doc="off | plain U P | login U P | forward | external"),
        TLS_CLIENT_DIRECTIVE,
        Directive("connect_timeout", Duration(), FIVE_MINUTES),
        Directive("command_timeout", Duration(), FIVE_MINUTES),
        Directive("submission_timeout", Duration(), FIVE_MINUTES, doc="code default 5m (docs: 12m)"),
    )
    return ModuleSchema(
        name=name,
        roles=roles("delivery_target"),
        directives=directives,
        inline=keep_inline_args,
        validate=_downstream_validator(name),
        runtime=None,
        doc=f"forwards every message to fixed {'LMTP' if lmtp else 'SMTP'} servers",
    )


SCHEMAS: list[ModuleSchema] = [
    TARGET_REMOTE,
    *MX_AUTH_POLICIES,
    TARGET_QUEUE,
    _downstream_schema("target.smtp"),
    _downstream_schema("target.lmtp"),
]
