"""`check.dnsbl`: DNS blocklists (RFC 5782), judged the way maddy 0.9.4's code does (spec §B.4).

* Lookups run only as an *early check* (`check_conn_early`, at EHLO) on the
  client IP and EHLO name; the result is remembered for the connection and
  reported by the message's connection stage. So a dnsbl that is not in an
  endpoint's root-level `check` block never looks anything up (maddy).
* IP lists: the reversed octets (IPv4) or nibbles (IPv6) under the zone
  (RFC 5782 §2.1, §2.4), asked for A and AAAA like Go's LookupIPAddr. An
  IPv4-mapped IPv6 address counts as IPv4. Domain lists (`ehlo`, `mailfrom`):
  `NAME.ZONE` (RFC 5782 §2.2); a bracketed address literal as EHLO is skipped.
  A list that lists the client IP is not asked about the EHLO name.
* Which answers count: `response` rules if any (each rule counts once, its
  score and first message are used), else for IP lists the `responses` CIDRs,
  and for domain lists every answer (maddy ignores `responses` there).
  A listing adds the rules' score, or the list's `score` when that sum is 0.
* Sum ≥ `reject_threshold` → reject, ≥ `quarantine_threshold` → quarantine, both
  `554 5.7.0 Client identity is listed in the used DNSBL` or the custom
  messages joined with "; ". With `check_early`, a reject refuses the EHLO itself.
* Any lookup error other than "not found": reject `451 4.7.0` (temporary,
  e.g. SERVFAIL/timeout) or `554 5.7.0` `DNS error during policy check`.
* Inline zones are shortcut lists: client_ipv4 only, score 0 (so they only count
  through response rules — never, in practice; maddy's behaviour).
* At start every list is tested in the background for the RFC 5782 §5 test
  entries (127.0.0.2 listed, 127.0.0.1 not; `test` listed, `invalid` not);
  problems are only logged. As in maddy, the IPv6 test addresses
  ::FFFF:7F00:2/1 are IPv4-mapped and so are asked as IPv4.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymaddy.checks.schema import DNSBLList, DNSBLResponseRule
from pymaddy.dns import DNSError, Resolver, resolver_for
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import MsgMeta
from pymaddy.pipeline.interfaces import OK, Check, CheckResult, CheckState, EarlyCheck
from pymaddy.runtime.module import Module

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

CHECK_NAME = "dnsbl"
DEFAULT_MESSAGE = "Client identity is listed in the used DNSBL"
# Early results kept per connection (client IP, port) until its messages ask for them.
CONN_RESULTS_MAX = 10000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Listed:
    """One list's verdict about one identity (maddy's ListedErr)."""

    identity: str
    zone: str
    reason: str  # the TXT explanation, else the answers
    score: int  # from response rules; 0 → the list's own score applies
    message: str = ""


def normalize_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses are treated as IPv4 (Go's IP.To4)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def query_name(ip: IPAddress) -> str:
    """The DNSxL key for `ip`, without the zone: reversed octets or nibbles (RFC 5782 §2.1, §2.4)."""
    ip = normalize_ip(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


def _match_rules(addrs: list[IPAddress], rules: tuple[DNSBLResponseRule, ...]) -> tuple[int, list[str], list[str]]:
    """(score, messages, matching answers); each rule counts at most once."""
    score = 0
    messages: list[str] = []
    matched: list[str] = []
    used: set[int] = set()
    for addr in addrs:
        for i, rule in enumerate(rules):
            if i in used:
                continue
            if any(addr.version == net.version and addr in net for net in rule.networks):
                score += rule.score
                if rule.message:
                    messages.append(rule.message)
                matched.append(str(addr))
                used.add(i)
    return score, messages, matched


def _parse_addrs(answers: list[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for a in answers:
        try:
            out.append(ipaddress.ip_address(a))
        except ValueError:
            continue
    return out


async def _lookup(resolver: Resolver, query: str) -> list[str]:
    """A and AAAA answers; a name that is not a valid domain name counts as not found (Go's
    LookupHost reports it as "no such host"), other failures raise DNSError."""
    try:
        return await resolver.addrs(query)
    except DNSError as e:
        if e.kind == "invalid-name":
            return []
        raise


async def _explain(resolver: Resolver, query: str, fallback: list[str]) -> str:
    """The list's TXT explanation (RFC 5782 §2.1), else the answers themselves."""
    try:
        txts = await resolver.txt(query)
    except DNSError:
        txts = []
    return "; ".join(txts) if txts else "; ".join(fallback)


async def check_ip(resolver: Resolver, lst: DNSBLList, ip: IPAddress) -> Listed | None:
    """Is `ip` listed on `lst`? Raises DNSError for lookup failures other than not-found."""
    ip = normalize_ip(ip)
    if isinstance(ip, ipaddress.IPv6Address) and not lst.client_ipv6:
        return None
    if isinstance(ip, ipaddress.IPv4Address) and not lst.client_ipv4:
        return None
    query = query_name(ip) + "." + lst.zone
    addrs = _parse_addrs(await _lookup(resolver, query))
    if not addrs:
        return None
    score, message = 0, ""
    if lst.rules:
        score, messages, hits = _match_rules(addrs, lst.rules)
        if not hits:
            return None
        message = messages[0] if messages else ""
    elif lst.responses:
        hits = [str(a) for a in addrs if any(a.version == n.version and a in n for n in lst.responses)]
        if not hits:
            return None
    else:
        hits = [str(a) for a in addrs]
    return Listed(str(ip), lst.zone, await _explain(resolver, query, hits), score, message)


async def check_domain(resolver: Resolver, lst: DNSBLList, domain: str) -> Listed | None:
    """Is `domain` listed on the domain list `lst` (RFC 5782 §2.2)?"""
    query = domain + "." + lst.zone
    answers = await _lookup(resolver, query)
    if not answers:
        return None
    score, message = 0, ""
    hits = answers
    if lst.rules:
        score, messages, hits = _match_rules(_parse_addrs(answers), lst.rules)
        if not hits:
            return None
        message = messages[0] if messages else ""
    return Listed(domain, lst.zone, await _explain(resolver, query, hits), score, message)


def _domain_of(addr: str) -> str:
    local, at, domain = addr.rpartition("@")
    return domain if at and local else ""


class DNSBL(Module, Check, EarlyCheck):
    """check.dnsbl: lists, scores and thresholds; see the module docstring."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.lists: list[DNSBLList] = list(self.settings.get("lists") or [])
        self.check_early = bool(self.settings.get("check_early") or False)
        self.quarantine_threshold = int(self.settings.get("quarantine_threshold", 1))
        self.reject_threshold = int(self.settings.get("reject_threshold", 9999))
        self.resolver: Resolver | None = None
        self.conn_results: OrderedDict[tuple[str, int], CheckResult] = OrderedDict()
        self.self_tests: set[asyncio.Task[None]] = set()

    def get_resolver(self) -> Resolver:
        if self.resolver is None:
            self.resolver = resolver_for(self.ctx)
        return self.resolver

    async def start(self) -> None:
        self.get_resolver()
        # RFC 5782 §7: check the test entries; DNS is slow, so do not hold up start-up.
        for lst in self.lists:
            task = asyncio.get_running_loop().create_task(self.test_list(lst))
            self.self_tests.add(task)
            task.add_done_callback(self.self_tests.discard)

    async def stop(self) -> None:
        for task in list(self.self_tests):
            task.cancel()
        if self.self_tests:
            await asyncio.gather(*self.self_tests, return_exceptions=True)

    # -- self-test --------------------------------------------------------------------------

    async def test_list(self, lst: DNSBLList) -> None:
        """RFC 5782 §5 test entries; every finding is only logged (many lists lack them)."""
        self.log.debug("testing list for RFC 5782 requirements...", list=lst.zone)
        res = self.get_resolver()
        # (enabled, must be listed, must not be listed, is an IP list test, how the log names them)
        tests = (
            (lst.client_ipv4, "127.0.0.2", "127.0.0.1", True, ("127.0.0.2", "127.0.0.1")),
            (lst.client_ipv6, "::FFFF:7F00:2", "::FFFF:7F00:1", True, ("::FFFF:7F00:2", "::FFFF:7F00:1")),
            (lst.ehlo or lst.mailfrom, "test", "invalid", False, ("'test' TLD", "'invalid' TLD")),
        )
        for enabled, must, must_not, is_ip, (must_text, must_not_text) in tests:
            if not enabled:
                continue
            try:
                if is_ip:
                    hit = await check_ip(res, lst, ipaddress.ip_address(must))
                else:
                    hit = await check_domain(res, lst, must)
                if hit is None:
                    self.log.msg(f"List does not contain a test record for {must_text}", list=lst.zone)
                if is_ip:
                    bad = await check_ip(res, lst, ipaddress.ip_address(must_not))
                else:
                    bad = await check_domain(res, lst, must_not)
                if bad is not None:
                    self.log.msg(f"List contains a record for {must_not_text}", list=lst.zone)
            except DNSError as e:
                self.log.error("lookup error, bailing out", err=e, list=lst.zone)
                return

    # -- evaluation -------------------------------------------------------------------------

    async def check_list(self, lst: DNSBLList, ip: IPAddress, ehlo: str, mail_from: str) -> Listed | None:
        """maddy's checkList: the IP first, then the EHLO name, then the MAIL FROM domain."""
        res = self.get_resolver()
        if lst.client_ipv4 or lst.client_ipv6:
            hit = await check_ip(res, lst, ip)
            if hit is not None:
                return hit
        if lst.ehlo and ehlo:
            if ehlo.startswith("[") and ehlo.endswith("]"):
                return None
            hit = await check_domain(res, lst, ehlo)
            if hit is not None:
                return hit
        if lst.mailfrom and mail_from:
            domain = _domain_of(mail_from)
            if not domain:
                return None  # <postmaster> or <>
            if lst.ehlo and domain.rstrip(".").lower() == ehlo.rstrip(".").lower():
                return None  # already asked
            return await check_domain(res, lst, domain)
        return None

    async def check_lists(self, ip: IPAddress, ehlo: str, mail_from: str = "") -> CheckResult:
        """Ask every list at once and weigh the listings against the thresholds."""
        outcomes = await asyncio.gather(
            *(self.check_list(lst, ip, ehlo, mail_from) for lst in self.lists), return_exceptions=True
        )
        score = 0
        listed_on: list[str] = []
        reasons: list[str] = []
        messages: list[str] = []
        for lst, out in zip(self.lists, outcomes, strict=True):
            if isinstance(out, DNSError):
                err = SMTPError(
                    451 if out.temporary else 554,
                    (4 if out.temporary else 5, 7, 0),
                    "DNS error during policy check",
                    check=CHECK_NAME,
                    reason=str(out),
                    list=lst.zone,
                )
                return CheckResult(reject=err, reason=err)
            if isinstance(out, BaseException):
                raise out
            if out is None:
                continue
            listed_on.append(out.zone)
            reasons.append(out.reason)
            score += out.score if out.score != 0 else lst.score
            if out.message:
                messages.append(out.message)
        if not listed_on:
            return OK
        message = "; ".join(messages) if messages else DEFAULT_MESSAGE
        if score >= self.reject_threshold or score >= self.quarantine_threshold:
            err = SMTPError(
                554,
                (5, 7, 0),
                message,
                check=CHECK_NAME,
                reason="; ".join(reasons),
                list=", ".join(listed_on),
                listed_identity=str(ip),
                score=score,
            )
            if score >= self.reject_threshold:
                return CheckResult(reject=err, reason=err)
            return CheckResult(quarantine=True, reason=err)
        self.log.debug("listed, below thresholds", list=", ".join(listed_on), score=score)
        return OK

    # -- EarlyCheck / Check -----------------------------------------------------------------

    async def check_conn_early(self, meta: MsgMeta) -> SMTPError | None:
        conn = meta.conn
        try:
            ip = ipaddress.ip_address(conn.remote_ip) if not conn.is_unix else None
        except ValueError:
            ip = None
        if ip is None:
            self.log.msg("non-TCP/IP source", src_addr=conn.remote_ip or "unix", src_host=conn.helo)
            return None
        result = await self.check_lists(ip, conn.helo)
        if result.reject is not None and self.check_early:
            return result.reject
        key = (conn.remote_ip, conn.remote_port)
        self.conn_results[key] = result
        self.conn_results.move_to_end(key)
        while len(self.conn_results) > CONN_RESULTS_MAX:
            self.conn_results.popitem(last=False)
        return None

    def result_for(self, meta: MsgMeta) -> CheckResult:
        """The early result of the message's connection (OK when none ran for it)."""
        conn = meta.conn
        return self.conn_results.get((conn.remote_ip, conn.remote_port), OK)

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)


class _State(CheckState):
    def __init__(self, bl: DNSBL, meta: MsgMeta) -> None:
        self.bl = bl
        self.meta = meta

    async def check_connection(self) -> CheckResult:
        if not self.meta.conn.remote_ip and not self.meta.conn.is_unix:
            self.bl.log.msg("locally generated message, ignoring", msg_id=self.meta.id)
            return OK
        return self.bl.result_for(self.meta)


__all__ = ["DNSBL", "Listed", "check_domain", "check_ip", "query_name"]
