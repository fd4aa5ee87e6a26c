"""Executing a compiled pipeline tree (spec §D.2): checks, modifiers, routing, delivery.

`PipelineRunner` wraps one `Pipeline` (the endpoint's embedded one, a
`msgpipeline` block or a `reroute` block) and starts `PipelineDelivery`
objects, one per message. A delivery fans the message out to every target
its recipients were routed to: one `Delivery` per target per message.
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pymaddy.mail import address
from pymaddy.mail.errors import SMTPError, internal_error
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.config import Pipeline, RcptBlock, SourceBlock
from pymaddy.pipeline.interfaces import (
    AuthResult,
    Check,
    CheckResult,
    CheckState,
    Delivery,
    DeliveryTarget,
    EarlyCheck,
    Modifier,
    ModifierState,
    PartialDelivery,
    StatusCallback,
)
from pymaddy.runtime.log import Logger
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext


X = TypeVar("X")


def module_of(ctx: RuntimeContext, inst: ModuleInstance, cls: type[X]) -> X:
    """The runtime object of `inst` as an interface (`ctx.module_as` only takes Module classes)."""
    from pymaddy.runtime.module import ModuleError

    obj = ctx.module(inst)
    if not isinstance(obj, cls):
        raise ModuleError(f"{inst.label} is not a {cls.__name__}")
    return obj


def reject_error(spec: Any) -> SMTPError:
    return SMTPError(spec.code, spec.enhanced, spec.message, reason="reject directive used")


# -- Received / Authentication-Results ----------------------------------------------------


def fold(name: str, value: str, limit: int = 76) -> bytes:
    """`Name: value` folded at whitespace so lines stay within `limit` (go-message style)."""
    line = name + ": "
    out: list[str] = []
    for i, word in enumerate(value.split(" ")):
        piece = word if i == 0 else " " + word
        if i > 0 and len(line) + len(piece) > limit and line.strip():
            out.append(line)
            line = piece
        else:
            line += piece
    out.append(line)
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


def received_value(meta: MsgMeta, hostname: str, mail_from: str, when: datetime | None = None) -> str:
    """maddy's Received (spec §I.1): no `for`, ESMTPS not ESMTPSA, `from` omitted on submission."""
    c = meta.conn
    parts: list[str] = []
    if not meta.dont_trace_sender and not c.is_unix and c.remote_ip:
        helo = c.helo or "unknown"
        inner = f"{c.rdns} [{c.remote_ip}]" if c.rdns else f"[{c.remote_ip}]"
        parts.append(f"from {helo} ({inner})")
    parts.append(f"by {hostname}")
    if mail_from:
        parts.append(f"(envelope-sender <{mail_from}>)")
    proto = c.proto or "ESMTP"
    if meta.smtputf8 and not proto.startswith("UTF8"):
        proto = "UTF8" + proto
    parts.append(f"with {proto} id {meta.id};")
    parts.append(email.utils.format_datetime(when or datetime.now().astimezone()))
    return " ".join(parts)


_SPECIALS = set(' ()<>@,;:\\"/[]?=\t')


def _param_value(v: str) -> str:
    if v == "" or any(ch in _SPECIALS for ch in v):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return v


def format_auth_results(hostname: str, results: Sequence[AuthResult]) -> str:
    """RFC 8601 value as go-msgauth writes it: `host; m=r reason=".." k=v; …`."""
    items = []
    for r in results:
        s = f"{r.method}={r.result} "
        params = []
        if r.reason:
            params.append("reason=" + _param_value(r.reason))
        for k in sorted(r.params):
            if r.params[k]:
                params.append(f"{k}={_param_value(r.params[k])}")
        items.append(s + " ".join(params))
    return hostname + "; " + "; ".join(items)


# -- checks -------------------------------------------------------------------------------


class CheckRunner:
    """Per-message check states; a state created late replays the earlier stages."""

    def __init__(self, ctx: RuntimeContext, meta: MsgMeta, log: Logger) -> None:
        self.ctx = ctx
        self.meta = meta
        self.log = log
        self.states: dict[int, CheckState] = {}
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.done_rcpts: dict[int, set[str]] = {}
        self.quarantine = False
        self.auth_results: list[AuthResult] = []
        self.headers: list[Header] = []

    async def _state(self, inst: ModuleInstance) -> tuple[CheckState, bool]:
        st = self.states.get(id(inst))
        if st is not None:
            return st, False
        check = module_of(self.ctx, inst, Check)  # type: ignore[type-abstract]
        st = await check.state_for_msg(self.meta)
        self.states[id(inst)] = st
        self.done_rcpts[id(inst)] = set()
        return st, True

    def _merge(self, inst: ModuleInstance, res: CheckResult) -> SMTPError | None:
        """Record what a check found; return its rejection (quarantine wins over reject, as maddy)."""
        name = inst.label
        self.auth_results.extend(res.auth_results)
        if res.header is not None and len(res.header):
            self.headers.append(res.header)
        if res.quarantine:
            self.quarantine = True
            self.log.error("quarantined", err=str(res.reason or "quarantined"), check=name, msg_id=self.meta.id)
            return None
        if res.reject is not None:
            if not res.reject.check:
                res.reject.check = name
            return res.reject
        if res.reason is not None:
            # an `ignore` action: logged for deployment testing
            self.log.error("no check action", err=res.reason, check=name, msg_id=self.meta.id)
        return None

    async def _rcpt(self, inst: ModuleInstance, st: CheckState, rcpt: str) -> SMTPError | None:
        done = self.done_rcpts[id(inst)]
        if rcpt in done:
            return None
        done.add(rcpt)
        return self._merge(inst, await st.check_rcpt(rcpt))

    async def _one(self, inst: ModuleInstance, stage: str, args: tuple[Any, ...]) -> SMTPError | None:
        try:
            st, new = await self._state(inst)
            if new and stage != "connection":
                # A state created late sees everything earlier states saw (maddy's checkStates).
                err = None
                if self.sender is not None:
                    err = self._merge(inst, await st.check_connection())
                    if err is None and stage != "sender":
                        err = self._merge(inst, await st.check_sender(self.sender))
                for r in self.rcpts:
                    if err is None:
                        err = await self._rcpt(inst, st, r)
                if err is not None:
                    return err
            if stage == "connection":
                res = await st.check_connection()
            elif stage == "sender":
                res = await st.check_sender(args[0])
            elif stage == "rcpt":
                return await self._rcpt(inst, st, args[0])
            else:
                res = await st.check_body(args[0], args[1])
            return self._merge(inst, res)
        except SMTPError as e:
            return e
        except Exception as e:  # a broken check fails the command, not the session
            self.log.error("check failed", err=f"{type(e).__name__}: {e}", check=inst.label, msg_id=self.meta.id)
            return internal_error(e, temporary=True)

    async def run(self, checks: Iterable[ModuleInstance], stage: str, *args: Any) -> None:
        """Run one stage of every check in parallel; the first reject (in order) is raised."""
        lst = list(checks)
        try:
            if not lst:
                return
            errs = await asyncio.gather(*(self._one(i, stage, args) for i in lst))
            for e in errs:
                if e is not None:
                    raise e
        finally:
            if stage == "rcpt" and args[0] not in self.rcpts:
                self.rcpts.append(args[0])

    async def close(self) -> None:
        for st in self.states.values():
            try:
                await st.close()
            except Exception as e:
                self.log.error("check state close failed", err=e)
        self.states.clear()


# -- modifiers ----------------------------------------------------------------------------


class ModifierRunner:
    def __init__(self, ctx: RuntimeContext, meta: MsgMeta) -> None:
        self.ctx = ctx
        self.meta = meta
        self.states: dict[int, ModifierState] = {}

    async def state(self, inst: ModuleInstance) -> ModifierState:
        st = self.states.get(id(inst))
        if st is None:
            mod = module_of(self.ctx, inst, Modifier)  # type: ignore[type-abstract]
            st = await mod.state_for_msg(self.meta)
            self.states[id(inst)] = st
        return st

    async def sender(self, mods: Iterable[ModuleInstance], addr: str) -> str:
        for inst in mods:
            addr = await (await self.state(inst)).rewrite_sender(addr)
        return addr

    async def rcpt(self, mods: Iterable[ModuleInstance], addr: str) -> list[str]:
        cur = [addr]
        for inst in mods:
            st = await self.state(inst)
            nxt: list[str] = []
            for a in cur:
                for r in await st.rewrite_rcpt(a):
                    if r not in nxt:
                        nxt.append(r)
            cur = nxt
        return cur

    async def body(self, mods: Iterable[ModuleInstance], header: Header, body: Body) -> None:
        for inst in mods:
            await (await self.state(inst)).rewrite_body(header, body)

    async def close(self) -> None:
        for st in self.states.values():
            await st.close()
        self.states.clear()


# -- routing -------------------------------------------------------------------------------


class PipelineRunner(DeliveryTarget):
    """One compiled pipeline made runnable; also a DeliveryTarget (for reroute / msgpipeline)."""

    def __init__(
        self, pipe: Pipeline, ctx: RuntimeContext, log: Logger, hostname: str, *, add_received: bool = False
    ) -> None:
        self.pipe = pipe
        self.ctx = ctx
        self.log = log
        self.hostname = hostname
        self.add_received = add_received
        self._nested: dict[int, PipelineRunner] = {}

    def target(self, t: ModuleInstance | Pipeline) -> DeliveryTarget:
        if isinstance(t, Pipeline):
            r = self._nested.get(id(t))
            if r is None:
                r = PipelineRunner(t, self.ctx, self.log, self.hostname)
                self._nested[id(t)] = r
            return r
        return module_of(self.ctx, t, DeliveryTarget)  # type: ignore[type-abstract]

    async def _table_match(self, tables: list[tuple[ModuleInstance, Any]], key: str) -> Any:
        for inst, block in tables:
            try:
                tbl = module_of(self.ctx, inst, Table)  # type: ignore[type-abstract]
                if await tbl.lookup(key) is not None:
                    return block
            except Exception as e:
                self.log.error("table lookup failed", err=f"{e}", key=key)
        return None

    async def select_source(self, sender: str) -> SourceBlock:
        p = self.pipe
        key = ""
        if sender:
            try:
                key = address.for_lookup(sender)
            except (address.AddressError, UnicodeError):
                raise SMTPError(501, (5, 1, 7), "Unable to normalize the sender address") from None
        blk = await self._table_match(p.source_in, key)
        if blk is not None:
            return blk  # type: ignore[no-any-return]
        if sender:
            found = _rule_match(p.per_source, key)
            if found is not None:
                return found  # type: ignore[no-any-return]
        assert p.default_source is not None
        return p.default_source

    async def select_rcpt(self, src: SourceBlock, rcpt: str) -> RcptBlock:
        try:
            key = address.for_lookup(rcpt)
        except (address.AddressError, UnicodeError):
            raise SMTPError(553, (5, 1, 2), "Unable to normalize the recipient address") from None
        blk = await self._table_match(src.rcpt_in, key)
        if blk is not None:
            return blk  # type: ignore[no-any-return]
        found = _rule_match(src.per_rcpt, key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        assert src.default_rcpt is not None
        return src.default_rcpt

    async def run_early_checks(self, meta: MsgMeta) -> SMTPError | None:
        """Global checks that judge the connection (at EHLO and AUTH), in parallel."""
        objs = [self.ctx.module(i) for i in self.pipe.checks]
        errs = await asyncio.gather(*(o.check_conn_early(meta) for o in objs if isinstance(o, EarlyCheck)))
        return next((e for e in errs if e is not None), None)

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> PipelineDelivery:
        d = PipelineDelivery(self, meta)
        try:
            await d.start(mail_from)
        except BaseException:
            await d.abort()
            raise
        return d


class PipelineDelivery(PartialDelivery):
    def __init__(self, runner: PipelineRunner, meta: MsgMeta) -> None:
        self.r = runner
        self.meta = meta
        self.log = runner.log
        self.checks = CheckRunner(runner.ctx, meta, runner.log)
        self.mods = ModifierRunner(runner.ctx, meta)
        self.source: SourceBlock | None = None
        self.mail_from = ""
        self.deliveries: dict[int, tuple[DeliveryTarget, Delivery, list[str]]] = {}
        self.blocks: list[RcptBlock] = []
        self.origin: dict[str, str] = {}  # final address → address as given to add_rcpt
        self.closed = False

    async def start(self, mail_from: str) -> None:
        p = self.r.pipe
        self.checks.sender = mail_from
        await self.checks.run(p.checks, "connection")
        await self.checks.run(p.checks, "sender", mail_from)
        sender = await self.mods.sender(p.modifiers, mail_from)
        src = await self.r.select_source(sender)
        self.source = src
        self.checks.sender = sender  # source checks see the globally rewritten sender (maddy)
        await self.checks.run(src.checks, "connection")
        await self.checks.run(src.checks, "sender", sender)
        sender = await self.mods.sender(src.modifiers, sender)
        self.mail_from = sender

    async def _delivery(self, t: ModuleInstance | Pipeline) -> tuple[DeliveryTarget, Delivery, list[str]]:
        ent = self.deliveries.get(id(t))
        if ent is None:
            target = self.r.target(t)
            d = await target.start_delivery(self.meta, self.mail_from)
            ent = (target, d, [])
            self.deliveries[id(t)] = ent
        return ent

    async def add_rcpt(self, rcpt: str) -> None:
        p, src = self.r.pipe, self.source
        assert src is not None
        await self.checks.run(p.checks, "rcpt", rcpt)
        await self.checks.run(src.checks, "rcpt", rcpt)
        addrs: list[str] = []
        for a in await self.mods.rcpt(p.modifiers, rcpt):
            for b in await self.mods.rcpt(src.modifiers, a):
                if b not in addrs:
                    addrs.append(b)
        for a in addrs:
            blk = await self.r.select_rcpt(src, a)
            if blk.reject is not None:
                raise reject_error(blk.reject)
            await self.checks.run(blk.checks, "rcpt", a)
            finals = await self.mods.rcpt(blk.modifiers, a)
            if blk not in self.blocks:
                self.blocks.append(blk)
            for f in finals:
                self.origin.setdefault(f, rcpt)
                self.meta.original_rcpts.setdefault(f, rcpt)
                for t in blk.targets:
                    _target, d, rcpts = await self._delivery(t)
                    if f in rcpts:
                        continue
                    await d.add_rcpt(f)
                    rcpts.append(f)

    def _body_check_groups(self, lmtp: bool) -> list[list[ModuleInstance]]:
        src = self.source
        assert src is not None
        groups = [self.r.pipe.checks, src.checks]
        if not lmtp:
            groups.extend(b.checks for b in self.blocks)
        return groups

    async def _prepare_body(self, header: Header, body: Body, lmtp: bool) -> None:
        groups = self._body_check_groups(lmtp)
        allc = [i for g in groups for i in g]
        await self.checks.run(allc, "body", header, body)
        if not lmtp:
            if self.r.add_received:
                # maddy names the sender as given in MAIL FROM, before any rewriting
                value = received_value(self.meta, self.r.hostname, self.meta.original_from)
                header.add_raw_top(Header([("Received", fold("Received", value))]))
            if self.checks.quarantine:
                self.meta.quarantine = True
            if self.checks.auth_results:
                val = format_auth_results(self.r.hostname, self.checks.auth_results)
                header.add_top("Authentication-Results", val)
        for h in self.checks.headers:
            header.add_raw_top(h)
        src = self.source
        assert src is not None
        await self.mods.body(self.r.pipe.modifiers, header, body)
        await self.mods.body(src.modifiers, header, body)
        for b in self.blocks:
            await self.mods.body(b.modifiers, header, body)

    async def body(self, header: Header, body: Body) -> None:
        await self._prepare_body(header, body, lmtp=False)
        for _t, d, _r in self.deliveries.values():
            await d.body(header.copy(), body)

    async def body_non_atomic(self, status: StatusCallback, header: Header, body: Body) -> None:
        """LMTP: report per original recipient (first error wins)."""
        reported: dict[str, SMTPError | None] = {}

        def report(rcpt: str, err: SMTPError | None) -> None:
            orig = self.origin.get(rcpt, rcpt)
            if reported.get(orig) is None:
                reported[orig] = err

        try:
            await self._prepare_body(header, body, lmtp=True)
        except Exception as e:
            err = internal_error(e)
            for orig in dict.fromkeys(self.origin.values()):
                status(orig, err)
            return
        for _t, d, rcpts in self.deliveries.values():
            if isinstance(d, PartialDelivery):
                await d.body_non_atomic(report, header.copy(), body)
                continue
            try:
                await d.body(header.copy(), body)
                for r in rcpts:
                    report(r, None)
            except Exception as e:
                err = internal_error(e)
                for r in rcpts:
                    report(r, err)
        for orig in dict.fromkeys(self.origin.values()):
            status(orig, reported.get(orig))

    async def commit(self) -> None:
        try:
            for _t, d, _r in self.deliveries.values():
                await d.commit()
        finally:
            self.deliveries.clear()
            await self._close()

    async def abort(self) -> None:
        for _t, d, _r in self.deliveries.values():
            try:
                await d.abort()
            except Exception as e:
                self.log.error("delivery abort failed", err=e, msg_id=self.meta.id)
        self.deliveries.clear()
        await self._close()

    async def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.checks.close()
        try:
            await self.mods.close()
        except Exception as e:
            self.log.error("modifier close failed", err=e)


def _rule_match(rules: dict[str, Any], key: str) -> Any:
    """§D.2 rule lookup: the exact (normalized) address first, then its domain."""
    if key in rules:
        return rules[key]
    if "@" in key:
        return rules.get(key.rpartition("@")[2])
    return None
