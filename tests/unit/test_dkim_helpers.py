"""Helpers shared by the DKIM tests: a loopback DNS server, module construction, messages.

Kept in a `test_dkim_*` module of its own (no tests here) so the DKIM tests do
not depend on the shared DNS helper written in parallel.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from pathlib import Path
from typing import TypeVar

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from pymaddy.mail.message import Body, Header
from pymaddy.runtime import metrics
from pymaddy.runtime.log import Logger
from pymaddy.runtime.module import Module, RuntimeContext
from pymaddy.runtime.options import RunOptions
from tests.runtime_helpers import MemoryOutput, compile_graph

M = TypeVar("M", bound=Module)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Lunch  tomorrow?\r\n"
    b"\tat noon\r\n"
    b"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
    b"Message-Id: <1234@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hi Bob,  \r\n"
    b"\r\n"
    b"shall we  meet at noon?\r\n"
    b"\r\n"
    b"\r\n"
)


def split_message(raw: bytes) -> tuple[Header, Body]:
    """Header and body of a message with CRLF or LF line ends."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    return Header.parse(head + b"\r\n"), Body(body)


def join_message(header: Header, body: Body) -> bytes:
    return header.to_bytes() + b"\r\n" + body.read_all()


def build(
    text: str, state_dir: Path, module: str, cls: type[M], *, dns_override: str | None = None
) -> tuple[M, MemoryOutput]:
    """The runtime object of the first `module` instance in `text` (not started)."""
    graph = compile_graph(text)
    inst = next(i for i in graph.instances if i.schema.name == module)
    out = MemoryOutput()
    ctx = RuntimeContext(
        options=RunOptions(config=os.path.join(state_dir, "maddy.conf"), debug=False, dns_override=dns_override),
        graph=graph,
        generation=1,
        logger=Logger(out=out),
        metrics=metrics.REGISTRY,
        state_dir=os.fspath(state_dir),
        runtime_dir=os.fspath(state_dir),
    )
    obj = cls(inst, ctx)
    ctx.objects[id(inst)] = obj
    return obj, out


class ZoneServer:
    """An authoritative DNS server on loopback answering TXT queries over UDP and TCP.

    `records` maps names (no trailing dot) to TXT values; strings longer than
    255 bytes are split into several character-strings of one record, as zone
    files publish DKIM keys. Names in `servfail` answer SERVFAIL; unknown
    names NXDOMAIN.
    """

    def __init__(
        self,
        records: dict[str, list[str]],
        host: str = "127.0.0.1",
        port: int = 0,
        servfail: frozenset[str] = frozenset(),
    ) -> None:
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.servfail = {s.lower().rstrip(".") for s in servfail}
        self.queries: list[str] = []
        # UDP and TCP on one port; with port 0 the TCP side of the chosen port may be taken
        # (an outgoing connection's ephemeral port): then try another, as tests/dnsserver.py does.
        for attempt in range(20):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((host, port))
            self.port: int = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((host, self.port))
            except OSError:
                self.udp.close()
                self.tcp.close()
                if port or attempt == 19:
                    raise
                continue
            break
        self.tcp.listen(16)
        self.addr = f"{host}:{self.port}"
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def answer(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries.append(name)
        if name in self.servfail:
            r.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.records:
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            rrset = r.find_rrset(r.answer, question.name, dns.rdataclass.IN, dns.rdatatype.TXT, create=True)
            for value in self.records[name]:
                data = value.encode()
                chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
                rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks), 60)
        return r.to_wire()

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            try:
                self.udp.sendto(self.answer(data), peer)
            except Exception:
                continue

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        head = conn.recv(2)
                        if len(head) < 2:
                            break
                        (n,) = struct.unpack("!H", head)
                        data = b""
                        while len(data) < n:
                            chunk = conn.recv(n - len(data))
                            if not chunk:
                                break
                            data += chunk
                        out = self.answer(data)
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    pass

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def __enter__(self) -> ZoneServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
