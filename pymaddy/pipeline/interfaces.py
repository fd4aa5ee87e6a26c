"""The interfaces modules meet through (maddy's framework/module), as Python ABCs.

A runtime class implements one or more of these; the pipeline and endpoints
only ever call these methods. All are async: anything blocking (SQLite, bcrypt,
RSA, LDAP) runs off the event loop inside the implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta

# -- delivery -------------------------------------------------------------------


class Delivery(ABC):
    """One message on its way into one target. Call order: add_rcpt*, body, commit | abort."""

    @abstractmethod
    async def add_rcpt(self, rcpt: str) -> None:
        """Accept a recipient or raise SMTPError (e.g. 501 5.1.1 for an unknown user)."""

    @abstractmethod
    async def body(self, header: Header, body: Body) -> None:
        """Take the message; must not make it visible before commit."""

    @abstractmethod
    async def commit(self) -> None:
        """Make the delivery durable and visible. After this returns, the message is safe."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop everything; must be safe to call at any point, also after a failure."""


StatusCallback = Callable[[str, SMTPError | None], None]


class PartialDelivery(Delivery):
    """A delivery that can succeed for some recipients and fail for others (LMTP, queue)."""

    @abstractmethod
    async def body_non_atomic(self, status: StatusCallback, header: Header, body: Body) -> None:
        """Like body(), but report each recipient's outcome through `status(rcpt, err_or_None)`."""


class DeliveryTarget(ABC):
    """Something that takes messages: storage, queue, remote, smtp/lmtp, a pipeline."""

    @abstractmethod
    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery: ...


# -- checks ----------------------------------------------------------------------


@dataclass
class AuthResult:
    """One `Authentication-Results:` entry (RFC 8601): `method=result reason params`."""

    method: str
    result: str
    reason: str = ""
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class CheckResult:
    """What a check found. `reject` fails the current SMTP command; `quarantine`
    flags the message; `reason` without an action is only logged."""

    reject: SMTPError | None = None
    quarantine: bool = False
    reason: SMTPError | None = None
    auth_results: list[AuthResult] = field(default_factory=list)
    header: Header | None = None  # fields to prepend to the message


OK = CheckResult()


class CheckState:
    """Per-message state of one check; each stage may be called once (rcpt: once per recipient)."""

    async def check_connection(self) -> CheckResult:
        return OK

    async def check_sender(self, mail_from: str) -> CheckResult:
        return OK

    async def check_rcpt(self, rcpt: str) -> CheckResult:
        return OK

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        return OK

    async def close(self) -> None:
        return None


class Check(ABC):
    @abstractmethod
    async def state_for_msg(self, meta: MsgMeta) -> CheckState: ...


class EarlyCheck(ABC):
    """Checks that judge the connection itself, before any transaction (dnsbl)."""

    @abstractmethod
    async def check_conn_early(self, meta: MsgMeta) -> SMTPError | None: ...


# -- modifiers ---------------------------------------------------------------------


class ModifierState:
    async def rewrite_sender(self, mail_from: str) -> str:
        return mail_from

    async def rewrite_rcpt(self, rcpt: str) -> list[str]:
        """One recipient may become several (aliases)."""
        return [rcpt]

    async def rewrite_body(self, header: Header, body: Body) -> None:
        """Change the header in place (DKIM adds its signature here)."""
        return None

    async def close(self) -> None:
        return None


class Modifier(ABC):
    @abstractmethod
    async def state_for_msg(self, meta: MsgMeta) -> ModifierState: ...
