"""The DNS layer: one shared asyncio resolver per process (see `resolver.py`).

Modules get it with `resolver_for(ctx)`; it honours `-debug.dnsoverride HOST:PORT`
(RunOptions.dns_override), so tests can point the whole server at a loopback
DNS server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymaddy.dns.resolver import Answer, DNSError, Resolver, from_options, parse_hostport

if TYPE_CHECKING:
    from pymaddy.runtime.module import RuntimeContext

# One resolver (and so one cache) per process and override: config reloads
# build new contexts, but cached answers stay valid across them.
_SHARED: dict[str | None, Resolver] = {}


def resolver_for(ctx: RuntimeContext | None) -> Resolver:
    """The process-wide resolver for the options of `ctx` (None: /etc/resolv.conf)."""
    override = getattr(getattr(ctx, "options", None), "dns_override", None) if ctx is not None else None
    res = _SHARED.get(override)
    if res is None:
        res = from_options(override)
        _SHARED[override] = res
    return res


def set_resolver(dns_override: str | None, resolver: Resolver) -> None:
    """Install `resolver` for an override value (tests use this to shorten timeouts)."""
    _SHARED[dns_override] = resolver


__all__ = ["Answer", "DNSError", "Resolver", "from_options", "parse_hostport", "resolver_for", "set_resolver"]
