"""`check.rspamd`: ask rspamd's /checkv2 about each message (spec §B.4; maddy's internal/check/rspamd).

* `rspamd [URL]` or `api_path URL` (default http://127.0.0.1:11333); the message
  (header + body) is POSTed to `URL/checkv2` at the body stage over a small
  HTTP/1.1 client here (https:// uses `tls_client`). Request headers as maddy
  sends them: `Pass: all`, `User-Agent: maddy`, `MTA-Tag` (`tag`, default
  maddy), `Settings-ID` (`settings_id`), `MTA-Name` (`hostname`), `From`, one
  `Rcpt` per recipient, `Queue-ID`, and for mail from a client `User` (SASL
  user), `IP` (TCP clients), `Helo`, `Hostname` (rDNS name when known),
  `TLS-Cipher`/`TLS-Version`; plus `Flags` from `flags` (default pass_all),
  which maddy parses but forgets to send.
* Actions (rspamd's `action`) → results, through maddy's FailAction.Apply:
  `reject` → `reject_action` on `550 5.7.0 Message rejected due to local policy`;
  `soft reject` → `soft_reject_action` on `450 4.7.0 …`; both already reject
  before the action is applied, so (as in maddy) `ignore` cannot un-reject them
  and `quarantine` quarantines (which wins over rejection in the pipeline).
  `add header` / `rewrite subject` → `add_header_action` / `rewrite_subj_action`
  (quarantine) on `450 4.7.0 …`, with `X-Spam-Score: N.NN` and `X-Spam-Flag: Yes`
  prepended; `greylist` → only `X-Spam-Score`; `no action` → nothing. The
  subject is not rewritten.
* Header fields rspamd asks to add (`milter.add_headers`, from its
  milter_headers module) are prepended too (beyond maddy, which ignores them).
* Failing to talk to rspamd → `io_error_action` (ignore) on
  `451 4.7.0 Internal error during policy check`; a non-2xx status →
  `error_resp_action` (ignore) on the same; an unparsable reply →
  `io_error_action` on `451 4.9.0 …`. No Authentication-Results entry.
* Beyond maddy (no timeout at all): a request gets REQUEST_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import Check, CheckResult, CheckState
from pymaddy.runtime.module import Module
from pymaddy.tls.client import client_context

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD_NAME = "check.rspamd"
REQUEST_TIMEOUT = 120.0
MAX_RESPONSE = 16 * 1024 * 1024
POLICY_MESSAGE = "Message rejected due to local policy"
INTERNAL_MESSAGE = "Internal error during policy check"
_CHUNK = 64 * 1024
_TLS_VERSIONS = {"TLSv1.3": "1.3", "TLSv1.2": "1.2", "TLSv1.1": "1.1", "TLSv1": "1.0", "TLSv1.0": "1.0"}


class HTTPError(Exception):
    """The request could not be made or the reply could not be read."""


async def http_post(
    url: str,
    headers: Sequence[tuple[str, str]],
    parts: Sequence[bytes | Body],
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> tuple[int, bytes]:
    """POST `parts` (bytes or bodies, streamed in order) to an http:// or https:// URL with
    HTTP/1.1 and `Connection: close`; → (status, response body). Raises HTTPError."""
    try:
        return await asyncio.wait_for(_post(url, headers, parts, tls), timeout)
    except TimeoutError:
        raise HTTPError(f"no reply within {timeout:g}s") from None
    except (OSError, ssl.SSLError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise HTTPError(str(e) or type(e).__name__) from None


async def _post(
    url: str, headers: Sequence[tuple[str, str]], parts: Sequence[bytes | Body], tls: ssl.SSLContext | None
) -> tuple[int, bytes]:
    u = urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise HTTPError(f"unsupported protocol scheme {u.scheme!r}")
    host = u.hostname or ""
    if not host:
        raise HTTPError(f"no host in request URL {url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    ctx = (tls or client_context(None)) if u.scheme == "https" else None
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    length = sum(len(p) if isinstance(p, bytes) else p.size for p in parts)
    hostport = u.netloc.rpartition("@")[2]
    head = [f"POST {target} HTTP/1.1", f"Host: {hostport}", f"Content-Length: {length}", "Connection: close"]
    head += [f"{k}: {_clean(v)}" for k, v in headers]
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host if ctx else None)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("utf-8"))
        for p in parts:
            if isinstance(p, bytes):
                writer.write(p)
                await writer.drain()
                continue
            with p.open() as f:
                while chunk := await asyncio.to_thread(f.read, _CHUNK):
                    writer.write(chunk)
                    await writer.drain()
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _clean(v: str) -> str:
    """A header value cannot carry line breaks (request splitting)."""
    return v.replace("\r", " ").replace("\n", " ")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    while True:
        status_line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HTTPError(f"malformed HTTP response {status_line[:80]!r}")
        status = int(parts[1])
        fields: dict[str, str] = {}
        while (line := (await reader.readuntil(b"\n")).strip()) != b"":
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            continue  # 100 Continue and friends: the real reply follows
        break
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            if len(body) + size > MAX_RESPONSE:
                raise HTTPError("response too large")
            body += await reader.readexactly(size)
            await reader.readuntil(b"\n")
        return status, bytes(body)
    if "content-length" in fields:
        n = int(fields["content-length"])
        if n > MAX_RESPONSE:
            raise HTTPError("response too large")
        return status, await reader.readexactly(n)
    data = await reader.read(MAX_RESPONSE + 1)
    if len(data) > MAX_RESPONSE:
        raise HTTPError("response too large")
    return status, data


def _format_score(score: float) -> str:
    return f"{score:.2f}"


def milter_headers(reply: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, value) of each field in `milter.add_headers` (a value is a string, an object
    with `value` and `order`, or a list of those), in order."""
    milter = reply.get("milter")
    add = milter.get("add_headers") if isinstance(milter, Mapping) else None
    if not isinstance(add, Mapping):
        return []
    out: list[tuple[int, int, str, str]] = []
    for name, spec in add.items():
        for item in spec if isinstance(spec, list) else [spec]:
            if isinstance(item, str):
                value, order = item, 0
            elif isinstance(item, Mapping) and isinstance(item.get("value"), str):
                value, order = item["value"], item.get("order", 0)
                order = order if isinstance(order, int) else 0
            else:
                continue
            if name and all(33 <= ord(c) <= 126 and c != ":" for c in name):
                out.append((order, len(out), str(name), value))
    return [(n, v) for _, _, n, v in sorted(out)]


class RspamdCheck(Module, Check):
    """check.rspamd [URL]; see the module docstring."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.api_path = str(s.get("api_path") or "http://127.0.0.1:11333")
        self.settings_id = str(s.get("settings_id") or "")
        self.tag = str(s.get("tag") if s.get("tag") is not None else "maddy")
        self.mta_name = str(s.get("hostname") or "")
        self.flags = ",".join(s.get("flags") or [])
        self.tls: ssl.SSLContext | None = None
        self.timeout = REQUEST_TIMEOUT

    async def start(self) -> None:
        if urlsplit(self.api_path).scheme == "https":
            self.tls = client_context(self.settings.get("tls_client"))

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)

    def apply(self, setting: str, res: CheckResult) -> CheckResult:
        """maddy's FailAction.Apply: override the reason, then add (never remove) reject/quarantine."""
        if res.reason is None:
            return res
        action = self.settings.get(setting)
        kind = str(getattr(action, "action", "ignore"))
        override = getattr(action, "override", None)
        if override is not None:
            res.reason = SMTPError(
                override.code, override.enhanced, override.message, check=MOD_NAME, reason=res.reason.message
            )
            if res.reject is not None:
                res.reject = res.reason
        if kind == "quarantine":
            res.quarantine = True
        elif kind == "reject":
            res.reject = res.reason
        return res

    def request_headers(self, meta: MsgMeta, mail_from: str, rcpts: Sequence[str]) -> list[tuple[str, str]]:
        h: list[tuple[str, str]] = [("Pass", "all"), ("User-Agent", "maddy")]
        if self.tag:
            h.append(("MTA-Tag", self.tag))
        if self.settings_id:
            h.append(("Settings-ID", self.settings_id))
        if self.mta_name:
            h.append(("MTA-Name", self.mta_name))
        if self.flags:
            h.append(("Flags", self.flags))
        h.append(("From", mail_from))
        h += [("Rcpt", r) for r in rcpts]
        h.append(("Queue-ID", meta.id))
        conn = meta.conn
        if conn.remote_ip or conn.is_unix or conn.helo:
            if conn.auth_user:
                h.append(("User", conn.auth_user))
            if conn.remote_ip and not conn.is_unix:
                h.append(("IP", conn.remote_ip))
            h.append(("Helo", conn.helo))
            if conn.rdns:
                h.append(("Hostname", conn.rdns))
            if conn.tls:
                if conn.tls_cipher:
                    h.append(("TLS-Cipher", conn.tls_cipher))
                if conn.tls_version in _TLS_VERSIONS:
                    h.append(("TLS-Version", _TLS_VERSIONS[conn.tls_version]))
        return h


def _err(code: int, enhanced: tuple[int, int, int], message: str, **fields: Any) -> SMTPError:
    return SMTPError(code, enhanced, message, check=MOD_NAME, **fields)


class _State(CheckState):
    def __init__(self, chk: RspamdCheck, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta
        self.mail_from = ""
        self.rcpts: list[str] = []

    async def check_sender(self, mail_from: str) -> CheckResult:
        self.mail_from = mail_from
        return CheckResult()

    async def check_rcpt(self, rcpt: str) -> CheckResult:
        self.rcpts.append(rcpt)
        return CheckResult()

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        chk = self.chk
        headers = chk.request_headers(self.meta, self.mail_from, self.rcpts)
        try:
            status, data = await http_post(
                chk.api_path + "/checkv2",
                headers,
                [header.to_bytes() + b"\r\n", body],
                tls=chk.tls,
                timeout=chk.timeout,
            )
        except HTTPError as e:
            err = _err(451, (4, 7, 0), INTERNAL_MESSAGE, reason=str(e))
            return chk.apply("io_error_action", CheckResult(reason=err))
        if status // 100 != 2:
            err = _err(451, (4, 7, 0), INTERNAL_MESSAGE, reason=f"HTTP {status}")
            return chk.apply("error_resp_action", CheckResult(reason=err))
        try:
            reply = json.loads(data)
            if not isinstance(reply, dict):
                raise ValueError("reply is not a JSON object")
            score = float(reply.get("score") or 0.0)
            action = str(reply.get("action") or "")
        except (ValueError, TypeError) as e:
            err = _err(451, (4, 9, 0), INTERNAL_MESSAGE, reason=str(e))
            return chk.apply("io_error_action", CheckResult(reason=err))

        added = Header()
        for name, value in milter_headers(reply):
            added.add(name, value)
        res = CheckResult()
        if action == "no action":
            pass
        elif action == "greylist":
            added.add("X-Spam-Score", _format_score(score))
        elif action in ("add header", "rewrite subject"):
            # go-message writes fields in reverse order of Add: Score above Flag
            added.add("X-Spam-Score", _format_score(score))
            added.add("X-Spam-Flag", "Yes")
            res.reason = _err(450, (4, 7, 0), POLICY_MESSAGE, action=action)
            setting = "add_header_action" if action == "add header" else "rewrite_subj_action"
            res = chk.apply(setting, res)
        elif action in ("soft reject", "reject"):
            if action == "reject":
                res.reason = _err(550, (5, 7, 0), POLICY_MESSAGE, action=action)
                setting = "reject_action"
            else:
                res.reason = _err(450, (4, 7, 0), POLICY_MESSAGE, action=action)
                setting = "soft_reject_action"
            res.reject = res.reason
            res = chk.apply(setting, res)
        else:
            chk.log.msg("unhandled action", action=action, msg_id=self.meta.id)
        if len(added):
            res.header = added
        return res


__all__ = ["HTTPError", "RspamdCheck", "http_post", "milter_headers"]
