"""`pymaddy imap-msgs add|add-flags|rem-flags|set-flags|remove|copy|move|list|dump`
(maddy's internal/cli/ctl/imap.go, spec §G).

Messages are picked by an IMAP sequence set (`1:3,5,7:*`): sequence numbers
(1-based positions in UID order) by default, UIDs with `-u`/`--uid`. Without
`-u` each command (except `add`) first warns `WARNING: --uid=true will be the
default in 0.7` on stderr, as maddy does.

How sets resolve (go-imap-mess, which maddy uses):
* sequence numbers: `*` is the last message; a range that starts past the last
  message matches nothing, one that ends past it stops at the last message;
* UIDs: `*` is the highest UID, `a:b` and `b:a` are the same range;
* nothing matched — an empty mailbox, or no sequence number in range — is
  `Error: No messages matched` (exit 1), except that `list`, `dump` and `copy`
  with UIDs then silently do nothing.

`list` and `dump` without SEQSET show every message (as UIDs `1:*`, no warning).
`remove` deletes the messages outright, whatever their flags.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pymaddy.cli.imap_acct import EXIT_FAIL, EXIT_USAGE, CLIExit, _cfg_block, _confirm, _help, run
from pymaddy.cli.imap_mboxes import mailbox_name, open_account, require

if TYPE_CHECKING:
    from pymaddy.storage.imapsql import IMAPSQL
    from pymaddy.storage.mailstore import AccountStore, Msg

UID_WARNING = "WARNING: --uid=true will be the default in 0.7\n"
RFC3339_LAYOUT = "2006-01-02T15:04:05Z07:00"
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
UINT32_MAX = 0xFFFFFFFF


# -- sequence sets --------------------------------------------------------------------------------------


class NoMessages(Exception):
    pass


def _go_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bad_seq(v: str) -> CLIExit:
    return CLIExit(f"imap: bad sequence set value {_go_quote(v)}", EXIT_FAIL)


def _seq_number(v: str) -> int:
    """A non-zero uint32 or `*` (0)."""
    if v == "*":
        return 0
    if not v.isascii() or not v.isdigit() or v[0] == "0" or int(v) > UINT32_MAX:
        raise _bad_seq(v)
    return int(v)


def parse_seqset(text: str) -> list[tuple[int, int]]:
    """`1:3,5,7:*` as (start, stop) pairs; 0 stands for `*`; start <= stop unless stop is `*`."""
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        if ":" not in part:
            n = _seq_number(part)
            out.append((n, n))
            continue
        a, b = part.split(":", 1)
        try:
            start, stop = _seq_number(a), _seq_number(b)
        except CLIExit:
            raise _bad_seq(part) from None
        if (stop < start and stop != 0) or start == 0:
            start, stop = stop, start
        out.append((start, stop))
    return out


def resolve(seqset: Sequence[tuple[int, int]], uids: Sequence[int], by_uid: bool) -> list[int]:
    """The UIDs (of the mailbox's sorted `uids`) a parsed set names; NoMessages as go-imap-mess says."""
    if not uids:
        raise NoMessages()
    chosen: set[int] = set()
    if by_uid:
        top = uids[-1]
        for start, stop in seqset:
            lo, hi = sorted((start or top, stop or top))
            chosen.update(u for u in uids if lo <= u <= hi)
        return sorted(chosen)
    n = len(uids)
    for start, stop in seqset:
        first = start or n
        if first > n:
            continue
        last = n if start == 0 or stop == 0 or stop > n else stop
        chosen.update(uids[first - 1:last])
    if not chosen:
        raise NoMessages()
    return sorted(chosen)


# -- Go-like rendering ------------------------------------------------------------------------------------


def go_time(dt: datetime, zone: str) -> str:
    """Go's time.Time.String() without the monotonic part: `2006-01-02 15:04:05.999 -0700 MST`."""
    s = dt.strftime("%Y-%m-%d %H:%M:%S")
    if dt.microsecond:
        s += f".{dt.microsecond:06d}".rstrip("0")
    off = dt.utcoffset()
    secs = int(off.total_seconds()) if off is not None else 0
    sign = "-" if secs < 0 else "+"
    mins = abs(secs) // 60
    numeric = f"{sign}{mins // 60:02d}{mins % 60:02d}"
    return f"{s} {numeric} {zone or numeric}"


def local_time(ts: int) -> str:
    """A Unix time as Go prints time.Unix(ts, 0) in the local zone."""
    lt = time.localtime(ts)
    dt = datetime.fromtimestamp(ts).astimezone()
    return go_time(dt, lt.tm_zone)


def header_date(dt: datetime | None) -> str:
    """An envelope date as maddy prints it: the zone is named UTC for +0000, the local zone's
    abbreviation when its offset matches the local one then, else the numeric offset again."""
    if dt is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    off = dt.utcoffset()
    secs = int(off.total_seconds()) if off is not None else 0
    zone = ""
    if secs == 0:
        zone = "UTC"
    else:
        try:
            lt = time.localtime(int(dt.timestamp()))
            if lt.tm_gmtoff == secs:
                zone = lt.tm_zone
        except (OverflowError, OSError, ValueError):
            pass
    return go_time(dt, zone)


def go_list(items: Sequence[str]) -> str:
    return "[" + " ".join(items) + "]"


@dataclass
class Envelope:
    date: datetime | None = None
    subject: str = ""
    from_: tuple[str, ...] = ()
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    in_reply_to: str = ""
    message_id: str = ""


def _addresses(hdr: Any) -> tuple[str, ...]:
    """`Name <local@domain>` per address; like go-imap-sql, the list stops at one without a domain."""
    out: list[str] = []
    if hdr is None:
        return ()
    try:
        addrs = hdr.addresses
    except Exception:
        return ()
    for a in addrs:
        if not a.domain:
            break
        out.append(f"{a.display_name} <{a.username}@{a.domain}>")
    return tuple(out)


def _parse_date(value: str) -> datetime | None:
    from email.utils import parsedate_to_datetime

    value = re.sub(r"[ \t]+\(.*\)$", "", value.strip())
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:  # "-0000": no zone information
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return dt


def envelope(header: bytes) -> Envelope:
    """The parts of a message header `list` shows (RFC 2047 words decoded)."""
    from email import policy
    from email.parser import HeaderParser

    env = Envelope()
    try:
        msg = HeaderParser(policy=policy.default).parsestr(header.decode("utf-8", "surrogateescape"))
    except Exception:
        return env

    def text(name: str) -> str:
        try:
            v = msg.get(name)
            return "" if v is None else str(v)
        except Exception:
            return ""

    date = text("Date")
    env.date = _parse_date(date) if date else None
    env.subject = text("Subject")
    for attr, name in (("from_", "From"), ("to", "To"), ("cc", "Cc"), ("bcc", "Bcc")):
        try:
            setattr(env, attr, _addresses(msg.get(name)))
        except Exception:
            setattr(env, attr, ())
    env.in_reply_to = text("In-Reply-To")
    env.message_id = text("Message-Id")
    return env


def _out(s: str) -> None:
    try:
        data = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = s.encode("utf-8", "replace")
    sys.stdout.buffer.write(data)


# -- registration ------------------------------------------------------------------------------------------


def _uid_flag(p: argparse.ArgumentParser, what: str = "SEQSET") -> None:
    p.add_argument("--uid", "-uid", "-u", dest="uid", action="store_true",
                   help=f"{what} holds UIDs, not sequence numbers")


def _rfc3339(v: str) -> datetime:
    if _RFC3339.fullmatch(v):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"invalid value {_go_quote(v)}: parsing time as {RFC3339_LAYOUT!r} failed")


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    top = sub.add_parser("imap-msgs", help="IMAP messages management",
                         description="Inspect and change the messages in the mailboxes of one IMAP storage "
                                     "account.")
    add_globals(top)
    top.set_defaults(func=_help(top))
    cmds = top.add_subparsers(dest="msgs_command", metavar="COMMAND", parser_class=type(top))

    def command(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = cmds.add_parser(name, help=help_, description=description or help_)
        add_globals(p)
        _cfg_block(p)
        return p

    p = command("add", "Add a message to a mailbox",
                "The message (header and body) is read from standard input; the UID it gets is printed.")
    p.add_argument("--flag", "-flag", "-f", dest="flags", action="append", default=[], metavar="FLAG",
                   help="flag the new message with FLAG (repeatable)")
    p.add_argument("--date", "-date", "-d", dest="date", type=_rfc3339, default=None, metavar="DATE",
                   help=f"internal date, RFC 3339 ({RFC3339_LAYOUT}); default now")
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("mailbox", nargs="?", metavar="MAILBOX")
    p.set_defaults(func=run, action=cmd_add)

    for name, mode, verb in (("add-flags", "+", "Add flags to"), ("rem-flags", "-", "Remove flags from"),
                             ("set-flags", "", "Set the flags of")):
        p = command(name, f"{verb} messages", f"{verb} every message SEQ names.")
        _uid_flag(p, "SEQ")
        p.add_argument("username", nargs="?", metavar="USERNAME")
        p.add_argument("mailbox", nargs="?", metavar="MAILBOX")
        p.add_argument("seqset", nargs="?", metavar="SEQ")
        p.add_argument("flags", nargs="*", metavar="FLAG")
        p.set_defaults(func=run, action=cmd_flags, mode=mode)

    p = command("remove", "Delete messages from a mailbox")
    _uid_flag(p)
    p.add_argument("--yes", "-yes", "-y", dest="yes", action="store_true", help="don't ask for confirmation")
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("mailbox", nargs="?", metavar="MAILBOX")
    p.add_argument("seqset", nargs="?", metavar="SEQSET")
    p.set_defaults(func=run, action=cmd_remove)

    for name, move in (("copy", False), ("move", True)):
        p = command(name, f"{'Move' if move else 'Copy'} messages to another mailbox",
                    f"{'Move' if move else 'Copy'} messages between two mailboxes of the same account; the "
                    "target's APPENDLIMIT does not apply.")
        _uid_flag(p)
        p.add_argument("username", nargs="?", metavar="USERNAME")
        p.add_argument("mailbox", nargs="?", metavar="SRCMAILBOX")
        p.add_argument("seqset", nargs="?", metavar="SEQSET")
        p.add_argument("target", nargs="?", metavar="TGTMAILBOX")
        p.set_defaults(func=run, action=cmd_copy, move=move)

    p = command("list", "List the messages of a mailbox", "Only the messages SEQSET names, when given.")
    _uid_flag(p)
    p.add_argument("--full", "-full", "-f", dest="full", action="store_true",
                   help="show the server's data and the whole envelope")
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("mailbox", nargs="?", metavar="MAILBOX")
    p.add_argument("seqset", nargs="?", metavar="SEQSET")
    p.set_defaults(func=run, action=cmd_list)

    p = command("dump", "Write messages to standard output",
                "The raw text of the messages SEQ names (all when omitted), one after another.")
    _uid_flag(p, "SEQ")
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("mailbox", nargs="?", metavar="MAILBOX")
    p.add_argument("seqset", nargs="?", metavar="SEQ")
    p.set_defaults(func=run, action=cmd_dump)


# -- commands ---------------------------------------------------------------------------------------------


async def _select(acct: AccountStore, name: str, seqset: list[tuple[int, int]], by_uid: bool,
                  quiet_uid: bool = False) -> tuple[int, list[int], list[int]]:
    """(mailbox id, all its UIDs, the UIDs the set names); with `quiet_uid`, nothing matched by UID is
    no error (an empty list)."""
    info = await acct.mailbox(name)
    every = [m.uid for m in await acct.fetch(info.id, None)]
    try:
        return info.id, every, resolve(seqset, every, by_uid)
    except NoMessages:
        if quiet_uid and by_uid:
            return info.id, every, []
        raise CLIExit("No messages matched", EXIT_FAIL) from None


async def cmd_add(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username = require(ns.username, "USERNAME")
    mailbox = mailbox_name(require(ns.mailbox, "MAILBOX"))
    acct = await open_account(st, username)
    data = await asyncio.to_thread(sys.stdin.buffer.read)
    if not data:
        raise CLIExit("Empty message, refusing to continue", EXIT_USAGE)
    date = int(ns.date.timestamp()) if ns.date is not None else None
    _, uid = await acct.append(mailbox, data, ns.flags, date)
    sys.stdout.write(f"{uid}\n")
    return 0


def _checked(ns: argparse.Namespace, mailbox_what: str, seq_what: str, needed: bool = True) -> tuple[
        str, str, list[tuple[int, int]], bool]:
    """USERNAME, MAILBOX and the set (required unless not `needed`: then all, by UID), warning
    when sequence numbers are used."""
    username = require(ns.username, "USERNAME")
    mailbox = mailbox_name(require(ns.mailbox, mailbox_what))
    by_uid: bool = ns.uid
    if needed:
        text = require(ns.seqset, seq_what)
    elif ns.seqset:
        text = ns.seqset
    else:
        text, by_uid = "1:*", True
    if hasattr(ns, "target"):
        require(ns.target, "TGTMAILBOX")
    if not by_uid:
        sys.stderr.write(UID_WARNING)
    return username, mailbox, parse_seqset(text), by_uid


async def cmd_flags(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username, mailbox, seqset, by_uid = _checked(ns, "MAILBOX", "SEQ")
    acct = await open_account(st, username)
    info = await acct.mailbox(mailbox)
    if not ns.flags:
        raise CLIExit("at least once FLAG is required", EXIT_USAGE)
    _, _, uids = await _select(acct, info.name, seqset, by_uid)
    if uids:
        await acct.store_flags(info.id, uids, ns.mode, ns.flags)
    return 0


async def cmd_remove(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username, mailbox, seqset, by_uid = _checked(ns, "MAILBOX", "SEQSET")
    acct = await open_account(st, username)
    await acct.mailbox(mailbox)
    if not ns.yes and not await asyncio.to_thread(_confirm, "Are you sure you want to delete these messages?"):
        raise CLIExit("Cancelled", EXIT_FAIL)
    mid, _, uids = await _select(acct, mailbox, seqset, by_uid)
    if uids:
        # The store only expunges \Deleted messages: mark exactly these, then expunge exactly these.
        await acct.store_flags(mid, uids, "+", ["\\Deleted"])
        await acct.expunge(mid, uids)
    return 0


async def cmd_copy(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username, mailbox, seqset, by_uid = _checked(ns, "SRCMAILBOX", "SEQSET")
    target = mailbox_name(ns.target)
    acct = await open_account(st, username)
    # go-imap-sql: COPY by UID from an empty mailbox does nothing (not even look at the target).
    mid, every, uids = await _select(acct, mailbox, seqset, by_uid, quiet_uid=not ns.move)
    if every or not by_uid:
        await acct.copy(mid, uids, target, move=ns.move)
    return 0


async def cmd_list(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username, mailbox, seqset, by_uid = _checked(ns, "MAILBOX", "SEQSET", needed=False)
    acct = await open_account(st, username)
    mid, every, uids = await _select(acct, mailbox, seqset, by_uid, quiet_uid=True)
    if not uids:
        return 0
    seqnum = {u: i + 1 for i, u in enumerate(every)}
    for m in await acct.fetch(mid, uids, header=True):
        _out(_render(m, seqnum.get(m.uid, 0), ns.full))
        sys.stdout.buffer.flush()
    return 0


def _render(m: Msg, seq: int, full: bool) -> str:
    head = m.header if m.header is not None else (m.data or b"")
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    env = envelope(head if end < 0 else head[:end + 2])
    flags = go_list(m.flags)
    if not full:
        return (f"UID {m.uid}: {', '.join(env.from_)} - {env.subject}\n"
                f"  {flags}, {header_date(env.date)}\n\n")
    lines = [
        "- Server meta-data:",
        f"UID: {m.uid}",
        f"Sequence number: {seq}",
        f"Flags: {flags}",
        f"Body size: {m.size}",
        f"Internal date: {m.internaldate} {local_time(m.internaldate)}",
        "- Envelope:",
    ]
    for label, addrs in (("From", env.from_), ("To", env.to), ("CC", env.cc), ("BCC", env.bcc)):
        if addrs:
            lines.append(f"{label}: {', '.join(addrs)}")
    if env.in_reply_to:
        lines.append(f"In-Reply-To: {env.in_reply_to}")
    if env.message_id:
        lines.append(f"Message-Id: {env.message_id}")
    if env.date is not None:
        lines.append(f"Date: {int(env.date.timestamp())} {header_date(env.date)}")
    if env.subject:
        lines.append(f"Subject: {env.subject}")
    return "\n".join(lines) + "\n\n"


async def cmd_dump(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username, mailbox, seqset, by_uid = _checked(ns, "MAILBOX", "SEQ", needed=False)
    acct = await open_account(st, username)
    mid, _, uids = await _select(acct, mailbox, seqset, by_uid, quiet_uid=True)
    if not uids:
        return 0
    for m in await acct.fetch(mid, uids, content=True):
        sys.stdout.buffer.write(m.data or b"")
        sys.stdout.buffer.flush()
    return 0
