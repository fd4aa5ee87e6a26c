"""The `pymaddy` (alias `maddy`) command line, flag-compatible with maddy's.

Global flags come before the command, Go style (`-config F` or `--config F`),
and are accepted after it too. Every failure is one `Error: …` line on stderr;
no traceback reaches a user.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pymaddy import MADDY_COMPAT, __version__

DEFAULT_CONFIG = "/etc/maddy/maddy.conf"
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def _get_option_tuples(self, option_string: str) -> list[Any]:
        # Go's flag parser takes no abbreviations; without this, `-d` would be an ambiguous prefix of
        # `-debug…` (allow_abbrev=False does not cover single-dash options on 3.11).
        return []

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"Error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _globals(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("-config", "--config", dest="config", metavar="PATH", default=d,
                   help=f"configuration file (env MADDY_CONFIG, default {DEFAULT_CONFIG})")
    p.add_argument("-debug", "--debug", dest="debug", action="store_true",
                   default=argparse.SUPPRESS if suppress else False, help="enable debug logging early")
    p.add_argument("-log", "--log", dest="log", action="append", metavar="TARGET", default=d,
                   help="log target: stderr, stderr_ts, syslog, off or a file (repeatable)")
    p.add_argument("-libexec", "--libexec", dest="libexec", metavar="DIR", default=d,
                   help="directory of helper binaries (default /usr/lib/maddy)")
    p.add_argument("-debug.smtpport", "--debug.smtpport", dest="smtp_port", type=int, metavar="PORT", default=d,
                   help="port used to reach remote MX hosts (tests)")
    p.add_argument("-debug.dnsoverride", "--debug.dnsoverride", dest="dns_override", metavar="HOST:PORT", default=d,
                   help="send every DNS query to this server (tests)")


# Management commands live in their own modules: each has
#   register(sub: argparse._SubParsersAction, add_globals: Callable[[ArgumentParser], None]) -> None
# and its parsers set `func=run(ns, config_path) -> int` as a default. A module
# that does not exist yet is simply not offered.
# Imported only when their command (or help) is asked for: check-config must start fast.
COMMAND_MODULES = {
    "creds": "pymaddy.cli.creds",
    "hash": "pymaddy.cli.hash",
    "imap-acct": "pymaddy.cli.imap_acct",
    "imap-mboxes": "pymaddy.cli.imap_mboxes",
    "imap-msgs": "pymaddy.cli.imap_msgs",
    "dev": "pymaddy.cli.dev",
    "dns": "pymaddy.cli.dns",
    "queue": "pymaddy.cli.queue",
}
CORE_COMMANDS = frozenset({"run", "check-config", "verify-config", "version", "help"})


def _add_globals(p: argparse.ArgumentParser) -> None:
    _globals(p, suppress=True)


def _command_word(argv: Sequence[str]) -> str | None:
    """The command in argv, skipping global flags and their values (Go-style single dash too)."""
    takes_value = {"-config", "--config", "-log", "--log", "-libexec", "--libexec", "-debug.smtpport",
                   "--debug.smtpport", "-debug.dnsoverride", "--debug.dnsoverride"}
    it = iter(argv)
    for a in it:
        if a in takes_value:
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="pymaddy", description="pymaddy: a composable all-in-one mail server (maddy-compatible)")
    _globals(p, suppress=False)
    p.add_argument("-v", dest="show_version", action="store_true", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p.set_defaults(func=None)

    run = sub.add_parser("run", help="start the server")
    _globals(run, suppress=True)
    run.add_argument("-v", dest="show_version", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    for name in ("check-config", "verify-config"):
        c = sub.add_parser(name, help="check the configuration and report every error as FILE:LINE: message")
        _globals(c, suppress=True)
        c.add_argument("--syntax-only", "-syntax-only", action="store_true", help="check the config language only")
        c.add_argument("--print", "-print", dest="print_config", action="store_true",
                       help="print the config after macro, env, snippet and import expansion, with FILE:LINE")

    import importlib

    wanted = [] if command in CORE_COMMANDS else [COMMAND_MODULES[command]] if command in COMMAND_MODULES else None
    for modname in COMMAND_MODULES.values() if wanted is None else wanted:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        mod.register(sub, _add_globals)

    v = sub.add_parser("version", help="print version and build defaults")
    _globals(v, suppress=True)
    sub.add_parser("help", help="show this help")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # the promise: no traceback reaches a user
        sys.stderr.write(f"Error: internal error: {type(e).__name__}: {e}\n")
        return 1


def _main(argv: list[str]) -> int:
    parser = build_parser(_command_word(argv))
    ns = parser.parse_args(argv)
    config = ns.config or os.environ.get("MADDY_CONFIG") or DEFAULT_CONFIG
    if ns.show_version:
        print(f"pymaddy {__version__}")
        return 0
    if ns.command in (None, "help"):
        parser.print_help()
        return 0 if ns.command == "help" else EXIT_USAGE
    if ns.command == "version":
        return _version()
    if ns.command in ("check-config", "verify-config"):
        return check_config(config, syntax_only=ns.syntax_only, print_config=ns.print_config)
    if getattr(ns, "func", None) is not None:
        code: int = ns.func(ns, config)
        return code
    if ns.command == "run":
        from pymaddy.runtime.supervisor import RunOptions, run

        return run(
            RunOptions(
                config=config,
                debug=ns.debug,
                log=ns.log,
                libexec=ns.libexec or "/usr/lib/maddy",
                smtp_port=ns.smtp_port,
                dns_override=ns.dns_override,
            )
        )
    parser.error(f"unknown command {ns.command}")  # pragma: no cover


def _version() -> int:
    from pymaddy.compiler.globals import DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR

    print(f"pymaddy {__version__} (maddy {MADDY_COMPAT} compatible) {sys.platform}/{platform.machine()} "
          f"python {platform.python_version()}")
    print()
    print(f"default config: {DEFAULT_CONFIG}")
    print(f"default state_dir: {DEFAULT_STATE_DIR}")
    print(f"default runtime_dir: {DEFAULT_RUNTIME_DIR}")
    return 0


def check_config(path: str, syntax_only: bool = False, print_config: bool = False) -> int:
    """Exit 0 when valid, 2 with every error listed when not (maddy's verify-config codes)."""
    from pymaddy.config.expand import load_file

    loaded = load_file(path)
    if print_config:
        out = []
        for node in loaded.nodes:
            out.extend(node.render())
        sys.stdout.write("\n".join(out) + ("\n" if out else ""))
    errors = list(loaded.errors)
    if not syntax_only and not loaded.errors:
        from pymaddy.compiler import compile_loaded

        errors = list(compile_loaded(loaded).errors)
    if errors:
        for e in sorted(errors, key=lambda e: (e.file != path, e.file, e.line)):
            sys.stderr.write(f"{e}\n")
        sys.stderr.write(f"{len(errors)} error{'s' if len(errors) != 1 else ''} found\n")
        return 2
    sys.stderr.write("No errors detected\n")
    return 0
