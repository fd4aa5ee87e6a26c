"""`pymaddy dev`: run the development config with a demo account ready (a pymaddy extension).

Runs from the source checkout: `conf.d/dev.conf`, state under `.dev/`. Before
starting the server it creates the demo account (credentials and mailbox) if
it is missing, the same way `creds create` and `imap-acct create` would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_USER = "demo@pymaddy.test"
DEMO_PASSWORD = "demo"  # a documented demo credential, loopback only


def checkout_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "conf.d" / "dev.conf").is_file() else None


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("dev", help="run the development config (conf.d/dev.conf) with a demo account")
    add_globals(p)
    p.set_defaults(func=run)


async def _ensure_demo(config: str) -> None:
    from pymaddy.auth.pass_table import PassTable
    from pymaddy.cli.blocks import open_block
    from pymaddy.storage.imapsql import IMAPSQL

    async with open_block(config, "local_authdb", PassTable, what="a local credentials store") as auth:
        if DEMO_USER not in await auth.list_users():
            await auth.create_user(DEMO_USER, DEMO_PASSWORD)
    async with open_block(config, "local_mailboxes", IMAPSQL, what="an IMAP storage") as store:
        if await store.get_account(DEMO_USER) is None:
            await store.create_account(DEMO_USER)
            for attr, name in (("\\Sent", "Sent"), ("\\Trash", "Trash"), ("\\Junk", "Junk"),
                               ("\\Drafts", "Drafts"), ("\\Archive", "Archive")):
                await store.create_mailbox(DEMO_USER, name, attr)


def run(ns: argparse.Namespace, config_path: str) -> int:
    from pymaddy.cli.blocks import BlockError
    from pymaddy.runtime.supervisor import RunOptions
    from pymaddy.runtime.supervisor import run as run_server

    root = checkout_root()
    if root is None:
        sys.stderr.write("Error: pymaddy dev runs from a source checkout (conf.d/dev.conf not found)\n")
        return 2
    os.chdir(root)
    os.environ["PWD"] = str(root)  # dev.conf places its state under {env:PWD}/.dev
    config = str(root / "conf.d" / "dev.conf")
    try:
        asyncio.run(_ensure_demo(config))
    except BlockError as e:
        sys.stderr.write(f"Error: {e}\n")
        return e.code
    sys.stderr.write(f"demo account: {DEMO_USER} / {DEMO_PASSWORD}\n")
    return run_server(
        RunOptions(config=config, debug=bool(ns.debug), log=ns.log, libexec=ns.libexec or "/usr/lib/maddy")
    )
