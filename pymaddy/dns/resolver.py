"""An asyncio stub resolver on dnspython, shared by every check and outbound delivery.

Why not `dns.asyncresolver` directly: we need the AD bit of each answer (DANE,
RFC 7671 §4), negative caching bounded by the SOA minimum (RFC 2308 §5), a
bounded cache and maddy's error classification (SERVFAIL/timeout are
temporary, everything else is permanent), all in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
from dns import asyncquery

# RFC 2308 §5 caps negative caching at the SOA minimum; we cap that again so a
# zone typo does not stick for hours.
NEGATIVE_TTL_CAP = 300
MAX_TTL = 86400
CACHE_SIZE = 10000
EDNS_PAYLOAD = 1232  # DNS flag day 2020: avoids fragmentation, larger answers go over TCP
MAX_CNAME_CHAIN = 8


class DNSError(Exception):
    """A lookup failure. `temporary` follows Go's net.DNSError.IsTemporary as maddy relies on it:
    SERVFAIL and timeouts are temporary, malformed names and other rcodes permanent."""

    def __init__(self, message: str, temporary: bool, name: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.temporary = temporary
        self.name = name
        # timeout | servfail | network | rcode | invalid-name | cname-loop
        self.kind = kind


@dataclass(frozen=True)
class Answer:
    """The records of one lookup (CNAMEs already followed) and whether they were validated.

    `authenticated` is the AD bit of the response (RFC 4035 §3.2.3): meaningful only when
    the configured server is a trusted validating resolver (RFC 6698 §4.1). `nxdomain`
    distinguishes NXDOMAIN from NODATA for callers that care (e.g. the SPF void lookup count)."""

    records: tuple[dns.rdata.Rdata, ...]
    authenticated: bool = False
    nxdomain: bool = False
    ttl: int = 0
    cname: str = ""  # the canonical name when a CNAME chain was followed


@dataclass
class _Entry:
    answer: Answer
    expires: float


@dataclass
class Stats:
    """Counters for tests and metrics."""

    queries: int = 0  # packets sent (UDP + TCP)
    cache_hits: int = 0
    tcp_fallbacks: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _host(name: dns.name.Name) -> str:
    """A domain name as text without the final dot ("." for the root, as in a null MX)."""
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True)


def _default_nameservers() -> list[tuple[str, int]]:
    """The servers of /etc/resolv.conf (dnspython reads it); loopback when there is none."""
    try:
        res = dns.resolver.Resolver()
    except (dns.resolver.NoResolverConfiguration, OSError):
        return [("127.0.0.1", 53)]
    out = [(str(ns), int(res.port)) for ns in res.nameservers]
    return out or [("127.0.0.1", 53)]


class Resolver:
    """Queries the configured servers in order; answers are cached by (name, type)."""

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        timeout: float = 5.0,
        cache_size: int = CACHE_SIZE,
        negative_ttl_cap: int = NEGATIVE_TTL_CAP,
    ) -> None:
        self.nameservers = list(nameservers) if nameservers is not None else _default_nameservers()
        self.timeout = timeout
        self.cache_size = cache_size
        self.negative_ttl_cap = negative_ttl_cap
        self.stats = Stats()
        self._cache: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Task[Answer]] = {}
        # (name as asked, type as asked) -> cache key: a cache hit then needs no name parsing
        self._keys: dict[tuple[str, int | str], tuple[str, int]] = {}

    # -- cache -------------------------------------------------------------------------

    def _cache_get(self, key: tuple[str, int]) -> Answer | None:
        ent = self._cache.get(key)
        if ent is None:
            return None
        if ent.expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        self.stats.cache_hits += 1
        return ent.answer

    def _cache_put(self, key: tuple[str, int], ans: Answer) -> None:
        if ans.ttl <= 0:
            return
        self._cache[key] = _Entry(ans, time.monotonic() + ans.ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def flush(self) -> None:
        self._cache.clear()

    # -- transport ---------------------------------------------------------------------

    async def _exchange(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """Send one query to each server in turn until one answers; UDP, then TCP on TC (RFC 7766 §5)."""
        last: DNSError | None = None
        for host, port in self.nameservers:
            q = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
            q.flags |= dns.flags.AD  # ask for the AD bit without DO (RFC 6840 §5.7)
            try:
                self.stats.queries += 1
                resp = await asyncquery.udp(q, host, timeout=self.timeout, port=port, ignore_unexpected=True)
                if resp.flags & dns.flags.TC:
                    self.stats.tcp_fallbacks += 1
                    self.stats.queries += 1
                    resp = await asyncquery.tcp(q, host, timeout=self.timeout, port=port)
            except dns.exception.Timeout:
                last = DNSError(f"lookup {_host(qname)}: i/o timeout", True, _host(qname), "timeout")
                continue
            except (OSError, EOFError, dns.exception.DNSException) as e:
                last = DNSError(f"lookup {_host(qname)}: {e}", True, _host(qname), "network")
                continue
            rcode = resp.rcode()
            if rcode == dns.rcode.SERVFAIL:
                last = DNSError(f"lookup {_host(qname)}: server misbehaving", True, _host(qname), "servfail")
                continue
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                text = f"lookup {_host(qname)}: server misbehaving ({dns.rcode.to_text(rcode)})"
                last = DNSError(text, False, _host(qname), "rcode")
                continue
            return resp
        raise last or DNSError(f"lookup {_host(qname)}: no nameservers", True, _host(qname), "network")

    def _negative_ttl(self, resp: dns.message.Message) -> int:
        """RFC 2308 §5: min(SOA TTL, SOA MINIMUM), capped; no SOA → not cached."""
        for rrset in resp.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                soa: Any = rrset[0]
                return int(min(rrset.ttl, soa.minimum, self.negative_ttl_cap))
        return 0

    async def lookup(self, name: str, rdtype: int | str) -> Answer:
        """Records of `rdtype` at `name`, CNAMEs followed. NXDOMAIN/NODATA → empty Answer.

        Raises DNSError (temporary for SERVFAIL/timeouts)."""
        asked = (name, rdtype)
        known = self._keys.get(asked)
        if known is not None:
            cached = self._cache_get(known)
            if cached is not None:
                return cached
        rdt = dns.rdatatype.RdataType.make(rdtype)
        try:
            if not name.strip("."):
                raise dns.name.EmptyLabel
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError) as e:
            raise DNSError(f"lookup {name}: invalid domain name ({e})", False, name, "invalid-name") from None
        key = (qname.to_text().lower(), int(rdt))
        if len(self._keys) >= self.cache_size:
            self._keys.clear()
        self._keys[asked] = key
        cached = self._cache_get(key)
        if cached is not None:
            return cached
        # Concurrent identical questions share one query (SPF, DKIM and DMARC of one
        # message often ask the same thing at the same time). The query runs as its own
        # task so a cancelled caller does not cancel it for the others.
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._resolve_and_cache(key, qname, rdt))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def cached(self, name: str, rdtype: int | str) -> Answer | None:
        """The answer `lookup(name, rdtype)` would give from the cache, or None when it would
        have to ask (or fail): a caller can then skip creating a task for the lookup."""
        known = self._keys.get((name, rdtype))
        return self._cache_get(known) if known is not None else None

    def _done(self, key: tuple[str, int], task: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter re-raises it

    async def _resolve_and_cache(
        self, key: tuple[str, int], qname: dns.name.Name, rdt: dns.rdatatype.RdataType
    ) -> Answer:
        ans = await self._resolve(qname, rdt)
        self._cache_put(key, ans)
        return ans

    async def _resolve(self, qname: dns.name.Name, rdt: dns.rdatatype.RdataType) -> Answer:
        """Query and follow CNAMEs (RFC 1034 §3.6.2): within a response first, re-asking for a
        target the server did not answer for (an authoritative server stops at its zone)."""
        target = qname
        ad = True
        ttl = MAX_TTL
        hops = 0
        while True:
            resp = await self._exchange(target, rdt)
            ad = ad and bool(resp.flags & dns.flags.AD)
            moved = False
            while True:
                rrset = resp.get_rrset(resp.answer, target, dns.rdataclass.IN, rdt)
                if rrset is not None:
                    cname = _host(target) if target != qname else ""
                    return Answer(tuple(rrset), ad, False, min(ttl, rrset.ttl), cname)
                cn = resp.get_rrset(resp.answer, target, dns.rdataclass.IN, dns.rdatatype.CNAME)
                if cn is None or rdt == dns.rdatatype.CNAME:
                    break
                hops += 1
                if hops > MAX_CNAME_CHAIN:
                    raise DNSError(f"lookup {_host(qname)}: CNAME chain too long", False, _host(qname), "cname-loop")
                ttl = min(ttl, cn.ttl)
                target = cn[0].target
                moved = True
            negative = any(r.rdtype == dns.rdatatype.SOA for r in resp.authority)
            if moved and resp.rcode() == dns.rcode.NOERROR and not negative:
                continue  # the chain left the server's zone: ask again for the target
            neg = min(ttl, self._negative_ttl(resp))
            return Answer((), ad, resp.rcode() == dns.rcode.NXDOMAIN, neg)

    # -- typed helpers -------------------------------------------------------------------

    async def txt(self, name: str) -> list[str]:
        """Each TXT record's strings joined (RFC 7208 §3.3); undecodable bytes replaced."""
        return [b.decode("utf-8", "replace") for b in await self.txt_bytes(name)]

    def txt_cached(self, name: str) -> list[str] | None:
        """txt() from the cache only; None when not cached."""
        ans = self.cached(name, "TXT")
        if ans is None:
            return None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in ans.records]  # type: ignore[attr-defined]

    async def txt_bytes(self, name: str) -> list[bytes]:
        ans = await self.lookup(name, "TXT")
        return [b"".join(r.strings) for r in ans.records]  # type: ignore[attr-defined]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) pairs sorted by preference (RFC 5321 §5.1); a null MX (RFC 7505)
        shows as (0, ".")."""
        ans = await self.lookup(name, "MX")
        out = [(int(r.preference), _host(r.exchange)) for r in ans.records]  # type: ignore[attr-defined]
        return sorted(out, key=lambda p: p[0])

    async def a(self, name: str) -> list[str]:
        ans = await self.lookup(name, "A")
        return [str(r.address) for r in ans.records]  # type: ignore[attr-defined]

    async def aaaa(self, name: str) -> list[str]:
        ans = await self.lookup(name, "AAAA")
        return [str(r.address) for r in ans.records]  # type: ignore[attr-defined]

    async def addrs(self, name: str) -> list[str]:
        """A and AAAA together (like Go's LookupHost); fails only when both fail."""
        res = await asyncio.gather(self.a(name), self.aaaa(name), return_exceptions=True)
        out: list[str] = []
        errs: list[DNSError] = []
        for r in res:
            if isinstance(r, DNSError):
                errs.append(r)
            elif isinstance(r, BaseException):
                raise r
            else:
                out.extend(r)
        if len(errs) == 2 or (errs and not out):
            raise errs[0]
        return out

    async def ptr(self, ip: str) -> list[str]:
        """Reverse names of an IP address (without the final dot)."""
        try:
            rev = dns.reversename.from_address(ip)
        except (ValueError, dns.exception.DNSException) as e:
            raise DNSError(f"lookup {ip}: unrecognized address ({e})", False, ip, "invalid-name") from None
        ans = await self.lookup(rev.to_text(), "PTR")
        return [_host(r.target) for r in ans.records]  # type: ignore[attr-defined]

    async def tlsa(self, name: str) -> tuple[list[tuple[int, int, int, bytes]], bool]:
        """TLSA records (usage, selector, mtype, data) and the AD bit (RFC 6698 §2, RFC 7672 §2.2)."""
        ans = await self.lookup(name, "TLSA")
        recs = [
            (int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))  # type: ignore[attr-defined]
            for r in ans.records
        ]
        return recs, ans.authenticated


def parse_hostport(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or a bare host (port 53)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest.lstrip(":") or 53)
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host or "127.0.0.1", int(port or 53)
    return value, 53


def from_options(dns_override: str | None, timeout: float = 5.0) -> Resolver:
    """The resolver for `-debug.dnsoverride HOST:PORT` (every query goes there) or /etc/resolv.conf."""
    if dns_override:
        return Resolver([parse_hostport(dns_override)], timeout=timeout)
    return Resolver(timeout=timeout)


__all__ = ["Answer", "DNSError", "Resolver", "from_options", "parse_hostport"]
