"""SMTP errors as maddy produces them (framework/exterrors)."""

from __future__ import annotations

from typing import Any


class SMTPError(Exception):
    """An error with an SMTP reply: code, enhanced code, text, plus log fields.

    `reason` and `fields` go to the log only; the client sees
    `CODE ENH MESSAGE (msg ID = xxxxxxxx)` (the suffix is added by the endpoint).
    """

    def __init__(
        self,
        code: int,
        enhanced: tuple[int, int, int],
        message: str,
        *,
        reason: str = "",
        check: str = "",
        target: str = "",
        **fields: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced
        self.message = message
        self.reason = reason
        self.check = check
        self.target = target
        self.fields = fields

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def enhanced_str(self) -> str:
        return ".".join(str(x) for x in self.enhanced)

    def log_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"smtp_code": self.code, "smtp_enchcode": self.enhanced_str, "smtp_msg": self.message}
        if self.reason:
            out["reason"] = self.reason
        if self.check:
            out["check"] = self.check
        if self.target:
            out["target"] = self.target
        out.update(self.fields)
        return out

    def __repr__(self) -> str:
        return f"SMTPError({self.code} {self.enhanced_str} {self.message!r})"


def internal_error(err: BaseException, temporary: bool = False) -> SMTPError:
    """maddy's mapping of unexpected errors: 554 (or 451 when temporary) 'Internal server error'."""
    if isinstance(err, SMTPError):
        return err
    if temporary:
        return SMTPError(451, (4, 0, 0), "Internal server error", reason=str(err))
    return SMTPError(554, (5, 0, 0), "Internal server error", reason=str(err))


class AuthError(Exception):
    """Credentials refused (535 5.7.8 Invalid credentials)."""


class AuthTemporaryError(Exception):
    """The auth backend is unavailable (454 4.7.0 Temporary authentication failure)."""
