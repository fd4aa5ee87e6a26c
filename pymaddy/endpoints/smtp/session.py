"""One SMTP/LMTP conversation: the protocol state machine (replies follow go-smtp 0.21 + maddy)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import socket
import ssl
import struct
from typing import TYPE_CHECKING

from pymaddy.auth.throttle import Throttled
from pymaddy.endpoints.smtp.protocol import (
    MALFORMED_HEADER,
    DotDecoder,
    LineTooLong,
    MessageReader,
    Spool,
    parse_args,
    parse_cmd,
    parse_path,
    read_proxy_header,
    valid_header_block,
)
from pymaddy.endpoints.smtp.submission import submission_prepare
from pymaddy.mail import address
from pymaddy.mail.errors import AuthTemporaryError, SMTPError, internal_error
from pymaddy.mail.message import ConnInfo, Header, MsgMeta, new_msg_id
from pymaddy.pipeline.interfaces import Delivery, PartialDelivery
from pymaddy.runtime.module import Connection, host_port

if TYPE_CHECKING:
    from pymaddy.endpoints.smtp.endpoint import SMTPEndpoint


# rDNS answers are reused for connections from the same IP for this long (seconds), as a caching
# resolver would: a lookup is a worker-thread round trip per connection otherwise.
RDNS_CACHE_TTL = 30.0
RDNS_CACHE_MAX = 1024


class _Close(Exception):
    pass


def clean_domain(addr: str) -> str:
    """maddy's address.CleanDomain: the domain in lower-case U-label NFC form."""
    local, domain = address.split(addr)
    if not domain:
        return addr
    if not address.valid_domain(domain):
        raise address.AddressError("invalid domain")
    return local + "@" + address.domain_for_lookup(domain)


def mangle(msg: str) -> str:
    return "".join(ch if ord(ch) <= 128 else "?" for ch in msg)


class Session:
    def __init__(self, endp: SMTPEndpoint, conn: Connection) -> None:
        self.e = endp
        self.conn = conn
        self.reader = conn.reader
        self.writer = conn.writer
        self.log = endp.log
        self.lmtp = endp.lmtp
        self.tls = conn.writer.get_extra_info("ssl_object") is not None
        self.helo: str | None = None
        self.auth_user = ""
        self.auth_password = ""
        peer = conn.peer
        self.is_unix = not (isinstance(peer, tuple) and len(peer) >= 2)
        self.remote_ip = "127.0.0.1" if self.is_unix else str(peer[0])
        self.remote_port = 0 if self.is_unix else int(peer[1])
        self.rdns = ""
        self._rdns_task: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()
        self._reset_tx()
        self.logged_rcpt_errors = 0
        self.repeated_mail_errs = 0
        self.err_count = 0
        self.did_auth = False

    # -- I/O -----------------------------------------------------------------------------

    @property
    def src(self) -> str:
        return host_port(self.remote_ip, self.remote_port)

    async def reply(self, code: int, enh: tuple[int, int, int] | None, *lines: str) -> None:
        out = []
        for i, text in enumerate(lines or ("",)):
            sep = " " if i == len(lines) - 1 else "-"
            prefix = f"{code}{sep}"
            if enh is not None:
                prefix += ".".join(map(str, enh)) + " "
            out.append(prefix + text + "\r\n")
        if self.e.io_debug:
            for ln in out:
                self.log.debug("S: " + ln.rstrip())
        self.writer.write("".join(out).encode("utf-8"))
        async with asyncio.timeout(self.e.write_timeout):
            await self.writer.drain()

    async def reply_err(self, err: SMTPError) -> None:
        await self.reply(err.code, err.enhanced, err.message)

    async def readline(self, *, idle: bool) -> bytes:
        limit = self.e.max_line
        try:
            if idle:
                with self.conn.idle():
                    async with asyncio.timeout(self.e.read_timeout):
                        line = await self.reader.readuntil(b"\n")
            else:
                async with asyncio.timeout(self.e.read_timeout):
                    line = await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise LineTooLong from None
        except asyncio.IncompleteReadError as e:
            if e.partial and len(e.partial) > limit:
                raise LineTooLong from None
            raise _Close from None
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.reply(421, (4, 4, 2), "Idle timeout, bye bye")
            raise _Close from None
        if limit and len(line) > limit:
            raise LineTooLong
        return line

    # -- session -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except LineTooLong:
            with contextlib.suppress(Exception):
                await self.reply(500, (5, 4, 0), "Too long line, closing connection")
        except (_Close, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await self._abort()
            if self.repeated_mail_errs > self.e.max_logged_rcpt_errors:
                self.log.msg(
                    "MAIL FROM repeated error a lot of times, possible dictonary attack",
                    count=self.repeated_mail_errs,
                    src_ip=self.src,
                )
            if self._rdns_task is not None:
                self._rdns_task.cancel()

    async def _run(self) -> None:
        pp = self.e.proxy
        if pp is not None:
            try:
                info = await read_proxy_header(self.reader)
            except (
                ValueError,
                UnicodeError,
                struct.error,
                asyncio.LimitOverrunError,
                asyncio.IncompleteReadError,
            ) as e:
                self.log.error("invalid PROXY protocol header", err=str(e) or type(e).__name__, src_ip=self.src)
                return
            trusted = self.is_unix or not pp.trust or any(_in_net(self.remote_ip, n) for n in pp.trust)
            if info and trusted and not isinstance(info, bool):
                self.remote_ip, self.remote_port = info.ip, info.port
                self.is_unix = False
        if not self.is_unix:
            hit = self.e.rdns_cache.get(self.remote_ip)
            if hit is not None and hit[1] > self.loop.time():
                self.rdns = hit[0]
            else:
                self._rdns_task = asyncio.ensure_future(self._lookup_rdns())
        await self.reply(220, None, f"{self.e.hostname} {'LMTP' if self.lmtp else 'ESMTP'} Service Ready")
        while True:
            raw = await self.readline(idle=True)
            line = raw.decode("utf-8", errors="replace")
            parsed = parse_cmd(line) if "\x00" not in line else None
            if parsed is None:
                if await self.protocol_error(501, (5, 5, 2), "Bad command"):
                    return
                continue
            cmd, arg = parsed
            if self.e.io_debug:
                self.log.debug("C: " + (line.rstrip() if cmd != "AUTH" else "AUTH ..."))
            if not cmd:
                if await self.protocol_error(500, (5, 5, 2), "Error: bad syntax"):
                    return
                continue
            if cmd in ("SEND", "SOML", "SAML", "EXPN", "HELP", "TURN"):
                await self.reply(502, (5, 5, 1), f"{cmd} command not implemented")
                continue
            handler = getattr(self, "cmd_" + cmd, None) if cmd.isalpha() else None
            if handler is None:
                if await self.protocol_error(500, (5, 5, 2), f"Syntax errors, {cmd} command unrecognized"):
                    return
                continue
            if await handler(arg) is False:
                return

    async def protocol_error(self, code: int, enh: tuple[int, int, int], text: str) -> bool:
        """go-smtp's protocolError: after more than 3, `500 5.5.1 Too many errors` and close."""
        await self.reply(code, enh, text)
        self.err_count += 1
        if self.err_count > 3:
            await self.reply(500, (5, 5, 1), "Too many errors. Quiting now")
            return True
        return False

    async def _lookup_rdns(self) -> None:
        ip = self.remote_ip
        try:
            host, _ = await asyncio.wait_for(self.loop.getnameinfo((ip, 0), socket.NI_NAMEREQD), 5.0)
            self.rdns = host
        except socket.gaierror:
            self.rdns = ""  # an answer (no name): cached too
        except Exception:
            self.rdns = ""
            return  # timeout or the like: not cached
        cache = self.e.rdns_cache
        if len(cache) >= RDNS_CACHE_MAX:
            cache.clear()
        cache[ip] = (self.rdns, self.loop.time() + RDNS_CACHE_TTL)

    def conn_info(self) -> ConnInfo:
        sslobj = self.writer.get_extra_info("ssl_object")
        proto = "LMTP" if self.lmtp else ("ESMTPS" if self.tls else "ESMTP")
        return ConnInfo(
            remote_ip=self.remote_ip,
            remote_port=self.remote_port,
            helo=self.helo or "",
            rdns=self.rdns,
            proto=proto,
            tls=self.tls,
            tls_version=sslobj.version() if sslobj is not None else "",
            tls_cipher=(sslobj.cipher() or ("",))[0] if sslobj is not None else "",
            auth_user=self.auth_user,
            auth_password=self.auth_password,
            is_unix=self.is_unix,
        )

    def _reset_tx(self) -> None:
        self.mail_from: str | None = None
        self.clean_from = ""
        self.utf8 = False
        self.body_8bit = False
        self.requiretls = False
        self.size = 0
        self.rcpts: list[str] = []
        self.delivery: Delivery | None = None
        self.delivery_err: SMTPError | None = None
        self.meta: MsgMeta | None = None
        self.limits_taken: tuple[str, str] | None = None
        self.bdat: MessageReader | None = None
        self.bdat_failed: SMTPError | None = None

    async def _abort(self) -> None:
        if self.delivery is not None:
            try:
                await self.delivery.abort()
            except Exception as e:
                self.log.error("delivery abort failed", err=e)
            if self.meta is not None:
                self.log.msg("aborted", msg_id=self.meta.id)
        if self.bdat is not None:
            self.bdat.spool.discard()
        self._release()
        self._reset_tx()

    def _release(self) -> None:
        if self.limits_taken is not None and self.e.limits is not None:
            self.e.limits.release_msg(*self.limits_taken)
        self.limits_taken = None

    def wrap(self, err: BaseException, msg_id: str | None, command: str) -> SMTPError:
        """maddy's wrapErr: SMTP annotations kept, anything else 554/451 Internal server error."""
        e = internal_error(err)
        msg = e.message
        if msg_id:
            msg += f" (msg ID = {msg_id})"
        if not self.utf8:
            msg = mangle(msg)
        self.e.failed_cmd(command, e.code, e.enhanced_str)
        return SMTPError(e.code, e.enhanced, msg)

    # -- greeting ------------------------------------------------------------------------

    async def cmd_HELO(self, arg: str) -> None:
        if self.lmtp:
            await self.reply(500, (5, 5, 1), "This is a LMTP server, use LHLO")
            return
        await self._hello(arg, ehlo=False)

    async def cmd_EHLO(self, arg: str) -> None:
        if self.lmtp:
            await self.reply(500, (5, 5, 1), "This is a LMTP server, use LHLO")
            return
        await self._hello(arg, ehlo=True)

    async def cmd_LHLO(self, arg: str) -> None:
        if not self.lmtp:
            await self.reply(500, (5, 5, 1), "This is not a LMTP server")
            return
        await self._hello(arg, ehlo=True)

    async def _hello(self, arg: str, ehlo: bool) -> None:
        if not arg:
            await self.reply(501, (5, 5, 2), "Domain/address argument required for " + ("EHLO" if ehlo else "HELO"))
            return
        await self._abort()
        # go-smtp makes a new maddy session at every greeting: early checks run again and
        # the session's authentication is gone (the "already authenticated" flag is not).
        self.auth_user, self.auth_password = "", ""
        # The early checks (dnsbl `ehlo` lists) judge the name being introduced now.
        self.helo = arg.split(maxsplit=1)[0]
        if await self._early_checks("EHLO"):
            self.helo = None
            return
        if not ehlo:
            await self.reply(250, (2, 0, 0), f"Hello {self.helo}")
            return
        caps = [f"Hello {self.helo}", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING"]
        if self.e.tls_ctx is not None and not self.tls:
            caps.append("STARTTLS")
        if self.auth_allowed():
            caps.append("AUTH " + " ".join(self.e.mechanisms))
        caps.append("SMTPUTF8")
        if self.tls:
            caps.append("REQUIRETLS")
        caps.append(f"SIZE {self.e.max_size}" if self.e.max_size else "SIZE")
        if self.e.max_rcpts:
            caps.append(f"LIMITS RCPTMAX={self.e.max_rcpts}")
        await self.reply(250, None, *caps)

    async def _early_checks(self, command: str) -> bool:
        """dnsbl-style checks on the connection; True when they refused it (already answered)."""
        try:
            err = await self.e.pipeline.run_early_checks(MsgMeta(id="", conn=self.conn_info()))
        except Exception as e:
            err = internal_error(e, temporary=True)
        if err is None:
            return False
        self.log.error(f"{command} refused by an early check", err=err, src_ip=self.src)
        await self.reply_err(self.wrap(err, None, command))
        return True

    def auth_allowed(self) -> bool:
        return bool(self.e.auth) and (self.tls or self.e.insecure_auth)

    # -- simple commands -----------------------------------------------------------------

    async def cmd_NOOP(self, arg: str) -> None:
        await self.reply(250, (2, 0, 0), "I have successfully done nothing")

    async def cmd_VRFY(self, arg: str) -> None:
        await self.reply(252, (2, 5, 0), "Cannot VRFY user, but will accept message")

    async def cmd_RSET(self, arg: str) -> None:
        await self._abort()
        await self.reply(250, (2, 0, 0), "Session reset")

    async def cmd_QUIT(self, arg: str) -> bool:
        await self.reply(221, (2, 0, 0), "Bye")
        return False

    async def cmd_STARTTLS(self, arg: str) -> None:
        if self.tls:
            await self.reply(502, (5, 5, 1), "Already running in TLS")
            return
        if self.e.tls_ctx is None:
            await self.reply(502, (5, 5, 1), "TLS not supported")
            return
        # Stop reading before the 220 goes out: a fast client sends its ClientHello the
        # moment it sees the reply, and those bytes must reach TLS, not the plaintext
        # buffer (where they would be thrown away below and the handshake would hang).
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]
        # Commands pipelined after STARTTLS in plaintext must not survive the upgrade.
        self.reader._buffer.clear()  # type: ignore[attr-defined]
        await self.reply(220, (2, 0, 0), "Ready to start TLS")
        try:
            await asyncio.wait_for(self._start_tls(self.e.tls_ctx), self.e.read_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self.log.debug("TLS handshake failed", reason=str(e), src_ip=self.src)
            raise _Close from None
        self.tls = True
        await self._abort()
        self.helo = None
        self.auth_user = ""
        self.did_auth = False

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        """StreamWriter.start_tls as the server side (the stdlib one assumes a client for
        streams it did not create through start_server)."""
        w = self.writer
        await w.drain()
        transport = await self.loop.start_tls(w.transport, w._protocol, ctx, server_side=True)  # type: ignore[attr-defined]
        w._transport = transport  # type: ignore[attr-defined]
        w._protocol._replace_writer(w)  # type: ignore[attr-defined]

    # -- AUTH ----------------------------------------------------------------------------

    async def cmd_AUTH(self, arg: str) -> None:
        """go-smtp's handleAuth around maddy's SASL servers (PLAIN, LOGIN with sasl_login)."""
        if self.helo is None:
            await self.reply(502, (5, 5, 1), "Please introduce yourself first.")
            return
        if self.did_auth:
            await self.reply(503, (5, 5, 1), "Already authenticated")
            return
        parts = arg.split()
        if not parts:
            await self.reply(502, (5, 5, 4), "Missing parameter")
            return
        if not (self.tls or self.e.insecure_auth):
            await self.reply(523, (5, 7, 10), "TLS is required")
            return
        mech = parts[0].upper()
        initial: bytes | None = None
        if len(parts) > 1:
            initial = self._b64(parts[1])
            if initial is None:
                await self.reply(454, (4, 7, 0), "Invalid base64 data")
                return
        if mech not in self.e.mechanisms:
            await self.reply(454, (4, 7, 0), "unsupported SASL mechanism")
            return
        log_user = ""
        if mech == "PLAIN":
            data = initial if initial is not None else await self._sasl_step("")
            if data is None:
                return
            fields = data.split(b"\x00")
            if len(fields) != 3:
                await self.reply(454, (4, 7, 0), "sasl: invalid response")
                return
            authz, user_b, pwd_b = fields
            user, pwd = user_b.decode("utf-8", "replace"), pwd_b.decode("utf-8", "replace")
            if authz and authz != user_b:
                # maddy refuses this without logging it (no fail2ban line)
                self.e.failed_login()
                await self.reply(535, (5, 7, 8), "Invalid credentials")
                return
        else:  # LOGIN
            u = initial if initial is not None else await self._sasl_step("VXNlcm5hbWU6")
            if u is None:
                return
            pw = await self._sasl_step("UGFzc3dvcmQ6")
            if pw is None:
                return
            user, pwd = u.decode("utf-8", "replace"), pw.decode("utf-8", "replace")
            try:
                log_user = await self.e.username_for_auth(user)  # LOGIN logs the mapped name (maddy)
            except Exception:
                self.e.failed_login()
                await self.reply(535, (5, 7, 8), "Invalid credentials")
                return
        err = await self.e.check_password(user, pwd, self.remote_ip)
        if err is not None:
            self._auth_failed(log_user or user, str(err))
            if isinstance(err, Throttled):
                await self.reply(454, (4, 7, 0), "Too many failed logins, try again later")
            elif isinstance(err, AuthTemporaryError):
                await self.reply(454, (4, 7, 0), "Temporary authentication failure")
            else:
                await self.reply(535, (5, 7, 8), "Invalid credentials")
            return
        self.auth_user, self.auth_password = user, pwd
        self.did_auth = True
        await self.reply(235, (2, 0, 0), "Authentication succeeded")

    @staticmethod
    def _b64(s: str) -> bytes | None:
        if s == "=":
            return b""
        try:
            return base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _sasl_step(self, challenge: str) -> bytes | None:
        """Send a 334 challenge, read the answer; None when it was cancelled or bad (answered)."""
        await self.reply(334, None, challenge)
        answer = (await self.readline(idle=False)).decode("ascii", "replace").rstrip("\r\n")
        if answer == "*":
            await self.reply(501, (5, 0, 0), "Negotiation cancelled")
            return None
        data = self._b64(answer)
        if data is None:
            await self.reply(454, (4, 7, 0), "Invalid base64 data")
        return data

    def _auth_failed(self, user: str, reason: str) -> None:
        self.log.msg("authentication failed", reason=reason, src_ip=self.src, username=user)
        self.e.failed_login()

    # -- MAIL / RCPT ---------------------------------------------------------------------

    async def cmd_MAIL(self, arg: str) -> None:
        if self.helo is None:
            await self.reply(502, (5, 5, 1), "Please introduce yourself first.")
            return
        if self.bdat is not None:
            await self.reply(502, (5, 5, 1), "MAIL not allowed during message transfer")
            return
        if self.mail_from is not None:
            # go-smtp would pass a second MAIL on; RFC 5321 calls it a bad sequence
            await self.reply(503, (5, 5, 1), "Error: nested MAIL command")
            return
        p = parse_path(arg, "FROM:")
        if p is None:
            await self.reply(501, (5, 5, 2), "Was expecting MAIL arg syntax of FROM:<address>")
            return
        addr, rest = p
        params = parse_args(rest)
        if params is None:
            await self.reply(501, (5, 5, 4), "Unable to parse MAIL ESMTP parameters")
            return
        utf8, body8, reqtls, size = False, False, False, 0
        for key, val in params.items():
            if key == "SIZE":
                if not val.isdigit() or int(val) >= 1 << 32:
                    await self.reply(501, (5, 5, 4), "Unable to parse SIZE as an integer")
                    return
                size = int(val)
                if self.e.max_size and size > self.e.max_size:
                    await self.reply(552, (5, 3, 4), "Max message size exceeded")
                    return
            elif key == "SMTPUTF8":
                utf8 = True
            elif key == "REQUIRETLS":
                reqtls = True
            elif key == "BODY":
                v = val.upper()
                if v == "BINARYMIME":
                    await self.reply(504, (5, 5, 4), "BINARYMIME is not implemented")
                    return
                if v not in ("7BIT", "8BITMIME"):
                    await self.reply(501, (5, 5, 4), "Unknown BODY value")
                    return
                body8 = v == "8BITMIME"
            elif key in ("RET", "ENVID"):
                await self.reply(504, (5, 5, 4), f"{key} is not implemented")
                return
            elif key == "AUTH":
                if not _auth_param_ok(val):
                    await self.reply(500, (5, 5, 4), "Malformed AUTH parameter value")
                    return
            else:
                await self.reply(500, (5, 5, 4), "Unknown MAIL FROM argument")
                return
        if self.e.auth_required and not self.auth_user:
            await self.reply(502, (5, 7, 0), "Please authenticate first")
            return
        self.mail_from = addr
        self.utf8, self.body_8bit, self.requiretls, self.size = utf8, body8, reqtls, size
        if not self.e.defer_sender_reject:
            err = await self._start_delivery()
            if err is not None:
                self.mail_from = None
                await self.reply_err(err)
                return
        await self.reply(250, (2, 0, 0), f"Roger, accepting mail from <{addr}>")

    async def _start_delivery(self, rcpt: str | None = None) -> SMTPError | None:
        """maddy's startDelivery; `rcpt` is set when it runs deferred, at the first RCPT."""
        assert self.mail_from is not None
        frm = self.mail_from
        meta = MsgMeta(id=new_msg_id(), conn=self.conn_info())
        meta.smtputf8, meta.body_8bit = self.utf8, self.body_8bit
        meta.requiretls, meta.size = self.requiretls, self.size
        meta.original_from = frm
        meta.dont_trace_sender = self.e.submission
        fields = {"src_host": self.helo, "src_ip": self.src, "sender": frm, "msg_id": meta.id}
        if self.auth_user:
            fields["username"] = self.auth_user
        self.log.msg("incoming message", **fields)
        try:
            if not self.utf8 and not frm.isascii():
                raise SMTPError(550, (5, 6, 7), "SMTPUTF8 is required for non-ASCII senders")
            clean = ""
            if frm:
                try:
                    clean = clean_domain(frm)
                except (address.AddressError, UnicodeError):
                    raise SMTPError(553, (5, 1, 7), "Unable to normalize the sender address") from None
            domain = clean.rpartition("@")[2] if "@" in clean else ""
            if self.e.limits is not None:
                try:
                    await self.e.limits.take_msg(self.remote_ip, domain)
                except SMTPError:
                    self.e.ratelimit_deferred()
                    raise
                self.limits_taken = (self.remote_ip, domain)
            self.delivery = await self.e.pipeline.start_delivery(meta, clean)
        except Exception as e:
            self._release()
            self.delivery = None
            why: BaseException | str = e if isinstance(e, SMTPError) else f"{e}"
            if rcpt is None:
                self.log.error("MAIL FROM error", err=why, msg_id=meta.id)
            else:
                self.log.error("MAIL FROM error (deferred)", err=why, rcpt=rcpt, msg_id=meta.id)
            return self.wrap(e, meta.id, "MAIL" if not self.e.defer_sender_reject else "RCPT")
        self.meta = meta
        self.clean_from = clean
        self.e.started_tx()
        return None

    async def cmd_RCPT(self, arg: str) -> None:
        if self.mail_from is None:
            await self.reply(502, (5, 5, 1), "Missing MAIL FROM command.")
            return
        if self.bdat is not None:
            await self.reply(502, (5, 5, 1), "RCPT not allowed during message transfer")
            return
        p = parse_path(arg, "TO:")
        if p is None:
            await self.reply(501, (5, 5, 2), "Was expecting RCPT arg syntax of TO:<address>")
            return
        to, rest = p
        if self.e.max_rcpts and len(self.rcpts) >= self.e.max_rcpts:
            await self.reply(452, (4, 5, 3), f"Maximum limit of {self.e.max_rcpts} recipients reached")
            return
        params = parse_args(rest)
        if params is None:
            await self.reply(501, (5, 5, 4), "Unable to parse RCPT ESMTP parameters")
            return
        for key in params:
            if key in ("NOTIFY", "ORCPT"):
                await self.reply(504, (5, 5, 4), f"{key} is not implemented")
                return
            await self.reply(500, (5, 5, 4), "Unknown RCPT TO argument")
            return
        if self.delivery is None:
            if self.delivery_err is not None:
                self.repeated_mail_errs += 1
                await self.reply_err(self.delivery_err)
                return
            err = await self._start_delivery(to)
            if err is not None:
                self.delivery_err = err
                await self.reply_err(err)
                return
        assert self.meta is not None and self.delivery is not None
        try:
            if not to.isascii() and not self.utf8:
                raise SMTPError(553, (5, 6, 7), "SMTPUTF8 is required for non-ASCII recipients")
            try:
                clean = clean_domain(to)
            except (address.AddressError, UnicodeError):
                raise SMTPError(501, (5, 1, 2), "Unable to normalize the recipient address") from None
            await self.delivery.add_rcpt(clean)
        except Exception as e:
            if self.logged_rcpt_errors < self.e.max_logged_rcpt_errors:
                why: BaseException | str = e if isinstance(e, SMTPError) else f"{e}"
                self.log.error("RCPT error", err=why, rcpt=to, msg_id=self.meta.id)
                self.logged_rcpt_errors += 1
                if self.logged_rcpt_errors == self.e.max_logged_rcpt_errors:
                    msg = "too many RCPT errors, possible dictonary attack"
                    self.log.msg(msg, src_ip=self.src, msg_id=self.meta.id)
            await self.reply_err(self.wrap(e, self.meta.id, "RCPT"))
            return
        self.rcpts.append(to)
        self.log.msg("RCPT ok", rcpt=to, msg_id=self.meta.id)
        await self.reply(250, (2, 0, 0), f"I'll make sure <{to}> gets this")

    # -- DATA / BDAT ---------------------------------------------------------------------

    def _new_reader(self) -> MessageReader:
        spool = Spool(self.e.buffer_mode, self.e.buffer_dir, self.e.buffer_max_ram)
        return MessageReader(spool, self.e.max_size, self.e.max_header)

    async def cmd_DATA(self, arg: str) -> None:
        if arg:
            await self.reply(501, (5, 5, 4), "DATA command should not have any arguments")
            return
        if self.bdat is not None:
            await self.reply(502, (5, 5, 1), "DATA not allowed during message transfer")
            return
        if self.mail_from is None or not self.rcpts:
            await self.reply(502, (5, 5, 1), "Missing RCPT TO command.")
            return
        await self.reply(354, None, "Go ahead. End your data with <CR><LF>.<CR><LF>")
        mr = self._new_reader()
        try:
            await self._read_dot(mr)
        except LineTooLong:
            # maddy sees an I/O error (554 Internal server error), then go-smtp's line
            # limit ends the connection
            mr.spool.discard()
            meta = self.meta
            err = self.wrap(SMTPError(554, (5, 0, 0), "Internal server error"), meta.id if meta else None, "DATA")
            with contextlib.suppress(Exception):
                await self.reply_err(err)
            raise
        except BaseException:
            mr.spool.discard()
            raise
        await self._finish(mr)

    async def _read_dot(self, mr: MessageReader) -> None:
        """Read DATA to its end marker (see DotDecoder: bare LF never ends it).

        Reads the stream in blocks and splits lines itself (a readline per line is slow);
        what follows the end marker is given back to the stream for the next command.
        """
        dec = DotDecoder()
        limit = self.e.max_line
        pending = b""
        while True:
            async with asyncio.timeout(self.e.read_timeout):
                block = await self.reader.read(65536)
            if not block:
                raise _Close
            pending += block
            # Whole blocks of plain CR LF lines at C speed; anything odd goes line by line.
            cut = pending.rfind(b"\r\n") + 2
            if cut > 1:
                fast = dec.block(pending[:cut], limit)
                if fast is not None:
                    data, end = fast
                    if data:
                        mr.feed(data)
                    if end >= 0:
                        rest = pending[end:]
                        if rest:
                            self.reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                        return
                    pending = pending[cut:]
            last = pending.rfind(b"\n")
            if last < 0:
                if limit and len(pending) > limit:
                    raise LineTooLong
                continue
            lines, pending = pending[: last + 1], pending[last + 1 :]
            start = 0
            while start < len(lines):
                nl = lines.index(b"\n", start) + 1
                line = lines[start:nl]
                start = nl
                if limit and len(line) > limit:
                    raise LineTooLong
                data, end_ = dec.line(line)
                if data:
                    mr.feed(data)
                if end_:
                    rest = lines[start:] + pending
                    if rest:
                        self.reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                    return
            if limit and len(pending) > limit:
                raise LineTooLong

    async def _read_chunk(self, size: int, sink: MessageReader | None) -> None:
        """Read a BDAT chunk in pieces (never all at once), feeding `sink` or dropping it."""
        left = size
        while left > 0:
            async with asyncio.timeout(self.e.read_timeout):
                piece = await self.reader.read(min(left, 65536))
            if not piece:
                raise _Close
            left -= len(piece)
            if sink is not None:
                sink.feed(piece)

    async def cmd_BDAT(self, arg: str) -> None:
        parts = arg.split()
        if not parts:
            await self.reply(501, (5, 5, 4), "Missing chunk size argument")
            return
        if len(parts) > 2:
            await self.reply(501, (5, 5, 4), "Too many arguments")
            raise _Close  # which argument is the size? The stream cannot be resynchronised.
        if not parts[0].isdigit() or int(parts[0]) >= 1 << 32:
            await self.reply(501, (5, 5, 4), "Malformed size argument")
            raise _Close
        size = int(parts[0])
        if self.mail_from is None or not self.rcpts:
            # go-smtp would now read the chunk as commands; drop it instead (smuggling).
            await self._read_chunk(size, None)
            await self.reply(502, (5, 5, 1), "Missing RCPT TO command.")
            return
        if len(parts) == 2 and parts[1].upper() != "LAST":
            await self._read_chunk(size, None)
            await self.reply(501, (5, 5, 4), "Unknown BDAT argument")
            return
        last = len(parts) == 2
        if self.bdat is None:
            self.bdat = self._new_reader()
        if self.e.max_size and self.bdat.total + size > self.e.max_size:
            await self._read_chunk(size, None)
            await self._abort()
            await self.reply(552, (5, 3, 4), "Max message size exceeded")
            return
        await self._read_chunk(size, self.bdat)
        if not last:
            await self.reply(250, (2, 0, 0), "Continue")
            return
        mr, self.bdat = self.bdat, None
        await self._finish(mr)

    async def _finish(self, mr: MessageReader) -> None:
        """The whole message is read: run it through the pipeline and answer."""
        body = mr.spool.finish()
        try:
            await self._deliver(mr, body)
        finally:
            body.discard()
            mr.spool.discard()
            self._release()
            self._reset_tx()

    async def _deliver(self, mr: MessageReader, body: object) -> None:
        from pymaddy.mail.message import Body

        assert isinstance(body, Body)
        rcpts = list(self.rcpts)
        meta, delivery = self.meta, self.delivery
        assert meta is not None and delivery is not None

        async def fail(err: BaseException) -> None:
            self.log.error("DATA error", err=err if isinstance(err, SMTPError) else f"{err}", msg_id=meta.id)
            e = self.wrap(err, meta.id, "DATA")
            with contextlib.suppress(Exception):
                await delivery.abort()
            self.delivery = None
            self.e.aborted_tx()
            if self.lmtp:
                for _ in rcpts:
                    await self.reply_err(e)
            else:
                await self.reply_err(e)

        if self._rdns_task is not None and not self._rdns_task.done():
            # Received names the client's rDNS: give the lookup started at connect a moment
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._rdns_task), 5.0)
        meta.conn.rdns = self.rdns
        try:
            if mr.error is not None:
                raise mr.error
            raw = bytes(mr.header)
            if not valid_header_block(raw):
                raise MALFORMED_HEADER
            header = Header.parse(raw)
            if self.e.submission:
                submission_prepare(meta, header, self.e.hostname, self.log)
            n = header.count("Received")
            if n > self.e.max_received:
                raise SMTPError(554, (5, 4, 6), f"Too many Received header fields ({n}), possible forwarding loop")
            if (header.get("TLS-Required") or "").lower() == "no":
                meta.tls_required_override = True
        except Exception as e:
            await fail(e)
            return

        if self.lmtp and isinstance(delivery, PartialDelivery):
            statuses: dict[str, SMTPError | None] = {}

            def status(rcpt: str, err: SMTPError | None) -> None:
                statuses.setdefault(rcpt, err)

            try:
                await delivery.body_non_atomic(status, header, body)
                await delivery.commit()
            except Exception as e:
                await fail(e)
                return
            self.delivery = None
            self.log.msg("accepted", msg_id=meta.id)
            self.e.completed_tx()
            for r in rcpts:
                try:
                    key = clean_domain(r)
                except (address.AddressError, UnicodeError):
                    key = r
                err = statuses.get(key)
                if err is None:
                    await self.reply(250, (2, 0, 0), f"<{r}> OK: queued")
                else:
                    await self.reply_err(self.wrap(err, meta.id, "DATA"))
            return
        try:
            await delivery.body(header, body)
            await delivery.commit()
        except Exception as e:
            await fail(e)
            return
        self.delivery = None
        self.log.msg("accepted", msg_id=meta.id)
        self.e.completed_tx()
        await self.reply(250, (2, 0, 0), "OK: queued")


def _auth_param_ok(val: str) -> bool:
    """MAIL … AUTH=<> or AUTH=xtext-encoded mailbox (RFC 4954 §5)."""
    if not val:
        return False
    if val == "<>":
        return True
    import re

    if re.search(r"\+(?![0-9A-F]{2})", val):
        return False
    decoded = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), val)
    p = parse_path(decoded, "")
    return p is not None and p[1] == "" and "<" not in decoded


def _in_net(ip: str, net: object) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(ip) in net  # type: ignore[operator]
    except ValueError:
        return False
