"""`pymaddy creds list|create|remove|password`: local credentials management (maddy's ctl/users.go).

The block is chosen with `--cfg-block` (env MADDY_CFGBLOCK, default
`local_authdb`) and must be an `auth.pass_table` over a mutable table. Only
that block and the modules it references are started, so the commands work
while the server runs (SQLite handles the concurrent writers).

Passwords come from `-p/--password` or are asked for: without echo on a
terminal, else one line read from standard input.

Exit status: 0 success; 2 usage errors (`USERNAME is required`, unknown or
wrong kind of block, bad config file path); 1 anything else (`Error: …` on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Callable
from typing import Any

from pymaddy.auth import hashes
from pymaddy.cli.blocks import EXIT_ERROR, EXIT_USAGE, BlockError, open_block
from pymaddy.runtime.log import Logger, LogTargetError, open_targets

DEFAULT_BLOCK = "local_authdb"
WHAT = "a local credentials store"


# -- prompts shared with `pymaddy hash` ------------------------------------------------------------


def read_password(prompt: str) -> str:
    """maddy's clitools.ReadPassword: `PROMPT: ` on stderr; no echo on a terminal, else one stdin line."""
    if sys.stdin.isatty():
        try:
            return getpass.getpass(f"{prompt}: ", stream=sys.stderr)
        except EOFError:
            return ""
    sys.stderr.write(f"{prompt}: ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.rstrip("\n").removesuffix("\r")


def confirm(prompt: str, default: bool = False) -> bool:
    """maddy's clitools.Confirmation: `PROMPT [y/N]: `; y/Y yes, n/N no, anything else the default."""
    sys.stderr.write(f"{prompt} [{'Y/n' if default else 'y/N'}]: ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        sys.stderr.write("\n")
        return False
    ans = line.rstrip("\n").removesuffix("\r")
    if ans in ("Y", "y"):
        return True
    if ans in ("N", "n"):
        return False
    return default


def command_logger(ns: argparse.Namespace) -> Logger | None:
    """A logger for `--log` targets (management commands ignore the config's `log`, as maddy)."""
    targets = getattr(ns, "log", None)
    if not targets:
        return None
    try:
        out = open_targets(targets, cwd=os.getcwd())
    except LogTargetError as e:
        raise BlockError(str(e), EXIT_USAGE) from None
    return Logger(out=out, debug=bool(getattr(ns, "debug", False)))


def error(msg: str, code: int = EXIT_ERROR) -> int:
    for line in msg.splitlines() or [""]:
        sys.stderr.write(f"Error: {line}\n")
    return code


# -- command line ---------------------------------------------------------------------------------


def _cfg_block(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cfg-block", "-cfg-block", dest="cfg_block", metavar="NAME",
        default=os.environ.get("MADDY_CFGBLOCK") or DEFAULT_BLOCK,
        help=f"module configuration block to use (env MADDY_CFGBLOCK, default {DEFAULT_BLOCK})",
    )


def _password(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p", "--password", "-password", dest="password", metavar="PASSWORD", default=None,
        help="use PASSWORD instead of asking for it (it stays in your shell history!)",
    )


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    creds = sub.add_parser(
        "creds", help="local credentials management",
        description="Manage the credentials of an auth.pass_table block (default local_authdb). "
        "Creating credentials does not create the IMAP account: see imap-acct create.",
    )
    add_globals(creds)
    csub = creds.add_subparsers(dest="creds_command", metavar="SUBCOMMAND", parser_class=type(creds))
    creds.set_defaults(func=_no_subcommand, creds_parser=creds)

    p = csub.add_parser("list", help="list created credentials")
    add_globals(p)
    _cfg_block(p)
    p.set_defaults(func=run)

    p = csub.add_parser("create", help="create user account", description="Reads the password from stdin "
                        "unless -p is given. --hash and --bcrypt-cost choose the hash of auth.pass_table.")
    add_globals(p)
    _cfg_block(p)
    _password(p)
    p.add_argument("--hash", "-hash", dest="hash", default=None,
                   help=f"hash algorithm: {', '.join(hashes.HASHES)} (default {hashes.DEFAULT_HASH})")
    p.add_argument("--bcrypt-cost", "-bcrypt-cost", dest="bcrypt_cost", type=int, default=None,
                   help=f"bcrypt cost (default {hashes.BCRYPT_DEFAULT_COST})")
    p.add_argument("username", nargs="?", default="", metavar="USERNAME")
    p.set_defaults(func=run)

    p = csub.add_parser("remove", help="delete user account")
    add_globals(p)
    _cfg_block(p)
    p.add_argument("-y", "--yes", "-yes", dest="yes", action="store_true", help="don't ask for confirmation")
    p.add_argument("username", nargs="?", default="", metavar="USERNAME")
    p.set_defaults(func=run)

    p = csub.add_parser("password", help="change account password", description="Reads the password from stdin "
                        "unless -p is given. The new hash is always bcrypt.")
    add_globals(p)
    _cfg_block(p)
    _password(p)
    p.add_argument("username", nargs="?", default="", metavar="USERNAME")
    p.set_defaults(func=run)


def _no_subcommand(ns: argparse.Namespace, config_path: str) -> int:
    ns.creds_parser.print_help(sys.stderr)
    return EXIT_USAGE


def run(ns: argparse.Namespace, config_path: str) -> int:
    try:
        return asyncio.run(_run(ns, config_path))
    except BlockError as e:
        return error(e.message, e.code)


async def _run(ns: argparse.Namespace, config_path: str) -> int:
    from pymaddy.auth.pass_table import PassTable, UserDBError

    cmd = ns.creds_command
    username: str = getattr(ns, "username", "")
    if cmd != "list" and not username:
        return error("USERNAME is required", EXIT_USAGE)
    async with open_block(config_path, ns.cfg_block, PassTable, what=WHAT, libexec=getattr(ns, "libexec", None),
                          debug=bool(getattr(ns, "debug", False)), logger=command_logger(ns)) as db:
        try:
            if cmd == "list":
                users = await db.list_users()
                if not users:
                    sys.stderr.write("No users.\n")
                for u in users:
                    sys.stdout.write(u + "\n")
                return 0
            if cmd == "create":
                password = ns.password
                if password is None:
                    password = await asyncio.to_thread(read_password, "Enter password for new user")
                algo = ns.hash or hashes.DEFAULT_HASH
                cost = hashes.BCRYPT_DEFAULT_COST if ns.bcrypt_cost is None else ns.bcrypt_cost
                await db.create_user(username, password, algo, hashes.HashOpts(bcrypt_cost=cost))
                return 0
            if cmd == "remove":
                if not ns.yes and not await asyncio.to_thread(
                    confirm, "Are you sure you want to delete this user account?", False
                ):
                    return error("cancelled")
                await db.delete_user(username)
                return 0
            if cmd == "password":
                password = ns.password
                if password is None:
                    password = await asyncio.to_thread(read_password, "Enter new password")
                await db.set_user_password(username, password)
                return 0
        except UserDBError as e:
            return error(str(e))
    return error(f"unknown command {cmd}", EXIT_USAGE)  # pragma: no cover


__all__ = ["confirm", "read_password", "register", "run"]
