"""`pymaddy hash`: print a password hash for auth.pass_table (maddy's ctl/hash.go).

Prints `ALGO:HASH`. Defaults as maddy really uses them: bcrypt cost 10;
argon2id time 2 (maddy's help text says 3, its code uses 2), 1024 KiB, 1 thread.
Warns on stderr when the password is empty or has surrounding whitespace.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pymaddy.auth import hashes
from pymaddy.cli.creds import error, read_password

EXIT_USAGE = 2


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("hash", help="generate password hashes for use with pass_table")
    add_globals(p)
    p.add_argument("-p", "--password", "-password", dest="password", metavar="PASSWORD", default=None,
                   help="use PASSWORD instead of reading it from stdin (it stays in your shell history!)")
    p.add_argument("--hash", "-hash", dest="hash", default=hashes.DEFAULT_HASH, help="hash algorithm (bcrypt, argon2)")
    p.add_argument("--bcrypt-cost", "-bcrypt-cost", dest="bcrypt_cost", type=int, default=None,
                   help=f"bcrypt cost ({hashes.BCRYPT_MIN_COST}-{hashes.BCRYPT_MAX_COST}, "
                   f"default {hashes.BCRYPT_DEFAULT_COST})")
    p.add_argument("--argon2-time", "-argon2-time", dest="argon2_time", type=int, default=2,
                   help="time factor for Argon2id (default 2)")
    p.add_argument("--argon2-memory", "-argon2-memory", dest="argon2_memory", type=int, default=1024,
                   help="memory in KiB for Argon2id (default 1024)")
    p.add_argument("--argon2-threads", "-argon2-threads", dest="argon2_threads", type=int, default=1,
                   help="threads for Argon2id (default 1)")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace, config_path: str) -> int:
    algo = ns.hash or hashes.DEFAULT_HASH
    if algo not in hashes.COMPUTE:
        return error(f"Unknown hash function, available: {', '.join(hashes.COMPUTE)}", EXIT_USAGE)
    cost = hashes.BCRYPT_DEFAULT_COST
    if ns.bcrypt_cost is not None:
        if ns.bcrypt_cost > hashes.BCRYPT_MAX_COST:
            return error("too big bcrypt cost", EXIT_USAGE)
        if ns.bcrypt_cost < hashes.BCRYPT_MIN_COST:
            return error("too small bcrypt cost", EXIT_USAGE)
        cost = ns.bcrypt_cost
    if not 1 <= ns.argon2_time < 1 << 32:
        return error("argon2 time must be between 1 and 4294967295", EXIT_USAGE)
    if not 0 <= ns.argon2_memory < 1 << 32:
        return error("argon2 memory must be between 0 and 4294967295", EXIT_USAGE)
    if not 1 <= ns.argon2_threads <= 255:
        return error("argon2 threads must be between 1 and 255", EXIT_USAGE)
    opts = hashes.HashOpts(
        bcrypt_cost=cost, argon2_time=ns.argon2_time, argon2_memory=ns.argon2_memory,
        argon2_threads=ns.argon2_threads,
    )
    password = ns.password if ns.password is not None else read_password("Password")
    if password == "":
        sys.stderr.write("WARNING: This is the hash of an empty string\n")
    if password.strip() != password:
        sys.stderr.write("WARNING: There is leading/trailing whitespace in the string\n")
    try:
        out = hashes.compute(algo, password, opts)
    except hashes.HashError as e:
        return error(str(e))
    sys.stdout.write(out + "\n")
    return 0


__all__ = ["register", "run"]
