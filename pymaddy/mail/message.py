"""A message in flight: envelope metadata, an ordered header, and a body buffer.

The header keeps each field's raw bytes (folding and all) because DKIM signs and
verifies exactly those bytes; the body is a buffer that lives in memory or in a
spool file, so a 100 MB message never sits whole in memory.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

_POOL_SIZE = 4096
_pool = b""
_pos = 0
_pool_lock = threading.Lock()


def _reset_pool() -> None:
    global _pool, _pos
    _pool, _pos = b"", 0


os.register_at_fork(after_in_child=_reset_pool)  # a child must not repeat its parent's bytes


def random_hex(nbytes: int) -> str:
    """Like secrets.token_hex(nbytes), served from a buffer of os.urandom bytes (one getrandom call
    per 4 KiB rather than one per ID); each byte is handed out once."""
    global _pool, _pos
    if nbytes > _POOL_SIZE // 4:
        return secrets.token_hex(nbytes)
    with _pool_lock:
        if _pos + nbytes > len(_pool):
            _pool, _pos = os.urandom(_POOL_SIZE), 0
        out = _pool[_pos : _pos + nbytes]
        _pos += nbytes
    return out.hex()


def new_msg_id() -> str:
    """maddy's message ID: 8 random hex characters, used in logs and replies."""
    return random_hex(4)


@dataclass
class ConnInfo:
    """Where the message came from (for Received:, checks and logs)."""

    remote_ip: str = ""
    remote_port: int = 0
    helo: str = ""
    rdns: str = ""  # "" when the PTR lookup found nothing or has not finished
    proto: str = "ESMTP"  # ESMTP | ESMTPS | LMTP, prefixed UTF8 when SMTPUTF8 was used
    tls: bool = False
    tls_version: str = ""
    tls_cipher: str = ""
    auth_user: str = ""
    auth_password: str = ""  # kept only for target.smtp `auth forward`
    is_unix: bool = False


@dataclass
class MsgMeta:
    """Per-transaction metadata passed along with the message to every module."""

    id: str = field(default_factory=new_msg_id)
    conn: ConnInfo = field(default_factory=ConnInfo)
    original_from: str = ""
    original_rcpts: dict[str, str] = field(default_factory=dict)  # final address → address as received
    smtputf8: bool = False
    body_8bit: bool = False
    requiretls: bool = False
    tls_required_override: bool = False  # `TLS-Required: No` seen (RFC 8689)
    size: int = 0  # declared SIZE= or 0
    quarantine: bool = False
    dont_trace_sender: bool = False  # submission: Received without `from`


class Header:
    """An ordered list of header fields, each kept as its raw bytes including CRLF."""

    def __init__(self, fields: list[tuple[str, bytes]] | None = None) -> None:
        self._fields: list[tuple[str, bytes]] = list(fields or [])

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """Split a header block (without the empty separator line) into fields.

        Lines starting with whitespace continue the previous field (RFC 5322 §2.2.3).
        A line with no colon is kept as a field with an empty name so nothing is lost.
        """
        fields: list[tuple[str, bytes]] = []
        for line in data.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t") and fields:
                name, raw = fields[-1]
                fields[-1] = (name, raw + line)
                continue
            colon = line.find(b":")
            name = line[:colon].strip().decode("latin-1") if colon > 0 else ""
            fields.append((name, line))
        return cls(fields)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def get_all(self, name: str) -> list[str]:
        """Unfolded values of every field with this name, in order."""
        low = name.lower()
        return [_value(raw) for n, raw in self._fields if n.lower() == low]

    def get(self, name: str) -> str | None:
        vals = self.get_all(name)
        return vals[0] if vals else None

    def count(self, name: str) -> int:
        low = name.lower()
        return sum(1 for n, _ in self._fields if n.lower() == low)

    def add_top(self, name: str, value: str | bytes) -> None:
        """Prepend a field (trace and result headers go on top, RFC 5321 §4.4)."""
        self._fields.insert(0, (name, _field_bytes(name, value)))

    def add(self, name: str, value: str | bytes) -> None:
        self._fields.append((name, _field_bytes(name, value)))

    def add_raw_top(self, raw: Header) -> None:
        self._fields[0:0] = list(raw)

    def remove(self, name: str) -> None:
        low = name.lower()
        self._fields = [(n, r) for n, r in self._fields if n.lower() != low]

    def to_bytes(self) -> bytes:
        return b"".join(raw if raw.endswith(b"\n") else raw + b"\r\n" for _, raw in self._fields)

    def copy(self) -> Header:
        return Header(self._fields)


def _value(raw: bytes) -> str:
    colon = raw.find(b":")
    v = raw[colon + 1 :] if colon >= 0 else raw
    text = v.decode("utf-8", errors="replace")
    return " ".join(part.strip() for part in text.splitlines()).strip()


def _field_bytes(name: str, value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return name.encode() + b": " + value.rstrip(b"\r\n") + b"\r\n"
    return (name + ": " + value.rstrip("\r\n") + "\r\n").encode("utf-8")


class Body:
    """The message body (after the header's blank line): in memory or in a spool file."""

    def __init__(self, data: bytes | None = None, path: str | None = None, size: int | None = None) -> None:
        if (data is None) == (path is None):
            raise ValueError("a body is either bytes or a file")
        self._data = data
        self.path = path
        self.size = len(data) if data is not None else (size if size is not None else os.path.getsize(path or ""))

    def open(self) -> BinaryIO:
        """A fresh reader from the start; several may be open at once."""
        if self._data is not None:
            return io.BytesIO(self._data)
        return open(self.path or "", "rb")

    def read_all(self) -> bytes:
        """Only for small bodies and tests: streams are the normal way."""
        with self.open() as f:
            return f.read()

    def discard(self) -> None:
        """Remove the spool file, if any."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None
