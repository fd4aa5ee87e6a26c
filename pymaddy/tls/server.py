"""Server-side TLS: the `tls` directive's value turned into an `ssl.SSLContext` (spec §B.10).

An endpoint with `supports_tls` calls `server_context(settings["tls"], ctx)`
once in `start()` (loaders are started before endpoints) and returns that
context from `StreamEndpoint.ssl_context(listener)` (for `tls://` listeners) or
uses it for STARTTLS. The context stays valid for the generation's lifetime:

* Its `sni_callback` runs at every handshake, asks the loader for the
  certificate matching the client's SNI name (`TLSLoader.select`) and switches
  the connection to a per-certificate context carrying the same tuning. Those
  contexts are cached per loader `version`, so a certificate re-read by the
  loader is served to the next handshake without touching listeners.
* Session tickets are off (maddy issue #730): `OP_NO_TICKET` and, for TLS 1.3,
  `num_tickets = 0`.

Mapping of maddy's (Go's) knobs onto OpenSSL, and the differences:

* `protocols MIN [MAX]` → `minimum_version` / `maximum_version` (no MAX: the
  highest OpenSSL has). OpenSSL 3 refuses TLS 1.0/1.1 at security level ≥ 1
  (they need SHA-1 signatures) and distributions raise the default level, so when
  MIN is below tls1.2 the cipher string gets `@SECLEVEL=0`, making the config
  work as written (maddy's default is `tls1.0`). With MIN ≥ tls1.2 the system's
  security level stays.
* `ciphers` → the equivalent OpenSSL names, in the given order. Suites OpenSSL
  lacks (RC4, often 3DES) are dropped; if none is left, `ModuleError`. Like in
  Go, the list does not apply to TLS 1.3, whose suites are OpenSSL's defaults.
  Without `ciphers`: Go's default TLS 1.0-1.2 list (ECDHE with AES-GCM,
  ChaCha20, AES-CBC-SHA).
* `curves` → with `SSLContext.set_groups` (newer Pythons) the whole list; on
  Python 3.11 `set_ecdh_curve` takes a single group, so **only the first curve
  is used**. Without `curves`: OpenSSL's default groups.
"""

from __future__ import annotations

import contextlib
import ssl
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pymaddy.runtime.module import ModuleError, RuntimeContext
from pymaddy.tls.loaders import CertPair, TLSLoader, load_into

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.tls.schema import TLSServerConfig

__all__ = ["CIPHER_NAMES", "CURVE_NAMES", "ServerTLS", "configure", "server_context"]

VERSIONS = {
    "tls1.0": ssl.TLSVersion.TLSv1,
    "tls1.1": ssl.TLSVersion.TLSv1_1,
    "tls1.2": ssl.TLSVersion.TLSv1_2,
    "tls1.3": ssl.TLSVersion.TLSv1_3,
}

CIPHER_NAMES = {
    "RSA-WITH-RC4128-SHA": "RC4-SHA",
    "RSA-WITH-3DES-EDE-CBC-SHA": "DES-CBC3-SHA",
    "RSA-WITH-AES128-CBC-SHA": "AES128-SHA",
    "RSA-WITH-AES256-CBC-SHA": "AES256-SHA",
    "RSA-WITH-AES128-CBC-SHA256": "AES128-SHA256",
    "RSA-WITH-AES128-GCM-SHA256": "AES128-GCM-SHA256",
    "RSA-WITH-AES256-GCM-SHA384": "AES256-GCM-SHA384",
    "ECDHE-ECDSA-WITH-RC4128-SHA": "ECDHE-ECDSA-RC4-SHA",
    "ECDHE-ECDSA-WITH-AES128-CBC-SHA": "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-ECDSA-WITH-AES256-CBC-SHA": "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-WITH-RC4128-SHA": "ECDHE-RSA-RC4-SHA",
    "ECDHE-RSA-WITH-3DES-EDE-CBC-SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "ECDHE-RSA-WITH-AES128-CBC-SHA": "ECDHE-RSA-AES128-SHA",
    "ECDHE-RSA-WITH-AES256-CBC-SHA": "ECDHE-RSA-AES256-SHA",
    "ECDHE-ECDSA-WITH-AES128-CBC-SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-WITH-AES128-CBC-SHA256": "ECDHE-RSA-AES128-SHA256",
    "ECDHE-RSA-WITH-AES128-GCM-SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-WITH-AES128-GCM-SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-WITH-AES256-GCM-SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-WITH-AES256-GCM-SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-WITH-CHACHA20-POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-WITH-CHACHA20-POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}

# Go 1.23's default TLS 1.0-1.2 suites (crypto/tls defaultCipherSuites), in its order.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
)

CURVE_NAMES = {"p256": "prime256v1", "p384": "secp384r1", "p521": "secp521r1", "X25519": "X25519"}
_GROUP_NAMES = {"p256": "P-256", "p384": "P-384", "p521": "P-521", "X25519": "X25519"}


def configure(
    ctx: ssl.SSLContext,
    protocols: tuple[str, str | None] | None,
    ciphers: Sequence[str] | None,
    curves: Sequence[str] | None,
    *,
    default_min: str = "tls1.0",
) -> None:
    """Apply maddy's `protocols`/`ciphers`/`curves` to a context (server or client).

    `protocols=None` means "not configured": minimum `default_min`. Raises
    ModuleError when OpenSSL cannot do what the config asks.
    """
    lo, hi = protocols if protocols is not None else (default_min, None)
    legacy = VERSIONS[lo] < ssl.TLSVersion.TLSv1_2
    names = [CIPHER_NAMES[c] for c in ciphers] if ciphers else list(DEFAULT_CIPHERS)
    spec = ":".join(names)
    if legacy or any("RC4" in n or "DES" in n for n in names):
        spec += ":@SECLEVEL=0"
    try:
        ctx.set_ciphers(spec)
    except ssl.SSLError:
        raise ModuleError(
            f"tls: none of the ciphers {' '.join(ciphers or ())} is available in {ssl.OPENSSL_VERSION}"
        ) from None
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0/1.1; maddy's default still allows them.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = VERSIONS[lo]
        ctx.maximum_version = VERSIONS[hi] if hi else ssl.TLSVersion.MAXIMUM_SUPPORTED
        if legacy:
            # Old-style flags some builds set by default would override minimum_version.
            for flag in ("OP_NO_TLSv1", "OP_NO_TLSv1_1"):
                opt = getattr(ssl, flag, None)
                if opt is not None:
                    ctx.options &= ~opt
    if curves:
        set_groups = getattr(ctx, "set_groups", None)
        try:
            if callable(set_groups):
                set_groups(":".join(_GROUP_NAMES[c] for c in curves))
            else:
                ctx.set_ecdh_curve(CURVE_NAMES[curves[0]])
        except (ValueError, ssl.SSLError) as e:
            raise ModuleError(f"tls: curves {' '.join(curves)}: {e}") from None


class ServerTLS:
    """One `tls` directive's live state: tuning plus the loader's per-certificate contexts."""

    def __init__(
        self, cfg: TLSServerConfig, loader: TLSLoader, customize: Callable[[ssl.SSLContext], None] | None = None
    ) -> None:
        self.cfg = cfg
        self.loader = loader
        self.customize = customize
        self._version = -1
        self._cache: dict[int, tuple[CertPair, ssl.SSLContext]] = {}
        # Built once now so a config OpenSSL refuses fails the endpoint's start.
        self.context = self._new_context()
        self.context.sni_callback = self._sni
        pair = loader.select(None)
        if pair is not None:
            try:
                load_into(self.context, pair)
            except ssl.SSLError as e:
                raise ModuleError(f"tls: {pair.source}: {e}") from None

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        configure(ctx, self.cfg.protocols, self.cfg.ciphers, self.cfg.curves)
        ctx.options |= ssl.OP_NO_TICKET
        with contextlib.suppress(AttributeError, ValueError):
            ctx.num_tickets = 0
        if self.customize is not None:
            self.customize(ctx)
        return ctx

    def context_for(self, pair: CertPair) -> ssl.SSLContext:
        """The context serving `pair` (built on first use after each loader change)."""
        if self._version != self.loader.version:
            self._cache = {}
            self._version = self.loader.version
        hit = self._cache.get(id(pair))
        if hit is not None and hit[0] is pair:
            return hit[1]
        ctx = self._new_context()
        load_into(ctx, pair)
        self._cache[id(pair)] = (pair, ctx)
        return ctx

    def _sni(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        try:
            pair = self.loader.select(server_name)
            if pair is None:
                self.loader.log.error("TLS handshake failed", err="no certificate loaded", sni=server_name or "")
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            sslobj.context = self.context_for(pair)
        except Exception as e:  # never let an exception escape into OpenSSL's callback
            self.loader.log.error("TLS handshake failed", err=e, sni=server_name or "")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


def server_context(
    cfg: TLSServerConfig | None,
    ctx: RuntimeContext,
    customize: Callable[[ssl.SSLContext], None] | None = None,
) -> ssl.SSLContext | None:
    """The SSLContext for an endpoint's `tls` setting; None for `tls off` or no loader.

    Call it from `start()`; the loader module must already be started (the
    supervisor starts non-endpoint modules, dependencies first, before endpoints).

    Use the returned context as it is: each handshake switches to a
    per-certificate context, so settings changed on the returned object later
    (verify mode, CA certificates, ALPN) would not apply. Pass `customize`
    instead; it is applied to every context this `tls` setting creates.
    """
    if cfg is None or cfg.loader is None:
        return None
    inst: ModuleInstance = cfg.loader  # type: ignore[assignment]
    loader = ctx.module_as(inst, TLSLoader)
    return ServerTLS(cfg, loader, customize).context
