"""Table module schemas (spec §B.6): static, file, regexp, chain, identity, email_* and sql_*.

Also home of small helpers the check/modify/auth schema files share (TABLE_REF,
`failed`, `go_atoi`, `ignore_children`). Inline arguments with a meaning no
directive has (`regexp RE REPL…`, `dnsbl ZONE…`) use the shared hidden-directive
mechanism of `pymaddy.config.schema` (`keep_inline_args` / `take_inline_args`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    INLINE_ARGS,
    INLINE_ARGS_DIRECTIVE,
    Bool,
    Ctx,
    Custom,
    Directive,
    ModuleRef,
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

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance

# -- inline-argument helpers shared by the check/modify/auth/table schemas -----


# A table given inline (`file /etc/aliases`) or by reference (`&name`).
TABLE_REF = ModuleRef("table", "table")


def failed(settings: Settings, *names: str) -> bool:
    """True when one of these directives was written but could not be parsed (already reported)."""
    return any(n in settings.failed for n in names)


def ignore_children(owner: Node | None, nodes: list[Node], settings: Settings, ctx: Ctx) -> None:
    """maddy never reads this module's block: anything written there is ignored."""


def go_atoi(s: str) -> int:
    """Go's strconv.Atoi: optional sign and ASCII digits; errors worded like Go's."""
    body = s[1:] if s[:1] in "+-" else s
    if not body or not body.isascii() or not body.isdigit():
        raise ValueError(f'strconv.Atoi: parsing "{s}": invalid syntax')
    v = int(s)
    if not -(1 << 63) <= v < (1 << 63):
        raise ValueError(f'strconv.Atoi: parsing "{s}": value out of range')
    return v


def valid_domain(domain: str) -> bool:
    """maddy's address.ValidDomain: a lenient length/shape check, not a hostname grammar."""
    if not domain or len(domain) > 255 or domain.startswith(".") or ".." in domain:
        return False
    for label in domain.split("."):
        if label.isascii():
            encoded = label
        else:
            try:
                encoded = "xn--" + label.encode("punycode").decode("ascii")
            except UnicodeError:
                return False
        if len(encoded) > 64:
            return False
    return True


# -- table.static ----------------------------------------------------------------


def _entry(node: Node, ctx: Ctx) -> tuple[str, list[str]]:
    if len(node.args) < 2:
        raise ConfigError.at(node, "expected at least one value")
    return node.args[0], list(node.args[1:])


def _static_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    entries: dict[str, list[str]] = {}
    for key, values in settings.get("entry") or []:
        entries[key] = values  # a later entry for the same key replaces the earlier one
    settings["entries"] = entries


STATIC = ModuleSchema(
    "table.static",
    roles("table"),
    (Directive("entry", Custom(_entry, allow_block=True), None, repeat=True, doc="entry KEY VALUE [VALUE…]"),),
    inline=ignore_inline_args,
    validate=_static_validate,
    reports_module_name=True,
    doc="In-config key → values table; settings['entries'] maps each key to its values (last entry wins).",
)

# -- table.file ------------------------------------------------------------------

FILE_MOD = "table.file"


def _file_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings)
    if len(args) > 1:
        raise ConfigError.at(
            node,
            f"{FILE_MOD}: cannot use multiple files with single {FILE_MOD}, use {FILE_MOD} multiple times to do so",
        )
    inline_path = args[0] if args else ""
    if failed(settings, "file"):
        return
    directive_path = settings.get("file") or ""
    if directive_path and inline_path:
        raise ConfigError.at(node, f"{FILE_MOD}: file path specified both in directive and in argument, do it once")
    # No path at all is not an error in maddy: the table is simply empty.
    settings["file"] = directive_path or inline_path


FILE = ModuleSchema(
    FILE_MOD,
    roles("table"),
    (
        INLINE_ARGS_DIRECTIVE,
        Directive("debug", Bool(), False, inherit=True),
        Directive("file", String(), "", doc="path of the `key: value, value` file (or the inline argument)"),
    ),
    inline=keep_inline_args,
    validate=_file_validate,
    doc="Table read from a text file, re-read when it changes; settings['file'] is the path ('' = empty table).",
)

# -- table.regexp ----------------------------------------------------------------


def _regexp_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings)
    if not args:
        # maddy 0.9.4 indexes the missing argument and crashes; report it instead.
        raise ConfigError.at(node, "table.regexp: a regular expression is required as the first inline argument")
    regex = args[0]
    settings["regexp"] = regex
    settings["replacements"] = list(args[1:])
    pattern = regex
    if settings.get("full_match"):
        if not pattern.startswith("^"):
            pattern = "^" + pattern
        if not pattern.endswith("$"):
            pattern = pattern + "$"
    if settings.get("case_insensitive"):
        pattern = "(?i)" + pattern
    settings["pattern"] = pattern  # Go RE2 syntax; compiled by the runtime


REGEXP = ModuleSchema(
    "table.regexp",
    roles("table"),
    (
        INLINE_ARGS_DIRECTIVE,
        Directive("full_match", Bool(), True, doc="anchor the expression with ^…$"),
        Directive("case_insensitive", Bool(), True, doc="prefix the expression with (?i)"),
        # The docs call it expand_placeholders; maddy's code only knows this spelling.
        Directive("expand_replaceholders", Bool(), True, doc="expand $1/${name} in replacements"),
    ),
    inline=keep_inline_args,
    validate=_regexp_validate,
    reports_module_name=True,
    doc="`regexp RE [REPL…]`: settings 'regexp', 'replacements' and the final 'pattern'. "
    "Without REPL every lookup misses (code, not docs).",
)

# -- table.chain -----------------------------------------------------------------


@dataclass(frozen=True)
class ChainStep:
    """One step of table.chain: a miss ends the chain unless the step is optional."""

    table: ModuleInstance | None
    optional: bool


def _chain_children(owner: Node | None, nodes: list[Node], settings: Settings, ctx: Ctx) -> None:
    steps: list[ChainStep] = settings.setdefault("steps", [])
    for node in nodes:
        if node.name not in ("step", "optional_step"):
            ctx.errors.at(node, f"unexpected directive: {node.name}")
            continue
        try:
            table = ctx.module(node, node.args, "table", "table")
        except (ConfigError, ValueError) as e:
            ctx.errors.add(e if isinstance(e, ConfigError) else ConfigError.at(node, str(e)))
            continue
        steps.append(ChainStep(table, node.name == "optional_step"))


def _chain_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    settings.setdefault("steps", [])


CHAIN = ModuleSchema(
    "table.chain",
    roles("table"),
    (),
    inline=ignore_inline_args,
    children=_chain_children,
    validate=_chain_validate,
    doc="`step TABLE…` / `optional_step TABLE…` in order; settings['steps'] is a list of ChainStep.",
)

# -- tables with no configuration -------------------------------------------------


def _no_config(name: str, doc: str) -> ModuleSchema:
    # Their Configure returns at once: inline arguments and block are never read.
    return ModuleSchema(
        name,
        roles("table"),
        (),
        inline=ignore_inline_args,
        children=ignore_children,
        reports_module_name=True,
        doc=doc,
    )


IDENTITY = _no_config("table.identity", "Returns the key itself.")
EMAIL_LOCALPART = _no_config("table.email_localpart", "`user@domain` → `user`; a key that is not an address misses.")
EMAIL_LOCALPART_OPTIONAL = _no_config(
    "table.email_localpart_optional", "`user@domain` → `user`; a key that is not an address is returned unchanged."
)

# -- table.email_with_domain -------------------------------------------------------

EWD_MOD = "table.email_with_domain"


def _ewd_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    domains = take_inline_args(settings)
    for d in domains:
        if not valid_domain(d):
            raise ConfigError.at(node, f"{EWD_MOD}: invalid domain: {d}")
    if not domains:
        raise ConfigError.at(node, f"{EWD_MOD}: at least one domain is required")
    settings["domains"] = domains


EMAIL_WITH_DOMAIN = ModuleSchema(
    EWD_MOD,
    roles("table"),
    (INLINE_ARGS_DIRECTIVE,),
    inline=keep_inline_args,
    children=ignore_children,
    validate=_ewd_validate,
    reports_module_name=True,
    doc="`email_with_domain DOMAIN…`: key → key@DOMAIN for each domain (settings['domains']).",
)

# -- table.sql_query / table.sql_table ----------------------------------------------

# Drivers linked into maddy 0.9.4: sqlite (two names), lib/pq, go-sql-driver/mysql.
SQL_DRIVERS = ("sqlite3", "sqlite", "postgres", "mysql")


def _check_driver(driver: str, named_args: bool, node: Node) -> None:
    if driver == "postgres" and named_args:
        raise ConfigError.at(node, "PostgreSQL driver does not support named_args")
    if driver not in SQL_DRIVERS:
        raise ConfigError.at(node, f'failed to open db: sql: unknown driver "{driver}" (forgotten import?)')


def _sql_query_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if settings.get("dsn") is not None:
        settings["dsn"] = " ".join(settings["dsn"])
    if settings.get("driver") is not None:
        _check_driver(settings["driver"], bool(settings.get("named_args")), node)


SQL_QUERY = ModuleSchema(
    "table.sql_query",
    roles("table", "mutable_table"),
    (
        Directive("driver", String(), None, required=True, doc="sqlite3 | sqlite | postgres | mysql"),
        Directive("dsn", StringList(), None, required=True, doc="data source name; arguments joined by spaces"),
        Directive("lookup", String(), None, required=True, doc="query returning the value(s) for :key / $1"),
        Directive("init", StringList(), list, doc="statements run once at start"),
        Directive("named_args", Bool(), False, doc="use :key/:value instead of $1/$2 (not with postgres)"),
        Directive("add", String(), "", doc="optional: insert :key :value"),
        Directive("list", String(), "", doc="optional: list all keys"),
        Directive("set", String(), "", doc="optional: update :key to :value"),
        Directive("del", String(), "", doc="optional: delete :key"),
    ),
    inline=ignore_inline_args,
    validate=_sql_query_validate,
    doc="Table backed by SQL queries; settings['dsn'] is the joined DSN string.",
)


def _sql_table_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if settings.get("dsn") is not None:
        settings["dsn"] = " ".join(settings["dsn"])
    driver, table = settings.get("driver"), settings.get("table_name")
    if driver is None or table is None or failed(settings, "key_column", "value_column"):
        return
    key, value = settings["key_column"], settings["value_column"]
    # maddy generates a table.sql_query configuration; only the "sqlite3" spelling
    # gets named arguments, every other driver name gets $1/$2.
    named = driver == "sqlite3"
    k, v = (":key", ":value") if named else ("$1", "$2")
    settings["named_args"] = named
    settings["lookup"] = f"SELECT {value} FROM {table} WHERE {key} = {k}"
    settings["add"] = f"INSERT INTO {table}({key}, {value}) VALUES({k}, {v})"
    settings["list"] = f"SELECT {key} from {table}"
    settings["set"] = f"UPDATE {table} SET {value} = {v} WHERE {key} = {k}"
    settings["del"] = f"DELETE FROM {table} WHERE {key} = {k}"
    settings["init"] = [f"CREATE TABLE IF NOT EXISTS {table} ({key} TEXT PRIMARY KEY NOT NULL, {value} TEXT NOT NULL)"]
    _check_driver(driver, named, node)


SQL_TABLE = ModuleSchema(
    "table.sql_table",
    roles("table", "mutable_table"),
    (
        Directive("driver", String(), None, required=True, doc="sqlite3 | sqlite | postgres | mysql"),
        Directive("dsn", StringList(), None, required=True, doc="data source name; arguments joined by spaces"),
        Directive("table_name", String(), None, required=True),
        Directive("key_column", String(), "key"),
        Directive("value_column", String(), "value"),
    ),
    inline=ignore_inline_args,
    validate=_sql_table_validate,
    doc="Key/value SQL table; validate derives the same settings as table.sql_query "
    "(lookup/add/list/set/del/init/named_args).",
)

SCHEMAS: list[ModuleSchema] = [
    STATIC,
    FILE,
    REGEXP,
    CHAIN,
    IDENTITY,
    EMAIL_LOCALPART,
    EMAIL_LOCALPART_OPTIONAL,
    EMAIL_WITH_DOMAIN,
    SQL_QUERY,
    SQL_TABLE,
]

__all__ = [
    "INLINE_ARGS",
    "INLINE_ARGS_DIRECTIVE",
    "SCHEMAS",
    "SQL_DRIVERS",
    "TABLE_REF",
    "ChainStep",
    "failed",
    "go_atoi",
    "ignore_children",
    "ignore_inline_args",
    "keep_inline_args",
    "reject_inline_args",
    "take_inline_args",
    "valid_domain",
]
