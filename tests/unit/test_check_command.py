"""check.command with small shell scripts (spec §B.4; maddy's internal/check/command)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pymaddy.checks.command import CommandCheck, parse_header_block
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.groups import CheckGroup
from pymaddy.pipeline.interfaces import CheckResult, Delivery, DeliveryTarget
from pymaddy.pipeline.runner import PipelineRunner
from pymaddy.runtime.module import Module, ModuleError
from tests.runtime_helpers import bare_context, compile_graph

HEADER = Header.parse(b"From: a@example.org\r\nSubject: hi\r\n")
BODY = b"Hello\r\nworld\r\n"


def script(tmp_path: Path, body: str, name: str = "chk.sh") -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def make_meta() -> MsgMeta:
    return MsgMeta(
        id="0123abcd",
        conn=ConnInfo(
            remote_ip="192.0.2.1", remote_port=4000, helo="mx.example.net", rdns="ptr.example.net", auth_user="alice"
        ),
    )


@asynccontextmanager
async def command(line: str, libexec: str = "/nonexistent") -> AsyncIterator[CommandCheck]:
    graph = compile_graph(f"checks g {{\n{line}\n}}\n")
    (inst,) = graph.blocks["g"].settings["members"]
    ctx = bare_context(graph, libexec=libexec)
    chk = CommandCheck(inst, ctx)
    await chk.start()
    try:
        yield chk
    finally:
        await chk.stop()


async def transaction(chk: CommandCheck, meta: MsgMeta | None = None) -> list[CheckResult]:
    """conn, sender, two rcpts, body — every stage's result in order."""
    st = await chk.state_for_msg(meta or make_meta())
    out = [await st.check_connection(), await st.check_sender("bob@example.org")]
    out.append(await st.check_rcpt("c1@example.com"))
    out.append(await st.check_rcpt("c2@example.com"))
    out.append(await st.check_body(HEADER.copy(), Body(BODY)))
    return out


def run_on(line: str, stage: str) -> list[CheckResult]:
    async def go() -> list[CheckResult]:
        async with command(line) as chk:
            assert chk.stage == stage
            return await transaction(chk)

    return asyncio.run(go())


def text(e: SMTPError | None) -> str:
    assert e is not None
    return f"{e.code} {e.enhanced_str} {e.message}"


def clean(res: CheckResult) -> bool:
    return res.reject is None and not res.quarantine and res.reason is None and res.header is None


ALL_PLACEHOLDERS = "{source_ip} {source_host} {source_rdns} {msg_id} {auth_user} {sender} {rcpts} {address} {nope}"


@pytest.mark.parametrize(
    ("stage", "index", "expected"),
    [
        ("conn", 0, ["192.0.2.1", "mx.example.net", "ptr.example.net", "0123abcd", "alice", "", "", "", "{nope}"]),
        (
            "sender",
            1,
            [
                "192.0.2.1",
                "mx.example.net",
                "ptr.example.net",
                "0123abcd",
                "alice",
                "bob@example.org",
                "",
                "bob@example.org",
                "{nope}",
            ],
        ),
        (
            "rcpt",
            3,
            [
                "192.0.2.1",
                "mx.example.net",
                "ptr.example.net",
                "0123abcd",
                "alice",
                "bob@example.org",
                "c1@example.com\nc2@example.com",
                "c2@example.com",
                "{nope}",
            ],
        ),
        (
            "body",
            4,
            [
                "192.0.2.1",
                "mx.example.net",
                "ptr.example.net",
                "0123abcd",
                "alice",
                "bob@example.org",
                "c1@example.com\nc2@example.com",
                "",
                "{nope}",
            ],
        ),
    ],
)
def test_stages_and_placeholders(tmp_path: Path, stage: str, index: int, expected: list[str]) -> None:
    log = tmp_path / "args"
    sh = script(tmp_path, f'for a in "$@"; do printf "%s\\0" "$a" >> {log}; done\nprintf "\\001" >> {log}\n')
    results = run_on(f"command {sh} {ALL_PLACEHOLDERS} {{\n run_on {stage}\n}}", stage)
    assert all(clean(r) for r in results), results
    runs = log.read_bytes().split(b"\x01")
    # rcpt runs once per recipient; every other stage once
    calls = [r for r in runs if r]
    assert len(calls) == (2 if stage == "rcpt" else 1)
    assert calls[-1].decode().split("\0")[:-1] == expected


def test_default_stage_is_body_and_stdin_is_the_message(tmp_path: Path) -> None:
    got = tmp_path / "stdin"
    sh = script(tmp_path, f"cat > {got}\n")
    results = run_on(f"command {sh}", "body")
    assert all(clean(r) for r in results)
    assert got.read_bytes() == HEADER.to_bytes() + b"\r\n" + BODY


def test_other_stages_get_empty_stdin(tmp_path: Path) -> None:
    got = tmp_path / "stdin"
    sh = script(tmp_path, f"cat > {got}\n")
    run_on(f"command {sh} {{\n run_on sender\n}}", "sender")
    assert got.read_bytes() == b""


def test_unix_client_has_no_source_ip(tmp_path: Path) -> None:
    log = tmp_path / "args"
    sh = script(tmp_path, f'printf "[%s]" "$1" > {log}\n')

    async def go() -> None:
        async with command(f"command {sh} {{source_ip}} {{\n run_on conn\n}}") as chk:
            st = await chk.state_for_msg(MsgMeta(conn=ConnInfo(remote_ip="", is_unix=True)))
            assert clean(await st.check_connection())

    asyncio.run(go())
    assert log.read_text() == "[]"


@pytest.mark.parametrize(
    ("exit_code", "kind", "reply"),
    [
        (1, "reject", "550 5.7.1 Message rejected for due to a local policy"),
        (2, "quarantine", "550 5.7.1 Message rejected for due to a local policy"),
        (3, "reject", "450 4.0.0 Internal server error"),
        (255, "reject", "450 4.0.0 Internal server error"),
    ],
)
def test_exit_codes(tmp_path: Path, exit_code: int, kind: str, reply: str) -> None:
    sh = script(tmp_path, f"cat > /dev/null\nexit {exit_code}\n")
    res = run_on(f"command {sh}", "body")[-1]
    assert text(res.reason) == reply
    if kind == "reject":
        assert res.reject is res.reason and not res.quarantine
    else:
        assert res.quarantine and res.reject is None


def test_code_overrides(tmp_path: Path) -> None:
    line = (
        "command {sh} {{\n"
        " code 1 quarantine\n"
        ' code 2 reject 451 4.7.1 "Try again later"\n'
        " code 3 ignore\n"
        " code 4 reject 552\n"
        "}}"
    )
    results = {}
    for exit_code in (1, 2, 3, 4):
        sh = script(tmp_path, f"exit {exit_code}\n", name=f"s{exit_code}.sh")
        results[exit_code] = run_on(line.format(sh=sh), "body")[-1]
    r = results[1]
    assert r.quarantine and r.reject is None
    assert text(r.reason) == "550 5.7.1 Message rejected for due to a local policy"
    assert text(results[2].reject) == "451 4.7.1 Try again later"
    r = results[3]  # ignore: logged only
    assert r.reject is None and not r.quarantine and r.reason is not None
    assert text(results[4].reject) == "552 5.7.0 Message rejected due to a local policy"


def test_header_prepend(tmp_path: Path) -> None:
    sh = script(tmp_path, 'cat > /dev/null\nprintf "X-Spam-Score: 5\\nX-Long: a\\n  b\\n\\nignored body\\n"\n')
    res = run_on(f"command {sh}", "body")[-1]
    assert res.reject is None and not res.quarantine
    assert res.header is not None
    assert res.header.to_bytes() == b"X-Spam-Score: 5\r\nX-Long: a\r\n  b\r\n"


def test_header_without_final_empty_line_and_with_quarantine(tmp_path: Path) -> None:
    sh = script(tmp_path, 'cat > /dev/null\nprintf "X-Verdict: junk"\nexit 2\n')
    res = run_on(f"command {sh}", "body")[-1]
    assert res.quarantine
    assert res.header is not None and res.header.to_bytes() == b"X-Verdict: junk\r\n"


def test_malformed_output_is_an_internal_error(tmp_path: Path) -> None:
    sh = script(tmp_path, 'cat > /dev/null\necho "this is not a header"\n')
    res = run_on(f"command {sh}", "body")[-1]
    assert text(res.reject) == "450 4.0.0 Internal server error"
    assert res.header is None


def test_program_that_ignores_stdin(tmp_path: Path) -> None:
    # a big body and a program that never reads it: EPIPE is not an error
    sh = script(tmp_path, "exit 0\n")

    async def go() -> CheckResult:
        async with command(f"command {sh}") as chk:
            st = await chk.state_for_msg(make_meta())
            return await st.check_body(HEADER.copy(), Body(b"x" * (4 * 1024 * 1024)))

    assert clean(asyncio.run(go()))


def test_big_body_from_a_spool_file(tmp_path: Path) -> None:
    spool = tmp_path / "body"
    spool.write_bytes(b"line\r\n" * 200_000)
    sh = script(tmp_path, 'n=$(wc -c)\nprintf "X-Size: %s\\n" "$n"\n')

    async def go() -> CheckResult:
        async with command(f"command {sh}") as chk:
            st = await chk.state_for_msg(make_meta())
            return await st.check_body(HEADER.copy(), Body(path=str(spool)))

    res = asyncio.run(go())
    assert res.header is not None
    size = len(HEADER.to_bytes()) + 2 + 200_000 * 6
    assert res.header.get("X-Size") == str(size)


def test_timeout_kills_the_program(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    sh = script(tmp_path, f"echo $$ > {pidfile}\nexec sleep 30\n")

    async def go() -> CheckResult:
        async with command(f"command {sh} {{\n run_on conn\n}}") as chk:
            chk.timeout = 0.5
            st = await chk.state_for_msg(make_meta())
            return await st.check_connection()

    start = time.monotonic()
    res = asyncio.run(go())
    assert time.monotonic() - start < 10
    assert text(res.reject) == "450 4.0.0 Internal server error"
    assert res.reject is not None and "did not finish" in res.reject.reason
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_killed_by_signal(tmp_path: Path) -> None:
    sh = script(tmp_path, "kill -TERM $$\n")
    res = run_on(f"command {sh} {{\n run_on conn\n}}", "conn")[0]
    assert text(res.reject) == "450 4.0.0 Internal server error"


def test_command_found_in_libexec_then_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libexec = tmp_path / "libexec"
    bindir = tmp_path / "bin"
    libexec.mkdir()
    bindir.mkdir()
    script(libexec, "exit 1\n", name="judge")
    script(bindir, "exit 0\n", name="judge")
    script(bindir, "exit 2\n", name="only-in-path")
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + os.environ.get("PATH", ""))

    async def go(name: str) -> CheckResult:
        async with command(f"command {name}", libexec=str(libexec)) as chk:
            st = await chk.state_for_msg(make_meta())
            return await st.check_body(HEADER.copy(), Body(BODY))

    assert asyncio.run(go("judge")).reject is not None
    assert asyncio.run(go("only-in-path")).quarantine


def test_missing_command_refuses_to_start(tmp_path: Path) -> None:
    async def go() -> None:
        async with command("command definitely-not-a-command-xyz"):
            pass

    with pytest.raises(ModuleError, match='command: exec: "definitely-not-a-command-xyz": executable file not found'):
        asyncio.run(go())


def test_parse_header_block() -> None:
    assert len(parse_header_block(b"")) == 0
    assert len(parse_header_block(b"\nA: b\n")) == 0
    h = parse_header_block(b"A: 1\r\nB:2\r\n\r\nC: 3\r\n")
    assert [n for n, _ in h] == ["A", "B"]
    for bad in (b" leading: continuation\n", b"no colon\n", b"bad name: x\n", b": empty name\n"):
        with pytest.raises(ValueError):
            parse_header_block(bad)


# -- through the pipeline ------------------------------------------------------------------------


class Recorder(DeliveryTarget):
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        rec = self

        class D(Delivery):
            async def add_rcpt(self, rcpt: str) -> None:
                return None

            async def body(self, header: Header, body: Body) -> None:
                rec.messages.append((header.to_bytes(), meta.quarantine))

            async def commit(self) -> None:
                return None

            async def abort(self) -> None:
                return None

        return D()


async def through_pipeline(tmp: Path, check: str) -> tuple[SMTPError | None, list[tuple[bytes, bool]]]:
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
        elif inst.name == "check.command":
            obj = CommandCheck(inst, ctx)
        else:
            continue
        if isinstance(obj, Module):
            await obj.start()
        ctx.objects[id(inst)] = obj
    runner = PipelineRunner(g.endpoints[0].settings["pipeline"], ctx, ctx.logger, "mx.example.net")
    try:
        d = await runner.start_delivery(make_meta(), "a@example.org")
        await d.add_rcpt("b@example.net")
        await d.body(HEADER.copy(), Body(BODY))
        await d.commit()
    except SMTPError as e:
        return e, target.messages
    return None, target.messages


def test_pipeline_prepends_header_and_quarantines(tmp_path: Path) -> None:
    sh = script(tmp_path, 'cat > /dev/null\nprintf "X-Checked: %s\\n" "$1"\nexit 2\n')
    err, msgs = asyncio.run(through_pipeline(tmp_path, f"  command {sh} {{msg_id}}"))
    assert err is None
    [(header, quarantined)] = msgs
    assert quarantined
    assert b"X-Checked: 0123abcd\r\n" in header
    assert header.index(b"X-Checked:") < header.index(b"From: a@example.org")


def test_pipeline_rejects_at_rcpt(tmp_path: Path) -> None:
    sh = script(tmp_path, '[ "$1" = "b@example.net" ] && exit 1\nexit 0\n')
    err, msgs = asyncio.run(through_pipeline(tmp_path, f"  command {sh} {{address}} {{\n   run_on rcpt\n  }}"))
    assert text(err) == "550 5.7.1 Message rejected for due to a local policy"
    assert msgs == []
