"""`mx_auth { … }` and its policies: how target.remote decides an MX and its TLS are trustworthy.

Each policy gives, per delivery, two verdicts (maddy's MXAuthPolicy): `check_mx`
before connecting (may raise the *MX level*: none < mtasts < dnssec) and
`check_conn` after the TLS ladder (may raise the *TLS level*: none < encrypted
< authenticated). Either can refuse with an SMTPError, which makes target.remote
try the next MX. The group applies its members in maddy's fixed order:
mtasts, sts_preload, dane, dnssec, local_policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pymaddy import dane, mtasts
from pymaddy.dns import DNSError, Resolver, resolver_for
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import MsgMeta
from pymaddy.runtime.module import Module, ModuleError, RuntimeContext

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance

__all__ = [
    "ConnState",
    "DANEPolicy",
    "DNSSECPolicy",
    "DeliveryPolicy",
    "LocalPolicy",
    "MTASTSPolicy",
    "MXAuthPolicy",
    "MXLevel",
    "PolicyGroup",
    "STSPreloadPolicy",
    "TLSLevel",
    "ad_trusted",
]

T = TypeVar("T")
ORDER = ("mx_auth.mtasts", "mx_auth.sts_preload", "mx_auth.dane", "mx_auth.dnssec", "mx_auth.local_policy")
REFRESH_INTERVAL = 12 * 3600.0


class TLSLevel(enum.IntEnum):
    NONE = 0
    ENCRYPTED = 1
    AUTHENTICATED = 2

    def __str__(self) -> str:
        return self.name.lower()


class MXLevel(enum.IntEnum):
    NONE = 0
    MTASTS = 1
    DNSSEC = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class ConnState:
    """What the TLS ladder produced for one MX connection."""

    handshake_complete: bool = False
    verified: bool = False  # PKIX chain and host name verified
    chain: list[bytes] = field(default_factory=list)  # DER, leaf first
    server_name: str = ""


def ad_trusted(resolver: Resolver) -> bool:
    """RFC 6698 §4.1 / RFC 7672 §2.1: the AD bit means something only from a validating resolver we
    trust; as maddy, only resolvers on loopback (127.0.0.0/8, ::1) are trusted."""
    try:
        return bool(resolver.nameservers) and all(
            ipaddress.ip_address(host).is_loopback for host, _ in resolver.nameservers
        )
    except ValueError:
        return False


class DeliveryPolicy:
    """One policy's state for one delivery (maddy's DeliveryMXAuthPolicy). Defaults: no opinion."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    def prepare_domain(self, domain: str) -> None:
        """Start lookups for a recipient domain early (they overlap the MX lookup)."""

    def prepare_conn(self, mx: str) -> None:
        """Start lookups for an MX host early (they overlap connecting)."""

    async def check_mx(self, mx_level: MXLevel, domain: str, mx: str, dnssec: bool) -> MXLevel:
        return MXLevel.NONE

    async def check_conn(
        self, mx_level: MXLevel, tls_level: TLSLevel, domain: str, mx: str, state: ConnState
    ) -> TLSLevel:
        return TLSLevel.NONE

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()


class MXAuthPolicy(ABC):
    @abstractmethod
    def start_delivery(self, meta: MsgMeta) -> DeliveryPolicy: ...


class PolicyGroup(Module):
    """`mx_auth NAME { … }` / inline `mx_auth { … }`: its members in maddy's order."""

    def log_name(self) -> str:
        return self.inst.instance or "mx_auth"

    def policies(self) -> list[MXAuthPolicy]:
        members: list[ModuleInstance] = list(self.settings.get("members") or [])
        members.sort(key=lambda i: ORDER.index(i.schema.name) if i.schema.name in ORDER else len(ORDER))
        out: list[MXAuthPolicy] = []
        for inst in members:
            obj = self.ctx.module(inst)
            if not isinstance(obj, MXAuthPolicy):
                raise ModuleError(f"{inst.label} is not an MX authentication policy")
            out.append(obj)
        return out


# -- mtasts -----------------------------------------------------------------------------------


class MTASTSPolicy(Module, MXAuthPolicy):
    """RFC 8461 through pymaddy.mtasts; the cache is refreshed at start and every 12 hours."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.resolver = resolver_for(ctx)
        store: mtasts.Store
        if self.settings.get("cache") == "ram":
            store = mtasts.RAMStore()
        else:
            directory = str(self.settings.get("fs_dir") or "mtasts_cache")
            self.fs_dir = os.path.join(ctx.state_dir, directory)  # maddy runs inside state_dir
            store = mtasts.FSStore(self.fs_dir)
        self.cache = mtasts.Cache(store, self.resolver.txt, self._fetch)
        self._updater: asyncio.Task[None] | None = None

    async def _fetch(self, domain: str) -> mtasts.Policy:
        # ssl.create_default_context honours SSL_CERT_FILE / SSL_CERT_DIR (tests point it at their CA)
        return await mtasts.fetch_policy(domain, self.resolver.addrs, ssl.create_default_context(), timeout=60.0)

    async def start(self) -> None:
        if isinstance(self.cache.store, mtasts.FSStore):
            try:
                await asyncio.to_thread(os.makedirs, self.cache.store.dir, 0o700, True)
            except OSError as e:
                raise ModuleError(f"mx_auth.mtasts: {e}") from None
        if not self.ctx.worker:  # the supervisor refreshes the cache (one fetch per domain, not per process)
            self._updater = asyncio.get_running_loop().create_task(self._update_loop())

    async def _update_loop(self) -> None:
        while True:
            self.log.debug("updating MTA-STS cache...")
            try:
                await self.cache.refresh()
            except Exception as e:  # the updater must outlive a bad entry
                self.log.error("MTA-STS cache update error", err=e)
            self.log.debug("updating MTA-STS cache... done!")
            await asyncio.sleep(REFRESH_INTERVAL)

    async def stop(self) -> None:
        if self._updater is not None:
            self._updater.cancel()
            with contextlib.suppress(BaseException):
                await self._updater
            self._updater = None

    def start_delivery(self, meta: MsgMeta) -> DeliveryPolicy:
        return _MTASTSDelivery(self)


class _MTASTSDelivery(DeliveryPolicy):
    def __init__(self, p: MTASTSPolicy) -> None:
        super().__init__()
        self.p = p
        self.policies: dict[str, asyncio.Task[mtasts.Policy]] = {}

    def prepare_domain(self, domain: str) -> None:
        if domain not in self.policies:
            self.policies[domain] = self._spawn(self.p.cache.get(domain))

    async def _policy(self, domain: str) -> mtasts.Policy | None:
        self.prepare_domain(domain)
        try:
            return await asyncio.shield(self.policies[domain])
        except Exception as e:
            self.p.log.debug("MTA-STS error", err=str(e), domain=domain)
            return None

    async def check_mx(self, mx_level: MXLevel, domain: str, mx: str, dnssec: bool) -> MXLevel:
        policy = await self._policy(domain)
        if policy is None:
            return MXLevel.NONE
        if not policy.match(mx):
            if policy.mode == "enforce":  # RFC 8461 §4.1, §5
                raise SMTPError(550, (5, 7, 0), "Failed to establish the MX record authenticity (MTA-STS)")
            self.p.log.msg("MX does not match published non-enforced MTA-STS policy", mx=mx, domain=domain)
            return MXLevel.NONE
        return MXLevel.MTASTS

    async def check_conn(
        self, mx_level: MXLevel, tls_level: TLSLevel, domain: str, mx: str, state: ConnState
    ) -> TLSLevel:
        policy = await self._policy(domain)
        if policy is None or policy.mode != "enforce":
            return TLSLevel.NONE
        if not state.handshake_complete:  # RFC 8461 §4.2: TLS is mandatory in enforce mode
            raise SMTPError(451, (4, 7, 1), "TLS is required but unavailable or failed (MTA-STS)")
        if not state.verified:
            raise SMTPError(
                451,
                (4, 7, 1),
                "Recipient server TLS certificate is not trusted but authentication is required by MTA-STS",
                tls_level=str(tls_level),
            )
        return TLSLevel.NONE


# -- sts_preload ------------------------------------------------------------------------------


class STSPreloadPolicy(Module, MXAuthPolicy):
    """Deprecated in maddy: the EFF STARTTLS preload list expired. Kept as a no-op."""

    async def start(self) -> None:
        self.log.printf("sts_preload module is deprecated and is no-op as the list is expired and unmaintained")

    def start_delivery(self, meta: MsgMeta) -> DeliveryPolicy:
        return _PassThrough()


class _PassThrough(DeliveryPolicy):
    async def check_mx(self, mx_level: MXLevel, domain: str, mx: str, dnssec: bool) -> MXLevel:
        return mx_level

    async def check_conn(
        self, mx_level: MXLevel, tls_level: TLSLevel, domain: str, mx: str, state: ConnState
    ) -> TLSLevel:
        return tls_level


# -- dnssec -----------------------------------------------------------------------------------


class DNSSECPolicy(Module, MXAuthPolicy):
    """An MX RRset with a trusted AD bit raises the MX level to dnssec."""

    def log_name(self) -> str:
        return "mx_auth.dnssec"

    def start_delivery(self, meta: MsgMeta) -> DeliveryPolicy:
        return _DNSSECDelivery()


class _DNSSECDelivery(DeliveryPolicy):
    async def check_mx(self, mx_level: MXLevel, domain: str, mx: str, dnssec: bool) -> MXLevel:
        return MXLevel.DNSSEC if dnssec else MXLevel.NONE


# -- dane -------------------------------------------------------------------------------------


class DANEPolicy(Module, MXAuthPolicy):
    """RFC 7672 through pymaddy.dane, with TLSA records only from authenticated answers."""

    def log_name(self) -> str:
        return "mx_auth.dane"

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.resolver = resolver_for(ctx)

    async def start(self) -> None:
        if not ad_trusted(self.resolver):
            self.log.msg("DANE is a no-op: the DNS resolver is not on loopback, its AD bit is not trusted")

    def start_delivery(self, meta: MsgMeta) -> DeliveryPolicy:
        return _DANEDelivery(self)

    async def discover(self, mx: str) -> list[dane.TLSA]:
        """RFC 7672 §2.2.1-2.2.2: TLSA at `_25._tcp` of the MX (or of its CNAME target when that
        chain is authenticated), used only when the address records are authenticated too."""
        res = self.resolver
        if not ad_trusted(res):
            return []
        mx = mx.rstrip(".")
        addr = await res.lookup(mx, "A")
        if not addr.records:
            addr = await res.lookup(mx, "AAAA")
        if not addr.records:
            raise DNSError(f"lookup {mx}: no address associated with the host", False, mx, "nodata")
        rname = addr.cname or mx
        if not addr.authenticated:
            if rname == mx:
                self.log.debug("skipping DANE: non-authenticated address records", mx=mx)
                return []
            cname = await res.lookup(mx, "CNAME")
            if not cname.authenticated:
                self.log.debug("skipping DANE: non-authenticated CNAME record", mx=mx)
                return []
        if rname != mx:
            recs, ad = await res.tlsa(f"_25._tcp.{rname}")
            if ad and recs:
                return recs
        recs, ad = await res.tlsa(f"_25._tcp.{mx}")
        if not ad:
            self.log.debug("ignoring non-authenticated TLSA records", mx=mx)
            return []
        return recs


class _DANEDelivery(DeliveryPolicy):
    def __init__(self, p: DANEPolicy) -> None:
        super().__init__()
        self.p = p
        self.tlsa: dict[str, asyncio.Task[list[dane.TLSA]]] = {}

    def prepare_conn(self, mx: str) -> None:
        if mx not in self.tlsa:
            self.tlsa[mx] = self._spawn(self.p.discover(mx))

    async def check_conn(
        self, mx_level: MXLevel, tls_level: TLSLevel, domain: str, mx: str, state: ConnState
    ) -> TLSLevel:
        self.prepare_conn(mx)
        try:
            recs = await asyncio.shield(self.tlsa[mx])
        except DNSError as e:
            if e.kind == "nodata":
                return TLSLevel.NONE
            raise SMTPError(451, (4, 4, 3), "DNS error during DANE lookup", reason=str(e), remote_server=mx) from e
        recs = dane.usable(recs)
        if not recs:
            return TLSLevel.NONE
        if not state.handshake_complete:  # RFC 7672 §2.2: usable TLSA records make TLS mandatory
            raise SMTPError(
                550, (5, 7, 1), "TLS is required but unsupported or failed (enforced by DANE)", remote_server=mx
            )
        verdict = await asyncio.to_thread(dane.verify, recs, state.chain, state.server_name or mx)
        if verdict is dane.Verdict.AUTHENTICATED:
            return TLSLevel.AUTHENTICATED
        if verdict is dane.Verdict.NO_MATCH:
            raise SMTPError(550, (5, 7, 0), "No matching TLSA records", remote_server=mx)
        return TLSLevel.NONE


# -- local_policy -----------------------------------------------------------------------------


class LocalPolicy(Module, MXAuthPolicy):
    """Minimum levels; failures are temporary so a fixed MX or DNS can still get the mail."""

    def log_name(self) -> str:
        return "mx_auth.local_policy"

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.min_tls = TLSLevel[str(self.settings.get("min_tls_level") or "encrypted").upper()]
        self.min_mx = MXLevel[str(self.settings.get("min_mx_level") or "none").upper()]

    def start_delivery(self, meta: MsgMeta) -> DeliveryPolicy:
        return _LocalDelivery(self)


class _LocalDelivery(DeliveryPolicy):
    def __init__(self, p: LocalPolicy) -> None:
        super().__init__()
        self.p = p

    async def check_mx(self, mx_level: MXLevel, domain: str, mx: str, dnssec: bool) -> MXLevel:
        if mx_level < self.p.min_mx:
            raise SMTPError(
                451,
                (4, 7, 0),
                "Failed to establish the MX record authenticity",
                mx_level=str(mx_level),
                required_mx_level=str(self.p.min_mx),
            )
        return MXLevel.NONE

    async def check_conn(
        self, mx_level: MXLevel, tls_level: TLSLevel, domain: str, mx: str, state: ConnState
    ) -> TLSLevel:
        if tls_level < self.p.min_tls:
            raise SMTPError(
                451,
                (4, 7, 1),
                "TLS it not available or unauthenticated but required",
                tls_level=str(tls_level),
                required_tls_level=str(self.p.min_tls),
            )
        return TLSLevel.NONE
