"""`openmetrics ADDR… { debug }`: Prometheus metrics over HTTP (spec §B.1).

`GET /metrics` (and HEAD) returns the text exposition of the process-wide
registry; every other path is Go's `404 page not found`. HTTP/1.1 with
keep-alive, because Prometheus keeps its scrape connections open; a small
hand-written parser is enough for one resource and keeps the dependency list
short. `tls://` is refused at start ("TLS is not supported yet"), as in maddy.

Limits keep a misbehaving client from holding memory or a session forever:
request line and headers ≤ 64 KiB, ≤ 100 headers, bodies ≤ 1 MiB (discarded),
30 s to send a request's head, 120 s idle between keep-alive requests.
"""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import urlsplit

from pymaddy.runtime.module import Connection, StreamEndpoint

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
IDLE_TIMEOUT = 120.0
HEAD_TIMEOUT = 30.0
MAX_HEADERS = 100
MAX_BODY = 1 << 20

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}

    @property
    def keep_alive(self) -> bool:
        conn = self.tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


class OpenMetrics(StreamEndpoint):
    """The `openmetrics` endpoint."""

    async def handle(self, conn: Connection) -> None:
        while True:
            with conn.idle():
                try:
                    line = await asyncio.wait_for(conn.reader.readline(), IDLE_TIMEOUT)
                except TimeoutError:
                    return
                except ValueError:  # longer than the stream limit
                    await self._send(conn, None, 431, "request line too long\n", close=True)
                    return
            if not line:
                return
            if line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore empty lines before a request
                continue
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    req = await self._read_head(conn, line)
            except _BadRequest as e:
                await self._send(conn, None, e.status, f"{e}\n", close=True)
                return
            except TimeoutError:
                return
            if not await self._respond(conn, req):
                return

    async def _read_head(self, conn: Connection, line: bytes) -> _Request:
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest(505 if version.startswith("HTTP/") else 400, "unsupported HTTP version")
        req = _Request(method, target, version)
        for _ in range(MAX_HEADERS + 1):
            try:
                raw = await conn.reader.readline()
            except ValueError:
                raise _BadRequest(431, "header line too long") from None
            if not raw:
                raise _BadRequest(400, "unexpected end of request")
            if raw in (b"\r\n", b"\n"):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "malformed header")
            key = name.lower()
            value = value.strip()
            req.headers[key] = f"{req.headers[key]}, {value}" if key in req.headers else value
        else:
            raise _BadRequest(431, "too many headers")
        if "transfer-encoding" in req.headers:
            raise _BadRequest(501, "request bodies with Transfer-Encoding are not supported")
        length = req.headers.get("content-length", "0")
        if not length.isdigit():
            raise _BadRequest(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            raise _BadRequest(413, "request body too large")
        if int(length):
            await conn.reader.readexactly(int(length))
        return req

    async def _respond(self, conn: Connection, req: _Request) -> bool:
        path = urlsplit(req.target).path if "://" in req.target else req.target.split("?", 1)[0]
        keep = req.keep_alive
        if path != "/metrics":
            status, body, ctype = 404, b"404 page not found\n", "text/plain; charset=utf-8"
        elif req.method not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed\n", "text/plain; charset=utf-8"
        else:
            await self.ctx.metrics.refresh()  # the worker processes' latest counts
            status, body, ctype = 200, self.ctx.metrics.render().encode(), CONTENT_TYPE
        self.log.debug("request", method=req.method, path=path, src=conn.remote, status=status)
        extra = {"Allow": "GET, HEAD"} if status == 405 else {}
        if status == 200 and "gzip" in req.tokens("accept-encoding"):
            body = gzip.compress(body, compresslevel=5)
            extra["Content-Encoding"] = "gzip"
            extra["Vary"] = "Accept-Encoding"
        await self._send(conn, req, status, body, ctype=ctype, close=not keep, extra=extra)
        return keep

    async def _send(
        self,
        conn: Connection,
        req: _Request | None,
        status: int,
        body: bytes | str,
        *,
        ctype: str = "text/plain; charset=utf-8",
        close: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, '')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(data)}",
            f"Date: {formatdate(usegmt=True)}",
            "X-Content-Type-Options: nosniff",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if close:
            head.append("Connection: close")
        elif req is not None and req.version == "HTTP/1.0":
            head.append("Connection: keep-alive")
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if req is None or req.method != "HEAD":
            payload += data
        conn.writer.write(payload)
        await conn.writer.drain()
