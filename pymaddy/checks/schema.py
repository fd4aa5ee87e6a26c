"""Check module schemas (spec §B.4) and the check-action value shared by all checks.

Registered names: check.spf, check.dkim, check.dnsbl, check.milter, check.rspamd,
check.command, check.authorize_sender, and the three "stateless" checks without a
`check.` prefix: require_mx_record, require_matching_rdns, require_tls.

Directive names, defaults and inline-argument handling follow maddy 0.9.4's code,
not its docs (spec §L.10): the docs-only directives `allow_body_subset` (dkim) and
`malformed_action` (authorize_sender) are deliberately absent, and SPF's
permerr/temperr actions default to `ignore`.
"""

from __future__ import annotations

import ipaddress
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
    Enum,
    Int,
    ModuleSchema,
    Settings,
    String,
    StringList,
    ignore_inline_args,
    keep_inline_args,
    reject_inline_args,
    roles,
    take_inline_args,
)
from pymaddy.config.values import NORMALIZERS
from pymaddy.tables.schema import (
    TABLE_REF,
    failed,
    go_atoi,
)
from pymaddy.tls.schema import TLS_CLIENT

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# -- check actions -------------------------------------------------------------------

DEFAULT_REJECT_MESSAGE = "Message rejected due to a local policy"


@dataclass(frozen=True)
class SMTPReply:
    """An SMTP error written in the config: `CODE [X.Y.Z [MESSAGE]]`."""

    code: int
    enhanced: tuple[int, int, int]
    message: str

    def __str__(self) -> str:
        return f"{self.code} {'.'.join(map(str, self.enhanced))} {self.message}"


@dataclass(frozen=True)
class CheckAction:
    """What to do when a check fails: `ignore`, `quarantine [reply]` or `reject [reply]`.

    override replaces the check's own SMTP error (the original stays as the cause).
    """

    action: str  # ignore | quarantine | reject
    override: SMTPReply | None = None

    @property
    def reject(self) -> bool:
        return self.action == "reject"

    @property
    def quarantine(self) -> bool:
        return self.action == "quarantine"

    @property
    def ignore(self) -> bool:
        return self.action == "ignore"


IGNORE = CheckAction("ignore")
QUARANTINE = CheckAction("quarantine")
REJECT = CheckAction("reject")


def _enhanced_code(s: str) -> tuple[int, int, int]:
    parts = s.split(".")
    if len(parts) != 3:
        raise ValueError("wrong amount of enhanced code parts")
    a, b, c = (go_atoi(p) for p in parts)
    return a, b, c


def _go_div100(n: int) -> int:
    """n / 100 with Go's truncation toward zero."""
    return n // 100 if n >= 0 else -(-n // 100)


def parse_reject_reply(args: list[str]) -> SMTPReply:
    """`[CODE [ENHANCED [MESSAGE]]]` as check actions and the pipeline's `reject` take it.

    No arguments: 554 5.7.0. Only CODE: the enhanced code's class follows CODE (450 → 4.7.0).
    Raises ValueError worded as maddy words it.
    """
    if len(args) > 3:
        raise ValueError("invalid count of arguments")
    code = 554
    enhanced = (0, 7, 0)
    message = DEFAULT_REJECT_MESSAGE
    if len(args) == 3:
        message = args[2]
        if message == "":
            raise ValueError("message can't be empty")
    if len(args) >= 2:
        enhanced = _enhanced_code(args[1])
        if enhanced[0] not in (4, 5):
            raise ValueError("enhanced code should use either 4 or 5 as a first number")
    if len(args) >= 1:
        try:
            code = go_atoi(args[0])
        except ValueError as e:
            raise ValueError(f"invalid error code integer: {e}") from None
        klass = _go_div100(code)
        if klass not in (4, 5):
            raise ValueError("error code should start with either 4 or 5")
        if enhanced[0] == 0:
            enhanced = (klass, enhanced[1], enhanced[2])
    else:
        enhanced = (5, 7, 0)
    return SMTPReply(code, enhanced, message)


def parse_check_action(args: list[str]) -> CheckAction:
    """`ignore` | `quarantine [CODE [ENH [MSG]]]` | `reject [CODE [ENH [MSG]]]`.

    Extra words after `ignore` are accepted and ignored, as in maddy.
    """
    if not args:
        raise ValueError("expected at least 1 argument")
    kind = args[0]
    if kind == "ignore":
        return IGNORE
    if kind not in ("reject", "quarantine"):
        raise ValueError("invalid action")
    override = parse_reject_reply(list(args[1:])) if len(args) > 1 else None
    return CheckAction(kind, override)


def _action(node: Node, ctx: Ctx) -> CheckAction:
    try:
        return parse_check_action(list(node.args))
    except ValueError as e:
        raise ConfigError.at(node, str(e)) from None


CHECK_ACTION = Custom(_action)


def action(name: str, default: CheckAction, doc: str = "") -> Directive:
    """A `*_action` directive with its code default."""
    return Directive(name, CHECK_ACTION, default, doc=doc or f"default: {default.action}")


def _debug(inherit: bool = True) -> Directive:
    return Directive("debug", Bool(), False, inherit=inherit)


# -- check.spf ---------------------------------------------------------------------------

SPF = ModuleSchema(
    "check.spf",
    roles("check"),
    (
        _debug(),
        Directive("enforce_early", Bool(), False, doc="apply the result at MAIL FROM instead of after DATA"),
        action("none_action", IGNORE),
        action("neutral_action", IGNORE),
        action("fail_action", QUARANTINE),
        action("softfail_action", IGNORE),
        action("permerr_action", IGNORE, "default: ignore (the docs say reject)"),
        action("temperr_action", IGNORE, "default: ignore (the docs say reject)"),
    ),
    inline=ignore_inline_args,  # spf's Configure never looks at them
    doc="SPF verification of the client IP, HELO and MAIL FROM.",
)

# -- check.dkim ---------------------------------------------------------------------------

DKIM = ModuleSchema(
    "check.dkim",
    roles("check"),
    (
        _debug(),
        Directive(
            "required_fields", StringList(), lambda: ["From", "Subject"], doc="header fields a signature must cover"
        ),
        Directive("fail_open", Bool(), False, doc="accept on temporary DNS errors"),
        action("broken_sig_action", IGNORE),
        action("no_sig_action", IGNORE),
    ),
    inline=None,  # "check.dkim: inline arguments are not used"
    doc="DKIM signature verification.",
)

# -- check.dnsbl ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DNSBLResponseRule:
    """`response IP/CIDR… { score N; message TEXT }` inside a list block."""

    networks: tuple[IPNetwork, ...]
    score: int
    message: str


@dataclass(frozen=True)
class DNSBLList:
    """One DNSBL zone with what it is asked about and how its answers count."""

    zone: str
    client_ipv4: bool = True
    client_ipv6: bool = False
    ehlo: bool = False
    mailfrom: bool = False
    score: int = 0
    responses: tuple[IPNetwork, ...] = ()  # empty: every answer counts
    rules: tuple[DNSBLResponseRule, ...] = ()  # when present they replace `responses`/`score`
    shortcut: bool = False  # given as an inline argument: client_ipv4 only, score 0


def _cidr(arg: str, bare_suffix: str) -> IPNetwork:
    text = arg if "/" in arg else arg + bare_suffix
    try:
        return V.parse_cidr(text)
    except ValueError:
        raise ValueError(f"invalid CIDR address: {text}") from None


def _responses(node: Node, ctx: Ctx) -> list[IPNetwork]:
    if not node.args:
        raise ConfigError.at(node, "expected at least one argument")
    try:
        # maddy appends /32 to every bare address here, IPv6 ones included.
        return [_cidr(a, "/32") for a in node.args]
    except ValueError as e:
        raise ConfigError.at(node, str(e)) from None


RESPONSE_RULE_DIRECTIVES = (
    Directive("score", Int(), None, required=True),
    Directive("message", String(), ""),
)


def _response_rule(node: Node, ctx: Ctx) -> DNSBLResponseRule | None:
    if not node.args:
        raise ConfigError.at(node, "response block requires at least one IP address or CIDR as argument")
    nets = []
    for a in node.args:
        try:
            nets.append(_cidr(a, "/128" if ":" in a else "/32"))
        except ValueError as e:
            raise ConfigError.at(node, f"invalid IP address or CIDR: {a}: {e}") from None
    s = ctx.block(node, RESPONSE_RULE_DIRECTIVES, "response")
    if s.get("score") is None or failed(s, "message"):
        return None
    return DNSBLResponseRule(tuple(nets), s["score"], s["message"])


LIST_DIRECTIVES = (
    Directive("client_ipv4", Bool(), True),
    Directive("client_ipv6", Bool(), True),
    Directive("ehlo", Bool(), False),
    Directive("mailfrom", Bool(), False, doc="accepted, but maddy never has a MAIL FROM at lookup time"),
    Directive("score", Int(), 1),
    Directive("responses", Custom(_responses), lambda: [V.parse_cidr("127.0.0.1/24")]),
    Directive("response", Custom(_response_rule, allow_block=True), None, repeat=True),
)


def _dnsbl_lists(owner: Node | None, nodes: list[Node], settings: Settings, ctx: Ctx) -> None:
    lists: list[DNSBLList] = settings.setdefault("lists", [])
    for node in nodes:
        s = ctx.block(node, LIST_DIRECTIVES, node.name)
        if failed(s, *(d.name for d in LIST_DIRECTIVES)):
            continue
        rules = tuple(r for r in s.get("response") or [] if r is not None)
        for zone in [node.name, *node.args]:
            if s["score"] < 0 and s["ehlo"]:
                ctx.errors.at(node, "dnsbl: 'ehlo' should not be used with negative score")
                break
            if s["score"] < 0 and s["mailfrom"]:
                ctx.errors.at(node, "dnsbl: 'mailfrom' should not be used with negative score")
                break
            lists.append(
                DNSBLList(
                    zone,
                    client_ipv4=s["client_ipv4"],
                    client_ipv6=s["client_ipv6"],
                    ehlo=s["ehlo"],
                    mailfrom=s["mailfrom"],
                    score=s["score"],
                    responses=tuple(s["responses"] or ()),
                    rules=rules,
                )
            )


def _dnsbl_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    shortcuts = [DNSBLList(zone, shortcut=True) for zone in take_inline_args(settings)]
    settings["lists"] = shortcuts + list(settings.get("lists") or [])


DNSBL = ModuleSchema(
    "check.dnsbl",
    roles("check"),
    (
        INLINE_ARGS_DIRECTIVE,
        _debug(inherit=False),
        Directive("check_early", Bool(), False, doc="reject at EHLO instead of reporting at RCPT"),
        Directive("quarantine_threshold", Int(), 1),
        Directive("reject_threshold", Int(), 9999),
    ),
    inline=keep_inline_args,
    children=_dnsbl_lists,
    validate=_dnsbl_validate,
    doc="DNS blocklists. Every other child is a list block `ZONE [ZONE…] { … }`; inline zones are "
    "shortcut lists (client_ipv4 only, score 0). settings['lists'] is a list of DNSBLList.",
)

# -- check.milter ---------------------------------------------------------------------------


def _milter_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings)
    if len(args) > 1:
        raise ConfigError.at(node, "check.milter: unexpected amount of arguments, want 1 or 0")
    if failed(settings, "endpoint"):
        return
    url = settings["endpoint"] if "endpoint" in settings.present else (args[0] if args else "")
    if not url:
        raise ConfigError.at(node, "check.milter: milter endpoint is not set")
    try:
        ep = V.parse_endpoint(url)
    except ValueError as e:
        raise ConfigError.at(node, f"check.milter: {e}") from None
    if ep.scheme not in ("tcp", "unix"):
        raise ConfigError.at(node, f"check.milter: scheme unsupported: {ep.scheme}")
    settings["endpoint"] = ep


MILTER = ModuleSchema(
    "check.milter",
    roles("check"),
    (
        INLINE_ARGS_DIRECTIVE,
        Directive("endpoint", String(), "", doc="tcp://HOST:PORT or unix://PATH (or the inline argument)"),
        Directive("fail_open", Bool(), False, doc="accept when the milter can't be reached"),
    ),
    inline=keep_inline_args,
    validate=_milter_validate,
    doc="Milter protocol client; settings['endpoint'] is a parsed Endpoint.",
)

# -- check.rspamd ---------------------------------------------------------------------------

RSPAMD_DEFAULT_URL = "http://127.0.0.1:11333"


def _rspamd_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings)
    if len(args) > 1:
        raise ConfigError.at(node, "check.rspamd: unexpected amount of inline arguments")
    if "api_path" not in settings.present:
        settings["api_path"] = args[0] if args else RSPAMD_DEFAULT_URL


RSPAMD = ModuleSchema(
    "check.rspamd",
    roles("check"),
    (
        INLINE_ARGS_DIRECTIVE,
        Directive("tls_client", TLS_CLIENT, None, inherit=True),
        Directive("api_path", String(), RSPAMD_DEFAULT_URL, doc="base URL of rspamd (or the inline argument)"),
        Directive("settings_id", String(), ""),
        Directive("tag", String(), "maddy"),
        Directive("hostname", String(), "", inherit=True),
        action("io_error_action", IGNORE),
        action("error_resp_action", IGNORE),
        action("add_header_action", QUARANTINE),
        action("rewrite_subj_action", QUARANTINE),
        action("reject_action", REJECT),
        action("soft_reject_action", REJECT),
        Directive("flags", StringList(), lambda: ["pass_all"]),
    ),
    inline=keep_inline_args,
    validate=_rspamd_validate,
    doc="Asks rspamd's /checkv2 about each message.",
)

# -- check.command ---------------------------------------------------------------------------

COMMAND_STAGES = ("conn", "sender", "rcpt", "body")


def _code(node: Node, ctx: Ctx) -> tuple[int, CheckAction]:
    if len(node.args) < 2:
        raise ConfigError.at(node, "at least two arguments are required: <code> <action>")
    try:
        return go_atoi(node.args[0]), parse_check_action(list(node.args[1:]))
    except ValueError as e:
        raise ConfigError.at(node, str(e)) from None


def _command_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings)
    actions: dict[int, CheckAction] = {1: REJECT, 2: QUARANTINE}
    for exit_code, act in settings.get("code") or []:
        actions[exit_code] = act
    settings["actions"] = actions
    if not args:
        raise ConfigError.at(node, "command: at least one argument is required (command name)")
    # maddy also resolves the executable in $PATH (libexec first) at this point;
    # that lookup depends on the machine and is left to the runtime.
    settings["command"] = args[0]
    settings["args"] = list(args[1:])


COMMAND = ModuleSchema(
    "check.command",
    roles("check"),
    (
        INLINE_ARGS_DIRECTIVE,
        Directive("run_on", Enum(COMMAND_STAGES), "body"),
        Directive("code", Custom(_code, allow_block=True), None, repeat=True, doc="code EXIT ACTION…"),
    ),
    inline=keep_inline_args,
    validate=_command_validate,
    doc="`command CMD ARG…`: runs an external program; settings 'command', 'args' and "
    "'actions' (exit code → CheckAction, 1 reject and 2 quarantine unless overridden).",
)

# -- check.authorize_sender ---------------------------------------------------------------------



AUTHORIZE_SENDER = ModuleSchema(
    "check.authorize_sender",
    roles("check"),
    (
        _debug(),
        Directive("check_header", Bool(), True, doc="also check From/Sender header addresses"),
        Directive("prepare_email", TABLE_REF, None, doc="address → canonical address (None: identity)"),
        Directive("user_to_email", TABLE_REF, None, doc="username → allowed addresses (None: identity)"),
        action("unauth_action", REJECT),
        action("no_match_action", REJECT),
        action("err_action", REJECT),
        # maddy marks both as inherited, but no global directive has these names.
        Directive("auth_normalize", Enum(NORMALIZERS), "auto"),
        Directive("from_normalize", Enum(NORMALIZERS), "auto"),
    ),
    inline=reject_inline_args("check.authorize_sender"),
    doc="The authenticated user must own the envelope sender (and From/Sender).",
)

# -- stateless checks (no check. prefix) -------------------------------------------------------


def _stateless(name: str, default: CheckAction, doc: str) -> ModuleSchema:
    return ModuleSchema(
        name,
        roles("check"),
        (_debug(), action("fail_action", default)),
        inline=None,  # "<name>: inline arguments are not used"
        doc=doc,
    )


REQUIRE_MX_RECORD = _stateless("require_mx_record", QUARANTINE, "The MAIL FROM domain must have (non-null) MX records.")
REQUIRE_MATCHING_RDNS = _stateless(
    "require_matching_rdns", QUARANTINE, "The client's reverse DNS name must match its EHLO name."
)
REQUIRE_TLS = _stateless("require_tls", REJECT, "The client connection must use TLS.")

SCHEMAS: list[ModuleSchema] = [
    SPF,
    DKIM,
    DNSBL,
    MILTER,
    RSPAMD,
    COMMAND,
    AUTHORIZE_SENDER,
    REQUIRE_MX_RECORD,
    REQUIRE_MATCHING_RDNS,
    REQUIRE_TLS,
]

__all__ = [
    "IGNORE",
    "QUARANTINE",
    "REJECT",
    "SCHEMAS",
    "CheckAction",
    "DNSBLList",
    "DNSBLResponseRule",
    "SMTPReply",
    "parse_check_action",
    "parse_reject_reply",
]
