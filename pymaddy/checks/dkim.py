"""`check.dkim`: verify DKIM signatures at the body stage (spec §B.4, §I.2, §I.4;
maddy's internal/check/dkim, RFC 6376 §6, RFC 8601 §2.7.1).

Every DKIM-Signature field is verified and yields one Authentication-Results
entry `dkim=<pass|fail|permerror|temperror|none> [reason] header.d=… header.i=…`
(the reason is go-msgauth's error text, which maddy repeats):

* no signature: `dkim=none`, then `no_sig_action` with `550 5.7.20 No DKIM signatures`;
* a signature that verifies but does not cover every `required_fields` name
  (From, Subject by default): permerror "some header fields are not signed";
* a temporary DNS failure fetching a key: the whole check fails with
  `421 4.7.20 Temporary error during DKIM verification` — unless `fail_open`,
  which records `dkim=temperror` and goes on;
* no passing signature: `broken_sig_action` with `550 5.7.20 No passing DKIM signatures`.

Both actions default to `ignore`: DMARC (which sees these results) decides.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, Any

from pymaddy.dkim.core import TXTLookup, verify
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import AuthResult, Check, CheckResult, CheckState
from pymaddy.runtime.module import Module

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD_NAME = "check.dkim"


class TXTLookupError(Exception):
    """A failed TXT lookup of the fallback resolver; `temporary` as the shared DNS layer's DNSError."""

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


def _dnspython_lookup(override: str | None) -> TXTLookup:
    """A dnspython stub resolver (/etc/resolv.conf, or `-debug.dnsoverride HOST:PORT`)."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    if override:
        host, _, port = override.rpartition(":")
        res = dns.asyncresolver.Resolver(configure=False)
        res.nameservers = [host.strip("[]") or "127.0.0.1"]
        res.port = int(port or 53)
    else:
        try:
            res = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = ["127.0.0.1"]

    async def txt(name: str) -> list[str]:
        try:
            ans = await res.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise TXTLookupError(f"lookup {name}: no such host", temporary=False) from None
        except dns.exception.Timeout:
            raise TXTLookupError(f"lookup {name}: i/o timeout", temporary=True) from None
        except dns.resolver.NoNameservers:
            raise TXTLookupError(f"lookup {name}: server misbehaving", temporary=True) from None
        return [b"".join(rr.strings).decode("utf-8", "replace") for rr in ans]

    return txt


def _shared_lookup(resolver: Any) -> TXTLookup:
    """TXT lookups through the shared DNS layer. Its NXDOMAIN/NODATA answer is empty; Go's
    LookupTXT (and so maddy) fails with "no such host" instead, which DKIM reports as
    "no key for signature" rather than "no valid key found"."""

    async def txt(name: str) -> list[str]:
        ans = await resolver.lookup(name, "TXT")
        if not ans.records:
            raise TXTLookupError(f"lookup {name}: no such host", temporary=False)
        return [b"".join(rr.strings).decode("utf-8", "replace") for rr in ans.records]

    return txt


def _txt_lookup(ctx: RuntimeContext) -> TXTLookup:
    """The server's TXT lookup: the shared DNS layer (`pymaddy.dns.resolver_for`) when present,
    else a dnspython stub resolver honouring -debug.dnsoverride."""
    mod: Any = None
    with contextlib.suppress(ImportError):
        mod = importlib.import_module("pymaddy.dns")
    get = getattr(mod, "resolver_for", None)
    if callable(get):
        return _shared_lookup(get(ctx))
    return _dnspython_lookup(getattr(ctx.options, "dns_override", None))


def _canon(name: str) -> str:
    return name.strip().lower()


class DKIMCheck(Module, Check):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        fields = self.settings.get("required_fields")
        self.required_fields = [_canon(f) for f in (["From", "Subject"] if fields is None else fields)]
        self.fail_open = bool(self.settings.get("fail_open") or False)
        self.lookup: TXTLookup | None = None

    async def start(self) -> None:
        if self.lookup is None:
            self.lookup = _txt_lookup(self.ctx)

    def _action(self, setting: str) -> tuple[str, Any]:
        action = self.settings.get(setting)
        return str(getattr(action, "action", "ignore")), getattr(action, "override", None)

    def apply(self, setting: str, res: CheckResult) -> CheckResult:
        """maddy's FailAction.Apply: override the reply, then reject/quarantine/ignore."""
        if res.reason is None:
            return res
        kind, override = self._action(setting)
        if override is not None:
            res.reason = SMTPError(
                override.code, override.enhanced, override.message, check=MOD_NAME, reason=res.reason.message
            )
        if kind == "reject":
            res.reject = res.reason
        elif kind == "quarantine":
            res.quarantine = True
        return res

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)


class _State(CheckState):
    def __init__(self, chk: DKIMCheck, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        chk = self.chk
        log = chk.log
        if not header.count("DKIM-Signature"):
            if chk._action("no_sig_action")[0] in ("reject", "quarantine"):
                log.msg("no signatures present", msg_id=self.meta.id)
            else:
                log.debug("no signatures present", msg_id=self.meta.id)
            return chk.apply(
                "no_sig_action",
                CheckResult(
                    reason=SMTPError(550, (5, 7, 20), "No DKIM signatures", check=MOD_NAME),
                    auth_results=[AuthResult("dkim", "none")],
                ),
            )
        if chk.lookup is None:
            chk.lookup = _txt_lookup(chk.ctx)
        try:
            verifications = await verify(header, body, chk.lookup)
        except OSError as e:
            err = SMTPError(451, (4, 0, 0), "Internal I/O error", check=MOD_NAME, reason=str(e))
            return CheckResult(reject=err, reason=err)

        res = CheckResult()
        good = False
        for v in verifications:
            params = {"header.d": v.domain, "header.i": v.identifier}
            if v.err is not None:
                log.debug("bad signature", domain=v.domain, identifier=v.identifier, msg_id=self.meta.id)
                value = {"perm": "permerror", "temp": "temperror"}.get(v.err.kind, "fail")
                if v.err.kind == "temp" and not chk.fail_open:
                    err = SMTPError(
                        421,
                        (4, 7, 20),
                        "Temporary error during DKIM verification",
                        check=MOD_NAME,
                        reason=v.err.message,
                    )
                    return CheckResult(reject=err, reason=err)
                res.auth_results.append(AuthResult("dkim", value, v.err.message, params))
                continue
            signed = {_canon(k) for k in v.header_keys}
            value, reason = "pass", ""
            if any(f not in signed for f in chk.required_fields):
                value, reason = "permerror", "some header fields are not signed"
            else:
                good = True
                log.debug("good signature", domain=v.domain, identifier=v.identifier, msg_id=self.meta.id)
            res.auth_results.append(AuthResult("dkim", value, reason, params))
        if not good:
            res.reason = SMTPError(550, (5, 7, 20), "No passing DKIM signatures", check=MOD_NAME)
            return chk.apply("broken_sig_action", res)
        return res


__all__ = ["DKIMCheck", "TXTLookupError"]
