"""`check.milter`: ask a Sendmail milter filter about each message (spec §B.4; maddy's internal/check/milter).

* `milter ENDPOINT` or `endpoint tcp://HOST:PORT | unix://PATH`; one filter
  connection per message (10 s dial, read and write timeouts), protocol v6,
  offering the filter header additions/changes and quarantine (maddy offers no
  changes, which OpenDKIM refuses to work with; changes are logged and ignored).
* Stages: connect (+ macros daemon_name/if_name/if_addr) and HELO (+ TLS macros)
  at the connection check, MAIL (+ macros i, auth_authen), each RCPT, then the
  header fields, EOH, body chunks and end-of-message. Locally generated mail
  (no client address) is presented as localhost / 127.0.0.1:25.
* Verdicts: accept → no further stages are sent; continue → fine;
  reject → `550 5.7.1`, tempfail → `450 4.7.1`, discard → treated as tempfail
  (silent discard is not supported), replycode → the filter's code with
  `X.7.1` (all "Message rejected due to local policy").
* End-of-message modifications: added and inserted header fields are prepended
  to the message, kept exactly as the filter folded them (a DKIM-Signature must
  stay byte-exact); quarantine requests quarantine the message; envelope and
  header-field changes are logged and ignored, as in maddy.
* I/O errors (including failing to connect) reject with
  `451 4.7.1 I/O error during policy check` unless `fail_open`, which lets the
  message through and stops talking to the filter.

Deviation: maddy's replycode result always carries the enhanced code 5.7.1;
here the class follows the filter's code (451 → 4.7.1), as RFC 3463 requires.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.milter import client as mc
from pymaddy.pipeline.interfaces import OK, Check, CheckResult, CheckState
from pymaddy.runtime.module import Module

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.config.values import Endpoint
    from pymaddy.runtime.module import RuntimeContext

CHECK_NAME = "milter"
TIMEOUT = 10.0
POLICY_MESSAGE = "Message rejected due to local policy"
# maddy offers only ADDHDRS|QUARANTINE, which OpenDKIM refuses (it requires CHGHDRS):
# header changes are offered too, and logged and ignored when asked for, as maddy does.
ACTION_MASK = mc.OPT_ADD_HEADER | mc.OPT_CHANGE_HEADER | mc.OPT_QUARANTINE


class MilterCheck(Module, Check):
    """check.milter ENDPOINT; see the module docstring."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        ep: Endpoint = self.settings["endpoint"]
        self.url = str(ep)
        self.fail_open = bool(self.settings.get("fail_open") or False)
        if ep.scheme == "unix":
            network, address = "unix", ep.path
        else:
            host = f"[{ep.host}]" if ":" in ep.host else ep.host
            network, address = "tcp", f"{host}:{ep.port}"
        self.client = mc.MilterClient(
            network,
            address,
            dial_timeout=TIMEOUT,
            read_timeout=TIMEOUT,
            write_timeout=TIMEOUT,
            action_mask=ACTION_MASK,
            protocol_mask=0,
        )

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)


def _policy_error(code: int, enhanced: tuple[int, int, int], reason: str, url: str) -> SMTPError:
    return SMTPError(code, enhanced, POLICY_MESSAGE, check=CHECK_NAME, reason=reason, milter=url)


class _State(CheckState):
    def __init__(self, chk: MilterCheck, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta
        self.session: mc.MilterSession | None = None
        self.skip = False

    # -- helpers -------------------------------------------------------------------

    async def _session(self) -> mc.MilterSession:
        if self.session is None:
            self.session = await self.chk.client.session()
        return self.session

    def io_error(self, err: Exception) -> CheckResult:
        """fail_open: log and let the message through; else 451 4.7.1."""
        if self.chk.fail_open:
            self.skip = True
            self.chk.log.error("I/O error", err=err, milter=self.chk.url, msg_id=self.meta.id)
            return OK
        e = SMTPError(
            451, (4, 7, 1), "I/O error during policy check", check=CHECK_NAME, reason=str(err), milter=self.chk.url
        )
        return CheckResult(reject=e, reason=e)

    def handle(self, act: mc.Action) -> CheckResult:
        """maddy's handleAction: a stage verdict as a check result."""
        url = self.chk.url
        if act.code == mc.ACT_ACCEPT:
            self.skip = True
            return OK
        if act.code == mc.ACT_CONTINUE:
            return OK
        if act.code == mc.ACT_REPLYCODE:
            cls = act.smtp_code // 100 if act.smtp_code // 100 in (4, 5) else 5
            e = _policy_error(act.smtp_code, (cls, 7, 1), "reply code action", url)
            if act.smtp_text:
                e.fields["milter_reply"] = act.smtp_text
            return CheckResult(reject=e, reason=e)
        if act.code in (mc.ACT_DISCARD, mc.ACT_TEMPFAIL):
            if act.code == mc.ACT_DISCARD:
                self.chk.log.msg("silent discard is not supported, rejecting message", milter=url, msg_id=self.meta.id)
            e = _policy_error(450, (4, 7, 1), "reject action", url)
            return CheckResult(reject=e, reason=e)
        if act.code == mc.ACT_REJECT:
            e = _policy_error(550, (5, 7, 1), "reject action", url)
            return CheckResult(reject=e, reason=e)
        self.chk.log.msg("unknown action code ignored", code=act.code, milter=url, msg_id=self.meta.id)
        return OK

    def apply(self, mods: list[mc.ModifyAction], res: CheckResult) -> CheckResult:
        """maddy's apply: header additions prepended, quarantine honoured, the rest logged."""
        log, url = self.chk.log, self.chk.url
        res = dataclasses.replace(res, auth_results=list(res.auth_results))  # never touch the shared OK
        added: list[tuple[str, bytes]] = []
        for m in mods:
            if m.code in (mc.MOD_ADDRCPT, mc.MOD_ADDRCPT_PAR, mc.MOD_DELRCPT):
                log.msg("envelope changes are not supported", rcpt=m.rcpt, code=m.code, milter=url)
            elif m.code == mc.MOD_CHGFROM:
                log.msg("envelope changes are not supported", **{"from": m.mail_from}, code=m.code, milter=url)
            elif m.code == mc.MOD_CHGHEADER:
                log.msg("header field changes are not supported", field=m.header_name, milter=url)
            elif m.code == mc.MOD_REPLBODY:
                log.msg("body changes are not supported", milter=url)
            elif m.code in (mc.MOD_INSHEADER, mc.MOD_ADDHEADER):
                if m.code == mc.MOD_INSHEADER and m.header_index != 1:
                    log.msg("header inserting not on top is not supported, prepending instead", field=m.header_name)
                added.append((m.header_name, mc.field_from_milter(m.header_name, m.header_value)))
            elif m.code == mc.MOD_QUARANTINE:
                res.quarantine = True
                res.reason = SMTPError(
                    554, (5, 7, 1), "milter quarantine action", check=CHECK_NAME, reason=m.reason, milter=url
                )
        if added:
            # maddy's AddRaw: each later field goes above the earlier ones
            hdr = Header(list(reversed(added)))
            if res.header is not None:
                hdr.add_raw_top(res.header)
            res.header = hdr
        return res

    # -- stages --------------------------------------------------------------------

    async def check_connection(self) -> CheckResult:
        try:
            s = await self._session()
            conn = self.meta.conn
            if not conn.remote_ip and not conn.is_unix:
                # generated locally: dummy values, as maddy
                act = await s.conn("localhost", mc.FAMILY_INET, 25, "127.0.0.1")
                if act.code != mc.ACT_CONTINUE:
                    return self.handle(act)
                return self.handle(await s.helo("localhost"))
            if not s.protocol_option(mc.OPT_NO_CONNECT):
                await s.macros(mc.CMD_CONNECT, "daemon_name", "maddy", "if_name", "unknown", "if_addr", "0.0.0.0")
                family, port, addr = mc.FAMILY_UNKNOWN, 0, ""
                if conn.is_unix:
                    family = mc.FAMILY_UNIX
                else:
                    try:
                        ip = ipaddress.ip_address(conn.remote_ip)
                    except ValueError:
                        pass
                    else:
                        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                            ip = ip.ipv4_mapped
                        family = mc.FAMILY_INET if ip.version == 4 else mc.FAMILY_INET6
                        port, addr = conn.remote_port, str(ip)
                act = await s.conn(conn.helo, family, port, addr)
                if act.code != mc.ACT_CONTINUE:
                    return self.handle(act)
            if not s.protocol_option(mc.OPT_NO_HELO):
                if conn.tls:
                    fields: list[str] = []
                    if conn.tls_version:
                        fields += ["tls_version", conn.tls_version]
                    fields += ["cipher", conn.tls_cipher]
                    await s.macros(mc.CMD_HELO, *fields)
                return self.handle(await s.helo(conn.helo))
        except mc.MilterError as e:
            return self.io_error(e)
        return OK

    async def check_sender(self, mail_from: str) -> CheckResult:
        if self.skip:
            return OK
        try:
            s = await self._session()
            if s.protocol_option(mc.OPT_NO_MAIL):
                return OK
            fields = ["i", self.meta.id]
            if self.meta.conn.auth_user:
                fields += ["auth_authen", self.meta.conn.auth_user]
            await s.macros(mc.CMD_MAIL, *fields)
            args = ["SMTPUTF8"] if self.meta.smtputf8 else []
            return self.handle(await s.mail(mail_from, args))
        except mc.MilterError as e:
            return self.io_error(e)

    async def check_rcpt(self, rcpt: str) -> CheckResult:
        if self.skip:
            return OK
        try:
            s = await self._session()
            return self.handle(await s.rcpt(rcpt))
        except mc.MilterError as e:
            return self.io_error(e)

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        if self.skip:
            return OK
        try:
            s = await self._session()
            act = await s.header(header)
            if act.code != mc.ACT_CONTINUE:
                return self.handle(act)
            if not s.protocol_option(mc.OPT_NO_BODY):
                try:
                    f = body.open()
                except OSError as e:
                    err = SMTPError(
                        451,
                        (4, 7, 1),
                        "Internal error during policy check",
                        check=CHECK_NAME,
                        reason=str(e),
                        milter=self.chk.url,
                    )
                    return CheckResult(reject=err, reason=err)
                with f:
                    mods, act = await s.body(f)
            else:
                mods, act = await s.end()
        except mc.MilterError as e:
            return self.io_error(e)
        return self.apply(mods, self.handle(act))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


__all__ = ["MilterCheck"]
