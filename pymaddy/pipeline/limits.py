"""`limits { SCOPE rate BURST [PERIOD]; SCOPE concurrency MAX }` (spec §B.2).

`rate N P`: a bucket of N tokens, refilled to N every P; 0 means unlimited.
`concurrency N`: at most N messages at once. ip/source/destination keep one
bucket per key (idle ones are reaped after a minute, at most 20010 kept).
Waiting is bounded by 5 s, then `451 4.4.5 High load, try again later`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pymaddy.mail.errors import SMTPError
from pymaddy.runtime.module import Module

WAIT = 5.0
MAX_BUCKETS = 20010
IDLE = 60.0


def high_load() -> SMTPError:
    return SMTPError(451, (4, 4, 5), "High load, try again later", reason="limit wait timed out")


class _Rate:
    def __init__(self, burst: int, period: float) -> None:
        self.burst = burst
        self.period = period
        self.tokens = burst
        self.refill_at = time.monotonic() + period
        self.used = time.monotonic()

    async def take(self, deadline: float) -> None:
        while True:
            now = time.monotonic()
            self.used = now
            if now >= self.refill_at:
                self.tokens = self.burst
                self.refill_at = now + self.period
            if self.tokens > 0:
                self.tokens -= 1
                return
            wait = self.refill_at - now
            if now + wait > deadline:
                await asyncio.sleep(max(0.0, deadline - now))
                raise high_load()
            await asyncio.sleep(wait)

    def release(self) -> None:
        return None

    def idle(self) -> bool:
        return time.monotonic() - self.used > IDLE


class _Concurrency:
    def __init__(self, n: int) -> None:
        self.sem = asyncio.Semaphore(n)
        self.n = n
        self.held = 0
        self.used = time.monotonic()

    async def take(self, deadline: float) -> None:
        self.used = time.monotonic()
        try:
            await asyncio.wait_for(self.sem.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise high_load() from None
        self.held += 1

    def release(self) -> None:
        if self.held > 0:
            self.held -= 1
            self.sem.release()
        self.used = time.monotonic()

    def idle(self) -> bool:
        return self.held == 0 and time.monotonic() - self.used > IDLE


def _make(rule: Any) -> _Rate | _Concurrency | None:
    if rule.kind == "rate":
        return None if rule.value <= 0 else _Rate(rule.value, rule.period)
    return None if rule.value <= 0 else _Concurrency(rule.value)


class _Keyed:
    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.buckets: dict[str, _Rate | _Concurrency] = {}

    def get(self, key: str) -> _Rate | _Concurrency | None:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= MAX_BUCKETS:
                for k in [k for k, v in self.buckets.items() if v.idle()]:
                    del self.buckets[k]
            if len(self.buckets) >= MAX_BUCKETS:
                return None
            b = _make(self.rule)
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
        for rule in self.settings.get("rules") or []:
            if rule.scope == "all":
                b = _make(rule)
                if b is not None:
                    self.global_.append(b)
            else:
                self.keyed[rule.scope].append(_Keyed(rule))

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
