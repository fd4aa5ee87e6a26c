"""`require_tls`: the client connection must use TLS (`550 5.7.1 TLS conversation required`)."""

from __future__ import annotations

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import MsgMeta
from pymaddy.pipeline.interfaces import OK, Check, CheckResult, CheckState
from pymaddy.runtime.module import Module


class _State(CheckState):
    def __init__(self, chk: RequireTLS, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta

    async def check_connection(self) -> CheckResult:
        if self.meta.conn.tls:
            return OK
        err = SMTPError(550, (5, 7, 1), "TLS conversation required", check="require_tls")
        return self.chk.apply(err)


class RequireTLS(Module, Check):
    def apply(self, err: SMTPError) -> CheckResult:
        action = self.settings.get("fail_action")
        kind = getattr(action, "action", "reject")
        override = getattr(action, "override", None)
        if override is not None:
            err = SMTPError(override.code, override.enhanced, override.message, check="require_tls", reason=err.message)
        if kind == "reject":
            return CheckResult(reject=err)
        if kind == "quarantine":
            return CheckResult(quarantine=True, reason=err)
        return CheckResult(reason=err)

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)
