"""Executing a compiled pipeline tree (spec §D.2): checks, modifiers, routing, delivery.

`PipelineRunner` wraps one `Pipeline` (the endpoint's embedded one, a
`msgpipeline` block or a `reroute` block) and starts `PipelineDelivery`
objects, one per message. A delivery fans the message out to every target
its recipients were routed to: one `Delivery` per target per message.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import email.utils
import unicodedata
from collections.abc import Coroutine, Generator, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pymaddy import dmarc
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
    if (type(obj), cls) not in _IS_A:  # an ABC isinstance per message and check adds up
        if not isinstance(obj, cls):
            raise ModuleError(f"{inst.label} is not a {cls.__name__}")
        _IS_A.add((type(obj), cls))
    return cast(X, obj)


_IS_A: set[tuple[type, type]] = set()  # (class, interface) pairs module_of found to match


# -- running coroutines without a task each ---------------------------------------------------

_NOTHING: Any = object()


class _Resumed(collections.abc.Coroutine[Any, Any, Any]):
    """A coroutine that was stepped once by hand and yielded `first` (the future it waits on):
    a Task created from this continues it exactly where it stopped."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def send(self, value: Any) -> Any:
        first = self._first
        if first is not _NOTHING:
            self._first = _NOTHING
            return first  # the Task waits on it, then sends None as the coroutine expects
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._first = _NOTHING
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover - the legacy signature

    def close(self) -> None:
        self._coro.close()

    def __next__(self) -> Any:  # the C Task steps a non-native coroutine through tp_iternext
        return self.send(None)

    def __iter__(self) -> _Resumed:
        return self

    def __await__(self) -> Generator[Any, None, Any]:
        return self


async def gather_eager(coros: Sequence[Coroutine[Any, Any, X]]) -> list[X]:
    """asyncio.gather for checks that usually finish without waiting: each coroutine runs at
    once in the calling task up to its first real wait, and only one that has to wait gets a
    task (which then overlaps with the others, as with gather). A stage whose checks answer
    from caches thus costs no task and no extra event-loop iteration.

    As with gather, the first exception raised is re-raised (after every coroutine has been
    started) and the others go on; cancelling the caller cancels them. A coroutine's first
    step runs in the caller's task, as a plain `await` would: it must not enter
    `asyncio.timeout()` before its first wait."""
    results: list[Any] = [None] * len(coros)
    pending: list[tuple[int, asyncio.Task[Any]]] = []
    error: Exception | None = None
    for i, coro in enumerate(coros):
        try:
            first = coro.send(None)
        except StopIteration as e:
            results[i] = e.value
            continue
        except Exception as e:
            if error is None:
                error = e
            continue
        except BaseException:
            for unstarted in coros[i + 1 :]:
                unstarted.close()  # no "never awaited" warning
            for _j, t in pending:
                t.cancel()
                t.add_done_callback(_retrieve)
            raise
        pending.append((i, asyncio.get_running_loop().create_task(_Resumed(coro, first))))
    if error is not None:
        for _i, t in pending:
            t.add_done_callback(_retrieve)
        raise error
    for n, (i, t) in enumerate(pending):
        try:
            results[i] = await t
        except asyncio.CancelledError:
            for _j, rest in pending[n + 1 :]:
                rest.cancel()  # the caller was cancelled: so are its children, as with gather
                rest.add_done_callback(_retrieve)
            raise
        except BaseException:
            for _j, rest in pending[n + 1 :]:
                rest.add_done_callback(_retrieve)
            raise
    return results


def _retrieve(t: asyncio.Task[Any]) -> None:
    """Mark an abandoned task's exception as seen (gather does the same for its children)."""
    if not t.cancelled():
        t.exception()


def reject_error(spec: Any) -> SMTPError:
    return SMTPError(spec.code, spec.enhanced, spec.message, reason="reject directive used")


# -- Received / Authentication-Results ----------------------------------------------------


_FOLD_SOFT = 76  # go-message textproto: preferredHeaderLen
_FOLD_HARD = 998  # maxHeaderLen (RFC 5322 §2.1.1)


def _fold_line(v: bytes, maxlen: int) -> tuple[bytes, bytes, bool]:
    """go-message's foldLine: (line with its CRLF, rest, whether no space had to be inserted)."""
    before = maxlen + 1
    if before > len(v):
        return v + (b"" if v.endswith(b"\n") else b"\r\n"), b"", True
    at = max(v.rfind(b" ", 0, before), v.rfind(b"\t", 0, before), v.rfind(b"\n", 0, before))
    if at == 0:
        at = before - 1  # only the previous folding space: no good place
    elif at < 0:
        at = before - 2
    ch = v[at : at + 1]
    if ch in (b" ", b"\t"):
        folding = b"" if v[at - 1 : at] == b"\n" else b"\r\n"
        return v[:at] + folding, v[at:], True
    if ch == b"\n":
        return v[:at], v[at:], True
    return v[:at] + b"\r\n ", v[at:], False


def fold(name: str, value: str) -> bytes:
    """`Name: value` with CRLF, folded byte for byte as go-message's formatHeaderField writes
    header fields: at whitespace before 76 octets a line, else (a long word) before 998."""
    out = (name + ": ").encode("utf-8")
    v = value.encode("utf-8")
    if not v:
        return out + b"\r\n"
    keylen = len(out)
    while v:
        line, rest, ok = _fold_line(v, _FOLD_SOFT - keylen)
        if not ok:
            line, rest, _ = _fold_line(v, _FOLD_HARD - keylen)
        out += line
        v = rest
        keylen = 0
    return out


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


# go-msgauth authres: tspecials force a quoted value; these punctuation marks (plus letters and
# digits) make an "address-like" pvalue that is written bare (RFC 8601 §2.2 pvalue).
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_ADDRESS_OK = frozenset("#$%&'*+,./-@[]\\^_`{|}~")


def _format_value(v: str) -> str:
    """RFC 2045 `value`: a token, else a quoted string (only `"` escaped, as go-msgauth)."""
    if any(ch <= " " or ch in _TSPECIALS for ch in v):
        return '"' + v.replace('"', '\\"') + '"'
    return v


_ASCII_PVALUE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") | _ADDRESS_OK


def _format_pvalue(v: str) -> str:
    """RFC 8601 `pvalue`: address- or domain-like values stay bare, anything else as `value`."""
    if v.isascii():  # the usual domain or address: one set test instead of a category per character
        return v if _ASCII_PVALUE.issuperset(v) else _format_value(v)
    if all(unicodedata.category(ch)[0] == "L" or unicodedata.category(ch) == "Nd" or ch in _ADDRESS_OK for ch in v):
        return v
    return _format_value(v)


def format_auth_results(hostname: str, results: Sequence[AuthResult]) -> str:
    """RFC 8601 field value byte for byte as go-msgauth's authres.Format writes it:
    `host; m=r reason="…" a=1 b=2; …` — reason first, other params sorted, empty ones dropped,
    a trailing space after a result without params; `host; none` without results."""
    if not results:
        return hostname + "; none"
    out = hostname
    for r in results:
        params = {k: v for k, v in r.params.items() if k != "reason"}
        reason = r.reason or r.params.get("reason", "")
        keys = sorted(params)
        items = [f"reason={_format_value(reason)}"] if reason else []
        items.extend(f"{k}={_format_pvalue(params[k])}" for k in keys if params[k])
        out += f"; {r.method}={r.result} " + " ".join(items)
    return out


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
            if len(lst) == 1:  # the usual `check { … }` group: no task needed to run one coroutine
                errs = [await self._one(lst[0], stage, args)]
            else:
                errs = await gather_eager([self._one(i, stage, args) for i in lst])
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
        if pipe.dmarc:
            dmarc.preload()

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
        early = [o.check_conn_early(meta) for o in objs if isinstance(o, EarlyCheck)]
        if len(early) <= 1:
            return await early[0] if early else None
        errs = await gather_eager(early)
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
        self.block_mods_ready: set[int] = set()  # destination blocks whose modifiers saw the sender
        # the policy lookup: done already when the answers were cached, else running
        self.dmarc_fetch: asyncio.Task[dmarc.Fetched] | dmarc.Fetched | None = None
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
            await self._init_block_modifiers(blk, a)
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

    async def _init_block_modifiers(self, blk: RcptBlock, rcpt: str) -> None:
        """maddy's getRcptModifiers: a destination block's modifiers see the final envelope sender
        once (modify.dkim picks its key by it); a rewrite there is ignored with a log line."""
        if id(blk) in self.block_mods_ready:
            return
        self.block_mods_ready.add(id(blk))
        try:
            new = await self.mods.sender(blk.modifiers, self.mail_from)
        except Exception as e:  # maddy ignores the error here too
            self.log.debug("destination modifiers sender rewrite failed", err=str(e), msg_id=self.meta.id)
            return
        if new != self.mail_from:
            self.log.msg(
                "Per-recipient modifier changed sender address. This is not supported and will be ignored.",
                rcpt=rcpt,
                originalFrom=self.mail_from,
                modifiedFrom=new,
                msg_id=self.meta.id,
            )

    def _start_dmarc(self, header: Header) -> None:
        """Start the policy lookup for the From domain while the body checks run (maddy's
        Verifier.FetchRecord; RFC 7489 §6.6.1 needs exactly one From with one address)."""
        try:
            domain = dmarc.extract_from_domain(header)
        except dmarc.DMARCError as e:
            self.dmarc_fetch = dmarc.Fetched(error=e)
            return
        from pymaddy.dns import resolver_for

        res = resolver_for(self.r.ctx)
        # A known sender's policy is cached: no task then.
        self.dmarc_fetch = dmarc.fetch_cached(res.txt_cached, domain) or asyncio.create_task(
            dmarc.fetch(res.txt, domain)
        )

    async def _apply_dmarc(self) -> None:
        """maddy's checkRunner.applyResults DMARC part: `dmarc=` goes last into the A-R entries;
        policy reject → 550 5.7.1 (450 4.7.1 on temperror), quarantine → the quarantine flag."""
        task = self.dmarc_fetch
        if task is None:
            return
        self.dmarc_fetch = None
        fetched = task if isinstance(task, dmarc.Fetched) else await task
        res, policy = dmarc.apply(fetched, self.checks.auth_results)
        self.checks.auth_results.append(res.authres)
        if policy == dmarc.REJECT:
            temp = res.authres.result == "temperror"
            raise SMTPError(
                450 if temp else 550,
                (4 if temp else 5, 7, 1),
                "DMARC check failed",
                check="dmarc",
                reason=res.authres.reason,
                dkim_res=res.dkim.result if res.dkim else "",
                dkim_domain=res.dkim.params.get("header.d", "") if res.dkim else "",
                spf_res=res.spf.result if res.spf else "",
                spf_from=res.spf.params.get("smtp.mailfrom", "") if res.spf else "",
            )
        if policy == dmarc.QUARANTINE:
            self.meta.quarantine = True
            self.log.msg("quarantined", reason=res.authres.reason, check="dmarc", msg_id=self.meta.id)

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
        if not lmtp and self.r.pipe.dmarc and self.dmarc_fetch is None:
            self._start_dmarc(header)  # the LMTP path never applies DMARC (maddy)
        await self.checks.run(allc, "body", header, body)
        if not lmtp:
            if self.r.add_received:
                # maddy names the sender as given in MAIL FROM, before any rewriting
                value = received_value(self.meta, self.r.hostname, self.meta.original_from)
                header.add_raw_top(Header([("Received", fold("Received", value))]))
            if self.checks.quarantine:
                self.meta.quarantine = True
            await self._apply_dmarc()
            if self.checks.auth_results:
                val = format_auth_results(self.r.hostname, self.checks.auth_results)
                header.add_raw_top(Header([("Authentication-Results", fold("Authentication-Results", val))]))
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
        task, self.dmarc_fetch = self.dmarc_fetch, None
        if isinstance(task, asyncio.Task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
