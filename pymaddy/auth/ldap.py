"""`auth.ldap` / `table.ldap`: passwords checked by binding to an LDAP directory (maddy's internal/auth/ldap).

A login is checked as maddy does: find the user's DN (`dn_template` with the
username DN-escaped, or a subtree search of `base_dn` with `filter`, the
username filter-escaped, at most one entry), then a simple bind as that DN with
the password; afterwards the connection binds again with the `bind` identity
so the next search runs with the service rights. As a table, a key maps to the
DN of the one entry the filter finds (search config required).

ldap3 is blocking, so every directory operation runs in a small worker pool,
one connection per worker at most, kept open between logins. A connection
broken since its last use (directory restarted, idle timeout) is dropped and
the operation retried once on a fresh one; when no URL answers, callers get
AuthTemporaryError (454 4.7.0 on SMTP, NO [UNAVAILABLE] on IMAP).

Differences from maddy, deliberate: up to POOL_SIZE connections instead of one
behind a mutex; with `bind off`/`unauth` the connection goes back to
anonymous after a user bind instead of searching as the last user; server
answers busy/unavailable/other (51, 52, 80) to a user bind are temporary
failures, not wrong passwords.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

with warnings.catch_warnings():  # ldap3 2.9.1 imports pyasn1 names deprecated in pyasn1 0.6
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.core.exceptions import LDAPCommunicationError, LDAPException, LDAPResponseTimeoutError
    from ldap3.core.tls import Tls

from pymaddy.auth.base import PlainAuth
from pymaddy.auth.ldapescape import escape_dn_value, escape_filter_value
from pymaddy.mail.errors import AuthError, AuthTemporaryError
from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.auth.schema import LDAPBind
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

__all__ = ["DirectoryError", "LDAPAuth"]

MOD_NAME = "auth.ldap"
POOL_SIZE = 4  # worker threads = most connections open at once

# RFC 4511 §4.1.9 result codes.
_INVALID_CREDENTIALS = 49
_NO_SUCH_OBJECT = 32
_INVALID_DN_SYNTAX = 34
_SIZE_LIMIT_EXCEEDED = 4
_TEMPORARY_CODES = frozenset({51, 52, 80})  # busy, unavailable, other

T = TypeVar("T")


class DirectoryError(RuntimeError):
    """The directory could not answer (unreachable, broken connection, failed search)."""


class _Broken(Exception):
    """The connection is unusable; the operation may be retried on a fresh one."""


class _ContextTls(Tls):
    """ldap3's Tls with pymaddy's `tls_client` SSLContext (ldap3 builds its own otherwise)."""

    def __init__(self, ctx: ssl.SSLContext, server_name: str) -> None:
        super().__init__()
        self._ctx = ctx
        self._server_name = server_name

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        # maddy sets ServerName to the URL's host: names and IP literals are checked by the context.
        connection.socket = self._ctx.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=True, server_hostname=self._server_name
        )


def _seconds(v: object) -> float:
    return 60.0 if v is None else float(v)  # type: ignore[arg-type]


def _code(conn: ldap3.Connection) -> int:
    res = conn.result or {}
    return int(res.get("result", -1)) if isinstance(res, dict) else -1


def _describe(conn: ldap3.Connection) -> str:
    res = conn.result if isinstance(conn.result, dict) else {}
    msg = res.get("message") or ""
    return f"{res.get('description', 'error')} ({res.get('result', '?')})" + (f": {msg}" if msg else "")


class LDAPAuth(Module, PlainAuth, Table):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.urls: list[str] = list(s.get("urls") or [])
        self.read_bind: LDAPBind = s["bind"]
        self.starttls = bool(s.get("starttls"))
        self.connect_timeout = _seconds(s.get("connect_timeout"))
        self.request_timeout = _seconds(s.get("request_timeout"))
        self.dn_template: str = s.get("dn_template") or ""
        self.base_dn: str = s.get("base_dn") or ""
        self.filter: str = s.get("filter") or ""
        self._tls_settings = s.get("tls_client")
        self._tls_ctx: ssl.SSLContext | None = None
        self._idle: list[ldap3.Connection] = []
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def log_name(self) -> str:
        return MOD_NAME

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        from pymaddy.tls.client import client_context

        if not self.urls:
            raise ModuleError(f"{MOD_NAME}: no server URLs configured")
        for u in self.urls:
            parts = urlsplit(u)
            if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
                raise ModuleError(f"{MOD_NAME}: invalid server URL: {u}")
        needs_tls = self.starttls or any(u.startswith("ldaps:") for u in self.urls)
        if needs_tls or self._tls_settings is not None:
            self._tls_ctx = client_context(self._tls_settings)
        self._executor = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="ldap")
        # As maddy: the module does not start without one working connection.
        try:
            conn = await self._in_thread(self._open)
        except DirectoryError as e:
            raise ModuleError(f"{MOD_NAME}: {e}") from None
        self._give(conn)

    async def stop(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
        for c in idle:
            _close(c)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise DirectoryError("module is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- connections (worker threads only) ---------------------------------------------------------------

    def _server(self, url: str) -> ldap3.Server:
        parts = urlsplit(url)
        host = parts.hostname or ""
        ssl_on = parts.scheme == "ldaps"
        tls = _ContextTls(self._tls_ctx, host) if self._tls_ctx is not None else None
        return ldap3.Server(
            host, port=parts.port or (636 if ssl_on else 389), use_ssl=ssl_on, tls=tls,
            get_info=ldap3.NONE, connect_timeout=self.connect_timeout or None,  # 0: none, as Go's Dialer
        )

    def _receive_timeout(self) -> int | None:
        # ldap3 packs it into SO_RCVTIMEO as whole seconds; 0 means none, as in maddy.
        t = self.request_timeout
        return None if t <= 0 else max(1, math.ceil(t))

    def _open(self) -> ldap3.Connection:
        """A connection to the first URL that answers, after STARTTLS and the read bind."""
        conn: ldap3.Connection | None = None
        for url in self.urls:
            try:
                c = ldap3.Connection(
                    self._server(url), receive_timeout=self._receive_timeout(), raise_exceptions=False,
                    auto_referrals=False, read_only=True,
                )
                c.open(read_server_info=False)
            except (LDAPException, OSError) as e:
                self.log.error("cannot contact directory server", err=str(e), url=url)
                continue
            conn = c
            break
        if conn is None:
            raise DirectoryError("all directory servers are unreachable")
        try:
            if self.starttls and not conn.start_tls(read_server_info=False):  # RFC 4513 §3
                raise DirectoryError(f"StartTLS: {_describe(conn)}")
            self._bind_read(conn)
        except (LDAPException, OSError) as e:
            _close(conn)
            raise DirectoryError(str(e)) from None
        except DirectoryError:
            _close(conn)
            raise
        return conn

    def _bind_read(self, conn: ldap3.Connection) -> None:
        """Bind with the configured service identity (`bind` directive)."""
        b = self.read_bind
        if b.kind == "plain":
            ok = _bind(conn, ldap3.SIMPLE, b.dn, b.password)
        elif b.kind == "external":
            # RFC 4422 Appendix A: an empty authorization identity (absent credentials make
            # Cyrus-based servers answer saslBindInProgress).
            conn.authentication, conn.sasl_mechanism, conn.sasl_credentials = ldap3.SASL, ldap3.EXTERNAL, ""
            ok = bool(conn.bind(read_server_info=False))
        else:
            # off / unauth [DN]: RFC 4513 §5.1.1/§5.1.2, a name with no password. Sent for `off`
            # too, so a connection last bound as a user returns to anonymous.
            ok = _bind(conn, ldap3.ANONYMOUS, b.dn if b.kind == "unauth" else "", "")
        if not ok:
            raise DirectoryError(f"bind: {_describe(conn)}")

    def _take(self, fresh: bool = False) -> tuple[ldap3.Connection, bool]:
        with self._lock:
            while self._idle and not fresh:
                c = self._idle.pop()
                if not c.closed:
                    return c, True
        return self._open(), False

    def _give(self, conn: ldap3.Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                return
        _close(conn)

    def _run(self, op: Callable[[ldap3.Connection], T]) -> T:
        """`op` on a pooled connection; once more on a new connection if a reused one was broken."""
        for attempt in range(2):
            conn, reused = self._take(fresh=attempt > 0)
            try:
                result = op(conn)
            except (_Broken, LDAPCommunicationError, LDAPResponseTimeoutError, OSError) as e:
                _close(conn)
                if reused and attempt == 0:
                    # The other idle connections most likely died with this one (directory restart).
                    with self._lock:
                        stale, self._idle = self._idle, []
                    for c in stale:
                        _close(c)
                    self.log.debug("connection broken, retrying on a new one", err=str(e))
                    continue
                raise DirectoryError(str(e) or type(e).__name__) from None
            except LDAPException as e:  # refused by ldap3 itself (e.g. a filter it cannot parse)
                _close(conn)
                raise DirectoryError(f"{type(e).__name__}: {e}") from None
            except BaseException:
                _close(conn)
                raise
            self._give(conn)
            return result
        raise DirectoryError("unreachable")  # pragma: no cover - the loop returns or raises

    def _search_dn(self, conn: ldap3.Connection, username: str) -> str | None:
        # RFC 4515: the username is an assertion value, never filter syntax.
        flt = self.filter.replace("{username}", escape_filter_value(username))
        ok = conn.search(
            self.base_dn, flt, search_scope=ldap3.SUBTREE, dereference_aliases=ldap3.DEREF_NEVER,
            attributes=[ldap3.NO_ATTRIBUTES], size_limit=2,
        )
        code = _code(conn)
        if code == -1 or conn.closed:
            raise _Broken("search: no answer")
        if code == _SIZE_LIMIT_EXCEEDED:
            raise DirectoryError("search: too many entries returned")
        if not ok and code != 0:
            if code == 1 or code in _TEMPORARY_CODES:  # operationsError (e.g. after a restart) or server trouble
                raise _Broken(f"search: {_describe(conn)}")
            raise DirectoryError(f"search: {_describe(conn)}")
        entries = [r for r in conn.response or [] if r.get("type") == "searchResEntry"]
        if len(entries) > 1:
            raise DirectoryError(f"search: too many entries returned ({len(entries)})")
        self.log.debug("search", filter=flt, found=len(entries))
        return str(entries[0]["dn"]) if entries else None

    def _check(self, conn: ldap3.Connection, username: str, password: str) -> bool:
        if self.dn_template:
            dn: str | None = self.dn_template.replace("{username}", escape_dn_value(username))  # RFC 4514
        else:
            dn = self._search_dn(conn, username)
        if dn is None:
            return False
        try:
            accepted = _bind(conn, ldap3.SIMPLE, dn, password)
        except (LDAPCommunicationError, LDAPResponseTimeoutError):
            raise
        except LDAPException as e:
            # ldap3 refuses some passwords before sending them (SASLprep, RFC 4013 §2.3 prohibited
            # characters): such a password cannot be right.
            self.log.debug("password refused by the client library", err=str(e))
            self._bind_read(conn)
            return False
        code = _code(conn)
        if code == -1 or conn.closed:
            raise _Broken("bind: no answer")
        if code in _TEMPORARY_CODES:
            raise DirectoryError(f"bind {dn}: {_describe(conn)}")
        if not accepted:
            self.log.debug("bind refused", dn=dn, result=_describe(conn))
        try:
            self._bind_read(conn)
        except DirectoryError as e:
            # The answer for this user stands; the connection is not reused.
            self.log.error("failed to rebind for reading", err=str(e))
            _close(conn)
        return accepted

    # -- PlainAuth ------------------------------------------------------------------------------------

    async def auth_plain(self, username: str, password: str) -> None:
        # RFC 4513 §5.1.2: a simple bind with an empty password is an unauthenticated bind that
        # many servers accept; it must never count as a login. Likewise an empty name (§5.1.1).
        if not password or not username:
            raise AuthError("invalid credentials")
        try:
            ok = await self._in_thread(lambda: self._run(lambda c: self._check(c, username, password)))
        except DirectoryError as e:
            self.log.error("directory unavailable", err=str(e), username=username)
            raise AuthTemporaryError(f"{MOD_NAME}: {e}") from None
        if not ok:
            raise AuthError("invalid credentials")

    # -- Table: username → DN --------------------------------------------------------------------------

    async def lookup_multi(self, key: str) -> list[str]:
        if self.dn_template:
            raise DirectoryError(f"{MOD_NAME}: lookups require search config but dn_template is used")
        if not key:
            return []
        try:
            dn = await self._in_thread(lambda: self._run(lambda c: self._search_dn(c, key)))
        except DirectoryError as e:
            raise DirectoryError(f"{MOD_NAME}: {e}") from None
        return [dn] if dn is not None else []


def _bind(conn: ldap3.Connection, method: str, dn: str, password: str) -> bool:
    """A bind on an open connection; False when the server refuses it."""
    conn.authentication, conn.user, conn.password = method, dn, password
    conn.sasl_mechanism = None
    if conn.closed:
        raise _Broken("connection closed")
    return bool(conn.bind(read_server_info=False))


def _close(conn: ldap3.Connection) -> None:
    with contextlib.suppress(Exception):  # closing a dead connection may fail in any way
        conn.unbind()
