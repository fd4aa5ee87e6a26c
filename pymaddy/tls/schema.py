"""The `tls` and `tls_client` directives and the TLS loader modules (spec §B.10)."""

from __future__ import annotations

from dataclasses import dataclass

from pymaddy.config.errors import ConfigError
from pymaddy.config.ir import Node
from pymaddy.config.schema import (
    INLINE_ARGS_DIRECTIVE,
    Block,
    Bool,
    Ctx,
    Custom,
    Directive,
    Enum,
    ModuleRef,
    ModuleSchema,
    Settings,
    String,
    StringList,
    ValidateFn,
    ignore_inline_args,
    keep_inline_args,
    roles,
    take_inline_args,
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
        raise ConfigError.at(node, "expected 1 or 2 arguments")
    for a in node.args:
        if a not in TLS_VERSIONS:
            raise ConfigError.at(node, f"invalid TLS version value: {a}")
    lo = node.args[0]
    # One version means exactly that version (maddy: min = max).
    hi = node.args[1] if len(node.args) == 2 else lo
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
        msg = "both cert and key must be set for client authentication"
        raise ConfigError(node.file if node else "", node.line if node else 0, msg)


def _tls_client(node: Node, ctx: Ctx) -> Settings:
    if node.args:
        raise ConfigError.at(node, "tls_client takes no arguments, only a block")
    s = ctx.block(node, CLIENT_DIRECTIVES, "tls_client")
    _check_client(s)
    return s


TLS_CLIENT = Custom(_tls_client, allow_block=True)
TLS_CLIENT_BLOCK = Block(CLIENT_DIRECTIVES)

# -- Loader modules: tls.loader.file, tls.loader.self_signed, tls.loader.acme --------
#
# Inline arguments travel in a hidden `@inline` node (no config text can spell
# '@'), merged by each validator, so `certs`/`keys` may still be written too.

LETSENCRYPT_CA = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING_CA = "https://acme-staging-v02.api.letsencrypt.org/directory"










def _file_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    inline = take_inline_args(settings)
    if "certs" in settings.failed or "keys" in settings.failed:
        return
    certs: list[str] = list(settings.get("certs") or [])
    keys: list[str] = list(settings.get("keys") or [])
    if len(certs) != len(keys):
        raise ConfigError.at(node, "tls.loader.file: mismatch in certs and keys count")
    if len(inline) % 2:
        raise ConfigError.at(node, "tls.loader.file: odd amount of arguments")
    certs += inline[0::2]
    keys += inline[1::2]
    # Config-time checks only; the files themselves are read when the server starts.
    for cert in certs:
        if not cert.startswith("/"):
            raise ConfigError.at(node, "tls.loader.file: only absolute paths allowed in certificate paths: sorry :(")
    if not certs:
        raise ConfigError.at(node, "tls.loader.file: at least one certificate required")
    settings["certs"] = certs
    settings["keys"] = keys


TLS_LOADER_FILE = ModuleSchema(
    name="tls.loader.file",
    roles=roles("tls_loader"),
    directives=(
        INLINE_ARGS_DIRECTIVE,
        Directive("certs", StringList(), None, doc="absolute certificate paths (inline: CERT KEY pairs)"),
        Directive("keys", StringList(), None, doc="key paths, one per certificate"),
    ),
    inline=keep_inline_args,
    validate=_file_validate,
    runtime=None,
    doc="certificate/key files, re-read every minute; SNI picks the certificate",
)


def _self_signed_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    settings["names"] = take_inline_args(settings)


TLS_LOADER_SELF_SIGNED = ModuleSchema(
    name="tls.loader.self_signed",
    roles=roles("tls_loader"),
    directives=(INLINE_ARGS_DIRECTIVE,),
    inline=keep_inline_args,
    validate=_self_signed_validate,
    runtime=None,
    doc="an in-memory ECDSA P-256 certificate for the inline names/IPs, made at each start",
)


def _acme_inline(head: Node, ctx: Ctx) -> list[Node]:
    raise ConfigError.at(head, "tls.loader.acme: no inline args expected")


def _acme_validate(settings: Settings, node: Node, ctx: Ctx) -> None:
    if settings.get("store_path") is None:
        # maddy joins its state directory, which is still unset while the global
        # `tls` is read; the relative "acme" then resolves against state_dir after
        # the chdir into it, so the result is the same place.
        state_dir = ctx.globals.get("state_dir")
        settings["store_path"] = state_dir.rstrip("/") + "/acme" if state_dir else "acme"
    # Only a challenge that was written and accepted can need a provider (one mistake, one error).
    challenge_ok = "challenge" in settings.present and "challenge" not in settings.failed
    if challenge_ok and settings.get("dns") is None and "dns" not in settings.failed:
        raise ConfigError.at(node, "tls.loader.acme: dns-01 challenge requires a configured DNS provider")


TLS_LOADER_ACME = ModuleSchema(
    name="tls.loader.acme",
    roles=roles("tls_loader"),
    directives=(
        Directive("debug", Bool(), False, inherit=True),
        Directive("hostname", String(), None, inherit=True, required=True, doc="the certificate's main name"),
        Directive("extra_names", StringList(), None, doc="more names on the certificate"),
        Directive("store_path", String(), None, doc="default STATE/acme"),
        Directive("ca", String(), LETSENCRYPT_CA),
        Directive("test_ca", String(), LETSENCRYPT_STAGING_CA),
        Directive("email", String(), ""),
        Directive("override_domain", String(), "", doc="delegated _acme-challenge domain"),
        Directive("agreed", Bool(), False, doc="agree to the CA's terms of service"),
        Directive("challenge", Enum(("dns-01",)), "dns-01", required=True),
        Directive("dns", ModuleRef("libdns", "dns_provider"), None, doc="DNS provider for dns-01"),
    ),
    inline=_acme_inline,
    validate=_acme_validate,
    runtime=None,
    doc="certificates from an ACME CA (Let's Encrypt) via the DNS-01 challenge",
)


# -- libdns.* DNS providers (spec §B.10) ----------------------------------------------------




def _need_one_of(module: str, message: str, *names: str) -> ValidateFn:
    def validate(settings: Settings, node: Node, ctx: Ctx) -> None:
        if any(n in settings.failed for n in names):
            return
        if not any(settings.get(n) for n in names):
            raise ConfigError.at(node, f"{module}: {message}")

    return validate


def _provider(
    name: str, fields: tuple[tuple[str, bool], ...], validate: ValidateFn | None = None, doc: str = ""
) -> ModuleSchema:
    return ModuleSchema(
        name=f"libdns.{name}",
        roles=roles("dns_provider"),
        directives=tuple(Directive(f, String(), None if req else "", required=req) for f, req in fields),
        inline=ignore_inline_args,
        validate=validate,
        runtime=None,
        doc=doc or f"{name} DNS API for ACME dns-01",
    )


OPT, REQ = False, True
DNS_PROVIDERS = [
    # In maddy's default build:
    _provider("cloudflare", (("api_token", OPT),)),
    _provider("digitalocean", (("api_token", OPT),)),
    _provider(
        "gandi",
        (("api_token", OPT), ("personal_token", OPT)),
        _need_one_of(
            "libdns.gandi", "either api_token or personal_token should be specified", "api_token", "personal_token"
        ),
        doc="gandi LiveDNS (api_token is deprecated, use personal_token)",
    ),
    _provider("gcore", (("api_key", OPT),), _need_one_of("libdns.gcore", "api_key should be specified", "api_key")),
    _provider("hetzner", (("api_token", OPT),)),
    _provider("namecheap", (("api_key", REQ), ("api_username", REQ), ("endpoint", OPT), ("client_ip", OPT))),
    _provider("vultr", (("api_token", OPT),)),
    # Only with build tags in maddy (libdns_all or libdns_NAME):
    _provider("acmedns", (("username", REQ), ("password", REQ), ("subdomain", REQ), ("server_url", REQ))),
    _provider("alidns", (("key_id", OPT), ("key_secret", OPT))),
    _provider("googleclouddns", (("project", REQ), ("service_account_json", OPT))),
    _provider("leaseweb", (("api_key", OPT),)),
    _provider("metaname", (("api_key", OPT), ("account_ref", OPT))),
    _provider("namedotcom", (("user", OPT), ("token", OPT))),
    _provider("rfc2136", (("key_name", REQ), ("key", REQ), ("key_alg", REQ), ("server", REQ))),
    _provider("route53", (("secret_access_key", OPT), ("access_key_id", OPT))),
]

SCHEMAS: list[ModuleSchema] = [TLS_LOADER_FILE, TLS_LOADER_SELF_SIGNED, TLS_LOADER_ACME, *DNS_PROVIDERS]
