"""The asyncio SMTP/LMTP client (pymaddy/targets/smtpclient.py).

Against a scripted in-process server (STARTTLS with a self-signed certificate,
AUTH, LMTP per-recipient replies, error replies) and against Postfix's
`smtp-sink` for dot-stuffing and large messages (RFC 5321 §4.5.2).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.interfaces import PartialDelivery
from pymaddy.targets.smtp import LMTPTarget, SMTPTarget, map_error
from pymaddy.targets.smtpclient import SMTPClient, TLSError, dot_stuff, parse_reply
from pymaddy.tls.loaders import load_into, make_self_signed
from tests.runtime_helpers import bare_context, compile_graph

SINK = "/usr/sbin/smtp-sink"


# bytes mapped onto the few that matter to stuffing: '.', CR, LF and one ordinary letter
_FEW = bytes(b".\r\na"[i % 4] for i in range(256))


def stuffed(data: bytes, chunk: int = 3) -> bytes:
    return b"".join(dot_stuff(data[i : i + chunk] for i in range(0, len(data), chunk)))


def test_dot_stuffing_and_line_endings() -> None:
    assert stuffed(b".a\r\nb\n..c\r\n") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert stuffed(b"no newline") == b"no newline\r\n.\r\n"
    assert stuffed(b".") == b"..\r\n.\r\n"
    assert stuffed(b"") == b".\r\n"
    assert stuffed(b"x\r\n.\r\ny\r\n", chunk=1) == b"x\r\n..\r\ny\r\n.\r\n"


def reference_dot_stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The straightforward per-line version dot_stuff must stay equivalent to."""
    carry = b""
    for chunk in chunks:
        lines = (carry + chunk).split(b"\n")
        carry = lines.pop()
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            yield (b"." if line.startswith(b".") else b"") + line + b"\r\n"
    if carry:
        carry = carry[:-1] if carry.endswith(b"\r") else carry
        yield (b"." if carry.startswith(b".") else b"") + carry + b"\r\n"
    yield b".\r\n"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=12).map(lambda b: b.translate(_FEW)), max_size=8))
def test_dot_stuffing_matches_the_per_line_reference(chunks: list[bytes]) -> None:
    # any split of the same bytes into chunks gives the reference's output
    assert b"".join(dot_stuff(iter(chunks))) == b"".join(reference_dot_stuff(iter(chunks)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.translate(_FEW)), st.integers(1, 50))
def test_dot_stuffing_ignores_chunk_boundaries(data: bytes, size: int) -> None:
    assert stuffed(data, size) == b"".join(reference_dot_stuff([data]))


def test_reply_parsing_strips_repeated_enhanced_code() -> None:
    r = parse_reply([b"550-5.7.1 first\r\n", b"550 5.7.1 second\r\n"])
    assert (r.code, r.enhanced, r.text) == (550, (5, 7, 1), "first\nsecond")
    plain = parse_reply([b"421 closing\r\n"])
    assert plain.enhanced is None
    err = plain.error("mx")
    assert (err.code, err.enhanced, err.message, err.fields) == (421, (4, 0, 0), "closing", {"remote_server": "mx"})


def test_552_is_rewritten_to_452() -> None:
    e = map_error(SMTPError(552, (5, 2, 2), "full"), "target.smtp")
    assert (e.code, e.enhanced, e.message, e.target) == (452, (4, 2, 2), "full", "target.smtp")
    other = map_error(RuntimeError("TLS required but unsupported by downstream"), "target.smtp")
    assert (other.code, other.enhanced, other.message) == (451, (4, 0, 0), "Internal server error")


# -- a scripted server -----------------------------------------------------------------------------


@dataclass
class Fake:
    lmtp: bool = False
    tls: ssl.SSLContext | None = None
    users: dict[str, str] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    auth_as: list[str] = field(default_factory=list)
    greet: bool = True
    pipelining: bool = False  # advertise PIPELINING and answer MAIL only once the next command is in

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        if not self.greet:
            await reader.read()
            return
        await send("220 fake ESMTP")
        tls_on = False
        rcpts: list[str] = []
        pending: list[str] = []
        while True:
            line = pending.pop(0) if pending else (await reader.readline()).decode().rstrip("\r\n")
            if not line:
                return
            self.seen.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "LHLO"):
                ext = ["8BITMIME", "SIZE 1000000", "ENHANCEDSTATUSCODES", "AUTH PLAIN LOGIN"]
                if self.pipelining:
                    ext.insert(0, "PIPELINING")
                if self.tls is not None and not tls_on:
                    ext.append("STARTTLS")
                await send("\r\n".join(["250-fake"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"]))
            elif verb == "STARTTLS" and self.tls is not None:
                await send("220 2.0.0 Ready")
                await writer.start_tls(self.tls)
                tls_on = True
            elif verb == "AUTH":
                parts = line.split(" ")
                if parts[1] == "LOGIN":
                    await send("334 VXNlcm5hbWU6")
                    user = base64.b64decode(await reader.readline()).decode()
                    await send("334 UGFzc3dvcmQ6")
                    pw = base64.b64decode(await reader.readline()).decode()
                else:
                    _, user, pw = base64.b64decode(parts[2]).decode().split("\0")
                if self.users.get(user) == pw:
                    self.auth_as.append(user)
                    await send("235 2.7.0 Authentication succeeded")
                else:
                    await send("535 5.7.8 Invalid credentials")
            elif verb == "MAIL":
                rcpts = []
                if self.pipelining:  # a lockstep client would wait here for ever
                    pending.append((await reader.readline()).decode().rstrip("\r\n"))
                if "multi" in line:
                    await send("550-5.7.1 line one\r\n550 5.7.1 line two")
                else:
                    await send("250 2.0.0 OK")
            elif verb == "RCPT":
                if "unknown" in line:
                    await send("550 5.1.1 No such user")
                else:
                    rcpts.append(line)
                    await send("250 2.0.0 OK")
            elif verb == "DATA":
                await send("354 go ahead")
                data = bytearray()
                while True:
                    dl = await reader.readline()
                    if dl == b".\r\n":
                        break
                    data += dl[1:] if dl.startswith(b".") else dl
                self.messages.append(bytes(data))
                if not self.lmtp:
                    await send("250 2.0.0 OK: queued")
                for r in rcpts if self.lmtp else []:
                    await send("452 4.2.2 Mailbox full" if "full" in r else "250 2.0.0 delivered")
            elif verb in ("RSET", "NOOP"):
                rcpts = []
                await send("250 2.0.0 OK")
            elif verb == "QUIT":
                await send("221 2.0.0 Bye")
                return
            else:
                await send("502 5.5.2 Unknown command")


@asynccontextmanager
async def serve(fake: Fake) -> AsyncIterator[int]:
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


def cert_pair() -> tuple[ssl.SSLContext, str]:
    pair = make_self_signed(["localhost", "127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_into(ctx, pair)
    return ctx, pair.leaf.public_bytes(serialization.Encoding.PEM).decode()


def test_starttls_with_self_signed_cert() -> None:
    server_ctx, pem = cert_pair()

    async def main() -> None:
        fake = Fake(tls=server_ctx)
        async with serve(fake) as port:
            good = ssl.create_default_context(cadata=pem)
            cl = SMTPClient(hostname="client.test")
            await cl.connect("127.0.0.1", port, server_name="localhost")
            await cl.hello()
            assert cl.supports("starttls")
            await cl.starttls(good)
            await cl.hello()
            assert cl.tls and not cl.supports("STARTTLS")
            await cl.mail("a@example.org")
            await cl.rcpt("b@example.net")
            await cl.data(b"Subject: t\r\n", b"secret\r\n")
            await cl.quit()
            assert fake.messages == [b"Subject: t\r\n\r\nsecret\r\n"]
            assert fake.seen.count("EHLO client.test") == 2

            untrusted = ssl.create_default_context()
            cl = SMTPClient()
            await cl.connect("127.0.0.1", port, server_name="localhost")
            await cl.hello()
            with pytest.raises(TLSError):
                await cl.starttls(untrusted)
            await cl.close()

    asyncio.run(main())


def test_auth_plain_login_and_refusal() -> None:
    async def main() -> None:
        fake = Fake(users={"u@example.org": "pw"})
        async with serve(fake) as port:
            for mech in ("PLAIN", "LOGIN"):
                cl = SMTPClient()
                await cl.connect("127.0.0.1", port)
                await cl.hello()
                await cl.auth(mech, "u@example.org", "pw")
                await cl.quit()
            cl = SMTPClient()
            await cl.connect("127.0.0.1", port)
            await cl.hello()
            with pytest.raises(SMTPError) as ei:
                await cl.auth("PLAIN", "u@example.org", "wrong")
            assert (ei.value.code, ei.value.enhanced, ei.value.message) == (535, (5, 7, 8), "Invalid credentials")
            await cl.quit()
        assert fake.auth_as == ["u@example.org", "u@example.org"]

    asyncio.run(main())


def test_error_replies_carry_codes() -> None:
    async def main() -> None:
        fake = Fake()
        async with serve(fake) as port:
            cl = SMTPClient()
            await cl.connect("127.0.0.1", port)
            await cl.hello()
            with pytest.raises(SMTPError) as ei:
                await cl.mail("multi@example.org")
            assert (ei.value.code, ei.value.enhanced, ei.value.message) == (550, (5, 7, 1), "line one\nline two")
            await cl.rset()
            await cl.mail("a@example.org", size=10, body_8bit=True)
            assert fake.seen[-1] == "MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=10"
            with pytest.raises(SMTPError) as ei:
                await cl.rcpt("unknown@example.net")
            assert (ei.value.code, ei.value.enhanced) == (550, (5, 1, 1))
            with pytest.raises(SMTPError) as ei:
                await cl.mail("b@example.org", smtputf8=True)
            assert ei.value.code == 550
            await cl.quit()

    asyncio.run(main())


def test_mail_and_first_rcpt_are_pipelined_and_answered_in_order() -> None:
    async def main() -> None:
        fake = Fake(pipelining=True)
        async with serve(fake) as port:
            cl = SMTPClient(command_timeout=10)
            await cl.connect("127.0.0.1", port)
            await cl.hello()
            assert cl.supports("PIPELINING")
            # RFC 2920: RCPT went out before MAIL's reply came back (the fake waits for it)
            assert await cl.mail_rcpt("a@example.org", "one@example.net", size=5) is None
            assert fake.seen[-2:] == ["MAIL FROM:<a@example.org> SIZE=5", "RCPT TO:<one@example.net>"]
            await cl.rcpt("two@example.net")
            assert cl.rcpts == ["one@example.net", "two@example.net"]
            await cl.data(b"Subject: p\r\n", b"hi\r\n")
            # a refused recipient is returned, not raised: the transaction goes on
            err = await cl.mail_rcpt("a@example.org", "unknown@example.net")
            assert err is not None and (err.code, err.enhanced, err.message) == (550, (5, 1, 1), "No such user")
            assert cl.rcpts == []
            await cl.rset()
            # a refused MAIL is raised; the RCPT reply behind it is read too (the next command works)
            with pytest.raises(SMTPError) as ei:
                await cl.mail_rcpt("multi@example.org", "one@example.net")
            assert (ei.value.code, ei.value.enhanced) == (550, (5, 7, 1))
            await cl.noop()
            await cl.quit()
        assert fake.messages == [b"Subject: p\r\n\r\nhi\r\n"]

    asyncio.run(main())


def test_mail_rcpt_is_lockstep_without_pipelining() -> None:
    async def main() -> None:
        fake = Fake()
        async with serve(fake) as port:
            cl = SMTPClient(command_timeout=10)
            await cl.connect("127.0.0.1", port)
            await cl.hello()
            assert not cl.supports("PIPELINING")
            assert await cl.mail_rcpt("a@example.org", "one@example.net") is None
            err = await cl.mail_rcpt("a@example.org", "unknown@example.net")
            assert err is not None and err.code == 550
            with pytest.raises(SMTPError) as ei:
                await cl.mail_rcpt("multi@example.org", "one@example.net")
            assert ei.value.code == 550
            await cl.quit()
        # MAIL refused: no RCPT was sent after it
        assert fake.seen[-3:] == ["RCPT TO:<unknown@example.net>", "MAIL FROM:<multi@example.org>", "QUIT"]

    asyncio.run(main())


def test_network_errors_and_timeouts() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(SMTPError) as ei:
            await SMTPClient().connect("127.0.0.1", port)
        assert (ei.value.code, ei.value.enhanced, ei.value.message) == (450, (4, 4, 2), "Network I/O error")
        async with serve(Fake(greet=False)) as p:
            cl = SMTPClient(command_timeout=0.2)
            with pytest.raises(SMTPError) as ei:
                await cl.connect("127.0.0.1", p)
            assert ei.value.reason == "i/o timeout"
            await cl.close()

    asyncio.run(main())


def test_lmtp_reports_each_recipient() -> None:
    async def main() -> None:
        fake = Fake(lmtp=True)
        async with serve(fake) as port:
            cl = SMTPClient(lmtp=True, hostname="client.test")
            await cl.connect("127.0.0.1", port)
            await cl.hello()
            assert fake.seen[0] == "LHLO client.test"
            await cl.mail("a@example.org")
            for r in ("one@example.net", "full@example.net", "two@example.net"):
                await cl.rcpt(r)
            got: list[tuple[str, int | None]] = []
            await cl.lmtp_data(b"Subject: x\r\n", b"hi\r\n", lambda r, e: got.append((r, e.code if e else None)))
            await cl.quit()
        assert got == [("one@example.net", None), ("full@example.net", 452), ("two@example.net", None)]

    asyncio.run(main())


# -- Postfix smtp-sink ------------------------------------------------------------------------------


@contextmanager
def run_sink(tmp: Path, *flags: str) -> Iterator[tuple[int, Path]]:
    """smtp-sink on a free port, dumping each message into its own file under tmp/dump."""
    if shutil.which(SINK) is None:
        pytest.skip("smtp-sink is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = tmp / "dump"
    dump.mkdir()
    proc = subprocess.Popen(
        [SINK, *flags, "-u", "root", "-d", f"{dump}/%M.", f"127.0.0.1:{port}", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port, dump
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with run_sink(tmp_path) as s:
        yield s


def _dumped(dump: Path) -> bytes:
    deadline = time.monotonic() + 10
    while not list(dump.iterdir()):
        assert time.monotonic() < deadline, "smtp-sink wrote no dump"
        time.sleep(0.05)
    [f] = list(dump.iterdir())
    return f.read_bytes()


def test_smtp_sink_dot_stuffing_and_large_message(sink: tuple[int, Path]) -> None:
    port, dump = sink
    lines = [b".leading dot", b"..two dots", b".", b"plain"] * 20000
    lines.append(b"x" * 900)
    body = b"\r\n".join(lines) + b"\r\n"  # about 500 KB with many dot lines

    async def main() -> None:
        cl = SMTPClient(hostname="client.test")
        await cl.connect("127.0.0.1", port)
        await cl.hello()
        await cl.mail("a@example.org", size=len(body))
        await cl.rcpt("b@example.net")
        reply = await cl.data(b"Subject: big\r\n", body)
        assert reply.code == 250
        await cl.quit()

    asyncio.run(main())
    got = _dumped(dump).replace(b"\r\n", b"\n")
    assert b"X-Helo-Args: client.test\n" in got
    assert got.split(b"Subject: big\n\n", 1)[1].rstrip(b"\n") == body.replace(b"\r\n", b"\n").rstrip(b"\n")


# -- the target.smtp / target.lmtp modules ---------------------------------------------------------


async def make_target(tmp: Path, inline: str, block: str = "") -> SMTPTarget:
    """The module as `deliver_to smtp|lmtp ENDPOINT… { block }` inside an endpoint defines it."""
    route = f"deliver_to {inline} {{\n{block}\n}}"
    glob = f"state_dir {tmp}\nruntime_dir {tmp}\nhostname mx.example.org\ntls off\n"
    text = glob + f"smtp tcp://127.0.0.1:1 {{\n{route}\n}}\n"
    g = compile_graph(text, strict=True)
    ctx = bare_context(g, str(tmp))
    [inst] = [i for i in g.instances if i.name in ("target.smtp", "target.lmtp")]
    target = LMTPTarget(inst, ctx) if inst.name == "target.lmtp" else SMTPTarget(inst, ctx)
    await target.start()
    return target


def meta(user: str = "", password: str = "") -> MsgMeta:
    return MsgMeta(conn=ConnInfo(remote_ip="127.0.0.1", auth_user=user, auth_password=password))


async def send_via(target: SMTPTarget, m: MsgMeta, rcpts: list[str]) -> None:
    d = await target.start_delivery(m, "alice@example.org")
    try:
        for r in rcpts:
            await d.add_rcpt(r)
        await d.body(Header.parse(b"Subject: t\r\n"), Body(b".dot\r\n"))
    except BaseException:
        await d.abort()
        raise
    await d.commit()


def test_target_auth_forward_plain_and_missing_credentials(tmp_path: Path) -> None:
    async def main() -> None:
        fake = Fake(users={"u@example.org": "pw", "fixed": "secret"})
        async with serve(fake) as port:
            fwd = await make_target(tmp_path, f"smtp tcp://127.0.0.1:{port}", "starttls no\nauth forward")
            await send_via(fwd, meta("u@example.org", "pw"), ["b@example.net"])
            with pytest.raises(SMTPError) as ei:
                await send_via(fwd, meta(), ["b@example.net"])
            assert (ei.value.code, ei.value.enhanced, ei.value.message) == (
                530,
                (5, 7, 0),
                "Authentication is required",
            )
            plain = await make_target(tmp_path, f"smtp tcp://127.0.0.1:{port}", "starttls no\nauth plain fixed secret")
            await send_via(plain, meta(), ["b@example.net"])
            bad = await make_target(tmp_path, f"smtp tcp://127.0.0.1:{port}", "starttls no\nauth plain fixed nope")
            with pytest.raises(SMTPError) as ei:
                await send_via(bad, meta(), ["b@example.net"])
            assert (ei.value.code, ei.value.enhanced, ei.value.target) == (535, (5, 7, 8), "target.smtp")
        assert fake.auth_as == ["u@example.org", "fixed"]
        assert fake.messages == [b"Subject: t\r\n\r\n.dot\r\n"] * 2

    asyncio.run(main())


def test_target_starttls_is_mandatory_and_verified(tmp_path: Path) -> None:
    server_ctx, pem = cert_pair()
    (tmp_path / "ca.pem").write_text(pem)

    async def main() -> None:
        async with serve(Fake()) as port:
            t = await make_target(tmp_path, f"smtp tcp://127.0.0.1:{port}")
            with pytest.raises(SMTPError) as ei:
                await send_via(t, meta(), ["b@example.net"])
            assert (ei.value.code, ei.value.enhanced, ei.value.message) == (451, (4, 0, 0), "Internal server error")
            assert ei.value.reason == "TLS required but unsupported by downstream"
        fake = Fake(tls=server_ctx)
        async with serve(fake) as port:
            untrusted = await make_target(tmp_path, f"smtp tcp://127.0.0.1:{port}")
            with pytest.raises(SMTPError) as ei:
                await send_via(untrusted, meta(), ["b@example.net"])
            assert ei.value.code == 451
            block = f"tls_client {{\n root_ca {tmp_path}/ca.pem\n }}"
            t = await make_target(tmp_path, f"smtp tcp://127.0.0.1:{port}", block)
            await send_via(t, meta(), ["b@example.net"])
        assert len(fake.messages) == 1

    asyncio.run(main())


def test_target_implicit_tls_endpoint(tmp_path: Path) -> None:
    server_ctx, pem = cert_pair()
    (tmp_path / "ca.pem").write_text(pem)

    async def main() -> None:
        fake = Fake()
        server = await asyncio.start_server(fake.handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            # as in maddy, `starttls` still applies on tls:// (the server would have to offer it again)
            block = f"starttls no\ntls_client {{\n root_ca {tmp_path}/ca.pem\n }}"
            t = await make_target(tmp_path, f"smtp tls://127.0.0.1:{port}", block)
            await send_via(t, meta(), ["b@example.net"])
            m = meta()
            m.requiretls = True
            with pytest.raises(SMTPError) as ei:
                await send_via(t, m, ["b@example.net"])
            assert (ei.value.code, ei.value.reason) == (451, "smtp: server does not support REQUIRETLS")
        finally:
            server.close()
            await server.wait_closed()
        assert len(fake.messages) == 1

    asyncio.run(main())


def test_target_tries_endpoints_in_order_and_unix_sockets(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    path = str(tmp_path / "lmtp.sock")

    async def main() -> None:
        fake = Fake(lmtp=True)
        server = await asyncio.start_unix_server(fake.handle, path)
        try:
            t = await make_target(tmp_path, f"lmtp tcp://127.0.0.1:{dead} unix://{path}")
            await send_via(t, meta(), ["b@example.net"])
        finally:
            server.close()
            await server.wait_closed()
        assert fake.seen[0] == "LHLO mx.example.org" and len(fake.messages) == 1

    asyncio.run(main())


def test_target_lmtp_per_recipient_status(tmp_path: Path) -> None:
    async def main() -> None:
        fake = Fake(lmtp=True)
        async with serve(fake) as port:
            t = await make_target(tmp_path, f"lmtp tcp://127.0.0.1:{port}")
            d = await t.start_delivery(meta(), "alice@example.org")
            assert isinstance(d, PartialDelivery)
            for r in ("one@example.net", "full@example.net"):
                await d.add_rcpt(r)
            with pytest.raises(SMTPError) as ei:
                await d.add_rcpt("unknown@example.net")
            assert (ei.value.code, ei.value.enhanced, ei.value.message) == (550, (5, 1, 1), "No such user")
            got: dict[str, SMTPError | None] = {}
            await d.body_non_atomic(got.__setitem__, Header.parse(b"Subject: t\r\n"), Body(b"hi\r\n"))
            await d.commit()
            assert got["one@example.net"] is None
            err = got["full@example.net"]
            assert err is not None and (err.code, err.enhanced, err.message) == (452, (4, 2, 2), "Mailbox full")
            # through plain body(): one failed recipient fails the message with its own error
            with pytest.raises(SMTPError) as ei:
                await send_via(t, meta(), ["full@example.net", "two@example.net"])
            assert (ei.value.code, ei.value.message) == (452, "Mailbox full")

    asyncio.run(main())


def test_smtp_sink_lmtp_mode(tmp_path: Path) -> None:
    with run_sink(tmp_path, "-L") as (port, dump):

        async def main() -> list[tuple[str, SMTPError | None]]:
            got: list[tuple[str, SMTPError | None]] = []
            cl = SMTPClient(lmtp=True, hostname="client.test")
            await cl.connect("127.0.0.1", port)
            await cl.hello()
            await cl.mail("a@example.org")
            await cl.rcpt("one@example.net")
            await cl.rcpt("two@example.net")
            await cl.lmtp_data(b"Subject: l\r\n", b"..x\r\n", lambda r, e: got.append((r, e)))
            await cl.quit()
            return got

        assert asyncio.run(main()) == [("one@example.net", None), ("two@example.net", None)]
        got = _dumped(dump).replace(b"\r\n", b"\n")
    assert b"X-Client-Proto: LMTP\n" in got and got.endswith(b"Subject: l\n\n..x\n\n")
