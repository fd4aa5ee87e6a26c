"""Endpoint schemas (spec §B.1): smtp, submission, lmtp, imap, openmetrics, dovecot_sasld.

Endpoints are written `NAME ADDR... { … }`: every argument is a listen address.
The smtp family passes every directive it does not know to its message pipeline.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pymaddy.auth.throttle import Policy
from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    Bool,
    Ctx,
    Custom,
    DataSize,
    Directive,
    Domain,
    Duration,
    Enum,
    Group,
    Int,
    ModuleRef,
    ModuleSchema,
    Settings,
    StringList,
    parse_endpoint_at,
    roles,
)
from pymaddy.config.values import NORMALIZERS, Endpoint, parse_data_size
from pymaddy.tls.schema import TLS_SERVER


def listen_addresses(node: Node, ctx: Ctx) -> list[Endpoint]:
    """An endpoint's arguments: at least one IP-literal or unix listen address."""
    if not node.args:
        raise ConfigError.at(node, f"{node.name}: at least one listen address is required")
    out = []
    for a in node.args:
        try:
            out.append(parse_endpoint_at(node, a, listen=True))
        except ConfigError as e:
            ctx.errors.add(e)
    return out


def _endpoint_inline(head: Node, ctx: Ctx) -> list[Node]:
    return [head.synth("listen", list(head.args))]


LISTEN = Directive("listen", Custom(listen_addresses), None, doc="listen addresses (the endpoint's arguments)")


@dataclass(frozen=True)
class BufferMode:
    """How message bodies are spooled while the pipeline runs."""

    mode: str  # ram | fs | auto
    dir: str | None = None  # None: STATE/buffer
    max_ram: int = 1 << 20  # auto: bodies up to this size stay in memory


def _buffer(node: Node, ctx: Ctx) -> BufferMode:
    a = node.args
    if not a:
        raise ConfigError.at(node, "at least one argument required")
    if a[0] == "ram":
        if len(a) > 1:
            raise ConfigError.at(node, "no additional arguments for 'ram' mode")
        return BufferMode("ram")
    if a[0] == "fs":
        if len(a) > 2:
            raise ConfigError.at(node, "too many arguments for 'fs' mode")
        return BufferMode("fs", a[1] if len(a) == 2 else None)
    if a[0] == "auto":
        if len(a) > 3:
            raise ConfigError.at(node, "too many arguments for 'auto' mode")
        size = parse_data_size([a[1]]) if len(a) >= 2 else 1 << 20
        return BufferMode("auto", a[2] if len(a) == 3 else None, size)
    raise ConfigError.at(node, f"unknown buffer mode: {a[0]}")


@dataclass(frozen=True)
class ProxyProtocol:
    """PROXY v1/v2 from trusted peers; an empty trust list trusts everyone."""

    trust: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    tls: object  # TLSServerConfig | None


def _proxy_protocol(node: Node, ctx: Ctx) -> ProxyProtocol:
    # maddy parses this block without globals: the global `tls` is not inherited.
    s = ctx.block(node, (Directive("trust", StringList(), None), Directive("tls", TLS_SERVER, None)), "proxy_protocol")
    nets = []
    for t in [*(s["trust"] or []), *node.args]:
        # maddy appends /32 to bare addresses, even IPv6 ones (spec §B.1).
        cidr = t if "/" in t else t + "/32"
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            ctx.errors.at(node, f"invalid CIDR address: {cidr}")
    return ProxyProtocol(tuple(nets), s["tls"])


def _pipeline_children(owner: Node | None, unknown: list[Node], settings: Settings, ctx: Ctx) -> None:
    from pymaddy.pipeline.config import parse_pipeline_nodes

    assert owner is not None
    settings["pipeline"] = parse_pipeline_nodes(owner, unknown, ctx)


def _smtp_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if "pipeline" not in settings:
        from pymaddy.pipeline.config import parse_pipeline_nodes

        settings["pipeline"] = parse_pipeline_nodes(node, [], ctx)
    if node.name == "submission" and not settings.get("auth") and "auth" not in settings.failed:
        raise ConfigError.at(node, "submission: auth. provider must be set for submission endpoint")
    if settings.get("tls") is None and "tls" not in settings.failed:
        for ep in settings.get("listen") or []:
            if ep.is_tls:
                ctx.errors.at(node, f"{node.name}: can't bind on SMTPS endpoint without TLS configuration")
                break


AUTH = Directive("auth", ModuleRef("auth", "auth"), None, repeat=True, doc="SASL providers, tried in order")
AUTH_MAP = Directive("auth_map", ModuleRef("table", "table"), None, inherit=True)
AUTH_MAP_NORMALIZE = Directive("auth_map_normalize", Enum(NORMALIZERS), "auto", inherit=True)
DEBUG = Directive("debug", Bool(), False, inherit=True)
PROXY = Directive("proxy_protocol", Custom(_proxy_protocol, allow_block=True), None)


def auth_throttle(node: Node, ctx: Ctx) -> Policy | None:
    """`auth_throttle off` or a block overriding Policy's defaults (a pymaddy extension)."""
    if node.args == ["off"] and not node.has_block:
        return None
    if node.args:
        raise ConfigError.at(node, "auth_throttle: expected 'off' or a block")
    d = Policy()
    s = ctx.block(
        node,
        (
            Directive("delay_after", Int(), d.delay_after, doc="failures answered without delay"),
            Directive("max_delay", Duration(), d.max_delay),
            Directive("ip_failures", Int(), d.ip_limit, doc="failures per IP before it is refused; 0: never"),
            Directive("user_failures", Int(), d.user_limit, doc="failures per username before it is refused"),
            Directive("window", Duration(), d.window),
            Directive("lockout", Duration(), d.lockout),
        ),
        "auth_throttle",
    )
    for name in ("delay_after", "ip_failures", "user_failures"):
        if s[name] < 0:
            raise ConfigError.at(s.nodes.get(name, node), f"auth_throttle: {name} must not be negative")
    return Policy(
        delay_after=s["delay_after"],
        max_delay=s["max_delay"],
        ip_limit=s["ip_failures"],
        user_limit=s["user_failures"],
        window=s["window"],
        lockout=s["lockout"],
    )


AUTH_THROTTLE = Directive(
    "auth_throttle", Custom(auth_throttle, allow_block=True), Policy(), inherit=True, doc="login failure limits"
)


def _smtp_schema(name: str) -> ModuleSchema:
    lmtp = name == "lmtp"
    return ModuleSchema(
        name=name,
        roles=roles("endpoint"),
        directives=(
            LISTEN,
            Directive("hostname", Domain(), None, inherit=True, required=True),
            Directive("tls", TLS_SERVER, None, inherit=True, required=not lmtp),
            AUTH,
            Directive("sasl_login", Bool(), False),
            AUTH_MAP,
            AUTH_MAP_NORMALIZE,
            AUTH_THROTTLE,
            Directive("insecure_auth", Bool(), False, inherit=lmtp),
            Directive("read_timeout", Duration(), 600.0),
            Directive("write_timeout", Duration(), 60.0),
            Directive("shutdown_timeout", Duration(), 180.0),
            Directive("max_message_size", DataSize(), 32 << 20),
            Directive("max_header_size", DataSize(), 1 << 20),
            Directive("max_recipients", Int(), 20000),
            Directive("max_received", Int(), 50),
            Directive("buffer", Custom(_buffer), BufferMode("auto")),
            Directive("smtp_max_line_length", Int(), 4000),
            PROXY,
            Directive("io_debug", Bool(), False),
            DEBUG,
            Directive("defer_sender_reject", Bool(), True),
            Directive("max_logged_rcpt_errors", Int(), 5),
            Directive("limits", Group("limits", "limits_group"), None),
        ),
        inline=_endpoint_inline,
        children=_pipeline_children,
        validate=_smtp_validate,
        doc=f"{name} endpoint: {'LMTP delivery' if lmtp else 'SMTP'} with an embedded message pipeline",
    )


def _imap_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if settings.get("tls") is None and "tls" not in settings.failed:
        for ep in settings.get("listen") or []:
            if ep.is_tls:
                ctx.errors.at(node, "imap: can't bind on IMAPS endpoint without TLS configuration")
                break


IMAP = ModuleSchema(
    name="imap",
    roles=roles("endpoint"),
    directives=(
        LISTEN,
        Directive("tls", TLS_SERVER, None, inherit=True, required=True),
        AUTH,
        Directive("sasl_login", Bool(), False),
        Directive("storage", ModuleRef("storage", "storage"), None, required=True),
        Directive("storage_map", ModuleRef("table", "table"), None),
        Directive("storage_map_normalize", Enum(NORMALIZERS), "auto"),
        AUTH_MAP,
        AUTH_MAP_NORMALIZE,
        AUTH_THROTTLE,
        Directive("insecure_auth", Bool(), False),
        Directive("io_debug", Bool(), False),
        Directive("io_errors", Bool(), False),
        DEBUG,
        PROXY,
    ),
    inline=_endpoint_inline,
    validate=_imap_validate,
    doc="IMAP4rev1 endpoint over a storage module",
)


def _openmetrics_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    for ep in settings.get("listen") or []:
        if ep.is_tls:
            ctx.errors.at(node, "openmetrics: TLS is not supported yet")


OPENMETRICS = ModuleSchema(
    name="openmetrics",
    roles=roles("endpoint"),
    directives=(LISTEN, DEBUG),
    inline=_endpoint_inline,
    validate=_openmetrics_validate,
    runtime="pymaddy.endpoints.openmetrics:OpenMetrics",
    doc="Prometheus metrics over HTTP at /metrics",
)

DOVECOT_SASLD = ModuleSchema(
    name="dovecot_sasld",
    roles=roles("endpoint"),
    directives=(
        LISTEN,
        AUTH,
        Directive("sasl_login", Bool(), False),
        AUTH_MAP,
        AUTH_MAP_NORMALIZE,
        AUTH_THROTTLE,
        DEBUG,
    ),
    inline=_endpoint_inline,
    doc="serves Dovecot's SASL protocol so Postfix can authenticate against pymaddy",
)

SCHEMAS: list[ModuleSchema] = [
    _smtp_schema("smtp"),
    _smtp_schema("submission"),
    _smtp_schema("lmtp"),
    IMAP,
    OPENMETRICS,
    DOVECOT_SASLD,
]
