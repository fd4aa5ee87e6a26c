"""`pymaddy imap-acct list|create|remove|appendlimit` (maddy's internal/cli/ctl/imapacct.go, spec §G).

The command compiles the whole configuration, creates state_dir/runtime_dir
like `run`, then starts only the selected storage block (pymaddy.cli.blocks) (default
`local_mailboxes`, env MADDY_CFGBLOCK) and what it references, so it works
while the server runs.

Outputs and exit codes follow maddy: usage problems (missing USERNAME, unknown
block, a block that is no IMAP storage) exit 2; failures of the operation
(`imap: user already exists`, `imap: user doesn't exists`, `Cancelled`) are
one `Error: …` line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

EXIT_FAIL = 1
EXIT_USAGE = 2
DEFAULT_BLOCK = "local_mailboxes"
UINT32_MAX = 0xFFFFFFFF


class CLIExit(Exception):
    """Stop with `Error: MESSAGE` (each line) on stderr and exit `code`."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _cfg_block(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-block", "-cfg-block", dest="cfg_block",
                   default=os.environ.get("MADDY_CFGBLOCK") or DEFAULT_BLOCK,
                   help="module configuration block to use (env MADDY_CFGBLOCK, default local_mailboxes)")


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    desc = ("List/create/delete IMAP storage accounts of the storage block named by --cfg-block "
            "(default local_mailboxes). Creating a storage account does not grant access: "
            "create credentials with 'creds' too.")
    top = sub.add_parser("imap-acct", help="IMAP storage accounts management", description=desc)
    add_globals(top)
    top.set_defaults(func=_help(top))  # no subcommand: help on stderr, exit 2 (as `creds`)
    acct = top.add_subparsers(dest="acct_command", metavar="COMMAND", parser_class=type(top))

    p = acct.add_parser("list", help="List storage accounts")
    add_globals(p)
    _cfg_block(p)
    p.set_defaults(func=run, action=cmd_list)

    p = acct.add_parser("create", help="Create IMAP storage account",
                        description="In addition to account creation, this command creates a set of default "
                                    "folders (mailboxes) with special-use attribute set.")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("--no-specialuse", "-no-specialuse", dest="no_specialuse", action="store_true",
                   help="do not create special-use folders")
    for attr, name in (("sent", "Sent"), ("trash", "Trash"), ("junk", "Junk"), ("drafts", "Drafts"),
                       ("archive", "Archive")):
        p.add_argument(f"--{attr}-name", f"-{attr}-name", dest=f"{attr}_name", default=name,
                       help=f"name of the {attr} folder, empty to not create one (default {name})")
    p.set_defaults(func=run, action=cmd_create)

    p = acct.add_parser("remove", help="Delete IMAP storage account")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("--yes", "-yes", "-y", dest="yes", action="store_true", help="don't ask for confirmation")
    p.set_defaults(func=run, action=cmd_remove)

    p = acct.add_parser("appendlimit", help="Query or set accounts's APPENDLIMIT value",
                        description="APPENDLIMIT is the largest message IMAP APPEND accepts; it does not "
                                    "limit delivery (SMTP). -1 unsets the account's value.")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("--value", "-value", "-v", dest="value", type=int, default=None,
                   help="set APPENDLIMIT to this value (bytes); -1 removes it")
    p.set_defaults(func=run, action=cmd_appendlimit)

    p = acct.add_parser("quota", help="Query or set the account's storage quota (pymaddy extension)",
                        description="The quota is the most bytes the account may store; IMAP QUOTA (RFC 9208) "
                                    "reports it, APPEND and COPY over it fail with [OVERQUOTA]. -1 removes it.")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("username", nargs="?", metavar="USERNAME")
    p.add_argument("--value", "-value", "-v", dest="value", default=None,
                   help="set the quota (bytes, or with a K/M/G suffix); -1 removes it")
    p.set_defaults(func=run, action=cmd_quota)


def _help(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace, str], int]:
    def show(ns: argparse.Namespace, config_path: str) -> int:
        p.print_help(sys.stderr)
        return EXIT_USAGE

    return show


# -- opening the block ------------------------------------------------------------------------------


async def _with_storage(config_path: str, block: str, fn: Callable[[Any], Awaitable[int]]) -> int:
    from pymaddy.cli.blocks import BlockError, open_block
    from pymaddy.storage.imapsql import IMAPSQL

    try:
        async with open_block(config_path, block, IMAPSQL, what="an IMAP storage") as st:
            # Changes reach a running server through the update pipe (IMAPSQL.publish).
            return await fn(st)
    except BlockError as e:
        raise CLIExit(e.message, e.code) from None


def run(ns: argparse.Namespace, config_path: str) -> int:
    action: Callable[[argparse.Namespace, Any], Awaitable[int]] = ns.action
    try:
        return asyncio.run(_with_storage(config_path, ns.cfg_block, lambda st: action(ns, st)))
    except CLIExit as e:
        for line in e.message.splitlines() or [""]:
            sys.stderr.write(f"Error: {line}\n")
        return e.code
    except Exception as e:
        from pymaddy.storage.imapsql import StorageError

        if isinstance(e, StorageError):
            sys.stderr.write(f"Error: {e}\n")
        else:
            sys.stderr.write(f"Error: {type(e).__name__}: {e}\n")
        return EXIT_FAIL


def _require_user(ns: argparse.Namespace) -> None:
    if not ns.username:
        raise CLIExit("USERNAME is required", EXIT_USAGE)


def _confirm(prompt: str) -> bool:
    sys.stderr.write(f"{prompt} [y/N]: ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        sys.stderr.write("\n")
        return False
    return line.rstrip("\r\n") in ("y", "Y")


# -- commands -----------------------------------------------------------------------------------------


async def cmd_list(ns: argparse.Namespace, st: Any) -> int:
    names = await st.list_accounts()
    if not names:
        sys.stderr.write("No users.\n")
    for n in names:
        print(n)
    return 0


async def cmd_create(ns: argparse.Namespace, st: Any) -> int:
    _require_user(ns)
    await st.create_account(ns.username)
    if ns.no_specialuse:
        return 0
    for attr, what in (("\\Sent", "sent"), ("\\Trash", "trash"), ("\\Junk", "junk"), ("\\Drafts", "drafts"),
                       ("\\Archive", "archive")):
        name = getattr(ns, f"{what}_name")
        if not name:
            continue
        try:
            await st.create_mailbox(ns.username, name, attr)
        except Exception as e:
            sys.stderr.write(f"Failed to create {what} folder: {e}\n")
    return 0


async def cmd_remove(ns: argparse.Namespace, st: Any) -> int:
    _require_user(ns)
    if not ns.yes and not await asyncio.to_thread(_confirm, "Are you sure you want to delete this user account?"):
        raise CLIExit("Cancelled", EXIT_FAIL)
    await st.remove_account(ns.username)
    return 0


async def cmd_appendlimit(ns: argparse.Namespace, st: Any) -> int:
    _require_user(ns)
    if ns.value is not None and (ns.value < -1 or ns.value > UINT32_MAX):
        raise CLIExit("APPENDLIMIT value must be between 0 and 4294967295 (or -1 to unset)", EXIT_USAGE)
    if ns.value is None:
        lim = await st.get_appendlimit(ns.username)
        print("No limit" if lim is None else lim)
        return 0
    await st.set_appendlimit(ns.username, None if ns.value == -1 else ns.value)
    return 0


async def cmd_quota(ns: argparse.Namespace, st: Any) -> int:
    from pymaddy.config.values import parse_data_size
    from pymaddy.storage.mailstore import get_quota, set_quota

    _require_user(ns)
    if ns.value is None:
        q = await get_quota(st, ns.username)
        print("No quota" if q is None else q)
        return 0
    if ns.value == "-1":
        await set_quota(st, ns.username, None)
        return 0
    try:
        value = parse_data_size([ns.value])
    except ValueError as e:
        raise CLIExit(f"invalid quota value: {e}", EXIT_USAGE) from None
    await set_quota(st, ns.username, value)
    return 0
