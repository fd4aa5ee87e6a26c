"""Wire-level helpers of the SMTP endpoint: command parsing, PROXY headers, DATA reading.

Nothing here knows about the pipeline; `session.py` drives the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import struct
import tempfile
from dataclasses import dataclass

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body


class LineTooLong(Exception):
    pass


TOO_LARGE = SMTPError(552, (5, 3, 4), "Maximum message size exceeded")  # go-smtp's ErrDataTooLarge
HEADER_TOO_LARGE = SMTPError(552, (5, 3, 4), "Message header size exceeds limit")
MALFORMED_HEADER = SMTPError(554, (5, 0, 0), "Internal server error", reason="malformed header")


def parse_cmd(line: str) -> tuple[str, str] | None:
    """go-smtp's parseCmd: a 4-letter verb, then a space and the argument (None: `Bad command`)."""
    line = line.rstrip("\r\n")
    if line.upper().startswith("STARTTLS"):
        return "STARTTLS", ""
    if not line:
        return "", ""
    if len(line) < 4 or len(line) == 5:  # "command too short" / "mangled command"
        return None
    if len(line) == 4:
        return line.upper(), ""
    if line[4] != " ":
        return None
    return line[:4].upper(), line[5:].strip()


_DOT_STRING_STOP = set('()<>[]:;\\," \t')


class _PathParser:
    """RFC 5321 §4.1.2 paths as go-smtp 0.21 parses them (brackets optional, source route dropped)."""

    def __init__(self, s: str) -> None:
        self.s = s

    def accept(self, ch: str) -> bool:
        if self.s.startswith(ch):
            self.s = self.s[1:]
            return True
        return False

    def reverse_path(self) -> str:
        if self.s.startswith("<>"):
            self.s = self.s[2:]
            return ""
        return self.path()

    def path(self) -> str:
        bracket = self.accept("<")
        # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain must be accepted (any case)
        if bracket and self.s[:11].lower() == "postmaster>":
            local, self.s = self.s[:10], self.s[11:]
            return local
        if self.accept("@"):
            i = self.s.find(":")
            if i < 0:
                raise ValueError("malformed a-d-l")
            self.s = self.s[i + 1 :]
        mbox = self.mailbox()
        if bracket and not self.accept(">"):
            raise ValueError("expected '>'")
        return mbox

    def mailbox(self) -> str:
        local = self.local_part()
        if not local:
            raise ValueError("local-part is empty")
        if not self.accept("@"):
            raise ValueError("expected '@'")
        i = 0
        while i < len(self.s) and self.s[i] not in " \t>":
            i += 1
        domain, self.s = self.s[:i], self.s[i:]
        if not domain:
            raise ValueError("domain is empty")
        return local + "@" + domain

    def local_part(self) -> str:
        out: list[str] = []
        if self.accept('"'):
            while True:
                if not self.s:
                    raise ValueError("malformed quoted-string")
                ch, self.s = self.s[0], self.s[1:]
                if ch == "\\":
                    if not self.s:
                        raise ValueError("malformed quoted-string")
                    ch, self.s = self.s[0], self.s[1:]
                elif ch == '"':
                    return "".join(out)
                out.append(ch)
        while self.s and self.s[0] != "@":
            if self.s[0] in _DOT_STRING_STOP:
                raise ValueError("malformed dot-string")
            out.append(self.s[0])
            self.s = self.s[1:]
        return "".join(out)


def parse_path(arg: str, prefix: str) -> tuple[str, str] | None:
    """`FROM:<addr> PARAMS` → (address, the rest); None on a syntax error."""
    if arg[: len(prefix)].upper() != prefix:
        return None
    p = _PathParser(arg[len(prefix) :].strip())
    try:
        addr = p.reverse_path() if prefix == "FROM:" else p.path()
    except ValueError:
        return None
    return addr, p.s


def parse_args(s: str) -> dict[str, str] | None:
    """ESMTP parameters `KEY[=VALUE]…` (keys upper-cased); None when one has two `=`."""
    out: dict[str, str] = {}
    for a in s.split():
        parts = a.split("=")
        if len(parts) > 2:
            return None
        out[parts[0].upper()] = parts[1] if len(parts) == 2 else ""
    return out


# -- PROXY protocol (v1 text, v2 binary) ---------------------------------------------------

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@dataclass
class ProxyInfo:
    ip: str
    port: int


async def read_proxy_header(reader: asyncio.StreamReader, timeout: float = 10.0) -> ProxyInfo | bool | None:
    """Read a PROXY header if the client sends one. None: LOCAL/UNKNOWN; False: no header."""
    try:
        head = await asyncio.wait_for(reader.readexactly(12), timeout)
    except (TimeoutError, asyncio.IncompleteReadError):
        return False
    if head == V2_SIG:
        rest = await reader.readexactly(4)
        ver_cmd, fam, length = rest[0], rest[1], struct.unpack("!H", rest[2:4])[0]
        payload = await reader.readexactly(length)
        if ver_cmd >> 4 != 2:
            raise ValueError("bad PROXY v2 version")
        if ver_cmd & 0xF == 0:  # LOCAL
            return None
        if fam >> 4 == 1 and len(payload) >= 12:
            src = ipaddress.IPv4Address(payload[0:4])
            port = struct.unpack("!H", payload[8:10])[0]
            return ProxyInfo(str(src), port)
        if fam >> 4 == 2 and len(payload) >= 36:
            src6 = ipaddress.IPv6Address(payload[0:16])
            port = struct.unpack("!H", payload[32:34])[0]
            return ProxyInfo(str(src6), port)
        return None
    if head.startswith(b"PROXY "):
        line = head + await reader.readuntil(b"\n")
        if len(line) > 107 or not line.endswith(b"\r\n"):
            raise ValueError("bad PROXY v1 header")
        parts = line.decode("ascii").split()
        if len(parts) >= 2 and parts[1] == "UNKNOWN":
            return None
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            raise ValueError("bad PROXY v1 header")
        ipaddress.ip_address(parts[2])
        return ProxyInfo(parts[2], int(parts[4]))
    # Not a PROXY header: give the bytes back to the stream.
    reader._buffer[0:0] = head  # type: ignore[attr-defined]
    return False


# -- DATA decoding -------------------------------------------------------------------------

_BOL, _DOT, _DOTCR, _CR, _DATA = range(5)


class DotDecoder:
    """go-smtp 0.21's DATA state machine, fed line by line (each line ends with LF).

    Only CR LF . CR LF ends the data; a dot at the beginning of a line (after CR LF)
    is removed; a bare LF is ordinary data and does not begin a line, so `\\n.\\n`,
    `\\n.\\r\\n` and `\\r\\n.\\n` never end the message. Its quirks are kept too:
    in `\\r\\r\\n` the second CR cancels the first, and a CR right after a leading dot is
    dropped. Common lines take a fast path; odd ones go through the byte-level machine.
    """

    def __init__(self) -> None:
        self.state = _BOL

    def line(self, line: bytes) -> tuple[bytes, bool]:
        """(decoded bytes, end of data reached)."""
        if b"\r" not in line[:-2]:
            if self.state == _BOL:
                if line == b".\r\n":
                    return b"", True
                if line.startswith(b"."):
                    line = line[1:]
            self.state = _BOL if line.endswith(b"\r\n") else _DATA
            return line, False
        return self._slow(line)

    def block(self, seg: bytes, limit: int) -> tuple[bytes, int] | None:
        """Whole-block fast path: decode `seg` (which ends with CR LF) at C speed, or None.

        Applies only at the beginning of a line and when every CR and LF of the data
        up to the end marker pairs up as CR LF; then lines are exactly the CR LF
        pieces, each begins a line, a leading dot is dropped and the first `.` line
        ends the data — what `line()` would do line by line. Returns (decoded bytes,
        index just past the end marker, or -1 when the data goes on). None: feed it
        to `line()` instead (bare CR or LF, CR CR LF, not at the start of a line).
        Raises LineTooLong for a line longer than `limit` (CR LF included) before the end.
        """
        if self.state != _BOL:
            return None
        if seg.startswith(b".\r\n"):
            return b"", 3
        e = seg.find(b"\r\n.\r\n")
        data = seg if e < 0 else seg[: e + 2]
        n = data.count(b"\r\n")
        if data.count(b"\r") != n or data.count(b"\n") != n:
            return None
        if limit and len(data) > limit and max(map(len, data.split(b"\r\n"))) + 2 > limit:
            raise LineTooLong
        if data.startswith(b"."):
            data = data[1:]
        data = data.replace(b"\r\n.", b"\r\n")
        return data, (-1 if e < 0 else e + 5)

    def _slow(self, line: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        st = self.state
        for c in line:
            if st == _BOL:
                if c == 0x2E:
                    st = _DOT
                    continue
                st = _CR if c == 0x0D else _DATA
            elif st == _DOT:
                if c == 0x0D:
                    st = _DOTCR
                    continue
                st = _DATA
            elif st == _DOTCR:
                if c == 0x0A:
                    self.state = _BOL
                    return bytes(out), True
                st = _DATA
            elif st == _CR:
                st = _BOL if c == 0x0A else _DATA
            elif c == 0x0D:
                st = _CR
            out.append(c)
        self.state = st
        return bytes(out), False


# -- body spooling -------------------------------------------------------------------------


class Spool:
    """Collects a body in memory, in a file, or in memory until `max_ram` (buffer ram|fs|auto)."""

    def __init__(self, mode: str, directory: str, max_ram: int) -> None:
        self.mode = mode
        self.dir = directory
        self.max_ram = max_ram
        self.mem = bytearray()
        self.file: tempfile._TemporaryFileWrapper[bytes] | None = None
        self.path: str | None = None
        self.size = 0
        if mode == "fs":
            self._to_file()

    def _to_file(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        f = tempfile.NamedTemporaryFile(dir=self.dir, prefix="body-", delete=False)  # noqa: SIM115
        self.file = f
        self.path = f.name
        if self.mem:
            f.write(self.mem)
            self.mem = bytearray()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.mem += data
        if self.mode == "auto" and len(self.mem) > self.max_ram:
            self._to_file()

    def finish(self) -> Body:
        if self.file is not None:
            self.file.close()
            return Body(path=self.path, size=self.size)
        return Body(bytes(self.mem))

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            if self.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)


class MessageReader:
    """Splits the incoming message into the raw header block and a spooled body.

    Fed with un-dot-stuffed bytes (DATA) or raw chunks (BDAT). Sizes are
    checked as data arrives; once an error is set, the rest is only counted.
    """

    def __init__(self, spool: Spool, max_size: int, max_header: int) -> None:
        self.spool = spool
        self.max_size = max_size
        self.max_header = max_header
        self.header = bytearray()
        self.in_header = True
        self.total = 0
        self.error: SMTPError | None = None

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self.error is not None:
            return
        if self.max_size and self.total > self.max_size:
            self.error = TOO_LARGE
            return
        if not self.in_header:
            self.spool.write(data)
            return
        start = max(0, len(self.header) - 2)
        self.header += data
        # The header ends at the first empty line (only the new bytes are scanned).
        end = _header_end(self.header, start)
        # maddy reads the header through a reader limited to max_header_size bytes:
        # the empty line must end within them.
        if end < 0:
            if len(self.header) >= self.max_header:
                self.error = HEADER_TOO_LARGE
            return
        hdr, rest = bytes(self.header[:end]), bytes(self.header[end:])
        if end + (1 if rest.startswith(b"\n") else 2) > self.max_header:
            self.error = HEADER_TOO_LARGE
            return
        self.header = bytearray(hdr)
        self.in_header = False
        # Skip the separator line itself.
        if rest.startswith(b"\r\n"):
            rest = rest[2:]
        elif rest.startswith(b"\n"):
            rest = rest[1:]
        if rest:
            self.spool.write(rest)


def _header_end(buf: bytearray, start: int = 0) -> int:
    """Index where the empty separator line starts, or -1."""
    if buf.startswith(b"\r\n") or buf.startswith(b"\n"):
        return 0
    i = buf.find(b"\n\r\n", start)
    j = buf.find(b"\n\n", start)
    cands = [x + 1 for x in (i, j) if x >= 0]
    return min(cands) if cands else -1


def valid_header_block(raw: bytes) -> bool:
    """Every line is `name: value` or a continuation (textproto.ReadHeader's rule)."""
    for n, line in enumerate(raw.split(b"\n")):
        if not line.strip(b"\r"):
            continue
        if line[:1] in (b" ", b"\t"):
            if n == 0:
                return False
            continue
        colon = line.find(b":")
        if colon <= 0 or b" " in line[:colon].rstrip(b" \t") or b"\t" in line[:colon].rstrip(b" \t"):
            return False
    return True
