"""`pymaddy run` options, kept apart so modules can see them without importing the supervisor."""

from __future__ import annotations

from dataclasses import dataclass

from pymaddy.compiler.globals import DEFAULT_LIBEXEC_DIR


@dataclass
class RunOptions:
    """What the command line passes to `supervisor.run()`."""

    config: str
    debug: bool = False
    log: list[str] | None = None  # --log targets; override the config's `log`
    libexec: str = DEFAULT_LIBEXEC_DIR
    smtp_port: int | None = None  # -debug.smtpport: port target.remote connects to
    dns_override: str | None = None  # -debug.dnsoverride HOST:PORT for every DNS query
    management: bool = False  # a management command (creds, imap-msgs…), not the server
