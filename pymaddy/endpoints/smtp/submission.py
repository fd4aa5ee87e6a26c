"""Header checks and fixes of the submission endpoint (maddy's submissionPrepare, spec §B.1).

Only the first field of each name is examined, and an empty field counts as absent
(go-message's Header.Get). Added fields go on top of the header (Header.Set).
"""

from __future__ import annotations

import email.utils
import uuid
from datetime import UTC, datetime

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Header, MsgMeta
from pymaddy.runtime.log import Logger


def _addresses(value: str) -> list[str] | None:
    """The addresses of an address-list value, or None when it does not parse."""
    if value.count("<") != value.count(">") or value.count('"') % 2:
        return None
    pairs = email.utils.getaddresses([value])
    if not pairs:
        return None
    out = []
    for _name, addr in pairs:
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain or " " in addr:
            return None
        out.append(addr)
    return out


def _date_ok(value: str) -> bool:
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError, IndexError):
        return False


def submission_prepare(meta: MsgMeta, header: Header, hostname: str, log: Logger | None = None) -> None:
    meta.dont_trace_sender = True
    if not header.get("Message-ID"):
        if log is not None:
            log.msg("adding missing Message-ID", msg_id=meta.id)
        header.remove("Message-ID")
        header.add_top("Message-ID", f"<{uuid.uuid4()}@{hostname}>")
    if not header.get("From"):
        raise SMTPError(554, (5, 6, 0), "Message does not contains a From header field", modifier="submission_prepare")
    sender = header.get("Sender")
    if sender:
        got = _addresses(sender)
        if got is None or len(got) != 1:
            raise SMTPError(554, (5, 6, 0), "Invalid address in Sender", modifier="submission_prepare", addr=sender)
    for name in ("To", "Cc", "Bcc", "Reply-To"):
        v = header.get(name)
        if v and _addresses(v) is None:
            raise SMTPError(554, (5, 6, 0), f"Invalid address in {name}", modifier="submission_prepare", addr=v)
    frm = header.get("From") or ""
    addrs = _addresses(frm)
    if addrs is None:
        raise SMTPError(554, (5, 6, 0), "Invalid address in From", modifier="submission_prepare", addr=frm)
    if len(addrs) > 1 and not header.get("Sender"):
        raise SMTPError(554, (5, 6, 0), "Missing Sender header field", modifier="submission_prepare", addr=frm)
    date = header.get("Date")
    if date:
        if not _date_ok(date):
            raise SMTPError(554, (5, 0, 0), "Malformed Date header", modifier="submission_prepare", date=date)
    else:
        if log is not None:
            log.msg("adding missing Date header", msg_id=meta.id)
        now = datetime.now(UTC)
        header.remove("Date")
        header.add_top("Date", now.strftime("%a, ") + str(now.day) + now.strftime(" %b %Y %H:%M:%S +0000"))
