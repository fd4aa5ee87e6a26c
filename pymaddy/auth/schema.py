"""Authentication provider schemas (spec §B.7).

Registered names: auth.pass_table, auth.ldap (also registered as table.ldap),
auth.external, auth.pam, auth.shadow, auth.plain_separate, auth.netauth (also
table.netauth) and dovecot_sasl (no `auth.` prefix; the docs' auth.dovecot_sasl
does not exist).

Checks that need the machine (helper binaries present, /etc/shadow readable,
the Dovecot socket answering, netauth's config file) happen in maddy's
Configure too, but they belong to the runtime, not to these schemas.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymaddy.config import values as V
from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    INLINE_ARGS_DIRECTIVE,
    Bool,
    Ctx,
    Custom,
    Directive,
    Duration,
    ModuleRef,
    ModuleSchema,
    Settings,
    String,
    StringList,
    keep_inline_args,
    reject_inline_args,
    roles,
    take_inline_args,
)
from pymaddy.tables.schema import (
    TABLE_REF,
    failed,
)
from pymaddy.tls.schema import TLS_CLIENT

# -- auth.pass_table -----------------------------------------------------------------------


def _pass_table_inline(head: Node, ctx: Ctx) -> list[Node]:
    # `pass_table TABLE [args] [{ table block }]`: the block configures the table.
    # Without inline arguments the block is pass_table's own (`table …` directive).
    if head.args:
        return [head.synth("table", list(head.args), head.children)]
    return list(head.children or [])


PASS_TABLE = ModuleSchema(
    "auth.pass_table",
    roles("auth", "table", "mutable_table"),
    (Directive("table", TABLE_REF, None, required=True, doc="table of username → ALGO:hash (or the inline table)"),),
    inline=_pass_table_inline,
    inline_owns_block=True,
    doc="Passwords hashed (bcrypt/argon2) in a table; `maddy creds` manages users when the table is mutable.",
)

# -- auth.ldap / table.ldap ------------------------------------------------------------------

LDAP_MOD = "auth.ldap"


@dataclass(frozen=True)
class LDAPBind:
    """How maddy binds before searching: off, unauth [DN], plain DN PASSWORD, external."""

    kind: str
    dn: str = ""
    password: str = ""


def _bind(node: Node, ctx: Ctx) -> LDAPBind:
    a = node.args
    if not a:
        raise ConfigError.at(node, f"{LDAP_MOD}: auth expects at least one argument")
    kind = a[0]
    # Extra words after off/unauth DN/external are ignored, as in maddy.
    if kind in ("off", "external"):
        return LDAPBind(kind)
    if kind == "unauth":
        return LDAPBind(kind, a[1] if len(a) == 2 else "")
    if kind == "plain":
        if len(a) != 3:
            raise ConfigError.at(node, f"{LDAP_MOD}: username and password expected for plaintext bind")
        return LDAPBind(kind, a[1], a[2])
    raise ConfigError.at(node, f"{LDAP_MOD}: unknown bind authentication: {kind}")


def _urls(node: Node, ctx: Ctx) -> list[str]:
    return list(node.args)  # a callback in maddy: no argument count check, repeatable


def _ldap_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    urls = take_inline_args(settings)
    for group in settings.get("urls") or []:
        urls.extend(group)
    settings["urls"] = urls
    dn_template = settings.get("dn_template") or ""
    base_dn = settings.get("base_dn") or ""
    filt = settings.get("filter") or ""
    if not dn_template:
        if not base_dn:
            raise ConfigError.at(node, f"{LDAP_MOD}: base_dn not set")
        if not filt:
            raise ConfigError.at(node, f"{LDAP_MOD}: filter not set")
    elif base_dn or filt:
        raise ConfigError.at(node, f"{LDAP_MOD}: search directives set when dn_template is used")


LDAP_DIRECTIVES = (
    INLINE_ARGS_DIRECTIVE,
    Directive("debug", Bool(), False, inherit=True),
    Directive("tls_client", TLS_CLIENT, None, inherit=True),
    Directive("urls", Custom(_urls, allow_block=True), None, repeat=True, doc="ldap:// or ldaps:// URLs"),
    Directive("bind", Custom(_bind), LDAPBind("off"), doc="off | unauth [DN] | plain DN PASSWORD | external"),
    Directive("starttls", Bool(), False),
    Directive("connect_timeout", Duration(), 60.0),
    Directive("request_timeout", Duration(), 60.0),
    Directive("dn_template", String(), "", doc="DN built from {username}; excludes base_dn/filter"),
    Directive("base_dn", String(), "", doc="search base (with filter)"),
    Directive("filter", String(), "", doc="search filter with {username}"),
)


def _ldap(name: str) -> ModuleSchema:
    return ModuleSchema(
        name,
        roles("auth", "table"),
        LDAP_DIRECTIVES,
        inline=keep_inline_args,
        validate=_ldap_validate,
        doc="LDAP bind authentication; `ldap URL…` inline. settings['urls'] joins inline and `urls` values.",
    )


LDAP = _ldap("auth.ldap")
TABLE_LDAP = _ldap("table.ldap")

# -- auth.external --------------------------------------------------------------------------


def _external_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if settings.get("perdomain") and settings.get("domains") is None:
        raise ConfigError.at(node, "auth_domains must be set if auth_perdomain is used")


EXTERNAL = ModuleSchema(
    "auth.external",
    roles("auth"),
    (
        Directive("debug", Bool(), False),
        Directive("perdomain", Bool(), False, doc="pass the full address; its domain must be in domains"),
        Directive("domains", StringList(), None),
        Directive("helper", String(), "", doc="'' = LIBEXEC/maddy-auth-helper"),
    ),
    inline=reject_inline_args("external"),
    validate=_external_validate,
    doc="Runs a helper program with the username and password on stdin.",
)

# -- auth.pam / auth.shadow -------------------------------------------------------------------

PAM = ModuleSchema(
    "auth.pam",
    roles("auth"),
    (Directive("debug", Bool(), False, inherit=True), Directive("use_helper", Bool(), False)),
    inline=reject_inline_args("pam"),
    doc="PAM authentication, directly or through maddy-pam-helper.",
)

SHADOW = ModuleSchema(
    "auth.shadow",
    roles("auth"),
    (Directive("debug", Bool(), False, inherit=True), Directive("use_helper", Bool(), False)),
    inline=reject_inline_args("shadow"),
    doc="/etc/shadow authentication, directly or through maddy-shadow-helper.",
)

# -- auth.plain_separate ---------------------------------------------------------------------

PLAIN_SEPARATE = ModuleSchema(
    "auth.plain_separate",
    roles("auth", "table"),
    (
        Directive("debug", Bool(), False),
        Directive("user", TABLE_REF, None, repeat=True, doc="tables the username must exist in (any of them)"),
        Directive("pass", ModuleRef("auth", "auth"), None, repeat=True, doc="providers checking the password"),
    ),
    inline=reject_inline_args("plain_separate"),
    doc="Username looked up in `user` tables, password checked by `pass` providers.",
)

# -- auth.netauth / table.netauth --------------------------------------------------------------


def _netauth(name: str) -> ModuleSchema:
    return ModuleSchema(
        name,
        roles("auth", "table"),
        (Directive("require_group", String(), ""), Directive("debug", Bool(), False, inherit=True)),
        inline=reject_inline_args("auth.netauth"),
        doc="NetAuth authentication (reads /etc/netauth/config.toml).",
    )


NETAUTH = _netauth("auth.netauth")
TABLE_NETAUTH = _netauth("table.netauth")

# -- dovecot_sasl ---------------------------------------------------------------------------

DOVECOT_MOD = "dovecot_sasl"


def _dovecot_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings)
    if len(args) > 1:
        raise ConfigError.at(node, f"{DOVECOT_MOD}: one or none arguments needed")
    if failed(settings, "endpoint"):
        return
    url = settings["endpoint"] if "endpoint" in settings.present else (args[0] if args else "")
    if not url:
        raise ConfigError.at(node, f"{DOVECOT_MOD}: missing server endpoint")
    try:
        settings["endpoint"] = V.parse_endpoint(url)
    except ValueError as e:
        raise ConfigError.at(node, f"{DOVECOT_MOD}: invalid server endpoint: {e}") from None


DOVECOT_SASL = ModuleSchema(
    DOVECOT_MOD,
    roles("auth"),
    (
        INLINE_ARGS_DIRECTIVE,
        Directive("endpoint", String(), "", doc="Dovecot auth socket (or the inline argument)"),
    ),
    inline=keep_inline_args,
    validate=_dovecot_validate,
    doc="Client of Dovecot's SASL auth service; settings['endpoint'] is a parsed Endpoint.",
)

SCHEMAS: list[ModuleSchema] = [
    PASS_TABLE,
    LDAP,
    TABLE_LDAP,
    EXTERNAL,
    PAM,
    SHADOW,
    PLAIN_SEPARATE,
    NETAUTH,
    TABLE_NETAUTH,
    DOVECOT_SASL,
]

__all__ = ["SCHEMAS", "LDAPBind"]
