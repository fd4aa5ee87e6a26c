"""target.smtp / target.lmtp: forward every message to fixed downstream servers (spec §B.3).

As maddy's smtp_downstream: a new connection per message, opened (with MAIL
FROM) in start_delivery; endpoints are tried in order and the first that
connects is used; `starttls` is mandatory when on (no plaintext fallback);
DATA is sent in body() and commit/abort only QUIT. target.lmtp is a
PartialDelivery, so an LMTP endpoint in front of it reports each recipient's
own reply (RFC 2033 §4.2).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from pymaddy.config.values import Endpoint
from pymaddy.mail import address
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget, PartialDelivery, StatusCallback
from pymaddy.runtime.module import Module, ModuleError, RuntimeContext
from pymaddy.targets.schema import SASLAuth
from pymaddy.targets.smtpclient import SMTPClient, TLSError, ascii_rcpt, ascii_sender
from pymaddy.tls.client import client_context

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance

__all__ = ["LMTPTarget", "SMTPTarget", "map_error"]


def map_error(err: BaseException, target: str, server: str = "") -> SMTPError:
    """maddy's smtpconn.wrapClientErr + endpoint mapping: what our own client is told."""
    if isinstance(err, SMTPError):
        if err.code == 552:
            # RFC 5321 §4.5.3.1.10: a 552 "too many recipients" is to be treated as temporary
            err = SMTPError(452, (4, *err.enhanced[1:]), err.message, reason=err.reason, **err.fields)
        if not err.target:
            err.target = target
        return err
    # TLS failures and "TLS required but unsupported" are plain errors in maddy: the
    # endpoint turns those (temporary-or-unspecified) into 451 4.0.0.
    return SMTPError(451, (4, 0, 0), "Internal server error", reason=str(err), target=target, remote_server=server)


class SMTPTarget(Module, DeliveryTarget):
    """target.smtp (and, through LMTPTarget, target.lmtp)."""

    lmtp = False

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.lmtp = inst.schema.name == "target.lmtp"
        self.name = inst.schema.name
        starttls = s.get("starttls")
        self.starttls = (not self.lmtp) if starttls is None else bool(starttls)
        try:
            self.hostname = address.to_ascii_domain(str(s.get("hostname") or ""))
        except address.AddressError:
            raise ModuleError(f"{self.name}: cannot represent the hostname as an A-label name") from None
        self.endpoints: list[Endpoint] = list(s.get("targets") or [])
        if not self.endpoints:
            raise ModuleError(f"{self.name}: at least one target endpoint is required")
        self.sasl: SASLAuth | None = s.get("auth")
        # 0 keeps smtpconn's own defaults (5m, 5m, 12m), as in maddy
        self.connect_timeout = float(s.get("connect_timeout") or 300.0)
        self.command_timeout = float(s.get("command_timeout") or 300.0)
        self.submission_timeout = float(s.get("submission_timeout") or 720.0)
        self.tls_context: ssl.SSLContext | None = None

    async def start(self) -> None:
        self.tls_context = client_context(self.settings.get("tls_client"))

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        cl = await self.connect(meta)
        try:
            await self._mail(cl, meta, mail_from)
        except Exception as e:
            await cl.quit()
            raise map_error(e, self.name, cl.server_name) from e
        except BaseException:  # cancelled: drop the connection, let the cancellation through
            await cl.close()
            raise
        if self.lmtp:
            return LMTPDelivery(self, cl)
        return SMTPDelivery(self, cl)

    async def _mail(self, cl: SMTPClient, meta: MsgMeta, mail_from: str) -> None:
        utf8 = meta.smtputf8 and cl.supports("SMTPUTF8")
        sender = mail_from
        if meta.smtputf8 and not utf8:
            sender = ascii_sender(mail_from)
        if meta.requiretls and not cl.supports("REQUIRETLS"):
            # go-smtp's plain error in maddy, hence 451 4.0.0 rather than RFC 8689's 5.7.30
            raise RuntimeError("smtp: server does not support REQUIRETLS")
        await cl.mail(sender, size=meta.size, body_8bit=meta.body_8bit, smtputf8=utf8, requiretls=meta.requiretls)

    def _client(self) -> SMTPClient:
        return SMTPClient(
            lmtp=self.lmtp,
            hostname=self.hostname,
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            submission_timeout=self.submission_timeout,
        )

    def _tls(self) -> ssl.SSLContext:
        if self.tls_context is None:
            self.tls_context = client_context(self.settings.get("tls_client"))
        return self.tls_context

    async def _connect_one(self, endp: Endpoint) -> SMTPClient:
        cl = self._client()
        host = endp.host
        try:
            if endp.is_unix:
                await cl.connect(unix_path=endp.path, server_name="")
            else:
                await cl.connect(host, int(endp.port), tls=self._tls() if endp.is_tls else None)
            await cl.hello()
            if self.starttls:
                if not cl.supports("STARTTLS"):
                    raise RuntimeError("TLS required but unsupported by downstream")
                try:
                    await cl.starttls(self._tls(), host)
                except SMTPError as e:
                    raise TLSError(f"STARTTLS failed: {e.code} {e.message}") from e
                await cl.hello()
        except Exception:
            await cl.quit()
            raise
        except BaseException:
            await cl.close()
            raise
        return cl

    async def connect(self, meta: MsgMeta) -> SMTPClient:
        """Try every endpoint in order; then authenticate as `auth` says."""
        last: BaseException | None = None
        cl: SMTPClient | None = None
        for endp in self.endpoints:
            try:
                cl = await self._connect_one(endp)
                break
            except Exception as e:
                if len(self.endpoints) != 1:
                    self.log.msg("connect error", reason=str(e), downstream_server=str(endp))
                last = e
        if cl is None:
            assert last is not None
            raise map_error(last, self.name) from last
        self.log.debug("connected", downstream_server=cl.server_name)
        if self.sasl is not None:
            try:
                await self._auth(cl, meta, self.sasl)
            except Exception as e:
                await cl.quit()
                raise map_error(e, self.name, cl.server_name) from e
            except BaseException:
                await cl.close()
                raise
        return cl

    async def _auth(self, cl: SMTPClient, meta: MsgMeta, sasl: SASLAuth) -> None:
        if sasl.mechanism == "forward":
            if not meta.conn.auth_user or not meta.conn.auth_password:
                raise SMTPError(
                    530,
                    (5, 7, 0),
                    "Authentication is required",
                    target=self.name,
                    reason="Credentials forwarding is requested but the client is not authenticated",
                )
            await cl.auth("PLAIN", meta.conn.auth_user, meta.conn.auth_password)
        elif sasl.mechanism == "external":
            await cl.auth("EXTERNAL")
        else:
            await cl.auth(sasl.mechanism.upper(), sasl.username, sasl.password)


class LMTPTarget(SMTPTarget):
    """target.lmtp: the same module; the schema name selects LMTP."""


class SMTPDelivery(Delivery):
    """One message over one downstream connection."""

    def __init__(self, target: SMTPTarget, cl: SMTPClient) -> None:
        self.target = target
        self.cl = cl
        self.rcpts: list[str] = []

    def _err(self, e: BaseException) -> SMTPError:
        return map_error(e, self.target.name, self.cl.server_name)

    async def add_rcpt(self, rcpt: str) -> None:
        to = rcpt if self.cl.supports("SMTPUTF8") else ascii_rcpt(rcpt, self.target.name)
        try:
            await self.cl.rcpt(to)
        except Exception as e:
            raise self._err(e) from e
        self.rcpts.append(rcpt)

    async def body(self, header: Header, body: Body) -> None:
        if self.cl.lmtp:
            errors: dict[str, SMTPError] = {}

            def status(rcpt: str, err: SMTPError | None) -> None:
                if err is not None:
                    errors[rcpt] = err

            await self._lmtp_data(status, header, body)
            if len(errors) == 1:
                raise next(iter(errors.values()))
            if errors:
                why = "; ".join(f"{r}: {e.code} {e.message}" for r, e in errors.items())
                raise map_error(RuntimeError(f"multiple errors reported by LMTP downstream: {why}"), self.target.name)
            return
        try:
            with body.open() as f:
                await self.cl.data(header.to_bytes(), f)
        except Exception as e:
            raise self._err(e) from e

    async def _lmtp_data(self, status: StatusCallback, header: Header, body: Body) -> None:
        # map accepted (possibly A-label) addresses back to what the pipeline gave us
        names = dict(zip(self.cl.rcpts, self.rcpts, strict=False))
        reported: set[str] = set()

        def cb(rcpt: str, err: SMTPError | None) -> None:
            name = names.get(rcpt, rcpt)
            reported.add(name)
            status(name, None if err is None else self._err(err))

        try:
            with body.open() as f:
                await self.cl.lmtp_data(header.to_bytes(), f, cb)
        except Exception as e:
            err = self._err(e)
            for r in self.rcpts:
                if r not in reported:
                    status(r, err)

    async def commit(self) -> None:
        await self.cl.quit()

    async def abort(self) -> None:
        await self.cl.quit()


class LMTPDelivery(SMTPDelivery, PartialDelivery):
    async def body_non_atomic(self, status: StatusCallback, header: Header, body: Body) -> None:
        await self._lmtp_data(status, header, body)
