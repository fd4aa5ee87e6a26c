"""An asyncio SMTP / LMTP client (RFC 5321, RFC 2033, RFC 3207, RFC 4954).

A protocol library only: it never reads server configuration, so both the
fixed-downstream targets (target.smtp / target.lmtp) and MX delivery
(target.remote) drive it. Every negative reply is raised as `SMTPError`
(pymaddy.mail.errors) carrying the server's code, enhanced code and text;
network trouble is raised as `SMTPError` 450 4.4.2 "Network I/O error" and TLS
handshake failures as `TLSError`. Mapping these to what *our* client sees
(e.g. maddy's 552 → 452 rewrite) is the caller's policy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from pymaddy.mail import address
from pymaddy.mail.errors import SMTPError

__all__ = ["LMTPStatus", "Reply", "SMTPClient", "TLSError", "dot_stuff"]

CHUNK = 64 * 1024
MAX_LINE = 64 * 1024  # reply lines longer than this are a protocol violation
_ENH = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


class TLSError(Exception):
    """The TLS handshake (implicit or STARTTLS) failed, e.g. certificate verification."""


@dataclass
class Reply:
    """One (possibly multi-line) server reply; `text` has lines joined by \\n, enhanced code removed."""

    code: int
    enhanced: tuple[int, int, int] | None
    text: str

    def error(self, server: str = "") -> SMTPError:
        # go-smtp leaves the enhanced code unset when absent; the server side then
        # derives X.0.0 from the reply class, which is what we record directly.
        enh = self.enhanced or (self.code // 100, 0, 0)
        fields = {"remote_server": server} if server else {}
        return SMTPError(self.code, enh, self.text, **fields)


LMTPStatus = Callable[[str, SMTPError | None], None]


def parse_reply(lines: list[bytes]) -> Reply:
    """Join continuation lines; strip an RFC 3463 enhanced code repeated on each line (RFC 2034)."""
    code = int(lines[0][:3])
    texts = [ln[4:].decode("utf-8", "replace").rstrip("\r\n") for ln in lines]
    enhanced: tuple[int, int, int] | None = None
    first, _, rest = texts[0].partition(" ")
    m = _ENH.match(first)
    if m is not None and rest:
        enhanced = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        prefix = first + " "
        texts = [rest] + [t[len(prefix) :] if t.startswith(prefix) else t for t in texts[1:]]
    return Reply(code, enhanced, "\n".join(texts))


def dot_stuff(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """Yield DATA content: bare LF → CRLF, leading '.' doubled (RFC 5321 §4.5.2), terminated by CRLF.CRLF.

    Works on whole runs of complete lines with bytes.replace (C speed); only the partial
    last line of a chunk is carried over to the next one. A CR is dropped only as part of
    CRLF; any other CR is content."""
    carry = b""
    for chunk in chunks:
        buf = carry + chunk if carry else chunk
        cut = buf.rfind(b"\n") + 1
        if not cut:
            carry = buf
            continue
        carry = buf[cut:]
        block = buf[:cut].replace(b"\r\n", b"\n").replace(b"\n.", b"\n..")
        if block.startswith(b"."):
            block = b"." + block
        yield block.replace(b"\n", b"\r\n")
    if carry:
        if carry.endswith(b"\r"):
            carry = carry[:-1]
        yield (b"." if carry.startswith(b".") else b"") + carry + b"\r\n"
    yield b".\r\n"


def _read_chunks(data: bytes, stream: BinaryIO | None) -> Iterable[bytes]:
    if data:
        yield data
    if stream is not None:
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                return
            yield chunk


def _xtext_ok(s: str) -> bool:
    return all(0x21 <= ord(c) <= 0x7E and c not in "+=" for c in s)


class SMTPClient:
    """One client connection. Call order: connect → hello → [starttls → hello] → [auth] →
    (mail → rcpt* → data)* → quit. Not safe for concurrent use by several tasks."""

    def __init__(
        self,
        *,
        lmtp: bool = False,
        hostname: str = "localhost.localdomain",
        connect_timeout: float = 300.0,
        command_timeout: float = 300.0,
        submission_timeout: float = 300.0,
    ) -> None:
        self.lmtp = lmtp
        self.hostname = hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.submission_timeout = submission_timeout
        self.server_name = ""
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper) → parameters
        self.tls = False
        self.greeting: Reply | None = None
        self.rcpts: list[str] = []  # accepted in the current transaction (LMTP reply order)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    # -- connection ---------------------------------------------------------------------------

    async def connect(
        self,
        host: str = "",
        port: int = 25,
        *,
        unix_path: str = "",
        tls: ssl.SSLContext | None = None,
        server_name: str = "",
        local_addr: tuple[str, int] | None = None,
    ) -> Reply:
        """Dial (TCP or a unix socket; `tls` = implicit TLS) and read the 220 greeting.

        `local_addr` binds the source address (target.remote's `local_ip`)."""
        self.server_name = server_name or host or unix_path
        try:
            if unix_path:
                coro = asyncio.open_unix_connection(
                    unix_path, ssl=tls, server_hostname=self.server_name if tls else None, limit=MAX_LINE
                )
            else:
                coro = asyncio.open_connection(
                    host,
                    port,
                    ssl=tls,
                    server_hostname=self.server_name if tls else None,
                    limit=MAX_LINE,
                    local_addr=local_addr,
                )
            self._reader, self._writer = await asyncio.wait_for(coro, self.connect_timeout)
        except ssl.SSLError as e:
            raise TLSError(str(e)) from e
        except (TimeoutError, OSError) as e:
            raise self._io_error(e, "dial") from e
        self.tls = tls is not None
        reply = await self._read_reply(self.command_timeout)
        self.greeting = reply
        if reply.code != 220:
            await self.close()
            raise reply.error(self.server_name)
        return reply

    async def hello(self) -> None:
        """EHLO (LHLO for LMTP, RFC 2033 §4.1); plain SMTP falls back to HELO on any error."""
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = await self.command(f"{verb} {self.hostname}")
        if reply.code == 250:
            self.extensions = {}
            for line in reply.text.split("\n")[1:]:
                kw, _, params = line.strip().partition(" ")
                if kw:
                    self.extensions[kw.upper()] = params
            return
        if self.lmtp:
            raise reply.error(self.server_name)
        self.extensions = {}
        await self.expect(f"HELO {self.hostname}", 250)

    def supports(self, ext: str) -> bool:
        return ext.upper() in self.extensions

    def auth_mechanisms(self) -> list[str]:
        return self.extensions.get("AUTH", "").upper().split()

    async def starttls(self, context: ssl.SSLContext, server_name: str = "") -> None:
        """RFC 3207: upgrade the connection; the caller must EHLO again (extensions are reset)."""
        await self.expect("STARTTLS", 220)
        writer = self._conn()[1]
        try:
            await asyncio.wait_for(
                writer.start_tls(context, server_hostname=server_name or self.server_name), self.command_timeout
            )
        except ssl.SSLError as e:
            raise TLSError(str(e)) from e
        except (TimeoutError, OSError) as e:
            raise self._io_error(e, "starttls") from e
        self.tls = True
        self.extensions = {}

    async def auth(self, mechanism: str, username: str = "", password: str = "", authzid: str = "") -> None:
        """RFC 4954 AUTH with PLAIN, LOGIN or EXTERNAL; a refusal raises the server's error."""
        mech = mechanism.upper()
        if "AUTH" not in self.extensions:
            raise SMTPError(451, (4, 0, 0), "Internal server error", reason="smtp: server doesn't support AUTH")
        steps: list[bytes]
        if mech == "PLAIN":
            steps = [f"{authzid}\0{username}\0{password}".encode()]
        elif mech == "LOGIN":
            steps = [username.encode(), password.encode()]
        elif mech == "EXTERNAL":
            steps = [authzid.encode()]
        else:
            raise ValueError(f"unsupported SASL mechanism {mechanism}")
        if mech == "LOGIN":
            reply = await self.command("AUTH LOGIN")
        else:
            ir = base64.b64encode(steps.pop(0)).decode("ascii") or "="
            reply = await self.command(f"AUTH {mech} {ir}")
        while reply.code == 334:
            if not steps:
                reply = await self.command("*")  # cancel an unexpected challenge (RFC 4954 §4)
                break
            reply = await self.command(base64.b64encode(steps.pop(0)).decode("ascii"))
        if reply.code != 235:
            raise reply.error(self.server_name)

    # -- transaction ------------------------------------------------------------------------------

    def _mail_cmd(
        self,
        sender: str,
        *,
        size: int = 0,
        body_8bit: bool = False,
        smtputf8: bool = False,
        requiretls: bool = False,
        auth: str | None = None,
    ) -> str:
        """MAIL FROM with the ESMTP parameters the server announced (RFC 6152, 1870, 6531, 8689)."""
        cmd = f"MAIL FROM:<{sender}>"
        if "8BITMIME" in self.extensions and body_8bit:
            cmd += " BODY=8BITMIME"
        if size and "SIZE" in self.extensions:
            cmd += f" SIZE={size}"
        if smtputf8:
            if "SMTPUTF8" not in self.extensions:
                raise SMTPError(550, (5, 6, 7), "SMTPUTF8 is unsupported by the downstream server")
            cmd += " SMTPUTF8"
        if requiretls:
            if "REQUIRETLS" not in self.extensions:
                raise SMTPError(550, (5, 7, 30), "REQUIRETLS is unsupported by the downstream server")
            cmd += " REQUIRETLS"
        if auth is not None and "AUTH" in self.extensions and _xtext_ok(auth):
            cmd += f" AUTH=<{auth}>" if auth == "" else f" AUTH={auth}"
        return cmd

    async def mail(
        self,
        sender: str,
        *,
        size: int = 0,
        body_8bit: bool = False,
        smtputf8: bool = False,
        requiretls: bool = False,
        auth: str | None = None,
    ) -> None:
        """MAIL FROM with the ESMTP parameters the server announced (RFC 6152, 1870, 6531, 8689)."""
        cmd = self._mail_cmd(
            sender, size=size, body_8bit=body_8bit, smtputf8=smtputf8, requiretls=requiretls, auth=auth
        )
        self.rcpts = []
        await self.expect(cmd, 250)

    async def mail_rcpt(
        self,
        sender: str,
        rcpt: str,
        *,
        size: int = 0,
        body_8bit: bool = False,
        smtputf8: bool = False,
        requiretls: bool = False,
    ) -> SMTPError | None:
        """MAIL FROM and the first RCPT TO, in one write when the server offers PIPELINING
        (RFC 2920 §3.1), else one after the other. MAIL's refusal (or any I/O error) is
        raised; RCPT's refusal is returned (None: accepted) so that the caller reports it
        for that recipient alone. Both replies are always read, in order (RFC 2920 §3.2)."""
        cmd = self._mail_cmd(sender, size=size, body_8bit=body_8bit, smtputf8=smtputf8, requiretls=requiretls)
        self.rcpts = []
        if "PIPELINING" not in self.extensions:
            await self.expect(cmd, 250)
            reply = await self.command(f"RCPT TO:<{rcpt}>")
        else:
            mail_reply, reply = await self.pipeline([cmd, f"RCPT TO:<{rcpt}>"])
            if mail_reply.code != 250:
                raise mail_reply.error(self.server_name)
        if reply.code not in (250, 251):
            return reply.error(self.server_name)
        self.rcpts.append(rcpt)
        return None

    async def rcpt(self, rcpt: str) -> None:
        await self.expect(f"RCPT TO:<{rcpt}>", 250, 251)
        self.rcpts.append(rcpt)

    async def data(self, header: bytes, body: BinaryIO | bytes) -> Reply:
        """SMTP DATA: send header + body (dot-stuffed); the final reply must be 250."""
        replies = await self._send_data(header, body, 1)
        reply = replies[0]
        if reply.code != 250:
            raise reply.error(self.server_name)
        return reply

    async def lmtp_data(self, header: bytes, body: BinaryIO | bytes, status: LMTPStatus) -> None:
        """LMTP DATA (RFC 2033 §4.2): one reply per accepted recipient, reported as it arrives.

        A connection error part-way raises; recipients already reported keep their status."""
        rcpts = list(self.rcpts)
        await self._data_start()
        await self._send_body(header, body)
        for rcpt in rcpts:
            reply = await self._read_reply(self.submission_timeout)
            status(rcpt, None if reply.code == 250 else reply.error(self.server_name))

    async def _data_start(self) -> None:
        await self.expect("DATA", 354)

    async def _send_body(self, header: bytes, body: BinaryIO | bytes) -> None:
        writer = self._conn()[1]
        stream = None if isinstance(body, bytes) else body
        first = header + b"\r\n" + (body if isinstance(body, bytes) else b"")
        try:
            for piece in dot_stuff(_read_chunks(first, stream)):
                writer.write(piece)
                await self._drain(writer, self.submission_timeout)
        except (TimeoutError, OSError) as e:
            raise self._io_error(e, "write") from e

    async def _send_data(self, header: bytes, body: BinaryIO | bytes, nreplies: int) -> list[Reply]:
        await self._data_start()
        await self._send_body(header, body)
        return [await self._read_reply(self.submission_timeout) for _ in range(nreplies)]

    async def rset(self) -> None:
        self.rcpts = []
        await self.expect("RSET", 250)

    async def noop(self) -> None:
        await self.expect("NOOP", 250)

    async def quit(self) -> None:
        """QUIT and close; errors on the way out are swallowed (the message is already handled)."""
        if self._writer is None:
            return
        with contextlib.suppress(SMTPError, TLSError, OSError, asyncio.TimeoutError):
            reply = await self.command("QUIT", timeout=min(self.command_timeout, 5.0))
            del reply
        await self.close()

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5.0)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def peer_chain(self) -> list[bytes]:
        """The certificates the server presented (DER, leaf first), verified or not; [] without TLS.

        DANE (RFC 7672) needs the whole chain even when PKIX verification was off; Python 3.11
        exposes it only on the private `_sslobj` (public from 3.13 as get_unverified_chain)."""
        if self._writer is None or not self.tls:
            return []
        obj = self._writer.get_extra_info("ssl_object")
        if obj is None:
            return []
        getter = getattr(obj, "get_unverified_chain", None) or getattr(
            getattr(obj, "_sslobj", None), "get_unverified_chain", None
        )
        if getter is not None:
            certs = getter() or []
            return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in certs]  # type: ignore[attr-defined]
        leaf = obj.getpeercert(binary_form=True)
        return [leaf] if leaf else []

    def local_address(self) -> str:
        if self._writer is None:
            return ""
        peer = self._writer.get_extra_info("sockname")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")

    # -- wire ---------------------------------------------------------------------------------------

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        """Send one command line and read its reply (any code)."""
        if "\r" in line or "\n" in line:
            raise ValueError("smtp: a command must not contain CR or LF")
        writer = self._conn()[1]
        try:
            writer.write(line.encode("utf-8") + b"\r\n")
            await self._drain(writer, timeout or self.command_timeout)
        except (TimeoutError, OSError) as e:
            raise self._io_error(e, "write") from e
        return await self._read_reply(timeout or self.command_timeout)

    async def pipeline(self, lines: list[str]) -> list[Reply]:
        """RFC 2920: send a group of commands in one write and read their replies in order.

        Only for a server that offers PIPELINING; the last command of a group may be one
        that changes the state (DATA, RSET, ...) but nothing may follow it (§3.1)."""
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError("smtp: a command must not contain CR or LF")
        writer = self._conn()[1]
        try:
            writer.write("".join(line + "\r\n" for line in lines).encode("utf-8"))
            await self._drain(writer, self.command_timeout)
        except (TimeoutError, OSError) as e:
            raise self._io_error(e, "write") from e
        return [await self._read_reply(self.command_timeout) for _ in lines]

    @staticmethod
    async def _drain(writer: asyncio.StreamWriter, timeout: float) -> None:
        # The kernel took everything (the usual case for a command line): there is nothing
        # to wait for, so skip wait_for's task and timer. A closed connection shows on read.
        transport = writer.transport
        if transport.get_write_buffer_size() == 0 and not transport.is_closing():
            return
        await asyncio.wait_for(writer.drain(), timeout)

    async def expect(self, line: str, *codes: int) -> Reply:
        reply = await self.command(line)
        if reply.code not in codes:
            raise reply.error(self.server_name)
        return reply

    async def _read_reply(self, timeout: float) -> Reply:
        reader = self._conn()[0]
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await reader.readline()
                    if not line.endswith(b"\n"):
                        raise ConnectionResetError("connection closed by the server")
                    if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                        raise SMTPError(450, (4, 4, 2), "Network I/O error", reason=f"malformed reply {line[:80]!r}")
                    lines.append(line)
                    if line[3:4] != b"-":
                        break
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            raise self._io_error(e, "read") from e
        return parse_reply(lines)

    def _conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            raise SMTPError(450, (4, 4, 2), "Network I/O error", reason="smtp: not connected")
        return self._reader, self._writer

    def _io_error(self, e: BaseException, op: str) -> SMTPError:
        if isinstance(e, ssl.SSLError):
            return SMTPError(450, (4, 4, 2), "Network I/O error", reason=f"tls: {e}", remote_server=self.server_name)
        reason = "i/o timeout" if isinstance(e, asyncio.TimeoutError) else (str(e) or type(e).__name__)
        return SMTPError(450, (4, 4, 2), "Network I/O error", reason=reason, remote_addr=self.server_name, io_op=op)


# -- addresses for a peer without SMTPUTF8 -------------------------------------------------------


def _ascii_mailbox(addr: str) -> str:
    # RFC 6531 §3.2: a domain can become an A-label; a non-ASCII local part has no ASCII form
    if addr.isascii() or addr == "":
        return addr
    local, domain = address.split(addr)
    if not local.isascii():
        raise address.AddressError("non-ASCII local part")
    return local + ("@" + address.to_ascii_domain(domain) if domain else "")


def ascii_sender(addr: str) -> str:
    """MAIL FROM for a peer that lacks SMTPUTF8, or 550 5.6.7 (maddy's wording)."""
    try:
        return _ascii_mailbox(addr)
    except (address.AddressError, UnicodeError) as e:
        raise SMTPError(
            550, (5, 6, 7), "SMTPUTF8 is unsupported, cannot convert sender address", reason=str(e)
        ) from None


def ascii_rcpt(addr: str, target: str) -> str:
    """RCPT TO for a peer that lacks SMTPUTF8, or 553 5.6.7 (maddy's wording)."""
    try:
        return _ascii_mailbox(addr)
    except (address.AddressError, UnicodeError) as e:
        raise SMTPError(
            553, (5, 6, 7), "SMTPUTF8 is unsupported, cannot convert recipient address", reason=str(e), target=target
        ) from None
