"""Delivery Status Notifications as maddy writes them (spec §E; RFC 3464, RFC 6522, RFC 6533).

A DSN is `multipart/report; report-type=delivery-status` with three parts:
a human-readable text, the machine-readable `message/delivery-status` (or
`message/global-delivery-status` for SMTPUTF8 messages, RFC 6533 §6) and the
original header as `message/rfc822-headers` (`message/global-headers`).
A library: it knows nothing of the queue or the configuration.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from pymaddy.mail import address
from pymaddy.mail.message import Header

FAILED = "failed"
DELAYED = "delayed"  # RFC 3464 §2.3.3; maddy never sends these (issue #326), pymaddy can


@dataclass
class MTAInfo:
    reporting_mta: str
    received_from_mta: str = ""
    x_sender: str = ""
    x_message_id: str = ""
    arrival: float = 0.0  # unix time; 0 = unknown
    last_attempt: float = 0.0


@dataclass
class Diagnostic:
    code: int
    enhanced: tuple[int, int, int]
    message: str

    def __str__(self) -> str:
        return f"SMTP error {self.code:03d}: {self.message}" if self.message else f"SMTP error {self.code:03d}"


@dataclass
class RcptInfo:
    final_recipient: str
    action: str
    status: tuple[int, int, int]
    diagnostic: Diagnostic | None = None
    remote_mta: str = ""


@dataclass
class Envelope:
    msg_id: str  # with angle brackets
    from_: str
    to: str


def _rfc5322_date(ts: float) -> str:
    """Go's "Mon, 2 Jan 2006 15:04:05 -0700" (day without padding); always UTC (maddy: local time)."""
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%a, ") + str(dt.day) + dt.strftime(" %b %Y %H:%M:%S %z")


def _go_time_string(ts: float) -> str:
    """Go's time.Time.String() of a second-truncated time: `2006-01-02 15:04:05 -0700 MST`."""
    if ts <= 0:
        return "0001-01-01 00:00:00 +0000 UTC"
    dt = datetime.fromtimestamp(int(ts), UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _oneline(s: str) -> str:
    return s.replace("\n", " ").replace("\r", " ")


def _domain(utf8: bool, name: str) -> str:
    """maddy's dns.SelectIDNA: U-labels for SMTPUTF8 messages, A-labels otherwise."""
    try:
        if utf8:
            return name.encode("ascii").decode("idna") if "xn--" in name.lower() else name
        return address.to_ascii_domain(name)
    except (address.AddressError, UnicodeError):
        return name


def _addr(utf8: bool, addr: str) -> str:
    if "@" not in addr:
        return addr
    local, _, domain = addr.rpartition("@")
    return local + "@" + _domain(utf8, domain)


def _fields(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in pairs) + b"\r\n"


def mta_fields(utf8: bool, info: MTAInfo) -> list[tuple[str, str]]:
    """Per-message fields of the delivery-status part (RFC 3464 §2.2)."""
    out = [("Reporting-MTA", "dns; " + _domain(utf8, info.reporting_mta))]
    if info.received_from_mta:
        out.append(("Received-From-MTA", "dns; " + _domain(utf8, info.received_from_mta)))
    if info.x_sender:
        out.append(("X-Maddy-Sender", ("utf8; " if utf8 else "rfc822; ") + _addr(utf8, info.x_sender)))
    if info.x_message_id:
        out.append(("X-Maddy-MsgID", info.x_message_id))
    if info.arrival:
        out.append(("Arrival-Date", _rfc5322_date(info.arrival)))
        out.append(("Last-Attempt-Date", _rfc5322_date(info.last_attempt or info.arrival)))
    return out


def rcpt_fields(utf8: bool, r: RcptInfo) -> list[tuple[str, str]]:
    """Per-recipient fields (RFC 3464 §2.3); utf8-type addresses per RFC 6533 §3."""
    out = [
        ("Final-Recipient", ("utf8; " if utf8 else "rfc822; ") + _addr(utf8, r.final_recipient)),
        ("Action", r.action),
        ("Status", ".".join(str(x) for x in r.status)),
    ]
    if r.diagnostic is not None:
        d = r.diagnostic
        enh = ".".join(str(x) for x in d.enhanced)
        out.append(("Diagnostic-Code", f"smtp; {d.code} {enh} {_oneline(d.message)}"))
    if r.remote_mta:
        out.append(("Remote-MTA", "dns; " + _domain(utf8, r.remote_mta)))
    return out


_FAILED_TEXT = """
This is the mail delivery system at {mta}.

Unfortunately, your message could not be delivered to one or more
recipients. The usual cause of this problem is invalid
recipient address or maintenance at the recipient side.

Contact the postmaster for further assistance, provide the Message ID (below):

Message ID: {msgid}
Arrival: {arrival}
Last delivery attempt: {last}

"""

_DELAYED_TEXT = """
This is the mail delivery system at {mta}.

Your message could not be delivered to one or more recipients yet.
Delivery is still being attempted; you do not need to resend it.
You will be notified again if it finally fails.

Message ID: {msgid}
Arrival: {arrival}
Last delivery attempt: {last}

"""


def generate(
    utf8: bool,
    env: Envelope,
    mta: MTAInfo,
    rcpts: list[RcptInfo],
    failed_header: Header,
    *,
    now: float | None = None,
    boundary: str | None = None,
) -> tuple[Header, bytes]:
    """The DSN's header and body (RFC 6522 multipart/report)."""
    delayed = bool(rcpts) and all(r.action == DELAYED for r in rcpts)
    boundary = boundary or secrets.token_hex(30)
    when = now if now is not None else datetime.now(UTC).timestamp()
    h = Header()
    h.add("Date", _rfc5322_date(when))
    h.add("Message-Id", env.msg_id)
    h.add("Content-Transfer-Encoding", "8bit")
    h.add("Content-Type", f"multipart/report; report-type=delivery-status; boundary={boundary}")
    h.add("MIME-Version", "1.0")
    h.add("Auto-Submitted", "auto-replied")  # RFC 3834 §5
    h.add("To", env.to)
    h.add("From", env.from_)
    h.add("Subject", "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender")

    parts: list[bytes] = []
    # (1) human-readable notification
    text = (_DELAYED_TEXT if delayed else _FAILED_TEXT).format(
        mta=mta.reporting_mta, msgid=mta.x_message_id,
        arrival=_go_time_string(mta.arrival), last=_go_time_string(mta.last_attempt),
    )
    verb = "is delayed with error" if delayed else "failed with error"
    text += "".join(f"Delivery to {r.final_recipient} {verb}: {r.diagnostic}\n" for r in rcpts)
    parts.append(
        _fields([("Content-Transfer-Encoding", "8bit"), ("Content-Type", 'text/plain; charset="utf-8"'),
                 ("Content-Description", "Notification")])
        + text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    )
    # (2) machine-readable report, RFC 3464 §2.1
    status = b"".join(_fields(rcpt_fields(utf8, r)) for r in rcpts)
    parts.append(
        _fields([("Content-Type", "message/global-delivery-status" if utf8 else "message/delivery-status"),
                 ("Content-Description", "Delivery report")])
        # groups are separated by blank lines; none after the last one (no empty trailing group)
        + (_fields(mta_fields(utf8, mta)) + status)[:-2]
    )
    # (3) the original header, RFC 6522 §4 / RFC 6533 §6.3
    parts.append(
        _fields([("Content-Description", "Undelivered message header"),
                 ("Content-Type", "message/global-headers" if utf8 else "message/rfc822-headers"),
                 ("Content-Transfer-Encoding", "8bit")])
        + failed_header.to_bytes() + b"\r\n"
    )
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"
    return h, body
