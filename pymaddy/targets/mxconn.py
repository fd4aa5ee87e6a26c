"""target.remote's connections to MX hosts and the idle-connection cache.

A connection that finished a transaction cleanly is reset (RSET) and kept per
recipient domain for `conn_max_idle_time` seconds, at most
`conn_max_idle_count` per domain, and reused for up to `conn_reuse_limit`
transactions (maddy's smtpconn/pool). RFC 5321 §4.5.3.2.7 lets a server drop
a client after 5 idle minutes; 150 s keeps well inside that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from pymaddy.targets.policies import ConnState, MXLevel, TLSLevel
from pymaddy.targets.smtpclient import SMTPClient

__all__ = ["MXConn", "Pool"]

MAX_KEYS = 5000
CLEANUP_INTERVAL = 60.0


@dataclass(eq=False)
class MXConn:
    """One SMTP connection to an MX of `domain`, with the levels its policies granted."""

    client: SMTPClient
    domain: str
    mx: str
    reuse_limit: int
    dnssec_ok: bool = False
    mx_level: MXLevel = MXLevel.NONE
    tls_level: TLSLevel = TLSLevel.NONE
    tls: ConnState = field(default_factory=ConnState)
    transactions: int = 0
    errored: bool = False
    last_use: float = field(default_factory=time.monotonic)
    rcpts: list[str] = field(default_factory=list)

    async def usable(self) -> bool:
        """Still worth caching: under the reuse limit, not failed, and the server accepts RSET."""
        if self.transactions > self.reuse_limit or self.errored or not self.client.connected:
            return False
        try:
            await self.client.rset()
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.client.quit()


class Pool:
    """Idle connections per key (the recipient domain), newest last."""

    def __init__(self, max_per_key: int, max_idle: float, max_keys: int = MAX_KEYS) -> None:
        self.max_per_key = max_per_key
        self.max_idle = max_idle
        self.max_keys = max_keys
        self.idle: OrderedDict[str, list[MXConn]] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._cleaner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._cleaner = asyncio.get_running_loop().create_task(self._clean_loop())

    def get(self, key: str) -> MXConn | None:
        conns = self.idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if now - conn.last_use < self.max_idle and conn.client.connected:
                if not conns:
                    del self.idle[key]
                return conn
            self._close_later(conn)
        self.idle.pop(key, None)
        return None

    def put(self, key: str, conn: MXConn) -> None:
        if self.max_per_key <= 0:
            self._close_later(conn)
            return
        conns = self.idle.setdefault(key, [])
        self.idle.move_to_end(key)
        conns.append(conn)
        while len(conns) > self.max_per_key:
            self._close_later(conns.pop(0))
        while len(self.idle) > self.max_keys:
            _, old = self.idle.popitem(last=False)
            for c in old:
                self._close_later(c)

    def _close_later(self, conn: MXConn) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def expire(self) -> None:
        now = time.monotonic()
        for key in list(self.idle):
            keep = [c for c in self.idle[key] if now - c.last_use < self.max_idle and c.client.connected]
            for c in self.idle[key]:
                if c not in keep:
                    self._close_later(c)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]

    async def _clean_loop(self) -> None:
        while True:
            await asyncio.sleep(min(CLEANUP_INTERVAL, max(self.max_idle, 1.0)))
            self.expire()

    async def close(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
            with contextlib.suppress(BaseException):
                await self._cleaner
            self._cleaner = None
        conns = [c for cs in self.idle.values() for c in cs]
        self.idle.clear()
        await asyncio.gather(*(c.close() for c in conns), *self._closing, return_exceptions=True)
