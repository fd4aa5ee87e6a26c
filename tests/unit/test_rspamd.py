"""check.rspamd (spec §B.4; maddy's internal/check/rspamd).

A fake rspamd (asyncio HTTP server) records each request and answers with canned
JSON; the real rspamd (Debian's `rspamd` package, if installed) is started on a
loopback port with a minimal configuration and two Lua rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pymaddy.checks.rspamd import HTTPError, RspamdCheck, http_post, milter_headers
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, ConnInfo, MsgMeta
from pymaddy.pipeline.interfaces import CheckResult
from tests.runtime_helpers import compile_graph
from tests.unit.test_dkim_helpers import MESSAGE, build, split_message
from tests.unit.test_milter import through_pipeline


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class FakeRspamd:
    """Answers each POST with `answer(request) -> (status, body, extra headers, chunked)`."""

    answer: Callable[[Request], tuple[int, bytes]] = lambda req: (200, b'{"action": "no action", "score": 0}')
    chunked: bool = False
    requests: list[Request] = field(default_factory=list)
    port: int = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            method, target, _ = (await r.readuntil(b"\r\n")).decode().split(" ", 2)
            headers: list[tuple[str, str]] = []
            while (line := (await r.readuntil(b"\r\n")).strip()) != b"":
                k, _, v = line.decode().partition(":")
                headers.append((k.strip(), v.strip()))
            n = int(next(v for k, v in headers if k.lower() == "content-length"))
            req = Request(method, target, headers, await r.readexactly(n))
            self.requests.append(req)
            status, body = self.answer(req)
            if self.chunked:
                w.write(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
                for i in range(0, len(body), 7):
                    part = body[i : i + 7]
                    w.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                w.write(b"0\r\n\r\n")
            else:
                w.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await w.drain()
        w.close()


def make_meta(**conn: object) -> MsgMeta:
    info = ConnInfo(
        remote_ip="192.0.2.1",
        remote_port=4000,
        helo="mx.example.net",
        rdns="ptr.example.net",
        auth_user="alice",
        tls=True,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_128_GCM_SHA256",
    )
    for k, v in conn.items():
        setattr(info, k, v)
    return MsgMeta(id="0123abcd", conn=info)


def rspamd_check(tmp: Path, url: str, extra: str = "", top: str = "") -> RspamdCheck:
    chk, _ = build(f"{top}check.rspamd {{\napi_path {url}\n{extra}\n}}\n", tmp, "check.rspamd", RspamdCheck)
    return chk


async def transaction(chk: RspamdCheck, meta: MsgMeta | None = None, message: bytes = MESSAGE) -> list[CheckResult]:
    await chk.start()
    st = await chk.state_for_msg(meta or make_meta())
    out = [await st.check_connection(), await st.check_sender("alice@example.org")]
    out.append(await st.check_rcpt("bob@example.net"))
    out.append(await st.check_rcpt("carol@example.net"))
    header, body = split_message(message)
    out.append(await st.check_body(header, body))
    await st.close()
    return out


def run_fake(tmp: Path, fake: FakeRspamd, extra: str = "", top: str = "", meta: MsgMeta | None = None) -> CheckResult:
    async def go() -> CheckResult:
        srv = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        fake.port = srv.sockets[0].getsockname()[1]
        try:
            res = await transaction(rspamd_check(tmp, f"http://127.0.0.1:{fake.port}", extra, top), meta)
        finally:
            srv.close()
            await srv.wait_closed()
        assert all(r.reject is None and r.header is None for r in res[:4])
        return res[-1]

    return asyncio.run(go())


def canned(action: str, score: float = 3.5, **more: object) -> FakeRspamd:
    body = json.dumps({"action": action, "score": score, "required_score": 15, **more}).encode()
    return FakeRspamd(lambda req: (200, body))


def summary(res: CheckResult) -> tuple[object, bool, bytes | None]:
    rej = None if res.reject is None else (res.reject.code, res.reject.enhanced_str, res.reject.message)
    return rej, res.quarantine, None if res.header is None else res.header.to_bytes()


# -- the request ---------------------------------------------------------------------------------


def test_request_as_maddy_sends_it(tmp_path: Path) -> None:
    fake = FakeRspamd()
    res = run_fake(tmp_path, fake, "settings_id outbound\ntag mytag\nflags pass_all groups", top="hostname mx.test\n")
    assert summary(res) == (None, False, None)
    (req,) = fake.requests
    assert (req.method, req.target) == ("POST", "/checkv2")
    header, body = split_message(MESSAGE)
    assert req.body == header.to_bytes() + b"\r\n" + body.read_all()
    names = [k for k, _ in req.headers]
    assert names[:4] == ["Host", "Content-Length", "Connection", "Pass"]
    expect = [
        ("Pass", "all"),
        ("User-Agent", "maddy"),
        ("MTA-Tag", "mytag"),
        ("Settings-ID", "outbound"),
        ("MTA-Name", "mx.test"),
        ("Flags", "pass_all,groups"),
        ("From", "alice@example.org"),
        ("Rcpt", "bob@example.net"),
        ("Rcpt", "carol@example.net"),
        ("Queue-ID", "0123abcd"),
        ("User", "alice"),
        ("IP", "192.0.2.1"),
        ("Helo", "mx.example.net"),
        ("Hostname", "ptr.example.net"),
        ("TLS-Cipher", "TLS_AES_128_GCM_SHA256"),
        ("TLS-Version", "1.3"),
    ]
    assert req.headers[3:] == expect
    assert req.get_all("Host") == [f"127.0.0.1:{fake.port}"]


def test_request_defaults_and_local_mail(tmp_path: Path) -> None:
    fake = FakeRspamd()
    run_fake(tmp_path, fake, meta=MsgMeta(id="feedbeef"))
    (req,) = fake.requests
    assert req.headers[3:] == [
        ("Pass", "all"),
        ("User-Agent", "maddy"),
        ("MTA-Tag", "maddy"),
        ("Flags", "pass_all"),
        ("From", "alice@example.org"),
        ("Rcpt", "bob@example.net"),
        ("Rcpt", "carol@example.net"),
        ("Queue-ID", "feedbeef"),
    ]


def test_inline_url_and_default(tmp_path: Path) -> None:
    graph = compile_graph("checks g {\nrspamd http://10.0.0.1:1/base\n}\nchecks h {\nrspamd\n}\n")
    (g,) = graph.blocks["g"].settings["members"]
    (h,) = graph.blocks["h"].settings["members"]
    assert g.settings["api_path"] == "http://10.0.0.1:1/base"
    assert h.settings["api_path"] == "http://127.0.0.1:11333"

    fake = FakeRspamd()

    async def go() -> None:
        srv = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            await transaction(rspamd_check(tmp_path, f"http://127.0.0.1:{port}/rspamd?x=1"))
        finally:
            srv.close()
            await srv.wait_closed()

    asyncio.run(go())
    assert fake.requests[0].target == "/rspamd?x=1/checkv2"  # maddy appends to the whole URL string


# -- actions -------------------------------------------------------------------------------------

POLICY = "Message rejected due to local policy"


@pytest.mark.parametrize(
    ("action", "expect"),
    [
        ("no action", (None, False, None)),
        ("greylist", (None, False, b"X-Spam-Score: 3.50\r\n")),
        ("add header", (None, True, b"X-Spam-Score: 3.50\r\nX-Spam-Flag: Yes\r\n")),
        ("rewrite subject", (None, True, b"X-Spam-Score: 3.50\r\nX-Spam-Flag: Yes\r\n")),
        ("soft reject", ((450, "4.7.0", POLICY), False, None)),
        ("reject", ((550, "5.7.0", POLICY), False, None)),
        ("something new", (None, False, None)),
    ],
)
def test_actions_with_defaults(tmp_path: Path, action: str, expect: tuple[object, bool, bytes | None]) -> None:
    res = run_fake(tmp_path, canned(action, subject="[SPAM] x"))
    assert summary(res) == expect
    if action in ("add header", "rewrite subject"):
        assert res.reason is not None and (res.reason.code, res.reason.enhanced_str) == (450, "4.7.0")


def test_action_directives(tmp_path: Path) -> None:
    res = run_fake(tmp_path, canned("add header"), "add_header_action reject 554 5.7.1 Spam")
    assert summary(res)[:2] == ((554, "5.7.1", "Spam"), False)
    res = run_fake(tmp_path, canned("add header"), "add_header_action ignore")
    assert summary(res)[:2] == (None, False) and res.reason is not None  # logged only
    res = run_fake(tmp_path, canned("rewrite subject"), "rewrite_subj_action reject")
    assert summary(res)[:2] == ((450, "4.7.0", POLICY), False)
    res = run_fake(tmp_path, canned("reject"), "reject_action quarantine")
    assert res.quarantine  # (reject stays set, as in maddy; quarantine wins in the pipeline)
    res = run_fake(tmp_path, canned("reject"), 'reject_action reject 521 5.7.2 "Go away"')
    assert summary(res)[0] == (521, "5.7.2", "Go away")
    # maddy's FailAction.Apply only adds actions: `ignore` cannot undo a rejection
    res = run_fake(tmp_path, canned("soft reject"), "soft_reject_action ignore")
    assert summary(res)[0] == (450, "4.7.0", POLICY)


def test_milter_add_headers(tmp_path: Path) -> None:
    milter = {
        "add_headers": {
            "X-Spamd-Result": {"value": "default: False [1.00 / 15.00]", "order": 1},
            "X-Rspamd-Server": "rspamd.test",
            "X-Multi": [{"value": "b", "order": 3}, "a"],
            "Bad Name": "x",
        },
        "remove_headers": {"X-Spam": 1},
    }
    res = run_fake(tmp_path, canned("no action", milter=milter))
    assert summary(res)[2] == (
        b"X-Rspamd-Server: rspamd.test\r\nX-Multi: a\r\nX-Spamd-Result: default: False [1.00 / 15.00]\r\nX-Multi: b\r\n"
    )
    assert milter_headers({"milter": "nonsense"}) == []


# -- failures ------------------------------------------------------------------------------------


def test_connection_failure(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}"
    res = asyncio.run(transaction(rspamd_check(tmp_path, url)))[-1]
    assert res.reject is None and not res.quarantine
    assert res.reason is not None and (res.reason.code, res.reason.enhanced_str) == (451, "4.7.0")
    assert res.reason.message == "Internal error during policy check"
    res = asyncio.run(transaction(rspamd_check(tmp_path, url, "io_error_action reject")))[-1]
    assert summary(res)[0] == (451, "4.7.0", "Internal error during policy check")
    res = asyncio.run(transaction(rspamd_check(tmp_path, url, "io_error_action quarantine")))[-1]
    assert res.quarantine and res.reject is None


def test_error_status_and_bad_json(tmp_path: Path) -> None:
    err = FakeRspamd(lambda req: (500, b"oops"))
    res = run_fake(tmp_path, err)
    assert res.reject is None and res.reason is not None and res.reason.reason == "HTTP 500"
    res = run_fake(tmp_path, FakeRspamd(lambda req: (503, b"")), "error_resp_action reject")
    assert summary(res)[0] == (451, "4.7.0", "Internal error during policy check")
    res = run_fake(tmp_path, FakeRspamd(lambda req: (200, b"{not json")), "io_error_action reject")
    assert summary(res)[0] == (451, "4.9.0", "Internal error during policy check")
    res = run_fake(tmp_path, FakeRspamd(lambda req: (200, b"[1]")), "error_resp_action reject")
    assert res.reject is None  # an unparsable reply is an I/O error, not an error response


def test_chunked_response(tmp_path: Path) -> None:
    fake = canned("reject", 20)
    fake.chunked = True
    res = run_fake(tmp_path, fake)
    assert summary(res)[0] == (550, "5.7.0", POLICY)


def test_http_post_errors() -> None:
    with pytest.raises(HTTPError, match="scheme"):
        asyncio.run(http_post("ftp://x/checkv2", [], []))

    async def silent() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while await r.read(4096):  # never answers; ends when the client gives up
                pass
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(HTTPError, match="no reply within"):
                await http_post(f"http://127.0.0.1:{port}/checkv2", [], [b"x", Body(b"y")], timeout=0.3)
            await asyncio.sleep(0.1)
        finally:
            srv.close()
            await srv.wait_closed()

    asyncio.run(silent())


# -- the real rspamd -----------------------------------------------------------------------------

RULES = """
local function subject_has(word)
  return function(task)
    local s = task:get_header('Subject')
    return s ~= nil and s:find(word, 1, true) ~= nil
  end
end
rspamd_config:register_symbol({name = 'PYMADDY_REJECT', score = 50.0, callback = subject_has('REJECTME')})
rspamd_config:register_symbol({name = 'PYMADDY_SPAMMY', score = 7.0, callback = subject_has('SPAMMY')})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def real_rspamd(tmp: Path) -> Iterator[int]:
    """rspamd in the foreground with a minimal config (no redis, no DNS); yields its port."""
    exe = shutil.which("rspamd")
    assert exe, "rspamd is not installed: apt-get install rspamd"
    work = Path(tempfile.mkdtemp(prefix="rsp"))
    port = _free_port()
    (work / "db").mkdir()
    (work / "rules.lua").write_text(RULES)
    (work / "rspamd.conf").write_text(
        f'options {{\n pidfile = "{work}/rspamd.pid";\n dbdir = "{work}/db";\n tempdir = "{work}";\n'
        ' filters = "";\n dns { nameserver = ["127.0.0.1:1"]; timeout = 1s; retransmits = 1; }\n}\n'
        'logging { type = "console"; level = "error"; }\n'
        "actions { reject = 15; add_header = 6; greylist = 4; }\n"
        f'worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; }}\n'
        f'lua = "{work}/rules.lua";\n'
    )
    proc = subprocess.Popen(
        [exe, "-f", "-u", "root", "-g", "root", "-c", str(work / "rspamd.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=work,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (proc.stdout.read() if proc.stdout else b"").decode()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "rspamd did not start listening"
            time.sleep(0.2)
        yield port
    finally:
        # SIGTERM lets the master reap its workers; whatever is left of the group is killed
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(180)
def test_real_rspamd(tmp_path: Path) -> None:
    with real_rspamd(tmp_path) as port:
        chk = rspamd_check(tmp_path, f"http://127.0.0.1:{port}")

        def judge(subject: bytes) -> CheckResult:
            msg = MESSAGE.replace(b"Subject: Lunch  tomorrow?", b"Subject: " + subject)
            return asyncio.run(transaction(chk, message=msg))[-1]

        # a worker may take a moment after listen() before it answers; retry the first one
        deadline = time.monotonic() + 60
        while (res := judge(b"hello")).reason is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert summary(res) == (None, False, None), res.reason
        assert summary(judge(b"SPAMMY offer")) == (None, True, b"X-Spam-Score: 7.00\r\nX-Spam-Flag: Yes\r\n")
        assert summary(judge(b"REJECTME now"))[:2] == ((550, "5.7.0", POLICY), False)


def test_pipeline_adds_spam_headers_and_quarantines(tmp_path: Path) -> None:
    fake = canned("add header", 6.5)

    async def go() -> tuple[SMTPError | None, list[tuple[bytes, bool]]]:
        srv = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            return await through_pipeline(tmp_path, f"  rspamd http://127.0.0.1:{port}", {"check.rspamd": RspamdCheck})
        finally:
            srv.close()
            await srv.wait_closed()

    err, msgs = asyncio.run(go())
    assert err is None
    [(header, quarantined)] = msgs
    assert quarantined
    assert b"X-Spam-Score: 6.50\r\nX-Spam-Flag: Yes\r\n" in header
    assert header.index(b"X-Spam-Flag") < header.index(b"From: Alice")
    assert fake.requests[0].get_all("Rcpt") == ["bob@example.net"]
