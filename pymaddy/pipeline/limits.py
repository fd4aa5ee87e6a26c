"""`limits { SCOPE rate BURST [PERIOD]; SCOPE concurrency MAX }` (spec §B.2).

`rate N P`: a bucket of N tokens, refilled to N every P; 0 means unlimited.
`concurrency N`: at most N messages at once. ip/source/destination keep one
bucket per key (idle ones are reaped after a minute, at most 20010 kept).
Waiting is bounded by 5 s, then `451 4.4.5 High load, try again later`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from pymaddy.mail.errors import SMTPError
from pymaddy.runtime.module import Module

WAIT = 5.0
MAX_BUCKETS = 20010
IDLE = 60.0


def high_load() -> SMTPError:
    return SMTPError(451, (4, 4, 5), "High load, try again later", reason="limit wait timed out")


class _Rate:
    def __init__(self, burst: int, period: float, share: Share | None = None) -> None:
        self.burst = burst
        self.period = period
        self.tokens = burst
        self.refill_at = time.monotonic() + period
        self.used = time.monotonic()
        self.share = share

    def _refill(self, now: float) -> None:
        if now >= self.refill_at:
            self.tokens = self.burst
            self.refill_at = now + self.period

    async def take(self, deadline: float) -> None:
        while True:
            now = time.monotonic()
            self.used = now
            self._refill(now)
            if self.tokens > 0:
                self.tokens -= 1
                if self.share is not None:
                    self.share("t")
                return
            wait = self.refill_at - now
            if now + wait > deadline:
                await asyncio.sleep(max(0.0, deadline - now))
                raise high_load()
            await asyncio.sleep(wait)

    def taken_elsewhere(self, _pid: int, _event: str) -> None:
        """Another process took a token of the same bucket (worker processes share the rate)."""
        now = time.monotonic()
        self.used = now
        self._refill(now)
        self.tokens -= 1  # may go below zero: this process then waits for the next refill

    def forget(self, _pid: int) -> None:
        return None

    def release(self) -> None:
        return None

    def idle(self) -> bool:
        return time.monotonic() - self.used > IDLE


class _Concurrency:
    def __init__(self, n: int, share: Share | None = None) -> None:
        self.sem = asyncio.Semaphore(n)
        self.n = n
        self.held = 0
        self.used = time.monotonic()
        self.share = share
        # With worker processes: messages the other processes hold, by pid (their events).
        self.remote: dict[int, int] = {}
        self.changed: asyncio.Event | None = None

    async def take(self, deadline: float) -> None:
        self.used = time.monotonic()
        try:
            await asyncio.wait_for(self.sem.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise high_load() from None
        while self.remote and self.held + sum(self.remote.values()) >= self.n:
            if self.changed is None:
                self.changed = asyncio.Event()
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.sem.release()
                raise high_load() from None
        self.held += 1
        if self.share is not None:
            self.share("+")

    def release(self) -> None:
        if self.held > 0:
            self.held -= 1
            self.sem.release()
            if self.share is not None:
                self.share("-")
        self.used = time.monotonic()

    def taken_elsewhere(self, pid: int, event: str) -> None:
        n = self.remote.get(pid, 0) + (1 if event == "+" else -1)
        if n > 0:
            self.remote[pid] = n
        else:
            self.remote.pop(pid, None)
        if event == "-" and self.changed is not None:
            self.changed.set()

    def forget(self, pid: int) -> None:
        if self.remote.pop(pid, None) and self.changed is not None:
            self.changed.set()

    def idle(self) -> bool:
        return self.held == 0 and not self.remote and time.monotonic() - self.used > IDLE


def _make(rule: Any, share: Share | None = None) -> _Rate | _Concurrency | None:
    if rule.kind == "rate":
        return None if rule.value <= 0 else _Rate(rule.value, rule.period, share)
    return None if rule.value <= 0 else _Concurrency(rule.value, share)


# -- worker processes ----------------------------------------------------------------------------
# Every process counts every process's messages: a take (or release) publishes an event on the
# peer bus (runtime/peerbus.py), keyed by the limits block's place in the configuration (the same
# in every process), the rule and the bucket's key; the others apply it to the same bucket.

Share = Callable[[str], None]
TOPIC = "limits"
_BLOCKS: dict[str, Limits] = {}


def _sharer(block: str, rule: int, key: str) -> Share:
    from pymaddy.runtime import peerbus

    pid = os.getpid()

    def share(event: str) -> None:
        if peerbus.active():
            peerbus.publish(TOPIC, {"b": block, "r": rule, "k": key, "e": event, "pid": pid})

    return share


def _on_event(p: dict[str, Any]) -> None:
    lim = _BLOCKS.get(str(p.get("b")))
    pid, rule, event = p.get("pid"), p.get("r"), str(p.get("e"))
    if lim is None or not isinstance(pid, int) or not isinstance(rule, int):
        return
    b = lim.bucket(rule, str(p.get("k") or ""))
    if b is not None:
        b.taken_elsewhere(pid, event)


def _on_leave(pid: int) -> None:
    for lim in list(_BLOCKS.values()):
        for b in lim.all_buckets():
            b.forget(pid)


class _Keyed:
    def __init__(self, rule: Any, block: str, index: int) -> None:
        self.rule = rule
        self.block = block
        self.index = index
        self.buckets: dict[str, _Rate | _Concurrency] = {}

    def get(self, key: str) -> _Rate | _Concurrency | None:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= MAX_BUCKETS:
                for k in [k for k, v in self.buckets.items() if v.idle()]:
                    del self.buckets[k]
            if len(self.buckets) >= MAX_BUCKETS:
                return None
            b = _make(self.rule, _sharer(self.block, self.index, key))
            if b is None:
                return None
            self.buckets[key] = b
        return b


class Limits(Module):
    def log_name(self) -> str:
        return self.inst.instance or "limits"

    def __init__(self, inst: Any, ctx: Any) -> None:
        super().__init__(inst, ctx)
        self.global_: list[_Rate | _Concurrency] = []
        self.keyed: dict[str, list[_Keyed]] = {"ip": [], "source": [], "destination": []}
        self.by_rule: dict[int, _Rate | _Concurrency | _Keyed] = {}
        block = f"{inst.node.file}:{inst.node.line}"  # the same in every worker process
        for i, rule in enumerate(self.settings.get("rules") or []):
            if rule.scope == "all":
                b = _make(rule, _sharer(block, i, ""))
                if b is not None:
                    self.global_.append(b)
                    self.by_rule[i] = b
            else:
                k = _Keyed(rule, block, i)
                self.keyed[rule.scope].append(k)
                self.by_rule[i] = k
        _BLOCKS[block] = self  # the newest generation's block gets the other processes' events
        from pymaddy.runtime import peerbus

        peerbus.subscribe(TOPIC, _on_event)
        peerbus.on_leave(_on_leave)

    def bucket(self, rule: int, key: str) -> _Rate | _Concurrency | None:
        b = self.by_rule.get(rule)
        return b.get(key) if isinstance(b, _Keyed) else b

    def all_buckets(self) -> list[_Rate | _Concurrency]:
        return [*self.global_, *(b for ks in self.keyed.values() for k in ks for b in k.buckets.values())]

    def _buckets(self, ip: str, domain: str) -> list[_Rate | _Concurrency]:
        out = list(self.global_)
        for scope, key in (("ip", ip), ("source", domain)):
            for k in self.keyed[scope]:
                b = k.get(key)
                if b is not None:
                    out.append(b)
        return out

    async def take_msg(self, ip: str, domain: str) -> None:
        deadline = time.monotonic() + WAIT
        taken: list[_Rate | _Concurrency] = []
        try:
            for b in self._buckets(ip, domain):
                await b.take(deadline)
                taken.append(b)
        except BaseException:
            for b in taken:
                b.release()
            raise

    def release_msg(self, ip: str, domain: str) -> None:
        for b in self._buckets(ip, domain):
            b.release()

    async def take_dest(self, domain: str) -> None:
        deadline = time.monotonic() + WAIT
        for k in self.keyed["destination"]:
            b = k.get(domain)
            if b is not None:
                await b.take(deadline)

    def release_dest(self, domain: str) -> None:
        for k in self.keyed["destination"]:
            b = k.buckets.get(domain)
            if b is not None:
                b.release()
