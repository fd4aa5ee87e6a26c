"""target.remote: deliver to the MX hosts of each recipient domain (spec §B.3, RFC 5321 §5).

Per recipient domain: MX lookup (RFC 5321 §5.1: preference order, implicit MX,
RFC 7505 null MX), then per MX the policies' check_mx, a TCP connection to port
25 (`-debug.smtpport` in tests), STARTTLS if offered down maddy's ladder —
verified (*authenticated*), else unverified (*encrypted*) after a verification
failure, else plaintext after any other TLS failure — and the policies'
check_conn. Recipients of one domain share that connection; at DATA the
domains are served in parallel, and each recipient gets its own status
(PartialDelivery), which target.queue records.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING

from pymaddy.dns import DNSError, resolver_for
from pymaddy.mail import address
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget, PartialDelivery, StatusCallback
from pymaddy.pipeline.limits import Limits
from pymaddy.runtime.module import Module, ModuleError, RuntimeContext
from pymaddy.targets.mxconn import MXConn, Pool
from pymaddy.targets.policies import (
    ConnState,
    DeliveryPolicy,
    MXAuthPolicy,
    MXLevel,
    PolicyGroup,
    TLSLevel,
    ad_trusted,
)
from pymaddy.targets.smtpclient import SMTPClient, TLSError, ascii_rcpt, ascii_sender
from pymaddy.tls.client import client_context

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance

__all__ = ["RemoteDelivery", "RemoteTarget"]

TARGET = "remote"
DEFAULT_TIMEOUT = 300.0


def _err_text(err: BaseException) -> str:
    """maddy's error text for the 'last err' part: the reason if any, else the message."""
    if isinstance(err, SMTPError):
        return err.reason or err.message
    return str(err) or type(err).__name__


def _is_reply(err: SMTPError) -> bool:
    """An error that is a reply of the remote server (not a local I/O or protocol failure)."""
    return "io_op" not in err.fields and not err.reason and "remote_server" in err.fields


def _wrap(err: BaseException, server: str) -> SMTPError:
    """maddy's smtpconn.wrapClientErr with AddrInSMTPMsg: server replies say who said them."""
    if isinstance(err, SMTPError):
        if _is_reply(err):
            code, enh = err.code, err.enhanced
            if code == 552:  # RFC 5321 §4.5.3.1.10: "too many recipients" is temporary
                code, enh = 452, (4, *enh[1:])
            return SMTPError(code, enh, f"{server} said: {err.message}", target=TARGET, remote_server=server)
        if not err.target:
            err.target = TARGET
        return err
    if isinstance(err, TLSError):
        return SMTPError(451, (4, 7, 0), "TLS error", reason=str(err), target=TARGET, remote_server=server)
    return SMTPError(451, (4, 0, 0), "Internal server error", reason=str(err), target=TARGET, remote_server=server)


def _rcpt_error(err: BaseException, server: str) -> SMTPError:
    wrapped = _wrap(err, server)
    if wrapped is not err:
        wrapped.__cause__ = err
    return wrapped


class RemoteTarget(Module, DeliveryTarget):
    """target.remote."""

    def log_name(self) -> str:
        return TARGET

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        try:
            self.hostname = address.to_ascii_domain(str(s.get("hostname") or ""))
        except address.AddressError:
            raise ModuleError("remote: cannot represent the hostname as an A-label name") from None
        local_ip = str(s.get("local_ip") or "").strip("[]")
        self.local_ip: str | None = None
        self.local_family = 0
        if local_ip:
            try:
                ip = ipaddress.ip_address(local_ip)
            except ValueError:
                raise ModuleError(f"remote: failed to parse local IP: {local_ip}") from None
            self.local_ip = str(ip)
            self.local_family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self.force_ipv4 = bool(s.get("force_ipv4"))
        self.allow_override = bool(s.get("requiretls_override", True))
        self.relaxed_requiretls = bool(s.get("relaxed_requiretls", True))
        self.reuse_limit = int(s.get("conn_reuse_limit", 10))
        self.connect_timeout = float(s.get("connect_timeout") or DEFAULT_TIMEOUT)
        self.command_timeout = float(s.get("command_timeout") or DEFAULT_TIMEOUT)
        self.submission_timeout = float(s.get("submission_timeout") or DEFAULT_TIMEOUT)
        port = getattr(ctx.options, "smtp_port", None)
        self.port = 25 if port is None else int(port)  # -debug.smtpport (0 → every dial fails)
        self.pool = Pool(int(s.get("conn_max_idle_count", 5)), float(s.get("conn_max_idle_time", 150)))
        self.resolver = resolver_for(ctx)
        self.policies: list[MXAuthPolicy] = []
        self.limits: Limits | None = None
        self.tls_verify: ssl.SSLContext | None = None
        self.tls_insecure: ssl.SSLContext | None = None

    async def start(self) -> None:
        group = self.settings.get("mx_auth")
        if group is not None:
            self.policies = self.ctx.module_as(group, PolicyGroup).policies()
        lim = self.settings.get("limits")
        if lim is not None:
            self.limits = self.ctx.module_as(lim, Limits)
        self.tls_verify = client_context(self.settings.get("tls_client"))
        # the encrypted-only rung of the ladder: same settings, no verification
        self.tls_insecure = client_context(self.settings.get("tls_client"))
        self.tls_insecure.check_hostname = False
        self.tls_insecure.verify_mode = ssl.CERT_NONE
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.close()

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        # RFC 8689 §4.1: `TLS-Required: No` asks to skip the policies, if we honour it
        skip = meta.tls_required_override and self.allow_override
        policies = [] if skip else [p.start_delivery(meta) for p in self.policies]
        domain = ""
        if mail_from:
            try:
                domain = address.split(mail_from)[1]
            except address.AddressError as e:
                raise SMTPError(501, (5, 1, 8), "Malformed sender address", reason=str(e), target=TARGET) from None
        ip = meta.conn.remote_ip or "127.0.0.1"
        if self.limits is not None:
            try:
                await self.limits.take_msg(ip, domain)
            except SMTPError as e:
                raise SMTPError(
                    451, (4, 4, 5), "High load, try again later", reason="Global limit timeout", target=TARGET
                ) from e
        return RemoteDelivery(self, meta, mail_from, policies, (ip, domain))

    def client(self) -> SMTPClient:
        return SMTPClient(
            hostname=self.hostname,
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            submission_timeout=self.submission_timeout,
        )

    async def addresses(self, host: str) -> list[str]:
        """IPv6 first, then IPv4 (the fallback); only A with force_ipv4 or an IPv4 local_ip."""
        want6 = not self.force_ipv4 and self.local_family != socket.AF_INET
        want4 = self.local_family != socket.AF_INET6
        try:
            ip = ipaddress.ip_address(host)
            return [str(ip)] if (want6 if ip.version == 6 else want4) else []
        except ValueError:
            pass
        lookups = []
        if want6:
            lookups.append(self.resolver.aaaa(host))
        if want4:
            lookups.append(self.resolver.a(host))
        results = await asyncio.gather(*lookups, return_exceptions=True)
        out: list[str] = []
        errs: list[BaseException] = []
        for r in results:
            if isinstance(r, BaseException):
                errs.append(r)
            else:
                out.extend(r)
        if not out:
            err = errs[0] if errs else None
            temporary = isinstance(err, DNSError) and err.temporary
            reason = str(err) if err is not None else f"lookup {host}: no such host"
            raise SMTPError(
                450 if temporary else 550,
                (4 if temporary else 5, 4, 4),
                "DNS error",
                reason=reason,
                remote_server=host,
                io_op="dial",
            )
        return out

    async def dial(self, cl: SMTPClient, host: str) -> None:
        """Connect to the first address of `host` that answers, and read its greeting."""
        last: SMTPError | None = None
        for ip in await self.addresses(host):
            local = (self.local_ip, 0) if self.local_ip else None
            try:
                await cl.connect(ip, self.port, server_name=host, local_addr=local)
                return
            except SMTPError as e:
                if e.fields.get("io_op") != "dial":
                    raise
                cause = e.__cause__
                if isinstance(cause, TimeoutError):
                    why = "i/o timeout"
                elif isinstance(cause, OSError) and cause.errno:
                    why = os.strerror(cause.errno).lower()  # as Go words it: "connection refused"
                else:
                    why = str(cause)
                last = SMTPError(
                    450,
                    (4, 4, 2),
                    "Network I/O error",
                    reason=f"dial tcp {ip}:{self.port}: connect: {why}",
                    remote_addr=f"{ip}:{self.port}",
                    io_op="dial",
                )
        assert last is not None
        raise last


class RemoteDelivery(PartialDelivery):
    """One message to any number of recipient domains."""

    def __init__(
        self,
        rt: RemoteTarget,
        meta: MsgMeta,
        mail_from: str,
        policies: list[DeliveryPolicy],
        limit_key: tuple[str, str],
    ) -> None:
        self.rt = rt
        self.meta = meta
        self.mail_from = mail_from
        self.policies = policies
        self.limit_key = limit_key
        self.log = rt.log
        self.conns: dict[str, MXConn] = {}
        self.dest_taken: set[str] = set()
        self.rcpts: list[str] = []
        self.closed = False

    # -- recipients ----------------------------------------------------------------------

    async def add_rcpt(self, rcpt: str) -> None:
        if self.meta.quarantine:
            raise SMTPError(550, (5, 7, 0), "Refusing to deliver a quarantined message", target=TARGET)
        try:
            _, domain = address.split(rcpt)
        except address.AddressError as e:
            raise SMTPError(501, (5, 1, 3), "Malformed recipient address", reason=str(e), target=TARGET) from None
        if domain == "":
            raise SMTPError(550, (5, 1, 1), "<postmaster> address it no supported", target=TARGET)
        if domain.startswith("["):
            raise SMTPError(550, (5, 1, 1), "IP address literals are not supported", target=TARGET)
        key = domain.lower().rstrip(".")
        conn = self.conns.get(key)
        if conn is None:
            # a new transaction: MAIL FROM and this RCPT TO go out together (RFC 2920)
            conn, err = await self._conn_for(key, rcpt)
        else:
            to = rcpt if conn.client.supports("SMTPUTF8") else ascii_rcpt(rcpt, TARGET)
            err = None
            try:
                await conn.client.rcpt(to)
            except Exception as e:
                err = _rcpt_error(e, conn.mx)
        if err is not None:
            if not conn.client.connected:
                conn.errored = True
            raise err
        conn.rcpts.append(rcpt)
        self.rcpts.append(rcpt)
        conn.last_use = time.monotonic()

    async def _conn_for(self, key: str, rcpt: str) -> tuple[MXConn, SMTPError | None]:
        """The domain's connection with a transaction open (MAIL FROM accepted) and the outcome
        of RCPT TO for `rcpt`, which went along with MAIL (None: accepted)."""
        requiretls = self.meta.requiretls
        conn = None
        rcpt_err: SMTPError | None = None
        pooled = self.rt.pool.get(key)
        if pooled is not None and requiretls:
            await pooled.close()  # REQUIRETLS: the levels must come from a fresh connection
            pooled = None
        if pooled is not None:
            self.log.msg("reusing cached connection", domain=key, transactions_counter=pooled.transactions)
            try:
                rcpt_err = await self._mail(pooled, rcpt)
                conn = pooled
            except SMTPError as e:
                if pooled.client.connected and _is_reply(e):
                    await pooled.close()
                    raise
                await pooled.close()  # the server dropped the idle connection: open a new one
        if conn is None:
            conn = await self._new_conn(key)
            if requiretls:
                self._requiretls_levels(conn)  # RFC 8689 §4.2.1
            try:
                rcpt_err = await self._mail(conn, rcpt)
            except Exception:
                await conn.close()
                raise
        if self.rt.limits is not None:
            try:
                await self.rt.limits.take_dest(key)
            except BaseException:
                await conn.close()
                raise
            self.dest_taken.add(key)
        self.conns[key] = conn
        return conn, rcpt_err

    def _requiretls_levels(self, conn: MXConn) -> None:
        if conn.tls_level < TLSLevel.AUTHENTICATED:
            asyncio.get_running_loop().create_task(conn.close())
            raise SMTPError(
                550,
                (5, 7, 30),
                "TLS it not available or unauthenticated but required (REQUIRETLS)",
                target=TARGET,
                tls_level=str(conn.tls_level),
            )
        if conn.mx_level < MXLevel.MTASTS:
            asyncio.get_running_loop().create_task(conn.close())
            raise SMTPError(
                550,
                (5, 7, 30),
                "Failed to establish the MX record authenticity (REQUIRETLS)",
                target=TARGET,
                mx_level=str(conn.mx_level),
            )

    async def _mail(self, conn: MXConn, rcpt: str) -> SMTPError | None:
        """MAIL FROM (its failure raised, wrapped) with the first RCPT TO pipelined after it;
        returns RCPT's failure, as add_rcpt reports it for that recipient (None: accepted)."""
        cl = conn.client
        requiretls = self.meta.requiretls
        if requiretls and self.rt.relaxed_requiretls and not cl.supports("REQUIRETLS"):
            requiretls = False  # relaxed_requiretls: deliver without the extension
        utf8 = self.meta.smtputf8 and cl.supports("SMTPUTF8")
        sender = self.mail_from
        if self.meta.smtputf8 and not utf8:
            sender = ascii_sender(self.mail_from)
        to: str | None = rcpt
        rcpt_err: SMTPError | None = None
        if not cl.supports("SMTPUTF8"):
            try:
                to = ascii_rcpt(rcpt, TARGET)
            except SMTPError as e:
                to, rcpt_err = None, e  # MAIL alone; this recipient is refused without asking
        size, body_8bit = self.meta.size, self.meta.body_8bit
        try:
            if to is None:
                await cl.mail(sender, size=size, body_8bit=body_8bit, smtputf8=utf8, requiretls=requiretls)
            else:
                refused = await cl.mail_rcpt(
                    sender, to, size=size, body_8bit=body_8bit, smtputf8=utf8, requiretls=requiretls
                )
                rcpt_err = None if refused is None else _rcpt_error(refused, conn.mx)
        except Exception as e:
            raise _wrap(e, conn.mx) from e
        conn.rcpts = []
        conn.last_use = time.monotonic()
        return rcpt_err

    # -- MX selection ---------------------------------------------------------------------

    async def _lookup_mx(self, domain: str) -> tuple[bool, list[tuple[int, str]]]:
        res = self.rt.resolver
        try:
            ans = await res.lookup(address.to_ascii_domain(domain), "MX")
        except (DNSError, address.AddressError) as e:
            temporary = isinstance(e, DNSError) and e.temporary
            raise SMTPError(
                451 if temporary else 554,
                (4 if temporary else 5, 4, 4),
                "MX lookup error",
                reason=str(e),
                target=TARGET,
            ) from None
        records = sorted(
            ((int(r.preference), r.exchange.to_text(omit_final_dot=True) or ".") for r in ans.records),  # type: ignore[attr-defined]
            key=lambda p: p[0],
        )
        if not records:  # RFC 5321 §5.1: no MX → the domain itself is the implicit MX
            records = [(0, address.to_ascii_domain(domain))]
        return ans.authenticated and ad_trusted(res), records

    async def _new_conn(self, domain: str) -> MXConn:
        for p in self.policies:
            p.prepare_domain(domain)
        dnssec_ok, records = await self._lookup_mx(domain)
        last: BaseException | None = None
        for _, host in records:
            if host in {".", ""}:  # RFC 7505 §3: null MX
                raise SMTPError(556, (5, 1, 10), "Domain does not accept email (null MX)", target=TARGET)
            try:
                return await self._attempt_mx(domain, host, dnssec_ok)
            except Exception as e:  # whatever went wrong with this MX, the next one may do
                fields = e.log_fields() if isinstance(e, SMTPError) else {}
                fields.update(remote_server=host, domain=domain)
                self.log.error("cannot use MX", err=_err_text(e), **fields)
                last = e
        assert last is not None
        temporary = not isinstance(last, SMTPError) or last.temporary
        raise SMTPError(
            451 if temporary else 550,
            (4 if temporary else 5, 4, 0),
            "No usable MXs, last err: " + _err_text(last),
            target=TARGET,
            domain=domain,
        )

    async def _attempt_mx(self, domain: str, host: str, dnssec_ok: bool) -> MXConn:
        mx_level = MXLevel.NONE
        for p in self.policies:
            mx_level = max(mx_level, await p.check_mx(mx_level, domain, host, dnssec_ok))
            p.prepare_conn(host)
        cl, tls_level, state = await self._connect(domain, host)
        try:
            for p in self.policies:
                tls_level = max(tls_level, await p.check_conn(mx_level, tls_level, domain, host, state))
        except BaseException:
            await cl.quit()
            raise
        self.log.debug("connected", remote_server=host, domain=domain, tls_level=str(tls_level), mx_level=str(mx_level))
        return MXConn(cl, domain, host, self.rt.reuse_limit, dnssec_ok, mx_level, tls_level, state)

    async def _connect(self, domain: str, host: str) -> tuple[SMTPClient, TLSLevel, ConnState]:
        """maddy's ladder: verified STARTTLS, else unverified after a verification error, else
        plaintext after any other TLS failure (RFC 3207 §4.1 leaves that choice to the client)."""
        level = TLSLevel.AUTHENTICATED
        ctx = self.rt.tls_verify
        self.log.debug("trying", remote_server=host, domain=domain)
        for _ in range(3):
            cl = self.rt.client()
            await self.rt.dial(cl, host)
            try:
                await cl.hello()
                if ctx is None or not cl.supports("STARTTLS"):
                    return cl, TLSLevel.NONE, ConnState(server_name=host)
                try:
                    await cl.starttls(ctx, host)
                except TLSError as e:
                    await cl.close()
                    if isinstance(e.__cause__, ssl.SSLCertVerificationError) and level == TLSLevel.AUTHENTICATED:
                        self.log.error(
                            "TLS verify error, trying without authentication", err=e, remote_server=host, domain=domain
                        )
                        ctx, level = self.rt.tls_insecure, TLSLevel.ENCRYPTED
                    else:
                        self.log.error("TLS error, trying plaintext", err=e, remote_server=host, domain=domain)
                        ctx, level = None, TLSLevel.NONE
                    continue
                await cl.hello()
                state = ConnState(True, level == TLSLevel.AUTHENTICATED, cl.peer_chain(), host)
                return cl, level, state
            except BaseException:
                await cl.quit()
                raise
        raise SMTPError(451, (4, 7, 0), "TLS error", reason="TLS ladder exhausted", remote_server=host)

    # -- body ----------------------------------------------------------------------------

    async def body(self, header: Header, body: Body) -> None:
        errs: dict[str, SMTPError | None] = {}

        def status(rcpt: str, err: SMTPError | None) -> None:
            errs[rcpt] = err

        await self.body_non_atomic(status, header, body)
        failed = [e for e in errs.values() if e is not None]
        if not failed:
            return
        if len(errs) == 1:
            raise failed[0]
        temporary = any(e.temporary for e in failed)
        raise SMTPError(
            451 if temporary else 550,
            (4 if temporary else 5, 0, 0),
            "Partial delivery failure, additional attempts may result in duplicates",
            target=TARGET,
            reason="; ".join(f"{r}: {e.code} {e.message}" for r, e in errs.items() if e is not None),
        )

    async def body_non_atomic(self, status: StatusCallback, header: Header, body: Body) -> None:
        if self.meta.quarantine:
            for rcpt in self.rcpts:
                status(rcpt, SMTPError(550, (5, 7, 0), "Refusing to deliver quarantined message", target=TARGET))
            return
        head = header.to_bytes()

        async def one(conn: MXConn) -> None:
            err: SMTPError | None = None
            try:
                with body.open() as f:
                    await conn.client.data(head, f)
            except Exception as e:
                err = _wrap(e, conn.mx)
            conn.errored = err is not None
            conn.last_use = time.monotonic()
            for rcpt in conn.rcpts:
                status(rcpt, err)

        # one task per domain: the domains' transfers run in parallel
        await asyncio.gather(*(one(c) for c in self.conns.values()))

    async def commit(self) -> None:
        await self._close()

    async def abort(self) -> None:
        await self._close()

    async def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for p in self.policies:
            await p.close()
        for key in self.dest_taken:
            if self.rt.limits is not None:
                self.rt.limits.release_dest(key)

        async def done(key: str, conn: MXConn) -> None:
            conn.transactions += 1
            if await conn.usable():  # RSET (in parallel for all domains), then back to the cache
                self.rt.pool.put(key, conn)
            else:
                self.log.debug(
                    "disconnected", remote_server=conn.mx, errored=conn.errored, transactions=conn.transactions
                )
                await conn.close()

        conns, self.conns = self.conns, {}
        await asyncio.gather(*(done(k, c) for k, c in conns.items()))
        if self.rt.limits is not None:
            self.rt.limits.release_msg(*self.limit_key)
