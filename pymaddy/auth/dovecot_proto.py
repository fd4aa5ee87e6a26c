"""Dovecot authentication protocol v1.x (the "auth-client" socket), both sides.

A library: line encoding, handshake and request/reply types, no I/O policy and
no server configuration. `pymaddy.auth.dovecot_sasl` (client of Dovecot) and
`pymaddy.endpoints.dovecot_sasld` (server for Postfix) are built on it.

The protocol (Dovecot's doc/auth-protocol.txt, "Design/AuthProtocol"):

    server → client on connect:  VERSION 1 2 / MECH name flags… / SPID / CUID / COOKIE / DONE
    client → server on connect:  VERSION 1 x / CPID pid
    client:  AUTH <id> <mech> [service=…] [secured] [rip=…] … [resp=<base64>]   (resp last)
    server:  CONT <id> <base64>  |  OK <id> [user=…]…  |  FAIL <id> [reason=…] [code=temp_fail|temp]…
    client:  CONT <id> <base64>

Lines end in LF; fields are separated by TAB; inside a field the bytes
\\001, TAB, CR, LF (and NUL) are written as \\001 followed by 1, t, r, n (0)
(Dovecot's str_tabescape).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

__all__ = [
    "MAJOR_VERSION",
    "MAX_LINE",
    "MECH_FLAGS",
    "MINOR_VERSION",
    "AuthReply",
    "AuthRequest",
    "Mechanism",
    "ProtocolError",
    "ServerHandshake",
    "b64decode",
    "b64encode",
    "client_handshake",
    "decode_line",
    "encode_line",
    "escape",
    "parse_client_version",
    "parse_cont",
    "parse_params",
    "unescape",
]

MAJOR_VERSION = 1
MINOR_VERSION = 2
MAX_LINE = 16384  # Dovecot's AUTH_CLIENT_MAX_LINE_LENGTH

_ESC = "\x01"
_ESCAPES = {"\x01": "1", "\t": "t", "\r": "r", "\n": "n", "\x00": "0"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}

# MECH flags (doc/auth-protocol.txt "MECH")
MECH_FLAGS = ("anonymous", "plaintext", "dictionary", "active", "forward-secrecy", "mutual-auth", "private")


class ProtocolError(ValueError):
    """The peer broke the protocol; the connection should be closed."""


def escape(s: str) -> str:
    """Dovecot's str_tabescape."""
    if not any(c in s for c in _ESCAPES):
        return s
    return "".join(_ESC + _ESCAPES[c] if c in _ESCAPES else c for c in s)


def unescape(s: str) -> str:
    """Dovecot's str_tabunescape: an unknown escape keeps the character after \\001."""
    if _ESC not in s:
        return s
    out: list[str] = []
    it = iter(s)
    for c in it:
        if c == _ESC:
            nxt = next(it, "")
            out.append(_UNESCAPES.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def encode_line(cmd: str, *args: str) -> bytes:
    """One protocol line: escaped fields joined by TAB, ending in LF."""
    return ("\t".join([cmd, *(escape(a) for a in args)]) + "\n").encode("utf-8")


def decode_line(line: bytes) -> tuple[str, list[str]]:
    """(command, unescaped arguments) of one line, with or without its LF."""
    if len(line) > MAX_LINE:
        raise ProtocolError("line too long")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("line is not UTF-8") from None
    text = text.rstrip("\n").removesuffix("\r")
    if not text:
        raise ProtocolError("empty line")
    parts = text.split("\t")
    return parts[0], [unescape(p) for p in parts[1:]]


def parse_params(args: list[str]) -> dict[str, str]:
    """`key=value` and bare `flag` arguments (a flag maps to ""); the last of a key wins."""
    out: dict[str, str] = {}
    for a in args:
        k, _, v = a.partition("=")
        out[k] = v
    return out


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(s: str) -> bytes:
    """Strict base64 (RFC 4648 §4); ProtocolError when malformed."""
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ProtocolError("invalid base64 data") from None


@dataclass(frozen=True)
class Mechanism:
    """One `MECH` line: a SASL mechanism name and its security flags."""

    name: str
    flags: frozenset[str] = frozenset()

    @property
    def private(self) -> bool:
        return "private" in self.flags

    def line(self) -> bytes:
        return encode_line("MECH", self.name, *(f for f in MECH_FLAGS if f in self.flags))

    @classmethod
    def parse(cls, args: list[str]) -> Mechanism:
        if not args or not args[0]:
            raise ProtocolError("MECH without a name")
        return cls(args[0].upper(), frozenset(a.lower() for a in args[1:]))


@dataclass
class ServerHandshake:
    """What the server announces before `DONE`; `feed` takes lines until it returns True."""

    version: tuple[int, int] | None = None
    mechanisms: dict[str, Mechanism] = field(default_factory=dict)
    spid: str = ""
    cuid: str = ""
    cookie: str = ""

    def feed(self, line: bytes) -> bool:
        cmd, args = decode_line(line)
        if cmd == "VERSION":
            self.version = _version(args)
            if self.version[0] != MAJOR_VERSION:
                raise ProtocolError(f"incompatible server protocol version {self.version[0]}.{self.version[1]}")
        elif self.version is None:
            raise ProtocolError(f"expected VERSION, got {cmd}")
        elif cmd == "MECH":
            m = Mechanism.parse(args)
            self.mechanisms[m.name] = m
        elif cmd in ("SPID", "CUID", "COOKIE"):
            setattr(self, cmd.lower(), args[0] if args else "")
        elif cmd == "DONE":
            return True
        # other commands: ignored, as the protocol requires of clients
        return False

    def lines(self) -> bytes:
        out = [encode_line("VERSION", str(MAJOR_VERSION), str(MINOR_VERSION))]
        out += [m.line() for m in self.mechanisms.values()]
        out += [encode_line("SPID", self.spid), encode_line("CUID", self.cuid), encode_line("COOKIE", self.cookie)]
        out.append(encode_line("DONE"))
        return b"".join(out)


def _version(args: list[str]) -> tuple[int, int]:
    try:
        return int(args[0]), int(args[1])
    except (IndexError, ValueError):
        raise ProtocolError("malformed VERSION") from None


def client_handshake(cpid: int) -> bytes:
    return encode_line("VERSION", str(MAJOR_VERSION), str(MINOR_VERSION)) + encode_line("CPID", str(cpid))


def parse_client_version(args: list[str]) -> tuple[int, int]:
    """A client's VERSION; ProtocolError unless the major version is ours."""
    v = _version(args)
    if v[0] != MAJOR_VERSION:
        raise ProtocolError(f"incompatible client protocol version {v[0]}.{v[1]}")
    return v


@dataclass
class AuthRequest:
    """`AUTH <id> <mech> params… [resp=…]`; `initial` is the decoded initial response, if any."""

    id: str
    mechanism: str
    params: dict[str, str] = field(default_factory=dict)
    initial: bytes | None = None

    def line(self) -> bytes:
        args = [self.id, self.mechanism]
        args += [k if v == "" else f"{k}={v}" for k, v in self.params.items() if k != "resp"]
        if self.initial is not None:
            args.append("resp=" + b64encode(self.initial))  # resp must be the last parameter
        return encode_line("AUTH", *args)

    @classmethod
    def parse(cls, args: list[str]) -> AuthRequest:
        if len(args) < 2 or not args[0] or not args[1]:
            raise ProtocolError("AUTH needs an id and a mechanism")
        if not args[0].isdigit():
            raise ProtocolError("AUTH id is not a number")
        params = parse_params(args[2:])
        initial = None
        if "resp" in params:
            initial = b64decode(params.pop("resp"))
        return cls(args[0], args[1].upper(), params, initial)

    @property
    def remote(self) -> str:
        """`rip:rport` for logs, "" when the client did not say; port 0 when only `rip` was sent
        (Postfix), so the usual `IP:PORT` log format (and maddy's fail2ban filter) still applies."""
        ip, port = self.params.get("rip", ""), self.params.get("rport", "") or "0"
        if not ip:
            return ""
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class AuthReply:
    """A server reply to a request: OK, CONT or FAIL."""

    kind: str  # OK | CONT | FAIL
    id: str
    params: dict[str, str] = field(default_factory=dict)
    data: bytes = b""  # CONT payload

    @property
    def temporary(self) -> bool:
        """FAIL because the server could not decide (Dovecot 2.3 `code=temp_fail`, 2.2 `temp`)."""
        return self.kind == "FAIL" and ("temp" in self.params or self.params.get("code") == "temp_fail")

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    def line(self) -> bytes:
        if self.kind == "CONT":
            return encode_line("CONT", self.id, b64encode(self.data))
        return encode_line(self.kind, self.id, *(k if v == "" else f"{k}={v}" for k, v in self.params.items()))

    @classmethod
    def parse(cls, cmd: str, args: list[str]) -> AuthReply:
        if cmd not in ("OK", "CONT", "FAIL"):
            raise ProtocolError(f"unexpected reply {cmd}")
        if not args:
            raise ProtocolError(f"{cmd} without a request id")
        if cmd == "CONT":
            return cls(cmd, args[0], data=b64decode(args[1] if len(args) > 1 else ""))
        return cls(cmd, args[0], parse_params(args[1:]))


def parse_cont(args: list[str]) -> tuple[str, bytes]:
    """A client's `CONT <id> <base64>`."""
    if not args or not args[0]:
        raise ProtocolError("CONT without a request id")
    return args[0], b64decode(args[1] if len(args) > 1 else "")
