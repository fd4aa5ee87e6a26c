"""RFC 8461 §3.3: fetch `https://mta-sts.<domain>/.well-known/mta-sts.txt`.

A minimal HTTP/1.0 client over asyncio streams rather than urllib: the host
name is resolved through the caller's resolver (so `-debug.dnsoverride`
reaches it) and nothing blocks the event loop. The certificate must be valid
for `mta-sts.<domain>` (the context passed in decides which CAs are trusted);
redirects are not followed (§3.3), only a 200 with a text/plain body counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

from pymaddy.mtasts.policy import Policy, parse_policy

__all__ = ["MAX_POLICY_SIZE", "FetchError", "fetch_policy", "policy_url"]

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.2: senders may limit the policy size (64 KiB recommended)
DEFAULT_TIMEOUT = 60.0  # RFC 8461 §3.3: "a reasonable timeout (e.g., 60 seconds)"

ResolveFn = Callable[[str], Awaitable[list[str]]]


class FetchError(Exception):
    """The policy could not be fetched (network, TLS, HTTP status, content type, size)."""


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


async def fetch_policy(
    domain: str,
    resolve: ResolveFn,
    context: ssl.SSLContext | None = None,
    *,
    port: int = 443,
    timeout: float = DEFAULT_TIMEOUT,
) -> Policy:
    """Download and parse the policy of `domain`; FetchError or PolicyError on failure."""
    host = f"mta-sts.{domain}"
    ctx = context if context is not None else ssl.create_default_context()
    try:
        async with asyncio.timeout(timeout):
            addrs = await resolve(host)
            if not addrs:
                raise FetchError(f"no address for {host}")
            last: BaseException | None = None
            for ip in addrs:
                try:
                    return parse_policy(await _get(ip, port, host, ctx))
                except (OSError, ssl.SSLError) as e:
                    last = e
            raise FetchError(f"{policy_url(domain)}: {last}")
    except TimeoutError:
        raise FetchError(f"{policy_url(domain)}: timeout") from None


async def _get(ip: str, port: int, host: str, ctx: ssl.SSLContext) -> str:
    reader, writer = await asyncio.open_connection(ip, port, ssl=ctx, server_hostname=host)
    try:
        writer.write(
            f"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\nUser-Agent: pymaddy\r\n"
            "Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        parts = status.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise FetchError(f"malformed HTTP status line {status[:60]!r}")
        if parts[1] != "200":  # RFC 8461 §3.3: no redirects; anything but 200 is a failure
            raise FetchError(f"HTTP status {status[9:]!r}")
        headers = {}
        for ln in lines:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "text/plain":  # RFC 8461 §3.2: media type text/plain
            raise FetchError(f"unexpected Content-Type {ctype!r}")
        body = await reader.read(MAX_POLICY_SIZE + 1)
        while len(body) <= MAX_POLICY_SIZE:
            more = await reader.read(MAX_POLICY_SIZE + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > MAX_POLICY_SIZE:
            raise FetchError("policy too large")
        return body.decode("utf-8", "replace")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise FetchError(f"truncated HTTP response: {e}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5.0)
