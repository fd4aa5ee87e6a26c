"""Schemas of the storage modules (spec §B.8, §B.9, §F).

storage.imapsql (also registered as target.imapsql), the blob stores
storage.blob.fs / storage.blob.s3 and the imap.filter.command filter, as maddy
0.9.4's Configure() code accepts them (code beats docs: `sqlite3_cache_size`,
`sqlite3_busy_timeout`, `auth_normalize` default `auto`).

Inline arguments that only *default* a directive (imapsql `DRIVER DSN…`,
fs `DIR`) travel in a hidden `@inline` node, merged by the validator, so the
block may still set the directive itself, as in maddy.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    INLINE_ARGS,
    INLINE_ARGS_DIRECTIVE,
    Bool,
    Ctx,
    Custom,
    DataSize,
    Directive,
    Group,
    Int,
    ModuleRef,
    ModuleSchema,
    Settings,
    String,
    StringList,
    roles,
    take_inline_args,
)
from pymaddy.config.values import NORMALIZERS, parse_int

LIBEXEC_DIR = "/usr/lib/maddy"  # maddy prepends it to $PATH at start-up

# Same names as the global auth_map_normalize (spec §C); defined here to keep imports cheap.
# Drivers linked into maddy 0.9.4; `sqlite3` is mapped to the pure-Go `sqlite` driver.
SQL_DRIVERS = ("sqlite", "postgres", "mysql")






DEBUG = Directive("debug", Bool(), False, inherit=True)


# -- storage.imapsql ----------------------------------------------------------------


@dataclass(frozen=True)
class Compression:
    """Message body compression in the blob store."""

    algo: str  # off | lz4 | zstd
    level: int | None = None


def _compression(node: Node, ctx: Ctx) -> Compression:
    a = node.args
    if not a:
        raise ConfigError.at(node, "expected at least one argument")
    if a[0] in ("zstd", "lz4"):
        level = None
        if len(a) >= 2:
            try:
                level = parse_int(a[1])
            except ValueError:
                raise ConfigError.at(node, "imapsql: first argument for lz4 and zstd is compression level") from None
        if len(a) > 2:
            raise ConfigError.at(node, "imapsql: expected at most 2 arguments")
        return Compression(a[0], level)
    if a[0] == "off":
        if len(a) > 1:
            raise ConfigError.at(node, "imapsql: expected at most 1 arguments")
        return Compression("off")
    raise ConfigError.at(node, "imapsql: unknown compression algorithm")


def _normalizer(node: Node, ctx: Ctx) -> str:
    if len(node.args) != 1:
        raise ConfigError.at(node, "expected 1 argument")
    if node.args[0] not in NORMALIZERS:
        raise ConfigError.at(node, f"imapsql: unknown normalization function: {node.args[0]}")
    return node.args[0]


def _fsstore(node: Node, ctx: Ctx) -> object:
    # Deprecated spelling of `msg_store fs DIR`.
    return ctx.module(node, ["fs", *node.args], "storage.blob", "blob_store")


def _imapsql_inline(head: Node, ctx: Ctx) -> list[Node]:
    if len(head.args) == 1:
        raise ConfigError.at(head, "imapsql: expected at least 2 arguments")
    return [head.synth(INLINE_ARGS, list(head.args))]


def _imapsql_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    inline = take_inline_args(settings)
    if inline:
        if "driver" not in settings.present:
            settings["driver"] = inline[0]
        if "dsn" not in settings.present:
            settings["dsn"] = inline[1:]

    # maddy quirk: the `msg_store` default (`fs messages`) is applied after the
    # block is read and overwrites what `fsstore` set; with both written, the
    # later one wins.
    if "msg_store" not in settings.present:
        default = node.synth("msg_store", ["fs", "messages"])
        settings["msg_store"] = ctx.module(default, default.args, "storage.blob", "blob_store")
    elif settings.get("fsstore"):
        last = [c.name for c in node.children or [] if c.name in ("msg_store", "fsstore")]
        if last and last[-1] == "fsstore":
            settings["msg_store"] = settings["fsstore"][-1]

    if not settings.get("dsn") and "dsn" not in settings.failed:
        ctx.errors.at(node, "imapsql: dsn is required")
    driver = settings.get("driver")
    if not driver:
        if "driver" not in settings.failed:
            ctx.errors.at(node, "imapsql: driver is required")
    else:
        mapped = "sqlite" if driver == "sqlite3" else driver
        if mapped not in SQL_DRIVERS:
            ctx.errors.at(settings.nodes.get("driver", node), f'imapsql: unknown driver "{mapped}"')
    limit = settings.get("appendlimit")
    if limit is not None and limit > 0xFFFFFFFF:
        ctx.errors.at(settings.nodes.get("appendlimit", node), "imapsql: appendlimit value is too big")


def _imapsql_schema(name: str) -> ModuleSchema:
    return ModuleSchema(
        name=name,
        roles=roles("storage", "delivery_target", "table"),
        directives=(
            INLINE_ARGS_DIRECTIVE,
            Directive("driver", String(), None, doc="sqlite3 | sqlite | postgres | mysql"),
            Directive("dsn", StringList(), None, doc="joined by spaces; sqlite: path relative to state_dir"),
            Directive("fsstore", Custom(_fsstore, allow_block=True), None, repeat=True, doc="deprecated"),
            Directive("msg_store", ModuleRef("storage.blob", "blob_store"), None, doc="default: fs messages"),
            Directive("compression", Custom(_compression), Compression("off")),
            Directive("appendlimit", DataSize(), 32 << 20, doc="max IMAP APPEND size"),
            DEBUG,
            Directive("sqlite3_cache_size", Int(), 0, doc="docs call it sqlite_cache_size"),
            Directive("sqlite3_busy_timeout", Int(), 5000, doc="milliseconds; docs call it sqlite_busy_timeout"),
            Directive("disable_recent", Bool(), True),
            Directive("junk_mailbox", String(), "Junk"),
            Directive("imap_filter", Group("imap_filters", "imap_filters_group"), None),
            Directive("auth_map", ModuleRef("table", "table"), None, doc="deprecated: use imap storage_map"),
            Directive("auth_normalize", Custom(_normalizer), "auto", doc="deprecated"),
            Directive("delivery_map", ModuleRef("table", "table"), None, doc="recipient -> account"),
            Directive("delivery_normalize", Custom(_normalizer), "precis_casefold_email"),
        ),
        inline=_imapsql_inline,
        validate=_imapsql_validate,
        runtime=None,
        doc="IMAP mailboxes in an SQL database with message bodies in a blob store",
    )


# -- blob stores ---------------------------------------------------------------------


def _fs_inline(head: Node, ctx: Ctx) -> list[Node]:
    if len(head.args) > 1:
        # Reported here; the first argument stands in so that one mistake gives one error.
        ctx.errors.at(head, "storage.blob.fs: 1 or 0 arguments expected")
    return [head.synth(INLINE_ARGS, head.args[:1])]


def _fs_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    inline = take_inline_args(settings)
    if "root" not in settings.present and inline:
        settings["root"] = inline[0]
    if not settings.get("root") and "root" not in settings.failed:
        raise ConfigError.at(node, "storage.blob.fs: directory not set")


S3_CREDS = ("access_key", "file_minio", "file_aws", "iam")


def _s3_inline(head: Node, ctx: Ctx) -> list[Node]:
    raise ConfigError.at(head, "storage.blob.s3: expected 0 arguments")


def _s3_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    endpoint = settings.get("endpoint")
    if endpoint is not None and not endpoint:
        ctx.errors.at(settings.nodes.get("endpoint", node), "storage.blob.s3: endpoint not set")
    elif endpoint and "/" in endpoint:
        # minio-go takes a bare host[:port]; a URL gives a path it refuses.
        ctx.errors.at(
            settings.nodes.get("endpoint", node), "storage.blob.s3: Endpoint url cannot have fully qualified paths."
        )
    # Unknown credential types fall back to the static access key in maddy.
    if settings.get("creds") not in S3_CREDS and "creds" not in settings.failed:
        settings["creds"] = "access_key"


BLOB_FS = ModuleSchema(
    name="storage.blob.fs",
    roles=roles("blob_store"),
    directives=(INLINE_ARGS_DIRECTIVE, Directive("root", String(), None, doc="directory, relative to state_dir")),
    inline=_fs_inline,
    validate=_fs_validate,
    runtime=None,
    doc="message bodies as files in one flat directory",
)

BLOB_S3 = ModuleSchema(
    name="storage.blob.s3",
    roles=roles("blob_store"),
    directives=(
        Directive("endpoint", String(), None, required=True, doc="host[:port]"),
        Directive("secure", Bool(), True),
        Directive("access_key", String(), None, required=True),
        Directive("secret_key", String(), None, required=True),
        Directive("bucket", String(), None, required=True),
        Directive("region", String(), ""),
        Directive("object_prefix", String(), ""),
        Directive("creds", String(), "access_key", doc="access_key | file_minio | file_aws | iam"),
    ),
    inline=_s3_inline,
    validate=_s3_validate,
    runtime=None,
    doc="message bodies as objects in an S3-compatible bucket",
)


# -- imap.filter.command --------------------------------------------------------------


def look_path(cmd: str, path: str | None = None) -> str:
    """Where Go's exec.LookPath finds `cmd` (maddy's $PATH starts with the libexec dir).

    Raises ValueError with Go's wording when it is not an executable file.
    """
    if "/" in cmd:
        problem = _not_executable(cmd)
        if problem:
            raise ValueError(f'exec: "{cmd}": {problem}')
        return cmd
    if path is None:
        path = LIBEXEC_DIR + os.pathsep + os.environ.get("PATH", "")
    for d in path.split(os.pathsep):
        candidate = os.path.join(d or ".", cmd)
        if not _not_executable(candidate):
            return candidate
    raise ValueError(f'exec: "{cmd}": executable file not found in $PATH')


def _not_executable(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        return f"stat {path}: {(e.strerror or str(e)).lower()}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not os.access(path, os.X_OK):
        return "permission denied"
    return ""


def _command_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    args = take_inline_args(settings) or []
    if not args:
        raise ConfigError.at(node, "command: at least one argument is required (command name)")
    try:
        look_path(args[0])
    except ValueError as e:
        raise ConfigError.at(node, f"command: {e}") from None
    settings["command"] = args[0]
    settings["args"] = args[1:]


IMAP_FILTER_COMMAND = ModuleSchema(
    name="imap.filter.command",
    # maddy accepts any IMAP filter where a filter group is expected (`imap_filter &name`).
    roles=roles("imap_filter", "imap_filters_group"),
    directives=(INLINE_ARGS_DIRECTIVE,),
    inline=lambda head, ctx: [head.synth(INLINE_ARGS, list(head.args))],
    validate=_command_validate,
    runtime=None,
    doc="runs a command per delivered message; its output picks the folder and flags",
)


SCHEMAS: list[ModuleSchema] = [
    _imapsql_schema("storage.imapsql"),
    _imapsql_schema("target.imapsql"),
    BLOB_FS,
    BLOB_S3,
    IMAP_FILTER_COMMAND,
]
