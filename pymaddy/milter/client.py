"""A Sendmail milter protocol (version 6) client on asyncio streams.

The MTA side of the protocol that libmilter filters (OpenDKIM, rspamd's proxy,
clamav-milter, …) speak; modelled on go-milter's client, which maddy uses.

Every packet is `uint32 length (big endian) | command byte | data`, strings are
NUL-terminated. One `MilterSession` is one filter connection: OPTNEG, then per
message `macros* → conn → helo → mail → rcpt* → header* → eoh → body* → eom`;
`eom` collects the modification requests (header add/change/insert, body
replacement, envelope changes, quarantine) that precede the final action.
Stages the filter opted out of (SMFIP_NO*) are skipped and answered with
"continue" locally; stages it will not answer (SMFIP_NR_*) are not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from pymaddy.mail.message import Header

PROTOCOL_VERSION = 6
MAX_BODY_CHUNK = 65535
MAX_PACKET = 64 * 1024 * 1024  # refuse absurd lengths from a broken peer

# commands (MTA → filter)
CMD_ABORT = b"A"
CMD_BODY = b"B"
CMD_CONNECT = b"C"
CMD_MACRO = b"D"
CMD_BODYEOB = b"E"
CMD_HELO = b"H"
CMD_QUIT_NC = b"K"
CMD_HEADER = b"L"
CMD_MAIL = b"M"
CMD_EOH = b"N"
CMD_OPTNEG = b"O"
CMD_QUIT = b"Q"
CMD_RCPT = b"R"
CMD_DATA = b"T"
CMD_UNKNOWN = b"U"

# replies (filter → MTA)
ACT_ACCEPT = "a"
ACT_CONTINUE = "c"
ACT_DISCARD = "d"
ACT_REJECT = "r"
ACT_TEMPFAIL = "t"
ACT_REPLYCODE = "y"
ACT_SKIP = "s"
ACT_PROGRESS = "p"
ACT_CONN_FAIL = "f"
ACT_SHUTDOWN = "4"

# modification requests, only before the final reply to end-of-message
MOD_ADDRCPT = "+"
MOD_DELRCPT = "-"
MOD_ADDRCPT_PAR = "2"
MOD_CHGFROM = "e"
MOD_REPLBODY = "b"
MOD_ADDHEADER = "h"
MOD_CHGHEADER = "m"
MOD_INSHEADER = "i"
MOD_QUARANTINE = "q"
MOD_SETSYMLIST = "l"
_MODS = frozenset(
    (
        MOD_ADDRCPT,
        MOD_DELRCPT,
        MOD_ADDRCPT_PAR,
        MOD_CHGFROM,
        MOD_REPLBODY,
        MOD_ADDHEADER,
        MOD_CHGHEADER,
        MOD_INSHEADER,
        MOD_QUARANTINE,
    )
)
_ACTIONS = frozenset((ACT_ACCEPT, ACT_CONTINUE, ACT_DISCARD, ACT_REJECT, ACT_TEMPFAIL, ACT_REPLYCODE, ACT_SKIP))

# action flags (what the filter may do)
OPT_ADD_HEADER = 0x01
OPT_CHANGE_BODY = 0x02
OPT_ADD_RCPT = 0x04
OPT_REMOVE_RCPT = 0x08
OPT_CHANGE_HEADER = 0x10
OPT_QUARANTINE = 0x20
OPT_CHANGE_FROM = 0x40
OPT_ADD_RCPT_PAR = 0x80
OPT_SET_SYMLIST = 0x100

# protocol flags (what the filter does not want to see / answer)
OPT_NO_CONNECT = 0x01
OPT_NO_HELO = 0x02
OPT_NO_MAIL = 0x04
OPT_NO_RCPT = 0x08
OPT_NO_BODY = 0x10
OPT_NO_HEADERS = 0x20
OPT_NO_EOH = 0x40
OPT_NR_HEADER = 0x80
OPT_NO_UNKNOWN = 0x100
OPT_NO_DATA = 0x200
OPT_SKIP = 0x400
OPT_RCPT_REJ = 0x800
OPT_NR_CONN = 0x1000
OPT_NR_HELO = 0x2000
OPT_NR_MAIL = 0x4000
OPT_NR_RCPT = 0x8000
OPT_NR_DATA = 0x10000
OPT_NR_UNKNOWN = 0x20000
OPT_NR_EOH = 0x40000
OPT_NR_BODY = 0x80000
OPT_HDR_LEADSPC = 0x100000

# address families of the connect command
FAMILY_UNKNOWN = "U"
FAMILY_UNIX = "L"
FAMILY_INET = "4"
FAMILY_INET6 = "6"


class MilterError(Exception):
    """I/O or protocol failure talking to a filter."""


@dataclass
class Action:
    """A filter's verdict on one stage. `smtp_code`/`smtp_text` are set for replycode."""

    code: str
    smtp_code: int = 0
    smtp_text: str = ""


@dataclass
class ModifyAction:
    """A modification requested at end-of-message."""

    code: str
    rcpt: str = ""
    rcpt_args: str = ""
    mail_from: str = ""
    from_args: list[str] = field(default_factory=list)
    body: bytes = b""
    header_index: int = 0
    header_name: str = ""
    header_value: str = ""
    reason: str = ""


CONTINUE = Action(ACT_CONTINUE)


def _cstr(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    return b.replace(b"\0", b"") + b"\0"


def _split_cstrs(data: bytes) -> list[str]:
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "replace") for p in parts]


def parse_action(code: str, data: bytes) -> Action:
    """One reply packet as an Action; MilterError for anything that is not a verdict."""
    if code not in _ACTIONS:
        raise MilterError(f"milter: unexpected reply code {code!r}")
    act = Action(code)
    if code == ACT_REPLYCODE:
        if len(data) <= 4:
            raise MilterError(f"milter: replycode: unexpected data length {len(data)}")
        try:
            act.smtp_code = int(data[:3].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise MilterError(f"milter: replycode: malformed SMTP code {data[:3]!r}") from None
        act.smtp_text = data[4:].split(b"\0", 1)[0].decode("utf-8", "replace")
    return act


def parse_modify_action(code: str, data: bytes) -> ModifyAction:
    """One modification packet as a ModifyAction."""
    mod = ModifyAction(code)
    if code in (MOD_ADDRCPT, MOD_DELRCPT):
        mod.rcpt = _split_cstrs(data)[0] if data else ""
    elif code == MOD_ADDRCPT_PAR:
        parts = _split_cstrs(data)
        mod.rcpt = parts[0] if parts else ""
        mod.rcpt_args = parts[1] if len(parts) > 1 else ""
    elif code == MOD_QUARANTINE:
        mod.reason = _split_cstrs(data)[0] if data else ""
    elif code == MOD_REPLBODY:
        mod.body = data
    elif code == MOD_CHGFROM:
        parts = _split_cstrs(data)
        mod.mail_from = parts[0] if parts else ""
        mod.from_args = parts[1:]
    elif code in (MOD_CHGHEADER, MOD_INSHEADER, MOD_ADDHEADER):
        if code != MOD_ADDHEADER:
            if len(data) < 4:
                raise MilterError("milter: modify action: missing header index")
            (mod.header_index,) = struct.unpack(">I", data[:4])
            data = data[4:]
        nul = data.find(b"\0")
        if nul < 0:
            raise MilterError("milter: modify action: missing NUL delimiter")
        mod.header_name = data[:nul].decode("utf-8", "replace")
        mod.header_value = data[nul + 1 :].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    else:
        raise MilterError(f"milter: unexpected modify action {code!r}")
    return mod


def header_value_for_milter(raw: bytes) -> str:
    """The value of a raw header field as MTAs hand it to filters: after the colon, one
    leading space removed, no trailing line end, folds as LF (Sendmail and Postfix
    keep lines LF-terminated internally)."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    value = value.removeprefix(b" ").rstrip(b"\r\n").replace(b"\r\n", b"\n")
    return value.decode("utf-8", "surrogateescape")


def field_from_milter(name: str, value: str) -> bytes:
    """A header field built from a filter's (name, value): `Name: value` with CRLF folds,
    keeping the filter's folding exactly (it matters for a DKIM-Signature it computed)."""
    v = value.encode("utf-8", "surrogateescape").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return name.encode("utf-8") + b": " + v + b"\r\n"


def apply_header_mods(header: Header, mods: Sequence[ModifyAction]) -> Header:
    """`header` with the header additions, insertions and changes applied, as libmilter
    documents them: add appends; insert puts the field at 0-based position `index` of the
    whole header (0 = top); change edits the index-th (1-based) field of that name, and an
    empty value deletes it. Other modifications are ignored here."""
    fields = list(header)
    for m in mods:
        if m.code == MOD_ADDHEADER:
            fields.append((m.header_name, field_from_milter(m.header_name, m.header_value)))
        elif m.code == MOD_INSHEADER:
            pos = min(m.header_index, len(fields))
            fields.insert(pos, (m.header_name, field_from_milter(m.header_name, m.header_value)))
        elif m.code == MOD_CHGHEADER:
            seen = 0
            low = m.header_name.lower()
            for i, (n, _) in enumerate(fields):
                if n.lower() != low:
                    continue
                seen += 1
                if seen == max(m.header_index, 1):
                    if m.header_value == "":
                        del fields[i]
                    else:
                        fields[i] = (n, field_from_milter(n, m.header_value))
                    break
            else:
                if m.header_value != "":
                    fields.append((m.header_name, field_from_milter(m.header_name, m.header_value)))
    return Header(fields)


def replaced_body(mods: Sequence[ModifyAction]) -> bytes | None:
    """The new body when the filter replaced it (SMFIR_REPLBODY chunks, LF → CRLF), else None."""
    chunks = [m.body for m in mods if m.code == MOD_REPLBODY]
    if not chunks:
        return None
    return b"".join(chunks).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class MilterSession:
    """One connection to a filter. Use `await MilterClient(...).session()` to open it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        read_timeout: float,
        write_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.version = PROTOCOL_VERSION
        self.action_opts = 0
        self.protocol_opts = 0
        self.need_abort = False
        self.closed = False

    # -- framing ----------------------------------------------------------------

    async def _write(self, cmd: bytes, data: bytes = b"") -> None:
        try:
            self.writer.write(struct.pack(">I", len(data) + 1) + cmd + data)
            await asyncio.wait_for(self.writer.drain(), self.write_timeout)
        except (OSError, TimeoutError) as e:
            raise MilterError(f"milter: write: {e or 'timeout'}") from None

    async def _read(self) -> tuple[str, bytes]:
        try:
            head = await asyncio.wait_for(self.reader.readexactly(4), self.read_timeout)
            (n,) = struct.unpack(">I", head)
            if n < 1 or n > MAX_PACKET:
                raise MilterError(f"milter: read: bad packet length {n}")
            pkt = await asyncio.wait_for(self.reader.readexactly(n), self.read_timeout)
        except asyncio.IncompleteReadError:
            raise MilterError("milter: read: connection closed by filter") from None
        except (OSError, TimeoutError) as e:
            raise MilterError(f"milter: read: {e or 'timeout'}") from None
        return chr(pkt[0]), pkt[1:]

    async def _read_action(self) -> Action:
        while True:
            code, data = await self._read()
            if code == ACT_PROGRESS:
                continue
            if code != ACT_CONTINUE:
                self.need_abort = False
            return parse_action(code, data)

    async def _send(self, cmd: bytes, data: bytes, skip_flag: int, no_reply_flag: int) -> Action:
        if self.protocol_opts & skip_flag:
            return CONTINUE
        await self._write(cmd, data)
        if self.protocol_opts & no_reply_flag:
            return CONTINUE
        return await self._read_action()

    # -- negotiation --------------------------------------------------------------

    async def negotiate(self, action_mask: int, protocol_mask: int) -> None:
        """Exchange OPTNEG; the filter's answer (limited to what was offered) becomes the session's options."""
        await self._write(CMD_OPTNEG, struct.pack(">III", self.version, action_mask, protocol_mask))
        code, data = await self._read()
        if code != "O":
            raise MilterError(f"milter: negotiate: unexpected code {code!r}")
        if len(data) < 12:
            raise MilterError(f"milter: negotiate: unexpected data size {len(data)}")
        version, actions, proto = struct.unpack(">III", data[:12])
        if version < self.version:
            if version >= 2 and action_mask & 0x3F == action_mask and protocol_mask & 0x7F == protocol_mask:
                self.version = version
            else:
                raise MilterError("milter: negotiate: unsupported milter version")
        self.action_opts = actions & action_mask
        # NR_*/NO_* bits are the filter's requests; the MTA may always honour them.
        self.protocol_opts = proto
        self.need_abort = True

    def protocol_option(self, opt: int) -> bool:
        return bool(self.protocol_opts & opt)

    def action_option(self, opt: int) -> bool:
        return bool(self.action_opts & opt)

    # -- stages -------------------------------------------------------------------

    async def macros(self, code: bytes, *kv: str) -> None:
        """Define macros (name, value, name, value, …) for the command `code` (e.g. CMD_CONNECT)."""
        await self._write(CMD_MACRO, code + b"".join(_cstr(s) for s in kv))

    async def conn(self, hostname: str, family: str, port: int, addr: str) -> Action:
        data = _cstr(hostname) + family.encode("ascii")
        if family != FAMILY_UNKNOWN:
            if family in (FAMILY_INET, FAMILY_INET6):
                data += struct.pack(">H", port & 0xFFFF)
            data += _cstr(addr)
        return await self._send(CMD_CONNECT, data, OPT_NO_CONNECT, OPT_NR_CONN)

    async def helo(self, helo: str) -> Action:
        return await self._send(CMD_HELO, _cstr(helo), OPT_NO_HELO, OPT_NR_HELO)

    async def mail(self, sender: str, esmtp_args: Sequence[str] = ()) -> Action:
        data = _cstr(f"<{sender}>") + b"".join(_cstr(a) for a in esmtp_args)
        self.need_abort = True
        return await self._send(CMD_MAIL, data, OPT_NO_MAIL, OPT_NR_MAIL)

    async def rcpt(self, rcpt: str, esmtp_args: Sequence[str] = ()) -> Action:
        data = _cstr(f"<{rcpt}>") + b"".join(_cstr(a) for a in esmtp_args)
        return await self._send(CMD_RCPT, data, OPT_NO_RCPT, OPT_NR_RCPT)

    async def header_field(self, name: str, value: str) -> Action:
        return await self._send(CMD_HEADER, _cstr(name) + _cstr(value), OPT_NO_HEADERS, OPT_NR_HEADER)

    async def header_end(self) -> Action:
        return await self._send(CMD_EOH, b"", OPT_NO_EOH, OPT_NR_EOH)

    async def header(self, header: Header) -> Action:
        """Every field of `header` (raw folding kept, as LF) and then end-of-header."""
        for name, raw in header:
            act = await self.header_field(name, header_value_for_milter(raw))
            if act.code != ACT_CONTINUE:
                return act
        return await self.header_end()

    async def body_chunk(self, chunk: bytes) -> Action:
        if len(chunk) > MAX_BODY_CHUNK:
            raise MilterError(f"milter: body chunk: too big body chunk: {len(chunk)}")
        return await self._send(CMD_BODY, chunk, OPT_NO_BODY, OPT_NR_BODY)

    async def body(self, f: BinaryIO) -> tuple[list[ModifyAction], Action]:
        """Send the body from a binary file in chunks, then end-of-message."""
        while True:
            chunk = await asyncio.to_thread(f.read, MAX_BODY_CHUNK)
            if not chunk:
                break
            act = await self.body_chunk(chunk)
            if act.code == ACT_SKIP:
                break
            if act.code != ACT_CONTINUE:
                return [], act
        return await self.end()

    async def end(self) -> tuple[list[ModifyAction], Action]:
        """End-of-message: the modifications requested, then the final verdict."""
        await self._write(CMD_BODYEOB)
        mods: list[ModifyAction] = []
        while True:
            code, data = await self._read()
            if code == ACT_PROGRESS:
                continue
            if code in _MODS:
                mods.append(parse_modify_action(code, data))
                continue
            self.need_abort = False
            return mods, parse_action(code, data)

    async def abort(self) -> None:
        await self._write(CMD_ABORT)

    async def close(self) -> None:
        """Abort an unfinished message, say QUIT and close the connection."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.need_abort:
                await self.abort()
            await self._write(CMD_QUIT)
        except MilterError:
            pass
        finally:
            self.writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class MilterClient:
    """Opens sessions to one filter: `network` is "tcp" (address "host:port") or "unix" (a path)."""

    def __init__(
        self,
        network: str,
        address: str,
        *,
        dial_timeout: float = 10.0,
        read_timeout: float = 10.0,
        write_timeout: float = 10.0,
        action_mask: int = OPT_ADD_HEADER | OPT_ADD_RCPT | OPT_CHANGE_BODY | OPT_CHANGE_FROM | OPT_CHANGE_HEADER,
        protocol_mask: int = 0,
    ) -> None:
        if network not in ("tcp", "unix"):
            raise ValueError(f"milter: unsupported network {network!r}")
        self.network = network
        self.address = address
        self.dial_timeout = dial_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.action_mask = action_mask
        self.protocol_mask = protocol_mask

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.network == "unix":
            return await asyncio.open_unix_connection(self.address)
        host, sep, port = self.address.rpartition(":")
        if not sep:
            raise MilterError(f"milter: missing port in address {self.address!r}")
        return await asyncio.open_connection(host.strip("[]"), int(port))

    async def session(self) -> MilterSession:
        """Connect and negotiate; MilterError on failure."""
        try:
            reader, writer = await asyncio.wait_for(self._dial(), self.dial_timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise MilterError(f"milter: session create: {e or 'dial timeout'}") from None
        s = MilterSession(reader, writer, self.read_timeout, self.write_timeout)
        try:
            await s.negotiate(self.action_mask, self.protocol_mask)
        except MilterError:
            s.need_abort = False
            await s.close()
            raise
        return s


__all__ = [
    "Action",
    "MilterClient",
    "MilterError",
    "MilterSession",
    "ModifyAction",
    "apply_header_mods",
    "field_from_milter",
    "header_value_for_milter",
    "replaced_body",
]
