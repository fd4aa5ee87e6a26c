"""`check.authorize_sender`: the SASL user must own the envelope sender and From/Sender (spec §B.4).

For each address checked (MAIL FROM; with `check_header` the From header, or
failing that the Sender header):

1. no SASL user → `530 5.7.0 Authentication required` (unauth_action);
2. address normalized by `from_normalize`, username by `auth_normalize`
   (failure: `553 5.1.7 Unable to normalize sender address` /
   `535 5.7.8 Unable to normalize authorization username`, err_action);
3. `prepare_email` maps the address to its canonical forms (a miss keeps it);
4. `user_to_email` maps the username to what it may use: an exact address,
   a bare domain (any address in it) or `*` (anything). Both tables default to
   identity, so by default the username must be the address itself.
5. no match → `553 5.7.0 Unauthorized use of sender address` (no_match_action);
   table failures → `454 4.7.0 Internal error during policy check` (err_action).

Header problems (err_action): `550 5.7.0 Missing From header`, `Malformed From
header`, `Multiple From addresses are not allowed`, `Malformed Sender header`.
When neither From nor Sender is authorised the result is the no-match error.
"""

from __future__ import annotations

import re
from email.errors import ObsoleteHeaderDefect
from email.headerregistry import HeaderRegistry
from typing import TYPE_CHECKING, Any

from pymaddy.auth import normalize
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import OK, Check, CheckResult, CheckState
from pymaddy.runtime.module import Module
from pymaddy.tables.base import Table
from pymaddy.tables.chain import resolve_table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD_NAME = "check.authorize_sender"

_HEADERS = HeaderRegistry()


class AddressParseError(ValueError):
    pass


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_WORD = rf"(?:{_ATEXT}+|\"[^\"\\\r\n]*\")"
# One address in its common shapes: `local@domain`, `Name <local@domain>`, `"Name" <local@domain>`
# (RFC 5322 §3.4 with dot-atoms only). Anything else goes to the full parser.
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:(?:{_WORD}(?:[ \t]+{_WORD})*)?[ \t]*<({_DOT_ATOM})@({_DOT_ATOM})>|({_DOT_ATOM})@({_DOT_ATOM}))[ \t]*"
)


def parse_address_list(value: str) -> list[str]:
    """Addresses (`local@domain`, local part unquoted) of an address-list header, as Go's
    mail.ParseAddressList returns them; AddressParseError when it is malformed."""
    m = _SIMPLE_ADDRESS.fullmatch(value)
    if m is not None:  # the usual single address: no need for the email package's full parser
        local, domain = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        return [f"{local}@{domain}"]
    try:
        hdr: Any = _HEADERS("From", value)
    except Exception as e:  # the email package raises assorted errors on garbage
        raise AddressParseError(str(e)) from None
    fatal = [d for d in hdr.defects if not isinstance(d, ObsoleteHeaderDefect)]
    if fatal:
        raise AddressParseError(str(fatal[0]))
    out = []
    for a in hdr.addresses:
        if not a.username or not a.domain:
            raise AddressParseError("mail: missing @ in addr-spec")
        out.append(f"{a.username}@{a.domain}")
    return out


def _err(code: int, enh: tuple[int, int, int], msg: str, reason: str = "") -> SMTPError:
    return SMTPError(code, enh, msg, check=MOD_NAME, reason=reason)


class _Identity(Table):
    async def lookup_multi(self, key: str) -> list[str]:
        return [key]


class AuthorizeSender(Module, Check):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.check_header = bool(self.settings.get("check_header", True))
        self.auth_norm = normalize.get(str(self.settings.get("auth_normalize") or "auto"))
        self.from_norm = normalize.get(str(self.settings.get("from_normalize") or "auto"))
        self.prepare_email: Table = _Identity()
        self.user_to_email: Table = _Identity()

    async def start(self) -> None:
        ref = self.settings.get("prepare_email")
        if ref is not None:
            self.prepare_email = resolve_table(self.ctx, ref)
        ref = self.settings.get("user_to_email")
        if ref is not None:
            self.user_to_email = resolve_table(self.ctx, ref)

    def apply(self, setting: str, err: SMTPError) -> CheckResult:
        """maddy's FailAction.Apply for the `*_action` directive `setting`."""
        action = self.settings.get(setting)
        kind = getattr(action, "action", "reject")
        override = getattr(action, "override", None)
        if override is not None:
            err = SMTPError(override.code, override.enhanced, override.message, check=MOD_NAME, reason=err.message)
        if kind == "reject":
            return CheckResult(reject=err, reason=err)
        if kind == "quarantine":
            return CheckResult(quarantine=True, reason=err)
        return CheckResult(reason=err)

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        return _State(self, meta)

    async def authorize_email_use(self, username: str, addrs: list[str]) -> bool:
        """maddy's authz.AuthorizeEmailUse; raises on table or address errors."""
        valid = await self.user_to_email.lookup_multi(username)
        for addr in addrs:
            _, domain = normalize.split(addr)
            for ent in valid:
                if ent in (domain, "*", addr):
                    return True
        return False

    async def authorize(self, auth_name: str, email: str) -> CheckResult:
        if not auth_name:
            return self.apply("unauth_action", _err(530, (5, 7, 0), "Authentication required"))
        try:
            email_norm = self.from_norm(email)
        except ValueError as e:
            return self.apply("err_action", _err(553, (5, 1, 7), "Unable to normalize sender address", str(e)))
        try:
            auth_norm = self.auth_norm(auth_name)
        except ValueError:
            return self.apply("err_action", _err(535, (5, 7, 8), "Unable to normalize authorization username"))
        self.log.debug("normalized names", **{"from": email_norm, "auth": auth_norm})
        try:
            prepared = await self.prepare_email.lookup_multi(email_norm)
            if not prepared:
                prepared = [email_norm]
            ok = await self.authorize_email_use(auth_norm, prepared)
        except Exception as e:
            return self.apply("err_action", _err(454, (4, 7, 0), "Internal error during policy check", str(e)))
        if not ok:
            return self.apply("no_match_action", _err(553, (5, 7, 0), "Unauthorized use of sender address"))
        return OK


class _State(CheckState):
    def __init__(self, chk: AuthorizeSender, meta: MsgMeta) -> None:
        self.chk = chk
        self.meta = meta

    def _auth_user(self) -> str | None:
        conn = getattr(self.meta, "conn", None)
        if conn is None:
            self.chk.log.msg("skipping locally generated message", msg_id=self.meta.id)
            return None
        return str(conn.auth_user or "")

    async def check_sender(self, mail_from: str) -> CheckResult:
        auth = self._auth_user()
        if auth is None:
            return OK
        return await self.chk.authorize(auth, mail_from)

    async def check_body(self, header: Header, body: Body) -> CheckResult:
        chk = self.chk
        if not chk.check_header:
            return OK
        auth = self._auth_user()
        if auth is None:
            return OK
        from_hdr = header.get("From") or ""
        if not from_hdr:
            return chk.apply("err_action", _err(550, (5, 7, 0), "Missing From header"))
        try:
            addrs = parse_address_list(from_hdr)
        except AddressParseError as e:
            return chk.apply("err_action", _err(550, (5, 7, 0), "Malformed From header", str(e)))
        if not addrs:
            return chk.apply("err_action", _err(550, (5, 7, 0), "Malformed From header"))
        if len(addrs) > 1:
            return chk.apply("err_action", _err(550, (5, 7, 0), "Multiple From addresses are not allowed"))
        from_addr = addrs[0]

        sender_addr = ""
        sender_hdr = header.get("Sender") or ""
        if sender_hdr:
            try:
                senders = parse_address_list(sender_hdr)
            except AddressParseError as e:
                return chk.apply("err_action", _err(550, (5, 7, 0), "Malformed Sender header", str(e)))
            if len(senders) != 1:
                return chk.apply("err_action", _err(550, (5, 7, 0), "Malformed Sender header"))
            sender_addr = senders[0]

        res = await chk.authorize(auth, from_addr)
        if res.reason is None and res.reject is None:
            return res
        if sender_addr and sender_addr != from_addr:
            res = await chk.authorize(auth, sender_addr)
            if res.reason is None and res.reject is None:
                return res
        return chk.apply("no_match_action", _err(553, (5, 7, 0), "Unauthorized use of sender address"))


__all__ = ["AuthorizeSender", "parse_address_list"]
