"""Configuration errors: every one carries the file and line it is about."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymaddy.config.ir import Node


class ConfigError(Exception):
    """An error located in a config file; printed as ``FILE:LINE: message``."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(message)
        self.file = file
        self.line = line
        self.message = message

    @classmethod
    def at(cls, node: Node, message: str) -> ConfigError:
        return cls(node.file, node.line, message)

    def __str__(self) -> str:
        if not self.file:
            return self.message
        return f"{self.file}:{self.line}: {self.message}"

    def sort_key(self) -> tuple[str, int, str]:
        return (self.file, self.line, self.message)


class ErrorList:
    """Collects errors so a check reports all of them, not just the first."""

    def __init__(self) -> None:
        self._errors: list[ConfigError] = []
        self._seen: set[tuple[str, int, str]] = set()

    def add(self, err: ConfigError) -> None:
        key = err.sort_key()
        if key not in self._seen:
            self._seen.add(key)
            self._errors.append(err)

    def at(self, node: Node, message: str) -> None:
        self.add(ConfigError.at(node, message))

    def extend(self, errs: ErrorList) -> None:
        for e in errs:
            self.add(e)

    def __iter__(self) -> Iterator[ConfigError]:
        return iter(self._errors)

    def __len__(self) -> int:
        return len(self._errors)

    def __bool__(self) -> bool:
        return bool(self._errors)
