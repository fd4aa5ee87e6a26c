"""The authentication interface (maddy's module.PlainAuth)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class PlainAuth(ABC):
    """Username/password checks for SASL PLAIN and LOGIN.

    Raise `pymaddy.mail.errors.AuthError` for refused credentials and
    `AuthTemporaryError` when the backend cannot answer; return on success.
    """

    @abstractmethod
    async def auth_plain(self, username: str, password: str) -> None: ...
