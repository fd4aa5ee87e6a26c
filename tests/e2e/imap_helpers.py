"""A transcript IMAP client for protocol tests: send a command, get every reply line exactly.

`Transcript.cmd("SELECT INBOX")` sends `tN SELECT INBOX` and returns the untagged
lines and the tagged completion; literals in replies are read in full and kept
inline (`* 1 FETCH (BODY[] {5}\\r\\nhello)`) so a test can compare bytes.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
import ssl
from dataclasses import dataclass

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


@dataclass
class Reply:
    untagged: list[bytes]
    tagged: bytes

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def status(self) -> str:
        parts = self.tagged.split(b" ", 2)
        return parts[1].decode() if len(parts) > 1 else ""

    def text(self) -> str:
        return "\r\n".join(x.decode("utf-8", "replace") for x in [*self.untagged, self.tagged])

    def lines(self, prefix: str) -> list[str]:
        return [x.decode("utf-8", "replace") for x in self.untagged if x.startswith(prefix.encode())]


class Transcript:
    def __init__(self, port: int, *, tls: bool = False, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls:
            sock = _client_ctx().wrap_socket(sock, server_hostname="localhost")
        self.sock: socket.socket = sock
        self.buf = b""
        self.n = 0
        self.greeting = self.line()

    def line(self) -> bytes:
        """One response line with its literals inlined, CRLF stripped."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; partial {self.buf!r}")
                self.buf += chunk
            i = self.buf.index(b"\r\n") + 2
            piece, self.buf = self.buf[:i], self.buf[i:]
            m = _LITERAL.search(piece)
            if not m:
                return out + piece[:-2]
            n = int(m.group(1))
            while len(self.buf) < n:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed inside a literal")
                self.buf += chunk
            out += piece + self.buf[:n]
            self.buf = self.buf[n:]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def tag(self) -> str:
        self.n += 1
        return f"t{self.n}"

    def cmd(self, command: str | bytes, literal: bytes | None = None) -> Reply:
        """Send `TAG command` (with a synchronizing literal appended when given) and read to the tag."""
        tag = self.tag()
        raw = command.encode() if isinstance(command, str) else command
        if literal is not None:
            self.send(tag.encode() + b" " + raw + b" {%d}\r\n" % len(literal))
            cont = self.line()
            if not cont.startswith(b"+"):
                return Reply([], cont)
            self.send(literal + b"\r\n")
        else:
            self.send(tag.encode() + b" " + raw + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> Reply:
        untagged: list[bytes] = []
        while True:
            ln = self.line()
            if ln.startswith(tag.encode() + b" "):
                return Reply(untagged, ln)
            untagged.append(ln)

    def login(self, user: str, password: str) -> Reply:
        r = self.cmd(f'LOGIN "{user}" "{password}"')
        assert r.ok, r.text()
        return r

    def starttls(self) -> None:
        r = self.cmd("STARTTLS")
        assert r.ok, r.text()
        self.sock = _client_ctx().wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Transcript:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(subject: str = "Hello", body: str = "Hello, world!\r\n", frm: str = "alice@example.net",
            to: str = "user@example.org", extra: str = "") -> bytes:
    return (f"From: Alice <{frm}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{abs(hash(subject))}@example.net>\r\n"
            f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


class IMAPFrom(imaplib.IMAP4):
    """imaplib from a chosen loopback source address (auth_throttle counts per address)."""

    def __init__(self, port: int, source: str) -> None:
        self._source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class IMAPSFrom(imaplib.IMAP4_SSL):
    """The same over implicit TLS."""

    def __init__(self, port: int, source: str) -> None:
        self._source = source
        super().__init__("127.0.0.1", port, ssl_context=_client_ctx(), timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
        tls: ssl.SSLContext = self.ssl_context
        return tls.wrap_socket(sock, server_hostname=self.host)


def login_from(port: int, source: str, user: str, password: str, *, tls: bool = False) -> str:
    """LOGIN from `source`: "OK ..." or "NO ..." with the server's text."""
    c: imaplib.IMAP4 = IMAPSFrom(port, source) if tls else IMAPFrom(port, source)
    try:
        typ, data = c.login(user, password)
        return f"{typ} {data[0].decode()}"
    except imaplib.IMAP4.error as e:
        arg = e.args[0]
        return "NO " + (arg.decode() if isinstance(arg, bytes) else str(arg))
    finally:
        c.shutdown()
