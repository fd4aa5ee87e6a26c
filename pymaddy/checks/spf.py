"""`check.spf`: RFC 7208 evaluation of the client IP against the MAIL FROM domain (spec §B.4, §I.2, §I.4).

Behaviour follows maddy 0.9.4's code (internal/check/spf):

* Evaluated for TCP clients only; a null sender is checked as `postmaster@<HELO>`
  (RFC 7208 §2.4). A sender that cannot be split or IDNA-encoded is rejected with
  `550 5.1.7 Malformed address`.
* `enforce_early yes`: evaluated and acted upon at MAIL FROM (connection stage).
* Default: the evaluation starts at MAIL FROM in the background and its result
  is applied at the end of DATA. If the From-header domain then has a DMARC
  policy other than `none`, the action is suppressed (DMARC decides; the A-R
  entry is still written) — whether or not the pipeline has `dmarc` on.
* Results → actions: fail → `fail_action` (quarantine), softfail, neutral, none,
  permerror → their actions (ignore) with `550 5.7.23 …`; temperror →
  `temperr_action` (ignore) with `451 4.7.23 …`. Pass never acts.
* Always one `spf=` Authentication-Results entry with `smtp.helo` and
  `smtp.mailfrom` (the MAIL FROM domain as received).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import time
from typing import TYPE_CHECKING

from pymaddy import dmarc
from pymaddy.checks.spf_eval import SPFResult, check_host
from pymaddy.dns import DNSError, Resolver, resolver_for
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import OK, AuthResult, Check, CheckResult, CheckState
from pymaddy.runtime.module import Module

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD_NAME = "check.spf"

# result → (action directive, code, enhanced code, message) — maddy's spfResult
_ACTIONS: dict[str, tuple[str, int, tuple[int, int, int], str]] = {
    "none": ("none_action", 550, (5, 7, 23), "No SPF policy"),
    "neutral": ("neutral_action", 550, (5, 7, 23), "Neutral SPF result is not permitted"),
    "fail": ("fail_action", 550, (5, 7, 23), "SPF authentication failed"),
    "softfail": ("softfail_action", 550, (5, 7, 23), "SPF authentication soft-failed"),
    "temperror": ("temperr_action", 451, (4, 7, 23), "SPF authentication failed with a temporary error"),
    "permerror": ("permerr_action", 550, (5, 7, 23), "SPF authentication failed with a permanent error"),
}


def split_address(addr: str) -> tuple[str, str]:
    """(local part, domain); ValueError for a malformed address. Bare `postmaster` has no domain."""
    if "@" not in addr:
        if addr.lower() == "postmaster":
            return addr, ""
        raise ValueError("malformed address")
    local, _, domain = addr.rpartition("@")
    if not local or not domain:
        raise ValueError("malformed address")
    return local, domain


def prepare_mail_from(addr: str) -> str:
    """The sender for check_host: domain in A-labels (RFC 7208 §4.3 needs a DNS name), and a
    non-ASCII local part dropped (the `%{l}` macro cannot carry it; §4.3 then uses postmaster)."""
    try:
        local, domain = split_address(addr)
        domain = domain.rstrip(".").encode("idna").decode("ascii") if domain else ""
    except (ValueError, UnicodeError):
        raise SMTPError(550, (5, 1, 7), "Malformed address", check="spf") from None
    if not local.isascii():
        local = ""
    return f"{local}@{domain}"


@functools.lru_cache(maxsize=1024)
def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


async def dmarc_policy(resolver: Resolver, from_domain: str) -> str | None:
    """The DMARC policy (`p=`, or `sp=` when found at the organizational domain) that applies
    to `from_domain` (RFC 7489 §6.6.3), or None without a usable record; the record is found as
    the pipeline's DMARC evaluation finds it (`pymaddy.dmarc.fetch_record`), from cached
    answers when they are all there. Raises DNSError or DMARCError."""
    found = dmarc.fetch_record_cached(resolver.txt_cached, from_domain)
    policy_domain, rec = await dmarc.fetch_record(resolver.txt, from_domain) if found is None else found
    if rec is None:
        return None
    if policy_domain.lower() != from_domain.lower() and rec.subdomain_policy:
        return rec.subdomain_policy
    return rec.policy


organizational_domain = dmarc.organizational_domain


RESULT_TTL = 30.0  # seconds a check_host() result is reused for the same (IP, sender, HELO)
RESULT_CACHE_MAX = 4096


class SPFCheck(Module, Check):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.enforce_early = bool(self.settings.get("enforce_early") or False)
        self.resolver: Resolver | None = None
        self._results: dict[tuple[str, str, str], tuple[float, SPFResult]] = {}

    async def start(self) -> None:
        if self.resolver is None:
            self.resolver = resolver_for(self.ctx)
        dmarc.preload()  # every message asks for its From domain's DMARC policy

    def get_resolver(self) -> Resolver:
        if self.resolver is None:
            self.resolver = resolver_for(self.ctx)
        return self.resolver

    def apply(self, setting: str, err: SMTPError, auth: AuthResult) -> CheckResult:
        """maddy's FailAction.Apply: the override replaces the reply; then reject/quarantine/ignore."""
        action = self.settings.get(setting)
        kind = getattr(action, "action", "ignore")
        override = getattr(action, "override", None)
        if override is not None:
            err = SMTPError(override.code, override.enhanced, override.message, check=MOD_NAME, reason=err.message)
        if kind == "reject":
            return CheckResult(reject=err, reason=err, auth_results=[auth])
        if kind == "quarantine":
            return CheckResult(quarantine=True, reason=err, auth_results=[auth])
        return CheckResult(reason=err, auth_results=[auth])

    def result(self, meta: MsgMeta, res: SPFResult) -> CheckResult:
        """The check result and `spf=` A-R entry (RFC 8601 §2.7.2) for one evaluation."""
        try:
            from_domain = split_address(meta.original_from)[1] if meta.original_from else ""
        except ValueError:
            from_domain = ""
        reason = res.reason or ("no policy" if res.result == "none" else "")
        auth = AuthResult("spf", res.result, reason, params={"smtp.helo": meta.conn.helo, "smtp.mailfrom": from_domain})
        if res.result == "pass":
            return CheckResult(auth_results=[auth])
        spec = _ACTIONS.get(res.result)
        if spec is None:
            err = SMTPError(550, (4, 7, 23), f"Unknown SPF status: {res.result}", check=MOD_NAME, reason=res.reason)
            return CheckResult(reason=err, auth_results=[auth])
        setting, code, enh, msg = spec
        return self.apply(setting, SMTPError(code, enh, msg, check=MOD_NAME, reason=res.reason), auth)

    def cached(self, ip: str, sender: str, helo: str) -> SPFResult | None:
        """A remembered check_host() result still within its RESULT_TTL, or None."""
        hit = self._results.get((ip, sender.lower(), helo.lower()))
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    async def evaluate(self, ip: str, sender: str, helo: str) -> SPFResult:
        """check_host(), with final results remembered for RESULT_TTL: a busy sender's messages
        share one evaluation (the DNS answers behind it are cached anyway)."""
        hit = self.cached(ip, sender, helo)
        if hit is not None:
            return hit
        key = (ip, sender.lower(), helo.lower())
        now = time.monotonic()
        res = await check_host(self.get_resolver(), ip, sender, helo)
        self.log.debug("result", result=res.result, reason=res.reason)
        if res.result != "temperror":
            if len(self._results) >= RESULT_CACHE_MAX:
                self._results.clear()
            self._results[key] = (now + RESULT_TTL, res)
        return res

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)


class _State(CheckState):
    def __init__(self, chk: SPFCheck, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta
        self.skip = False
        # the evaluation: a remembered result, or the task computing it
        self.pending: asyncio.Task[SPFResult] | SPFResult | None = None

    async def check_connection(self) -> CheckResult:
        conn = getattr(self.meta, "conn", None)
        if conn is None:
            self.skip = True
            self.chk.log.msg("locally generated message, skipping", msg_id=self.meta.id)
            return OK
        if conn.is_unix or not _is_ip(conn.remote_ip):
            self.skip = True
            self.chk.log.msg("non-IP SrcAddr", msg_id=self.meta.id)
            return OK
        # RFC 7208 §2.4: a null reverse-path is checked as postmaster@<HELO identity>.
        original = self.meta.original_from or f"postmaster@{conn.helo}"
        try:
            sender = prepare_mail_from(original)
        except SMTPError as e:
            self.skip = True
            return CheckResult(reject=e, reason=e)
        ip = conn.remote_ip
        if self.chk.enforce_early:
            return self.chk.result(self.meta, await self.chk.evaluate(ip, sender, conn.helo))
        self.pending = self.chk.cached(ip, sender, conn.helo) or asyncio.create_task(
            self.chk.evaluate(ip, sender, conn.helo)
        )
        return OK

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        if self.chk.enforce_early or self.skip or self.pending is None:
            return OK
        try:
            res = self.pending if isinstance(self.pending, SPFResult) else await self.pending
        except Exception as e:
            err = SMTPError(451, (4, 7, 0), "Internal error during policy check", check="spf", reason=str(e))
            return CheckResult(reject=err, reason=err)
        finally:
            self.pending = None
        out = self.chk.result(self.meta, res)
        if await self._rely_on_dmarc(header):
            # DMARC will judge this message; SPF only reports (maddy's relyOnDMARC).
            log = self.chk.log.msg if res.result != "pass" else self.chk.log.debug
            log("deferring action due to a DMARC policy", result=res.result, err=res.reason, msg_id=self.meta.id)
            out.reject = None
            out.quarantine = False
        return out

    async def _rely_on_dmarc(self, header: Header) -> bool:
        """maddy's relyOnDMARC: the From domain has an enforcing DMARC policy."""
        try:
            from_domain = dmarc.extract_from_domain(header)
        except dmarc.DMARCError as e:
            self.chk.log.error("DMARC domains extract", err=e, msg_id=self.meta.id)
            return False
        try:
            policy = await dmarc_policy(self.chk.get_resolver(), from_domain)
        except (DNSError, dmarc.DMARCError) as e:
            self.chk.log.error("DMARC fetch", err=e, from_domain=from_domain, msg_id=self.meta.id)
            return False
        return policy is not None and policy != "none"

    async def close(self) -> None:
        task, self.pending = self.pending, None
        if isinstance(task, asyncio.Task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["SPFCheck", "dmarc_policy", "organizational_domain", "prepare_mail_from"]
