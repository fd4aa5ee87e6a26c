"""`pymaddy imap-mboxes list|create|remove|rename` (maddy's internal/cli/ctl/imap.go, spec §G).

Works on one account of the IMAP storage block named by `--cfg-block`
(default `local_mailboxes`, env MADDY_CFGBLOCK), opened like `imap-acct` does
(pymaddy.cli.blocks), so it can run next to the server.

Behaviour follows maddy + go-imap-sql:
* `list` prints one mailbox a line in creation order; with attributes (the
  special-use one, then `\\HasChildren` or `\\HasNoChildren`) as
  `NAME<TAB>[ATTR ATTR]`, Go's rendering of a string slice. No mailbox at all:
  `No mailboxes.` on stderr, exit 0.
* `create --special WORD` capitalises WORD like Go's strings.Title and accepts
  only \\Archive, \\Drafts, \\Junk, \\Sent and \\Trash
  (`imap: special attribute is not supported` otherwise).
* `remove` without `-y` says how many messages the mailbox holds (when any)
  and asks; anything but `y`/`Y` is `Error: Cancelled`, exit 1.
* missing arguments: `Error: USERNAME is required` (NAME, OLDNAME, NEWNAME), exit 2;
  failures of the operation (`imap: user doesn't exists`, `No such mailbox`,
  `Mailbox already exists`, …): `Error: …`, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pymaddy.cli.imap_acct import EXIT_FAIL, EXIT_USAGE, CLIExit, _cfg_block, _confirm, _help, run

if TYPE_CHECKING:
    from pymaddy.storage.imapsql import IMAPSQL
    from pymaddy.storage.mailstore import AccountStore

SPECIAL_USE = ("\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash")


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    top = sub.add_parser("imap-mboxes", help="IMAP mailboxes (folders) management",
                         description="Inspect and change the folders of one IMAP storage account.")
    add_globals(top)
    top.set_defaults(func=_help(top))
    cmds = top.add_subparsers(dest="mboxes_command", metavar="COMMAND", parser_class=type(top))

    p = cmds.add_parser("list", help="Show the mailboxes of an account")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("--subscribed", "-subscribed", "-s", dest="subscribed", action="store_true",
                   help="only mailboxes the user is subscribed to")
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.set_defaults(func=run, action=cmd_list)

    p = cmds.add_parser("create", help="Create a mailbox")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("--special", "-special", dest="special", default=None, metavar="KIND",
                   help="give the mailbox a SPECIAL-USE attribute: archive, drafts, junk, sent or trash")
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.set_defaults(func=run, action=cmd_create)

    p = cmds.add_parser("remove", help="Remove a mailbox",
                        description="Deletes the mailbox and every message in it, for good.")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("--yes", "-yes", "-y", dest="yes", action="store_true", help="don't ask for confirmation")
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("name", nargs="?", metavar="MAILBOX")
    p.set_defaults(func=run, action=cmd_remove)

    p = cmds.add_parser("rename", help="Rename a mailbox",
                        description="Clients that have the mailbox open may be confused by a rename.")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("old", nargs="?", metavar="OLDNAME")
    p.add_argument("new", nargs="?", metavar="NEWNAME")
    p.set_defaults(func=run, action=cmd_rename)


# -- helpers shared with imap-msgs ------------------------------------------------------------------


def require(value: str | None, what: str) -> str:
    if not value:
        raise CLIExit(f"{what} is required", EXIT_USAGE)
    return value


def mailbox_name(name: str) -> str:
    """INBOX is case-insensitive; other names are used as given."""
    return "INBOX" if name.upper() == "INBOX" else name


async def open_account(st: IMAPSQL, username: str) -> AccountStore:
    from pymaddy.storage.imapsql import AccountNotFound
    from pymaddy.storage.mailstore import AccountStore

    account = await st.get_account(username)
    if account is None:
        raise AccountNotFound()
    return AccountStore(st, account)


def go_title(s: str) -> str:
    """Go's strings.Title: upper-case the first letter of every word, leave the rest alone."""
    out = []
    prev_sep = True
    for c in s:
        out.append(c.upper() if prev_sep else c)
        prev_sep = not (c.isalnum() or c == "_")
    return "".join(out)


# -- commands -----------------------------------------------------------------------------------------


async def cmd_list(ns: argparse.Namespace, st: IMAPSQL) -> int:
    from pymaddy.storage.imapsql import DELIMITER

    acct = await open_account(st, require(ns.username, "USERNAME"))
    every = sorted(await acct.mailboxes(), key=lambda m: m.id)
    names = [m.name for m in every]
    shown = [m for m in every if m.subscribed] if ns.subscribed else every
    if not shown:
        sys.stderr.write("No mailboxes.\n")
    for m in shown:
        attrs = [m.special_use] if m.special_use else []
        prefix = m.name + DELIMITER
        attrs.append("\\HasChildren" if any(n.startswith(prefix) for n in names) else "\\HasNoChildren")
        sys.stdout.write(f"{m.name}\t[{' '.join(attrs)}]\n")
    return 0


async def cmd_create(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username = require(ns.username, "USERNAME")
    name = require(ns.name, "NAME")
    acct = await open_account(st, username)
    special: str | None = None
    if ns.special is not None:
        special = "\\" + go_title(ns.special)
        if special not in SPECIAL_USE:
            raise CLIExit("imap: special attribute is not supported", EXIT_FAIL)
    await acct.create(mailbox_name(name), special)
    return 0


async def cmd_remove(ns: argparse.Namespace, st: IMAPSQL) -> int:
    from pymaddy.storage.imapsql import INBOX

    username = require(ns.username, "USERNAME")
    name = mailbox_name(require(ns.name, "NAME"))
    acct = await open_account(st, username)
    if not ns.yes:
        status = await acct.status(name)
        if status.messages:
            sys.stderr.write(f"Mailbox {name} contains {status.messages} messages.\n")
        if not await asyncio.to_thread(_confirm, "Are you sure you want to delete that mailbox?"):
            raise CLIExit("Cancelled", EXIT_FAIL)
    if name == INBOX:
        raise CLIExit("DeleteMailbox: can't delete INBOX", EXIT_FAIL)
    await acct.delete(name)
    return 0


async def cmd_rename(ns: argparse.Namespace, st: IMAPSQL) -> int:
    username = require(ns.username, "USERNAME")
    old = require(ns.old, "OLDNAME")
    new = require(ns.new, "NEWNAME")
    acct = await open_account(st, username)
    await acct.rename(mailbox_name(old), mailbox_name(new))
    return 0
