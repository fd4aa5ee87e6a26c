"""check.milter and the milter protocol client (spec §B.4; maddy's internal/check/milter, go-milter).

A tiny milter filter written here (asyncio, unix socket) records what the client
sends and answers per stage as each test scripts it; the real OpenDKIM filter
(Debian's `opendkim`) signs through the protocol, and the DKIM-Signature it
asks to insert is checked by pymaddy's check.dkim against the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pymaddy.checks.milter import MilterCheck
from pymaddy.dkim.keys import dns_record, load_key
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import ConnInfo, Header, MsgMeta
from pymaddy.milter import client as mc
from pymaddy.pipeline.groups import CheckGroup
from pymaddy.pipeline.interfaces import CheckResult
from pymaddy.pipeline.runner import PipelineRunner
from pymaddy.runtime.module import Module
from tests.confhelp import errors_of
from tests.runtime_helpers import bare_context, compile_graph
from tests.unit.test_check_command import Recorder
from tests.unit.test_dkim_helpers import MESSAGE, build, join_message, split_message
from tests.unit.test_dkim_opendkim import DATA, check_with_pymaddy

Reply = list[tuple[str, bytes]]
Script = Callable[[str, bytes], Reply | None]


class FakeMilter:
    """A filter on a unix socket. `script(cmd, data)` returns the replies to a command
    (None: the default — continue, or only the final continue at end-of-message)."""

    def __init__(self, script: Script | None = None, actions: int = 0x3F, proto: int = 0) -> None:
        self.script = script or (lambda cmd, data: None)
        self.actions = actions
        self.proto = proto
        self.dir = tempfile.mkdtemp(prefix="mlt")
        self.path = f"{self.dir}/m.sock"
        self.received: list[tuple[str, bytes]] = []
        self.optneg: tuple[int, int, int] | None = None
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeMilter:
        self.server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await asyncio.sleep(0.05)  # let the handler read the client's last packets
        self.server.close()
        await self.server.wait_closed()
        shutil.rmtree(self.dir, ignore_errors=True)

    def cmds(self) -> list[str]:
        return [c for c, _ in self.received]

    def data(self, cmd: str) -> list[bytes]:
        return [d for c, d in self.received if c == cmd]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (n,) = struct.unpack(">I", await r.readexactly(4))
                pkt = await r.readexactly(n)
                cmd, data = chr(pkt[0]), pkt[1:]
                self.received.append((cmd, data))
                replies: Reply
                if cmd == "O":
                    self.optneg = struct.unpack(">III", data)
                    replies = [("O", struct.pack(">III", 6, self.actions, self.proto))]
                elif cmd == "Q":
                    break
                elif cmd in "DAK":
                    continue
                else:
                    replies = self.script(cmd, data) or [("c", b"")]
                    if cmd == "R" and self.proto & mc.OPT_NR_RCPT:
                        replies = []
                for code, payload in replies:
                    w.write(struct.pack(">I", len(payload) + 1) + code.encode() + payload)
                await w.drain()
        w.close()


def make_meta(**conn: object) -> MsgMeta:
    info = ConnInfo(remote_ip="192.0.2.1", remote_port=4000, helo="mx.example.net", auth_user="alice")
    for k, v in conn.items():
        setattr(info, k, v)
    return MsgMeta(id="0123abcd", conn=info)


def milter_check(tmp: Path, endpoint: str, extra: str = "") -> MilterCheck:
    line = f"endpoint {endpoint}\n" if endpoint else ""
    chk, _ = build(f"check.milter {{\n{line}{extra}\n}}\n", tmp, "check.milter", MilterCheck)
    return chk


async def transaction(chk: MilterCheck, meta: MsgMeta | None = None, message: bytes = MESSAGE) -> list[CheckResult]:
    st = await chk.state_for_msg(meta or make_meta())
    try:
        out = [await st.check_connection(), await st.check_sender("alice@example.org")]
        out.append(await st.check_rcpt("bob@example.net"))
        out.append(await st.check_rcpt("carol@example.net"))
        header, body = split_message(message)
        out.append(await st.check_body(header, body))
    finally:
        await st.close()
    return out


def reject_of(res: CheckResult) -> tuple[int, str, str] | None:
    return None if res.reject is None else (res.reject.code, res.reject.enhanced_str, res.reject.message)


# -- the protocol as the filter sees it ------------------------------------------------------


def test_stages_macros_and_modifications(tmp_path: Path) -> None:
    def script(cmd: str, data: bytes) -> Reply | None:
        if cmd == "E":
            return [
                ("p", b""),
                ("h", b"X-Added\0first\0"),
                ("i", struct.pack(">I", 1) + b"X-Inserted\0folded\n\tvalue\0"),
                ("m", struct.pack(">I", 1) + b"Subject\0changed\0"),
                ("+", b"<eve@example.net>\0"),
                ("q", b"looks odd\0"),
                ("c", b""),
            ]
        return None

    async def go() -> tuple[FakeMilter, list[CheckResult]]:
        async with FakeMilter(script) as m:
            res = await transaction(
                milter_check(tmp_path, f"unix://{m.path}"),
                make_meta(tls=True, tls_version="TLSv1.3", tls_cipher="TLS_AES_128_GCM_SHA256"),
            )
            return m, res

    m, res = asyncio.run(go())
    assert m.optneg == (6, mc.OPT_ADD_HEADER | mc.OPT_CHANGE_HEADER | mc.OPT_QUARANTINE, 0)
    assert m.cmds() == ["O", "D", "C", "D", "H", "D", "M", "R", "R"] + ["L"] * 7 + ["N", "B", "E", "Q"]
    macros = m.data("D")
    assert macros[0] == b"Cdaemon_name\0maddy\0if_name\0unknown\0if_addr\x000.0.0.0\0"
    assert macros[1] == b"Htls_version\0TLSv1.3\0cipher\0TLS_AES_128_GCM_SHA256\0"
    assert macros[2] == b"Mi\x000123abcd\0auth_authen\0alice\0"
    assert m.data("C") == [b"mx.example.net\x004" + struct.pack(">H", 4000) + b"192.0.2.1\0"]
    assert m.data("H") == [b"mx.example.net\0"]
    assert m.data("M") == [b"<alice@example.org>\0"]
    assert m.data("R") == [b"<bob@example.net>\0", b"<carol@example.net>\0"]
    headers = m.data("L")
    assert headers[0] == b"From\0Alice <alice@example.org>\0"
    assert headers[2] == b"Subject\0Lunch  tomorrow?\n\tat noon\0"  # folding kept, as LF
    assert m.data("B") == [split_message(MESSAGE)[1].read_all()]

    assert all(r.reject is None for r in res)
    final = res[-1]
    assert final.quarantine
    assert final.reason is not None and final.reason.message == "milter quarantine action"
    assert final.header is not None
    assert final.header.to_bytes() == b"X-Inserted: folded\r\n\tvalue\r\nX-Added: first\r\n"


def test_ipv6_unix_and_local_connections(tmp_path: Path) -> None:
    async def go(meta: MsgMeta) -> FakeMilter:
        async with FakeMilter() as m:
            await transaction(milter_check(tmp_path, f"unix://{m.path}"), meta)
            return m

    m = asyncio.run(go(make_meta(remote_ip="2001:db8::1", remote_port=25)))
    assert m.data("C") == [b"mx.example.net\x006" + struct.pack(">H", 25) + b"2001:db8::1\0"]
    m = asyncio.run(go(make_meta(remote_ip="::ffff:192.0.2.7", remote_port=25)))
    assert m.data("C") == [b"mx.example.net\x004" + struct.pack(">H", 25) + b"192.0.2.7\0"]
    m = asyncio.run(go(make_meta(remote_ip="", is_unix=True)))
    assert m.data("C") == [b"mx.example.net\0L\0"]
    # generated locally: maddy's dummy values, no macros
    m = asyncio.run(go(MsgMeta(conn=ConnInfo())))
    assert m.data("C") == [b"localhost\x004" + struct.pack(">H", 25) + b"127.0.0.1\0"]
    assert m.data("H") == [b"localhost\0"]


@pytest.mark.parametrize(
    ("stage", "reply", "expect", "at"),
    [
        ("R", ("r", b""), (550, "5.7.1", "Message rejected due to local policy"), 2),
        ("M", ("t", b""), (450, "4.7.1", "Message rejected due to local policy"), 1),
        ("M", ("d", b""), (450, "4.7.1", "Message rejected due to local policy"), 1),
        ("C", ("y", b"554 5.7.1 go away\0"), (554, "5.7.1", "Message rejected due to local policy"), 0),
        ("H", ("y", b"421 4.3.2 later\0"), (421, "4.7.1", "Message rejected due to local policy"), 0),
        ("L", ("r", b""), (550, "5.7.1", "Message rejected due to local policy"), 4),
        ("B", ("t", b""), (450, "4.7.1", "Message rejected due to local policy"), 4),
        ("E", ("r", b""), (550, "5.7.1", "Message rejected due to local policy"), 4),
    ],
)
def test_verdicts(tmp_path: Path, stage: str, reply: tuple[str, bytes], expect: tuple[int, str, str], at: int) -> None:
    async def go() -> list[CheckResult]:
        async with FakeMilter(lambda cmd, data: [reply] if cmd == stage and b"carol" not in data else None) as m:
            return await transaction(milter_check(tmp_path, f"unix://{m.path}"), make_meta())

    res = asyncio.run(go())
    assert [reject_of(r) for r in res] == [expect if i == at else None for i in range(5)]
    rej = res[at].reject
    assert rej is not None and rej.check == "milter"


def test_accept_skips_the_rest(tmp_path: Path) -> None:
    async def go() -> tuple[FakeMilter, list[CheckResult]]:
        async with FakeMilter(lambda cmd, data: [("a", b"")] if cmd == "H" else None) as m:
            return m, await transaction(milter_check(tmp_path, f"unix://{m.path}"))

    m, res = asyncio.run(go())
    assert all(r.reject is None and not r.quarantine and r.header is None for r in res)
    assert m.cmds() == ["O", "D", "C", "H", "Q"]  # nothing pending: no abort


def test_protocol_options_honoured(tmp_path: Path) -> None:
    """The filter opts out of HELO, headers and the body and will not answer RCPT."""
    proto = mc.OPT_NO_HELO | mc.OPT_NO_HEADERS | mc.OPT_NO_EOH | mc.OPT_NO_BODY | mc.OPT_NR_RCPT

    async def go() -> tuple[FakeMilter, list[CheckResult]]:
        async with FakeMilter(
            lambda cmd, data: [("h", b"X-Seen\0yes\0"), ("c", b"")] if cmd == "E" else None, proto=proto
        ) as m:
            return m, await transaction(milter_check(tmp_path, f"unix://{m.path}"))

    m, res = asyncio.run(go())
    assert m.cmds() == ["O", "D", "C", "D", "M", "R", "R", "E", "Q"]
    assert res[-1].header is not None and res[-1].header.to_bytes() == b"X-Seen: yes\r\n"


def test_abort_sent_for_unfinished_message(tmp_path: Path) -> None:
    async def go() -> FakeMilter:
        async with FakeMilter() as m:
            st = await milter_check(tmp_path, f"unix://{m.path}").state_for_msg(make_meta())
            await st.check_connection()
            await st.check_sender("alice@example.org")
            await st.close()
            await asyncio.sleep(0.05)
            return m

    assert asyncio.run(go()).cmds()[-2:] == ["A", "Q"]


def test_io_errors_and_fail_open(tmp_path: Path) -> None:
    sockdir = tempfile.mkdtemp(prefix="mlt")
    try:
        missing = f"unix://{sockdir}/none.sock"
        res = asyncio.run(transaction(milter_check(tmp_path, missing)))
        assert reject_of(res[0]) == (451, "4.7.1", "I/O error during policy check")
        res = asyncio.run(transaction(milter_check(tmp_path, missing, "fail_open yes")))
        assert all(r.reject is None for r in res)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)

    def hang_up(cmd: str, data: bytes) -> Reply | None:
        if cmd == "R":
            raise ConnectionResetError  # the handler ends: the connection closes
        return None

    async def go(extra: str) -> list[CheckResult]:
        async with FakeMilter(hang_up) as m:
            return await transaction(milter_check(tmp_path, f"unix://{m.path}", extra))

    res = asyncio.run(go(""))
    assert [reject_of(r) is not None for r in res] == [False, False, True, True, True]
    res = asyncio.run(go("fail_open yes"))
    assert all(r.reject is None for r in res)


def test_tcp_endpoint_and_config(tmp_path: Path) -> None:
    async def go() -> list[CheckResult]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    (n,) = struct.unpack(">I", await r.readexactly(4))
                    cmd = chr((await r.readexactly(n))[0])
                    if cmd == "O":
                        w.write(struct.pack(">IcIII", 13, b"O", 6, 0x3F, 0))
                    elif cmd == "M":
                        w.write(struct.pack(">Ic", 1, b"r"))
                    elif cmd not in "DAQ":
                        w.write(struct.pack(">Ic", 1, b"c"))
                    await w.drain()
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            chk = milter_check(tmp_path, "", f"endpoint tcp://127.0.0.1:{port}")
            return await transaction(chk)
        finally:
            srv.close()
            await srv.wait_closed()

    res = asyncio.run(go())
    assert reject_of(res[1]) == (550, "5.7.1", "Message rejected due to local policy")
    assert any("milter endpoint is not set" in e for e in errors_of("check.milter {\n}\n"))
    assert any("scheme unsupported: tls" in e for e in errors_of("checks g {\nmilter tls://127.0.0.1:1\n}\n"))
    assert any("want 1 or 0" in e for e in errors_of("checks g {\nmilter a b\n}\n"))
    graph = compile_graph("checks g {\nmilter unix:///run/m.sock\n}\n")
    (inst,) = graph.blocks["g"].settings["members"]
    assert inst.settings["endpoint"].path == "/run/m.sock"


# -- library helpers --------------------------------------------------------------------------


def test_apply_header_mods_and_replaced_body() -> None:
    hdr = Header.parse(b"Received: x\r\nSubject: a\r\nTo: b\r\nSubject: c\r\n")
    mods = [
        mc.ModifyAction(mc.MOD_CHGHEADER, header_index=2, header_name="Subject", header_value="C2"),
        mc.ModifyAction(mc.MOD_CHGHEADER, header_index=1, header_name="To", header_value=""),
        mc.ModifyAction(mc.MOD_INSHEADER, header_index=0, header_name="Top", header_value="1"),
        mc.ModifyAction(mc.MOD_INSHEADER, header_index=2, header_name="Mid", header_value="2\n\tmore"),
        mc.ModifyAction(mc.MOD_ADDHEADER, header_name="End", header_value="3"),
        mc.ModifyAction(mc.MOD_CHGHEADER, header_index=1, header_name="New", header_value="4"),
    ]
    out = mc.apply_header_mods(hdr, mods)
    assert out.to_bytes() == (
        b"Top: 1\r\nReceived: x\r\nMid: 2\r\n\tmore\r\nSubject: a\r\nSubject: C2\r\nEnd: 3\r\nNew: 4\r\n"
    )
    assert mc.replaced_body(mods) is None
    body = [mc.ModifyAction(mc.MOD_REPLBODY, body=b"a\nb"), mc.ModifyAction(mc.MOD_REPLBODY, body=b"\n")]
    assert mc.replaced_body(body) == b"a\r\nb\r\n"
    assert mc.header_value_for_milter(b"Subject:  two\r\n\tlines\r\n") == " two\n\tlines"


def test_parse_errors() -> None:
    with pytest.raises(mc.MilterError):
        mc.parse_action("y", b"55")
    with pytest.raises(mc.MilterError):
        mc.parse_action("Z", b"")
    with pytest.raises(mc.MilterError):
        mc.parse_modify_action("i", b"\0\0")
    assert mc.parse_action("y", b"451 4.3.0 busy\0") == mc.Action("y", 451, "4.3.0 busy")
    m = mc.parse_modify_action("e", b"<a@b>\0SIZE=10\0")
    assert (m.mail_from, m.from_args) == ("<a@b>", ["SIZE=10"])


# -- the real OpenDKIM filter ----------------------------------------------------------------------


@contextlib.contextmanager
def opendkim(tmp: Path, settings: str) -> Iterator[str]:
    """Run `opendkim -f` with `settings` on a short unix socket; yield the socket path."""
    assert shutil.which("opendkim") or Path("/usr/sbin/opendkim").exists(), "apt-get install opendkim"
    sockdir = Path(tempfile.mkdtemp(prefix="odk"))
    sock = sockdir / "m.sock"
    conf = tmp / "opendkim.conf"
    conf.write_text(f"Syslog no\nBackground no\nSocket local:{sock}\nPidFile {tmp / 'opendkim.pid'}\n" + settings)
    daemon = subprocess.Popen(
        ["opendkim", "-f", "-x", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert daemon.poll() is None, daemon.communicate()[0].decode()
            assert time.monotonic() < deadline, "opendkim did not create its socket"
            time.sleep(0.05)
        yield str(sock)
    finally:
        daemon.kill()
        daemon.communicate()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
def test_opendkim_signs_through_milter(tmp_path: Path, canon: str) -> None:
    key_file = tmp_path / "signing.key"
    shutil.copy(DATA / "rsa2048-pkcs8.key", key_file)
    key_file.chmod(0o600)
    settings = (
        f"Mode s\nDomain example.org\nSelector sel\nKeyFile {key_file}\nCanonicalization {canon}\n"
        "SignatureAlgorithm rsa-sha256\nRequireSafeKeys no\n"
    )
    with opendkim(tmp_path, settings) as sock:
        res = asyncio.run(transaction(milter_check(tmp_path, f"unix://{sock}"), make_meta(remote_ip="127.0.0.1")))
    assert all(r.reject is None and not r.quarantine for r in res), res
    added = res[-1].header
    assert added is not None and [n for n, _ in added] == ["DKIM-Signature"]
    header, body = split_message(MESSAGE)
    header.add_raw_top(added)
    signed = join_message(header, body)
    assert signed.startswith(b"DKIM-Signature: v=1;")
    assert b"\r\n\t" in added.to_bytes() and b"\n\t" not in added.to_bytes().replace(b"\r\n", b"")

    zone = {"sel._domainkey.example.org": [dns_record(load_key(str(key_file)))]}
    check = check_with_pymaddy(tmp_path, zone, signed)
    assert [(r.result, r.params.get("header.d")) for r in check.auth_results] == [("pass", "example.org")]
    tampered = check_with_pymaddy(tmp_path, zone, signed.replace(b"noon?", b"one?"))
    assert [r.result for r in tampered.auth_results] == ["fail"]


def test_opendkim_verifier_adds_results(tmp_path: Path) -> None:
    """Verify mode on unsigned mail: OpenDKIM asks to add an Authentication-Results field."""
    settings = "Mode v\nAlwaysAddARHeader yes\nAuthservID mx.test\n"
    with opendkim(tmp_path, settings) as sock:
        res = asyncio.run(transaction(milter_check(tmp_path, f"unix://{sock}"), make_meta()))
    assert all(r.reject is None and not r.quarantine for r in res), res
    added = res[-1].header
    assert added is not None
    assert (added.get("Authentication-Results") or "").startswith("mx.test; dkim=none")


def test_opendkim_signs_only_for_internal_clients(tmp_path: Path) -> None:
    """OpenDKIM signs for clients in its InternalHosts (from the connect command's address) only.
    (It recognises authenticated clients by the `{auth_type}` macro, which maddy does not send.)"""
    key_file = tmp_path / "signing.key"
    shutil.copy(DATA / "rsa2048-pkcs8.key", key_file)
    key_file.chmod(0o600)
    settings = f"Mode s\nDomain example.org\nSelector sel\nKeyFile {key_file}\nRequireSafeKeys no\n"
    with opendkim(tmp_path, settings) as sock:
        chk = milter_check(tmp_path, f"unix://{sock}")
        authed = asyncio.run(transaction(chk, make_meta(remote_ip="::ffff:127.0.0.1")))
        anon = asyncio.run(transaction(chk, make_meta(remote_ip="192.0.2.1")))
    assert authed[-1].header is not None and [n for n, _ in authed[-1].header] == ["DKIM-Signature"]
    assert anon[-1].header is None and all(r.reject is None for r in anon)


# -- through the pipeline ------------------------------------------------------------------------


async def through_pipeline(
    tmp: Path, check: str, classes: dict[str, type[Module]], meta: MsgMeta | None = None
) -> tuple[SMTPError | None, list[tuple[bytes, bool]]]:
    """One message through an smtp endpoint's pipeline with `check` in its check block."""
    text = (
        f"state_dir {tmp}\nruntime_dir {tmp}\nhostname mx.example.net\ntls off\ndummy t\n"
        f"smtp tcp://127.0.0.1:1 {{\n check {{\n{check}\n }}\n deliver_to &t\n}}\n"
    )
    g = compile_graph(text, strict=True)
    ctx = bare_context(g, str(tmp))
    target = Recorder()
    for inst in g.instances:
        obj: Any
        if inst.name == "dummy":
            obj = target
        elif inst.name == "checks":
            obj = CheckGroup(inst, ctx)
        elif inst.name in classes:
            obj = classes[inst.name](inst, ctx)
        else:
            continue
        if isinstance(obj, Module):
            await obj.start()
        ctx.objects[id(inst)] = obj
    runner = PipelineRunner(g.endpoints[0].settings["pipeline"], ctx, ctx.logger, "mx.example.net")
    header, body = split_message(MESSAGE)
    d = await runner.start_delivery(meta or make_meta(), "alice@example.org")
    try:
        await d.add_rcpt("bob@example.net")
        await d.body(header, body)
        await d.commit()
    except SMTPError as e:
        await d.abort()
        return e, target.messages
    return None, target.messages


def test_pipeline_with_fake_milter(tmp_path: Path) -> None:
    def script(cmd: str, data: bytes) -> Reply | None:
        if cmd == "E":
            return [("i", struct.pack(">I", 1) + b"X-Milter\0seen\0"), ("q", b"odd\0"), ("c", b"")]
        return None

    async def go() -> tuple[SMTPError | None, list[tuple[bytes, bool]], FakeMilter]:
        async with FakeMilter(script) as m:
            err, msgs = await through_pipeline(tmp_path, f"  milter unix://{m.path}", {"check.milter": MilterCheck})
            return err, msgs, m

    err, msgs, m = asyncio.run(go())
    assert err is None
    [(header, quarantined)] = msgs
    assert quarantined
    assert b"X-Milter: seen\r\n" in header and header.index(b"X-Milter:") < header.index(b"From: Alice")
    assert m.cmds()[-1] == "Q"

    async def rejecting() -> SMTPError | None:
        async with FakeMilter(lambda cmd, data: [("r", b"")] if cmd == "R" else None) as m:
            err, msgs = await through_pipeline(tmp_path, f"  milter unix://{m.path}", {"check.milter": MilterCheck})
            assert msgs == []
            return err

    err = asyncio.run(rejecting())
    assert err is not None and (err.code, err.enhanced_str) == (550, "5.7.1")


def test_pipeline_with_opendkim_signer(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.key"
    shutil.copy(DATA / "rsa2048-pkcs8.key", key_file)
    key_file.chmod(0o600)
    settings = f"Mode s\nDomain example.org\nSelector sel\nKeyFile {key_file}\nRequireSafeKeys no\n"
    with opendkim(tmp_path, settings) as sock:
        err, msgs = asyncio.run(
            through_pipeline(
                tmp_path, f"  milter unix://{sock}", {"check.milter": MilterCheck}, make_meta(remote_ip="127.0.0.1")
            )
        )
    assert err is None
    [(header, quarantined)] = msgs
    assert not quarantined
    signed = header + b"\r\n" + split_message(MESSAGE)[1].read_all()
    zone = {"sel._domainkey.example.org": [dns_record(load_key(str(key_file)))]}
    check = check_with_pymaddy(tmp_path, zone, signed)
    assert [r.result for r in check.auth_results] == ["pass"]
