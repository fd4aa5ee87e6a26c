"""`modify.dkim`: DKIM-sign outgoing mail (spec §B.5, §I.3; maddy's internal/modify/dkim).

* The key is chosen by the **envelope sender's** domain (after source modifiers),
  not the From header; a null sender or bare `postmaster` uses the first domain;
  with `sign_subdomains` any subdomain of the single domain signs as it. No key
  for the domain: the message passes unsigned (logged).
* `d=` that domain, `s=` the selector, `i=@domain`, `c=` header_canon/body_canon,
  `x=` now + sig_expiry (none when 0), `a=rsa-sha256` or `ed25519-sha256`
  (RFC 8463). Domain and selector are sent as A-labels unless SMTPUTF8 is in use.
* `h=`: each `oversign_fields` name once per occurrence plus once more, so none
  can be added later (RFC 6376 §8.15); each `sign_fields` name once per
  occurrence. A name listed twice counts once.
* Keys: `key_path` with `{domain}`/`{selector}` substituted, relative to
  state_dir; a missing key is generated at start (`newkey_algo`, rsa2048 by
  default) with its `.dns` TXT value next to it (`pymaddy.dkim.keys`).
* `allow_multiple_from` is accepted and, as in maddy 0.9.4, has no effect.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from pymaddy.dkim.core import SignOptions, is_small, sign
from pymaddy.dkim.keys import DKIMKeyError, SigningKey, dns_path_for, load_key, write_new_key
from pymaddy.mail.address import AddressError, domain_for_lookup, split, to_ascii_domain
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.modify.schema import DKIM_KEY_PATH, DKIM_SIG_EXPIRY, OVERSIGN_DEFAULT, SIGN_DEFAULT
from pymaddy.pipeline.interfaces import Modifier, ModifierState
from pymaddy.runtime.module import Module, ModuleError

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext


def fields_to_sign(header: Header, oversign: list[str], sign_once: list[str]) -> list[str]:
    """maddy's fieldsToSign: the `h=` list for this header (duplicate names dropped)."""
    seen: set[str] = set()
    out: list[str] = []
    for key in oversign:
        if key.lower() in seen:
            continue
        seen.add(key.lower())
        out.extend([key] * (header.count(key) + 1))
    for key in sign_once:
        if key.lower() in seen:
            continue
        seen.add(key.lower())
        out.extend([key] * header.count(key))
    return out


class DKIMSigner(Module, Modifier):
    """The module: loads (or creates) one key per domain at start."""

    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        s = self.settings
        self.domains: list[str] = list(s.get("domains") or [])
        self.selector: str = str(s.get("selector") or "")
        self.key_path: str = str(s.get("key_path") or DKIM_KEY_PATH)
        self.oversign: list[str] = list(s.get("oversign_fields") or OVERSIGN_DEFAULT)
        self.sign_once: list[str] = list(s.get("sign_fields") or SIGN_DEFAULT)
        self.header_relaxed = (s.get("header_canon") or "relaxed") == "relaxed"
        self.body_relaxed = (s.get("body_canon") or "relaxed") == "relaxed"
        expiry = s.get("sig_expiry")
        self.sig_expiry = float(DKIM_SIG_EXPIRY if expiry is None else expiry)
        self.newkey_algo: str = str(s.get("newkey_algo") or "rsa2048")
        self.multiple_from_ok = bool(s.get("allow_multiple_from") or False)
        self.sign_subdomains = bool(s.get("sign_subdomains") or False)
        self.signers: dict[str, SigningKey] = {}

    def _abs(self, path: str) -> str:
        # state_dir is the process's working directory in the server; be explicit for tests.
        return path if os.path.isabs(path) else os.path.join(self.ctx.state_dir, path)

    async def start(self) -> None:
        if not self.domains or not self.selector:
            raise ModuleError("modify.dkim: domains and selector are required")
        for domain in self.domains:
            try:
                to_ascii_domain(domain)
            except AddressError as e:
                self.log.printf(
                    f"warning: unable to convert domain {domain} to A-labels form, "
                    f"non-EAI messages will not be signed: {e}"
                )
            key_path = self.key_path.replace("{domain}", domain).replace("{selector}", self.selector)
            key = await self._load_or_generate(key_path, domain)
            try:
                norm = domain_for_lookup(domain)
            except AddressError as e:
                raise ModuleError(f"sign_skim: unable to normalize domain {domain}: {e}") from None
            self.signers[norm] = key

    async def _load_or_generate(self, key_path: str, domain: str) -> SigningKey:
        full = self._abs(key_path)
        try:
            return await asyncio.to_thread(load_key, full)
        except FileNotFoundError:
            pass
        except DKIMKeyError as e:
            raise ModuleError(str(e).replace(full, key_path)) from None
        except OSError as e:
            raise ModuleError(f"modify.dkim: {key_path}: {e.strerror or e}") from None
        self.log.printf(f"generating a new {self.newkey_algo} keypair...")
        try:
            key, _ = await asyncio.to_thread(write_new_key, full, self.newkey_algo)
        except DKIMKeyError as e:
            raise ModuleError(str(e).replace(full, key_path)) from None
        self.log.printf(
            f"generated a new {self.newkey_algo} keypair, private key is in {key_path}, "
            f"TXT record with public key is in {dns_path_for(key_path)}, "
            f"put its contents into TXT record for {self.selector}._domainkey.{domain} "
            "to make signing and verification work"
        )
        return key

    async def state_for_msg(self, meta: MsgMeta) -> ModifierState:
        return _State(self, meta)

    def options_for(self, sender: str, smtputf8: bool) -> SignOptions | None:
        """Signing parameters for this envelope sender, or None when it is not signed."""
        domain = ""
        if sender:
            _, domain = split(sender)  # AddressError fails the message, as in maddy
        if not domain:
            domain = self.domains[0]
        selector = self.selector
        if self.sign_subdomains:
            top = self.domains[0]
            if domain.endswith("." + top):
                domain = top
        try:
            norm = domain_for_lookup(domain)
        except AddressError as e:
            self.log.error("unable to normalize domain from envelope sender", err=e, domain=domain)
            return None
        key = self.signers.get(norm)
        if key is None:
            self.log.msg("no key for domain", domain=norm)
            return None
        if not smtputf8:
            # RFC 6376 §3.5: without SMTPUTF8 the tags must be ASCII (A-labels).
            try:
                domain, selector = to_ascii_domain(domain), to_ascii_domain(selector)
            except AddressError:
                return None
        return SignOptions(
            domain=domain,
            selector=selector,
            key=key,
            header_keys=[],
            identifier="@" + domain,
            header_relaxed=self.header_relaxed,
            body_relaxed=self.body_relaxed,
            expiry=self.sig_expiry,
        )


class _State(ModifierState):
    def __init__(self, mod: DKIMSigner, meta: MsgMeta) -> None:
        self.mod = mod
        self.meta = meta
        self.sender: str | None = None

    async def rewrite_sender(self, mail_from: str) -> str:
        self.sender = mail_from
        return mail_from

    async def rewrite_body(self, header: Header, body: Body) -> None:
        # A modifier whose rewrite_sender was never called (a destination block) falls back
        # to MAIL FROM as received.
        sender = self.sender if self.sender is not None else self.meta.original_from
        opts = self.mod.options_for(sender, self.meta.smtputf8)
        if opts is None:
            return
        opts.header_keys = fields_to_sign(header, self.mod.oversign, self.mod.sign_once)
        if is_small(body) and opts.key.fast:
            raw = sign(header, body, opts)  # well under a millisecond: not worth a thread hop
        else:
            raw = await asyncio.to_thread(sign, header, body, opts)
        header.add_raw_top(Header.parse(raw))
        self.mod.log.debug("signed", domain=opts.domain)


__all__ = ["DKIMSigner", "fields_to_sign"]
