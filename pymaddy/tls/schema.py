"""The `tls` and `tls_client` directives and the TLS loader modules (spec §B.10)."""

from __future__ import annotations

from dataclasses import dataclass

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    Block,
    Ctx,
    Custom,
    Directive,
    ModuleRef,
    ModuleSchema,
    Settings,
    StringList,
    roles,
)

TLS_VERSIONS = ("tls1.0", "tls1.1", "tls1.2", "tls1.3")
CIPHERS = (
    "RSA-WITH-RC4128-SHA",
    "RSA-WITH-3DES-EDE-CBC-SHA",
    "RSA-WITH-AES128-CBC-SHA",
    "RSA-WITH-AES256-CBC-SHA",
    "RSA-WITH-AES128-CBC-SHA256",
    "RSA-WITH-AES128-GCM-SHA256",
    "RSA-WITH-AES256-GCM-SHA384",
    "ECDHE-ECDSA-WITH-RC4128-SHA",
    "ECDHE-ECDSA-WITH-AES128-CBC-SHA",
    "ECDHE-ECDSA-WITH-AES256-CBC-SHA",
    "ECDHE-RSA-WITH-RC4128-SHA",
    "ECDHE-RSA-WITH-3DES-EDE-CBC-SHA",
    "ECDHE-RSA-WITH-AES128-CBC-SHA",
    "ECDHE-RSA-WITH-AES256-CBC-SHA",
    "ECDHE-ECDSA-WITH-AES128-CBC-SHA256",
    "ECDHE-RSA-WITH-AES128-CBC-SHA256",
    "ECDHE-RSA-WITH-AES128-GCM-SHA256",
    "ECDHE-ECDSA-WITH-AES128-GCM-SHA256",
    "ECDHE-RSA-WITH-AES256-GCM-SHA384",
    "ECDHE-ECDSA-WITH-AES256-GCM-SHA384",
    "ECDHE-RSA-WITH-CHACHA20-POLY1305",
    "ECDHE-ECDSA-WITH-CHACHA20-POLY1305",
)
CURVES = ("p256", "p384", "p521", "X25519")


def _protocols(node: Node, ctx: Ctx) -> tuple[str, str | None]:
    if not 1 <= len(node.args) <= 2:
        raise ConfigError.at(node, "expected one or two arguments")
    for a in node.args:
        if a not in TLS_VERSIONS:
            raise ConfigError.at(node, f"invalid TLS version: {a}, valid values are: [{' '.join(TLS_VERSIONS)}]")
    lo = node.args[0]
    hi = node.args[1] if len(node.args) == 2 else None
    if hi is not None and TLS_VERSIONS.index(hi) < TLS_VERSIONS.index(lo):
        raise ConfigError.at(node, "minimum TLS version is above the maximum")
    return lo, hi


def _names(choices: tuple[str, ...], what: str) -> Custom:
    def fn(node: Node, ctx: Ctx) -> list[str]:
        if not node.args:
            raise ConfigError.at(node, "expected at least one argument")
        for a in node.args:
            if a not in choices:
                raise ConfigError.at(node, f"unknown {what}: {a}")
        return list(node.args)

    return Custom(fn)


PROTOCOLS = Custom(_protocols)
TUNING = (
    Directive("protocols", PROTOCOLS, ("tls1.0", None)),
    Directive("ciphers", _names(CIPHERS, "cipher"), None),
    Directive("curves", _names(CURVES, "curve"), None),
)


@dataclass
class TLSServerConfig:
    """Server TLS: a loader module (None = TLS off) and the handshake tuning."""

    loader: object  # ModuleInstance | None
    protocols: tuple[str, str | None]
    ciphers: list[str] | None
    curves: list[str] | None


def _tls_server(node: Node, ctx: Ctx) -> TLSServerConfig | None:
    loader = None
    if node.args:
        if node.args[0] == "off":
            return None
        # The block after inline loader arguments is the tls block, not the loader's.
        head = Node(node.name, list(node.args), None, node.file, node.line)
        loader = ctx.module(head, node.args, "tls.loader", "tls_loader")
    directives = (Directive("loader", ModuleRef("tls.loader", "tls_loader"), None), *TUNING)
    settings: Settings = ctx.block(node, directives, "tls")
    if settings.get("loader") is not None:
        loader = settings["loader"]
    return TLSServerConfig(loader, settings["protocols"], settings["ciphers"], settings["curves"])


TLS_SERVER = Custom(_tls_server, allow_block=True)

CLIENT_DIRECTIVES = (
    *TUNING,
    Directive("root_ca", StringList(), None, doc="replaces the system CA pool"),
    Directive("cert", Custom(lambda n, c: _one_path(n)), None),
    Directive("key", Custom(lambda n, c: _one_path(n)), None),
)


def _one_path(node: Node) -> str:
    if len(node.args) != 1:
        raise ConfigError.at(node, "expected 1 argument")
    return node.args[0]


def _check_client(settings: Settings) -> None:
    if (settings.get("cert") is None) != (settings.get("key") is None):
        node = settings.node
        raise ConfigError(node.file if node else "", node.line if node else 0, "both cert and key must be set for client authentication")


def _tls_client(node: Node, ctx: Ctx) -> Settings:
    if node.args:
        raise ConfigError.at(node, "tls_client takes no arguments, only a block")
    s = ctx.block(node, CLIENT_DIRECTIVES, "tls_client")
    _check_client(s)
    return s


TLS_CLIENT = Custom(_tls_client, allow_block=True)
TLS_CLIENT_BLOCK = Block(CLIENT_DIRECTIVES)

# Loader modules: tls.loader.file, tls.loader.self_signed, tls.loader.acme and
# the libdns.* DNS providers used by acme.
SCHEMAS: list[ModuleSchema] = []
