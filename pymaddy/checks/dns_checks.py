"""`require_mx_record` and `require_matching_rdns`: maddy's stateless DNS checks (spec §B.4).

Both report through `fail_action` (default quarantine) and never add
Authentication-Results entries.

* `require_mx_record` (sender stage): the MAIL FROM domain must publish MX
  records and no null MX (RFC 7505). Null sender: skipped. Replies:
  `501 5.1.8 Malformed sender address` / `No domain part in address`,
  `501 5.7.27 Domain in MAIL FROM does not have any MX records`,
  `501 5.7.27 Domain in MAIL FROM has null MX record`; DNS failures
  `450 4.7.0` (temporary) / `550 5.7.0` (permanent, e.g. NXDOMAIN — Go reports a
  nonexistent domain as a lookup error) `DNS error during policy check`.
* `require_matching_rdns` (connection stage): the client's (first) PTR name must
  equal its EHLO name, compared case-insensitively without the final dot.
  Replies: `550 5.7.25 No PTR record found`, `550 5.7.25 rDNS name does not
  match source hostname`, DNS failures `450 4.7.25` / `550 5.7.25 DNS error
  during policy check`. Skipped for local and non-IP (unix socket) clients.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from pymaddy.dns import DNSError, Resolver, resolver_for
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import MsgMeta
from pymaddy.pipeline.interfaces import OK, Check, CheckResult, CheckState
from pymaddy.runtime.module import Module

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext


def _dns_error(e: DNSError, enh_tail: tuple[int, int], check: str) -> SMTPError:
    """maddy's exterrors.SMTPCode(err, 450, 550) with the class digit taken from temporariness."""
    first = 4 if e.temporary else 5
    return SMTPError(
        450 if e.temporary else 550,
        (first, *enh_tail),
        "DNS error during policy check",
        check=check,
        reason=str(e),
    )


class _DNSCheck(Module, Check):
    """Shared plumbing: the process resolver and `fail_action`."""

    NAME = ""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.resolver: Resolver | None = None

    async def start(self) -> None:
        self.get_resolver()

    def get_resolver(self) -> Resolver:
        if self.resolver is None:
            self.resolver = resolver_for(self.ctx)
        return self.resolver

    def apply(self, err: SMTPError) -> CheckResult:
        """maddy's FailAction.Apply for `fail_action` (default quarantine)."""
        action = self.settings.get("fail_action")
        kind = getattr(action, "action", "quarantine")
        override = getattr(action, "override", None)
        if override is not None:
            err = SMTPError(override.code, override.enhanced, override.message, check=self.NAME, reason=err.message)
        if kind == "reject":
            return CheckResult(reject=err, reason=err)
        if kind == "quarantine":
            return CheckResult(quarantine=True, reason=err)
        return CheckResult(reason=err)


class RequireMXRecord(_DNSCheck):
    NAME = "require_mx_record"

    async def judge(self, mail_from: str) -> SMTPError | None:
        if not mail_from:
            return None
        if "@" not in mail_from:
            if mail_from.lower() == "postmaster":
                return SMTPError(501, (5, 1, 8), "No domain part in address", check=self.NAME)
            return SMTPError(501, (5, 1, 8), "Malformed sender address", check=self.NAME)
        local, _, domain = mail_from.rpartition("@")
        if not local:
            return SMTPError(501, (5, 1, 8), "Malformed sender address", check=self.NAME)
        if not domain:
            return SMTPError(501, (5, 1, 8), "No domain part in address", check=self.NAME)
        try:
            ans = await self.get_resolver().lookup(domain.encode("idna").decode("ascii"), "MX")
        except UnicodeError:
            return SMTPError(501, (5, 1, 8), "Malformed sender address", check=self.NAME)
        except DNSError as e:
            return _dns_error(e, (7, 0), self.NAME)
        if ans.nxdomain:
            return _dns_error(DNSError(f"lookup {domain}: no such host", False, domain), (7, 0), self.NAME)
        if not ans.records:
            return SMTPError(501, (5, 7, 27), "Domain in MAIL FROM does not have any MX records", check=self.NAME)
        for rd in ans.records:
            if rd.exchange.to_text() == ".":  # type: ignore[attr-defined]
                return SMTPError(501, (5, 7, 27), "Domain in MAIL FROM has null MX record", check=self.NAME)
        return None

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _MXState(self)


class _MXState(CheckState):
    def __init__(self, chk: RequireMXRecord) -> None:
        self.chk = chk

    async def check_sender(self, mail_from: str) -> CheckResult:
        err = await self.chk.judge(mail_from)
        return OK if err is None else self.chk.apply(err)


class RequireMatchingRDNS(_DNSCheck):
    NAME = "require_matching_rdns"

    async def judge(self, meta: MsgMeta) -> SMTPError | None:
        conn = getattr(meta, "conn", None)
        if conn is None:
            self.log.msg("locally-generated message, skipping", msg_id=meta.id)
            return None
        try:
            ipaddress.ip_address(conn.remote_ip)
        except ValueError:
            self.log.msg("rDNS lookup is disabled, skipping", msg_id=meta.id)
            return None
        try:
            names = await self.get_resolver().ptr(conn.remote_ip)
        except DNSError as e:
            return _dns_error(e, (7, 25), self.NAME)
        if not names:
            return SMTPError(550, (5, 7, 25), "No PTR record found", check=self.NAME)
        rdns = names[0].rstrip(".").lower()  # maddy keeps the first PTR name only
        if rdns == conn.helo.rstrip(".").lower():
            self.log.debug("PTR record matches source domain, OK", ptr=rdns, msg_id=meta.id)
            return None
        return SMTPError(550, (5, 7, 25), "rDNS name does not match source hostname", check=self.NAME)

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _RDNSState(self, meta)


class _RDNSState(CheckState):
    def __init__(self, chk: RequireMatchingRDNS, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta

    async def check_connection(self) -> CheckResult:
        err = await self.chk.judge(self.meta)
        return OK if err is None else self.chk.apply(err)


__all__ = ["RequireMXRecord", "RequireMatchingRDNS"]
