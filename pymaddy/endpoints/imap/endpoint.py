"""The `imap` endpoint (maddy's internal/endpoint/imap) over storage.imapsql."""

from __future__ import annotations

import ssl
from typing import Any

from pymaddy.auth import normalize
from pymaddy.auth.base import PlainAuth
from pymaddy.auth.normalize import NormalizeError
from pymaddy.auth.sasl import SASLCredentials
from pymaddy.auth.throttle import throttle_for
from pymaddy.pipeline.runner import module_of
from pymaddy.runtime.listeners import Listener
from pymaddy.runtime.module import Connection, ModuleError, StreamEndpoint
from pymaddy.storage.imapsql import IMAPSQL
from pymaddy.tables.base import Table

IDLE_POLL = 5.0  # seconds between database polls of an IDLE session (notices usually come first)
READ_TIMEOUT = 30 * 60.0  # RFC 3501 §5.4: an autologout timer of at least 30 minutes
WRITE_TIMEOUT = 60.0


class IMAPEndpoint(SASLCredentials, StreamEndpoint):
    supports_tls = True

    def __init__(self, inst: Any, ctx: Any) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.io_debug = bool(s.get("io_debug"))
        self.io_errors = bool(s.get("io_errors"))
        self.sasl_login = bool(s.get("sasl_login"))
        self.insecure_auth = bool(s.get("insecure_auth"))
        self.proxy = s.get("proxy_protocol")
        self.read_timeout = READ_TIMEOUT
        self.write_timeout = WRITE_TIMEOUT
        self.idle_poll = IDLE_POLL
        try:
            self.auth_normalize = normalize.get(str(s.get("auth_map_normalize") or "auto"))
            self.storage_normalize = normalize.get(str(s.get("storage_map_normalize") or "auto"))
        except NormalizeError as e:
            raise ModuleError(f"imap: {e}") from None
        self.auth: list[PlainAuth] = []
        self.throttle = throttle_for(s.get("auth_throttle"))
        self.auth_map: Table | None = None
        self.storage_map: Table | None = None
        self.storage: IMAPSQL | None = None
        self.tls_ctx: ssl.SSLContext | None = None
        self._m_failed_logins = ctx.metrics.counter("maddy_imap_failed_logins", "Failed IMAP logins", ["module"])

    def log_name(self) -> str:
        return "imap"

    async def start(self) -> None:
        s = self.settings
        self.auth = [module_of(self.ctx, i, PlainAuth) for i in (s.get("auth") or [])]  # type: ignore[type-abstract]
        if s.get("auth_map") is not None:
            self.auth_map = module_of(self.ctx, s["auth_map"], Table)  # type: ignore[type-abstract]
        if s.get("storage_map") is not None:
            self.storage_map = module_of(self.ctx, s["storage_map"], Table)  # type: ignore[type-abstract]
        store = self.ctx.module(s["storage"])
        if not isinstance(store, IMAPSQL):
            raise ModuleError(f"imap: {s['storage'].label} is not an IMAP storage")
        self.storage = store
        tls = s.get("tls")
        if tls is not None:
            from pymaddy.tls.server import server_context

            self.tls_ctx = server_context(tls, self.ctx)
        addrs = self.addresses()
        for addr in addrs:
            if addr.is_tls and self.tls_ctx is None:
                raise ModuleError("imap: can't bind on IMAPS endpoint without TLS configuration")
        all_local = all(a.is_unix or a.host.startswith("127.0.0.") for a in addrs)
        if self.tls_ctx is None:
            if not all_local:
                self.log.printf("TLS is disabled, this is insecure configuration and should be used only for testing!")
            self.insecure_auth = True
        elif self.insecure_auth and not all_local:
            self.log.printf("authentication over unencrypted connections is allowed, "
                            "this is insecure configuration and should be used only for testing!")
        if self.io_debug:
            self.log.printf("I/O debugging is on! It may leak passwords in logs, be careful!")

    def ssl_context(self, listener: Listener) -> ssl.SSLContext | None:
        return self.tls_ctx if listener.address.is_tls else None

    async def handle(self, conn: Connection) -> None:
        from pymaddy.endpoints.imap.session import Session

        await Session(self, conn).run()

    # -- authentication ----------------------------------------------------------------------------------

    async def storage_account(self, user: str) -> str | None:
        """The storage account of a login: storage_map (a miss refuses the login), else the storage's own
        normalization (and its deprecated auth_map)."""
        assert self.storage is not None
        try:
            if self.storage_map is not None:
                return await self.storage_map.lookup(self.storage_normalize(user))
            return await self.storage.auth_normalize(user)
        except (NormalizeError, LookupError):
            return None

    def failed_login(self) -> None:
        self._m_failed_logins.inc(module="imap")
