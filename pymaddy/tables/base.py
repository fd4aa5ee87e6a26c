"""The table interface: key → values, optionally mutable (maddy's module.Table)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Table(ABC):
    """Lookups receive keys already normalized by the caller (lower-case, NFC, U-labels)."""

    @abstractmethod
    async def lookup_multi(self, key: str) -> list[str]:
        """Every value for `key`; [] when absent. Raise on backend failure."""

    async def lookup(self, key: str) -> str | None:
        """The first value, or None when the key is absent."""
        values = await self.lookup_multi(key)
        return values[0] if values else None


class MutableTable(Table):
    """Tables that `pymaddy creds` and friends can edit."""

    @abstractmethod
    async def keys(self) -> list[str]: ...

    @abstractmethod
    async def set_key(self, key: str, value: str) -> None: ...

    @abstractmethod
    async def remove_key(self, key: str) -> None: ...
