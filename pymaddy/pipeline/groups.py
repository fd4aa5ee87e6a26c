"""`checks NAME { … }` and `modifiers NAME { … }`: groups referenced as `check &NAME` / `modify &NAME`.

A check group runs its members in parallel and merges their results (first
reject in member order wins, quarantine and Authentication-Results add up);
a modifier group applies its members in order.
"""

from __future__ import annotations

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import Check, CheckResult, CheckState, EarlyCheck, Modifier, ModifierState
from pymaddy.pipeline.runner import gather_eager, module_of
from pymaddy.runtime.module import Module


def merge_results(results: list[CheckResult]) -> CheckResult:
    out = CheckResult()
    for r in results:
        if r.reject is not None and out.reject is None:
            out.reject = r.reject
        out.quarantine = out.quarantine or r.quarantine
        if r.reason is not None and out.reason is None:
            out.reason = r.reason
        out.auth_results.extend(r.auth_results)
        if r.header is not None:
            if out.header is None:
                out.header = Header()
            out.header.add_raw_top(r.header)
    return out


_IMPLEMENTS: dict[tuple[type, str], bool] = {}


def _implements(cls: type, stage: str) -> bool:
    """Whether a CheckState class overrides the stage method (asked per message, answered once)."""
    known = _IMPLEMENTS.get((cls, stage))
    if known is None:
        known = _IMPLEMENTS[cls, stage] = getattr(cls, stage) is not getattr(CheckState, stage)
    return known


class _GroupCheckState(CheckState):
    def __init__(self, states: list[CheckState]) -> None:
        self.states = states

    async def _all(self, name: str, *args: object) -> CheckResult:
        # Members that do not implement this stage answer OK: skip them. One left runs without a
        # task; several run together, each without a task unless it has to wait (their DNS
        # waits overlap).
        states = [s for s in self.states if _implements(type(s), name)]
        if not states:
            return CheckResult()
        if len(states) == 1:
            return merge_results([await getattr(states[0], name)(*args)])
        return merge_results(await gather_eager([getattr(s, name)(*args) for s in states]))

    async def check_connection(self) -> CheckResult:
        return await self._all("check_connection")

    async def check_sender(self, mail_from: str) -> CheckResult:
        return await self._all("check_sender", mail_from)

    async def check_rcpt(self, rcpt: str) -> CheckResult:
        return await self._all("check_rcpt", rcpt)

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        return await self._all("check_body", header, body)

    async def close(self) -> None:
        for s in self.states:
            await s.close()


class CheckGroup(Module, Check, EarlyCheck):
    def log_name(self) -> str:
        return self.inst.instance or "checks"

    async def check_conn_early(self, meta: MsgMeta) -> SMTPError | None:
        """Members that judge the connection itself (dnsbl), in parallel; first error in order wins."""
        mods = [self.ctx.module(i) for i in self.settings.get("members") or []]
        early = [m.check_conn_early(meta) for m in mods if isinstance(m, EarlyCheck)]
        if len(early) <= 1:
            return await early[0] if early else None
        errs = await gather_eager(early)
        return next((e for e in errs if e is not None), None)

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        members = [module_of(self.ctx, i, Check) for i in self.settings.get("members") or []]  # type: ignore[type-abstract]
        return _GroupCheckState([await m.state_for_msg(meta) for m in members])


class _GroupModifierState(ModifierState):
    def __init__(self, states: list[ModifierState]) -> None:
        self.states = states

    async def rewrite_sender(self, mail_from: str) -> str:
        for s in self.states:
            mail_from = await s.rewrite_sender(mail_from)
        return mail_from

    async def rewrite_rcpt(self, rcpt: str) -> list[str]:
        cur = [rcpt]
        for s in self.states:
            nxt: list[str] = []
            for a in cur:
                for r in await s.rewrite_rcpt(a):
                    if r not in nxt:
                        nxt.append(r)
            cur = nxt
        return cur

    async def rewrite_body(self, header: Header, body: Body) -> None:
        for s in self.states:
            await s.rewrite_body(header, body)

    async def close(self) -> None:
        for s in self.states:
            await s.close()


class ModifierGroup(Module, Modifier):
    def log_name(self) -> str:
        return self.inst.instance or "modifiers"

    async def state_for_msg(self, meta: MsgMeta) -> ModifierState:
        members = [module_of(self.ctx, i, Modifier) for i in self.settings.get("members") or []]  # type: ignore[type-abstract]
        return _GroupModifierState([await m.state_for_msg(meta) for m in members])
