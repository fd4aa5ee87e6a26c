"""Modifier module schemas (spec §B.5): modify.dkim, modify.replace_rcpt, modify.replace_sender.

Follows maddy 0.9.4's code: `modify.dkim` has no `require_sender_match` directive
(the docs describe one; maddy rejects it as an unexpected directive), and its new
keys default to rsa2048.
"""

from __future__ import annotations

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    INLINE_ARGS_DIRECTIVE,
    Bool,
    Ctx,
    Directive,
    Duration,
    Enum,
    ModuleSchema,
    Settings,
    String,
    StringList,
    keep_inline_args,
    roles,
    take_inline_args,
)
from pymaddy.tables.schema import (
    TABLE_REF,
    failed,
    ignore_children,
)

# -- modify.dkim ------------------------------------------------------------------------

# Header fields signed once more than they occur, so none can be added later.
OVERSIGN_DEFAULT = (
    "Subject",
    "Sender",
    "To",
    "Cc",
    "From",
    "Date",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Reply-To",
    "In-Reply-To",
    "Message-Id",
    "References",
    "Autocrypt",
    "Openpgp",
)
# Header fields signed as many times as they occur.
SIGN_DEFAULT = (
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Resent-To",
    "Resent-Sender",
    "Resent-Message-Id",
    "Resent-Date",
    "Resent-From",
    "Resent-Cc",
)
DKIM_KEY_PATH = "dkim_keys/{domain}_{selector}.key"
DKIM_SIG_EXPIRY = 5 * 24 * 3600.0  # 120h
CANONICALIZATIONS = ("relaxed", "simple")


def _dkim_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings)
    if len(args) == 1:
        raise ConfigError.at(node, "modify.dkim: at least two arguments required")
    if failed(settings, "domains", "selector", "sign_subdomains"):
        return
    # Inline `dkim DOMAIN… SELECTOR` only provides defaults; directives win.
    if args and "domains" not in settings.present:
        settings["domains"] = list(args[:-1])
    if args and "selector" not in settings.present:
        settings["selector"] = args[-1]
    domains = settings.get("domains") or []
    if not domains:
        raise ConfigError.at(node, "sign_domain: at least one domain is needed")
    if not settings.get("selector"):
        raise ConfigError.at(node, "sign_domain: selector is not specified")
    if settings.get("sign_subdomains") and len(domains) > 1:
        raise ConfigError.at(node, "sign_domain: only one domain is supported when sign_subdomains is enabled")


DKIM = ModuleSchema(
    "modify.dkim",
    roles("modifier"),
    (
        INLINE_ARGS_DIRECTIVE,
        Directive("debug", Bool(), False, inherit=True),
        Directive("domains", StringList(), None, doc="domains to sign for (or inline: all but the last argument)"),
        Directive("selector", String(), "", doc="DKIM selector (or inline: the last argument)"),
        Directive("key_path", String(), DKIM_KEY_PATH, doc="{domain} and {selector} are substituted"),
        Directive("oversign_fields", StringList(), lambda: list(OVERSIGN_DEFAULT)),
        Directive("sign_fields", StringList(), lambda: list(SIGN_DEFAULT)),
        Directive("header_canon", Enum(CANONICALIZATIONS), "relaxed"),
        Directive("body_canon", Enum(CANONICALIZATIONS), "relaxed"),
        Directive("sig_expiry", Duration(), DKIM_SIG_EXPIRY, doc="seconds; 0 = no x= tag"),
        Directive("hash", Enum(("sha256",)), "sha256"),
        Directive("newkey_algo", Enum(("rsa4096", "rsa2048", "ed25519")), "rsa2048"),
        Directive("allow_multiple_from", Bool(), False),
        Directive("sign_subdomains", Bool(), False, doc="needs exactly one domain"),
    ),
    inline=keep_inline_args,
    validate=_dkim_validate,
    doc="DKIM signing; keys are generated on first use under key_path.",
)

# -- modify.replace_rcpt / modify.replace_sender --------------------------------------------

# The table hides behind a name no config can write: maddy takes it only from the
# inline arguments, never from a directive.
_TABLE = "@table"


def _replace_inline(head: Node, ctx: Ctx) -> list[Node]:
    # `replace_rcpt TABLE [args] [{ table block }]`: the whole block configures the table.
    if not head.args:
        return []
    return [head.synth(_TABLE, list(head.args), head.children)]


def _replace_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if _TABLE not in settings.present:
        settings.pop(_TABLE, None)
        raise ConfigError.at(node, "at least one argument is required")
    settings["table"] = settings.pop(_TABLE, None)
    settings.present.discard(_TABLE)
    settings.present.add("table")
    if _TABLE in settings.failed:
        settings.failed.discard(_TABLE)
        settings.failed.add("table")
    table_node = settings.nodes.pop(_TABLE, None)
    if table_node is not None:
        settings.nodes["table"] = table_node


def _replace(name: str, doc: str) -> ModuleSchema:
    return ModuleSchema(
        name,
        roles("modifier"),
        (Directive(_TABLE, TABLE_REF, None, doc="the table (inline arguments and block)"),),
        inline=_replace_inline,
        inline_owns_block=True,
        # A top-level block has no inline arguments, so maddy fails before reading it.
        children=ignore_children,
        validate=_replace_validate,
        doc=doc,
    )


REPLACE_RCPT = _replace(
    "modify.replace_rcpt",
    "Rewrites each recipient through a table (1:N allowed); settings['table'] is the table instance.",
)
REPLACE_SENDER = _replace(
    "modify.replace_sender",
    "Rewrites the envelope sender through a table (first value); settings['table'] is the table instance.",
)

SCHEMAS: list[ModuleSchema] = [DKIM, REPLACE_RCPT, REPLACE_SENDER]

__all__ = ["DKIM_KEY_PATH", "DKIM_SIG_EXPIRY", "OVERSIGN_DEFAULT", "SCHEMAS", "SIGN_DEFAULT"]
