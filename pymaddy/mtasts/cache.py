"""The MTA-STS policy cache (RFC 8461 §5.1, §10.2), in memory or one file per domain.

Lookup order for a domain: the `_mta-sts` TXT id; if it equals the id of a
still-valid cached policy, that policy is used without a fetch; otherwise the
policy is fetched and cached. When the TXT lookup or the fetch fails, a
still-valid cached policy keeps applying (§5.1: a removed or unreachable
policy must not disable protection before max_age runs out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pymaddy.mtasts.policy import NoPolicy, Policy, PolicyError, parse_policy, parse_txt

__all__ = ["Cache", "Entry", "FSStore", "RAMStore", "Store"]

TxtFn = Callable[[str], Awaitable[list[str]]]
FetchFn = Callable[[str], Awaitable[Policy]]
_DOMAIN = re.compile(r"^[a-z0-9_.-]{1,253}$")


@dataclass(frozen=True)
class Entry:
    ident: str
    fetched: float  # unix time of the fetch
    policy: Policy

    def valid(self, now: float) -> bool:
        return now < self.fetched + self.policy.max_age


class Store(ABC):
    @abstractmethod
    async def load(self, domain: str) -> Entry | None: ...

    @abstractmethod
    async def save(self, domain: str, entry: Entry) -> None: ...

    @abstractmethod
    async def domains(self) -> list[str]: ...

    @abstractmethod
    async def remove(self, domain: str) -> None: ...


class RAMStore(Store):
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    async def load(self, domain: str) -> Entry | None:
        return self.entries.get(domain)

    async def save(self, domain: str, entry: Entry) -> None:
        self.entries[domain] = entry

    async def domains(self) -> list[str]:
        return list(self.entries)

    async def remove(self, domain: str) -> None:
        self.entries.pop(domain, None)


class FSStore(Store):
    """One JSON file per domain, written atomically (temp file, fsync, rename), in a thread."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    def _path(self, domain: str) -> str:
        if not _DOMAIN.match(domain) or domain.startswith("."):
            raise ValueError(f"invalid domain {domain!r}")
        return os.path.join(self.dir, domain)

    async def load(self, domain: str) -> Entry | None:
        return await asyncio.to_thread(self._load, domain)

    def _load(self, domain: str) -> Entry | None:
        try:
            with open(self._path(domain), encoding="utf-8") as f:
                raw = json.load(f)
            return Entry(str(raw["id"]), float(raw["fetched"]), parse_policy(str(raw["policy"])))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, PolicyError):
            return None  # a damaged entry is as good as none: the policy is fetched again

    async def save(self, domain: str, entry: Entry) -> None:
        await asyncio.to_thread(self._save, domain, entry)

    def _save(self, domain: str, entry: Entry) -> None:
        path = self._path(domain)
        data = json.dumps({"id": entry.ident, "fetched": entry.fetched, "policy": entry.policy.to_text()})
        os.makedirs(self.dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError, ValueError):
                os.unlink(tmp)
            raise

    async def domains(self) -> list[str]:
        def scan() -> list[str]:
            try:
                return [n for n in os.listdir(self.dir) if not n.startswith(".") and _DOMAIN.match(n)]
            except OSError:
                return []

        return await asyncio.to_thread(scan)

    async def remove(self, domain: str) -> None:
        def rm() -> None:
            with contextlib.suppress(OSError, ValueError):
                os.unlink(self._path(domain))

        await asyncio.to_thread(rm)


class Cache:
    """get(domain) → Policy or NoPolicy; refresh() re-validates every cached domain."""

    def __init__(self, store: Store, txt: TxtFn, fetch: FetchFn, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.txt = txt
        self.fetch = fetch
        self.clock = clock

    async def get(self, domain: str) -> Policy:
        domain = domain.lower().rstrip(".")
        return await self._get(domain, force=False)

    async def _get(self, domain: str, force: bool) -> Policy:
        now = self.clock()
        cached = await self.store.load(domain)
        valid = cached if cached is not None and cached.valid(now) else None
        try:
            ident = parse_txt(await self.txt(f"_mta-sts.{domain}"))  # RFC 8461 §3.1
        except Exception as e:
            if valid is not None:
                return valid.policy
            raise NoPolicy(str(e)) from e
        if valid is not None and valid.ident == ident and not force:
            return valid.policy
        try:
            policy = await self.fetch(domain)  # RFC 8461 §3.3
        except Exception as e:
            if valid is not None:
                return valid.policy
            raise NoPolicy(f"policy fetch failed: {e}") from e
        if policy.max_age > 0:
            await self.store.save(domain, Entry(ident, now, policy))
        elif cached is not None:
            await self.store.remove(domain)
        return policy

    async def refresh(self) -> None:
        """RFC 8461 §10.2: re-check cached domains so a policy does not lapse while mail is idle.

        Entries past their max_age are dropped; others are re-fetched when their id changed."""
        now = self.clock()
        for domain in await self.store.domains():
            entry = await self.store.load(domain)
            if entry is None:
                continue
            if not entry.valid(now):
                await self.store.remove(domain)
                continue
            try:
                await self._get(domain, force=False)
            except NoPolicy:
                continue
