"""RFC 7208 `check_host()` on pyspf, with every DNS query going through our Resolver.

pyspf is synchronous and looks records up through the module-level function
`spf.DNSLookup(name, qtype, strict, timeout)`. We replace that function once
with a dispatcher that uses a per-thread lookup, run each evaluation in a worker
thread, and let the lookup hop back onto the event loop to ask the shared
Resolver. So SPF gets the same cache, `-debug.dnsoverride` and error
classification as every other check, and the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import spf

from pymaddy.dns.resolver import DNSError, Resolver

# RFC 7208 §4.6.4: at least 20 s for the whole evaluation is recommended.
DEFAULT_QUERY_TIME = 20.0
EVAL_THREADS = 64  # concurrent evaluations; each mostly waits on the event loop's DNS

LookupFn = Callable[[str, str], list[tuple[tuple[str, str], Any]]]

_local = threading.local()
_original_lookup: Any = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Iterable[tuple[tuple[str, str], Any]]:
    """pyspf's DNS hook: the current thread's lookup, or pyspf's own when none is set."""
    fn: LookupFn | None = getattr(_local, "lookup", None)
    if fn is None:
        result: Iterable[tuple[tuple[str, str], Any]] = _original_lookup(name, qtype, strict, timeout)
        return result
    return fn(name, qtype)


spf.DNSLookup = _dispatch


def _records(resolver: Resolver, loop: asyncio.AbstractEventLoop, deadline: float) -> LookupFn:
    """A synchronous lookup for pyspf that runs `resolver.lookup` on `loop`."""

    def lookup(name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        fut = asyncio.run_coroutine_threadsafe(resolver.lookup(name, qtype), loop)
        try:
            ans = fut.result(timeout=max(0.1, deadline - loop.time()))
        except TimeoutError:
            fut.cancel()
            raise spf.TempError(f"DNS lookup {name}: i/o timeout") from None
        except DNSError as e:
            # RFC 7208 §5: RCODE other than 0/3, or a timeout → temperror. A name that is
            # not a valid domain name, or a CNAME loop, has no records (§4.3, §5.5: the
            # name is skipped and processing continues).
            if e.kind in ("invalid-name", "cname-loop"):
                return []
            raise spf.TempError(f"DNS {e}") from None
        out: list[tuple[tuple[str, str], Any]] = []
        for r in ans.records:
            rd: Any = r
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), str(rd.address)))
            elif qtype == "MX":
                out.append(((name, qtype), (int(rd.preference), rd.exchange.to_text(omit_final_dot=True))))
            elif qtype == "PTR":
                out.append(((name, qtype), rd.target.to_text(omit_final_dot=True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), tuple(rd.strings)))
        return out

    return lookup


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """A pool of its own: each evaluation holds a thread while it waits for DNS, and must not
    starve the loop's default executor (SQLite, bcrypt…) under load."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(max_workers=EVAL_THREADS, thread_name_prefix="spf")
    return _pool


@dataclass(frozen=True)
class SPFResult:
    """`result` is one of pass fail softfail neutral none permerror temperror (RFC 7208 §2.6);
    `reason` is a short text for the Authentication-Results entry and logs;
    `explanation` the (macro-expanded) exp= text for fail results (RFC 7208 §6.2)."""

    result: str
    reason: str
    explanation: str
    mechanism: str = ""


def _reason(result: str, mechanism: str | None, text: str) -> str:
    """maddy (blitiri.com.ar/go/spf) reasons: `matched <mech>` for a match, `no DNS record
    found` for none, the error text for errors, nothing for the default result."""
    if result == "none":
        return "no DNS record found"
    if result in ("permerror", "temperror"):
        for prefix in ("SPF Permanent Error: ", "SPF Temporary Error: "):
            if text.startswith(prefix):
                return text[len(prefix) :]
        return text
    if not mechanism or mechanism == "default":
        return ""
    mech = mechanism.lstrip("+-~?").split(":", 1)[0].split("/", 1)[0].lower()
    kind = {"ip4": "ip", "ip6": "ip"}.get(mech, mech)
    if kind not in ("all", "a", "ip", "mx", "ptr", "exists"):
        return ""  # include: blitiri reports the inner match, which pyspf does not expose
    return f"matched {kind}"


def check_host_sync(
    lookup: LookupFn | None,
    ip: str,
    sender: str,
    helo: str,
    *,
    querytime: float = DEFAULT_QUERY_TIME,
    default_explanation: str | None = None,
) -> SPFResult:
    """Evaluate in the calling thread with `lookup` as the DNS source."""
    prev = getattr(_local, "lookup", None)
    _local.lookup = lookup
    try:
        q = spf.query(i=ip, s=sender, h=helo, strict=True, querytime=querytime)
        if default_explanation is not None:
            q.set_default_explanation(default_explanation)
        res, _code, text = q.check()
        res = {"error": "temperror", "unknown": "permerror"}.get(res, res)
        exp = str(text) if res == "fail" else ""
        return SPFResult(str(res), _reason(str(res), q.mechanism, str(text)), exp, str(q.mechanism or ""))
    finally:
        _local.lookup = prev


async def check_host(
    resolver: Resolver,
    ip: str,
    sender: str,
    helo: str,
    *,
    querytime: float = DEFAULT_QUERY_TIME,
    default_explanation: str | None = None,
) -> SPFResult:
    """RFC 7208 §4 check_host(ip, domain of `sender`, `sender`); a sender without a domain
    part uses `helo` (§4.3, `postmaster@helo`). Never raises for DNS problems: they are results."""
    loop = asyncio.get_running_loop()
    lookup = _records(resolver, loop, loop.time() + querytime)
    call = functools.partial(
        check_host_sync, lookup, ip, sender, helo, querytime=querytime, default_explanation=default_explanation
    )
    return await loop.run_in_executor(_executor(), call)


__all__ = ["DEFAULT_QUERY_TIME", "SPFResult", "check_host", "check_host_sync"]
