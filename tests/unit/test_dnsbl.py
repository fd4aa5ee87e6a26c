"""check.dnsbl against the loopback DNS server (spec §B.4, RFC 5782)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pymaddy.checks.dnsbl import DNSBL, query_name
from pymaddy.compiler.graph import ModuleInstance
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.groups import CheckGroup
from pymaddy.pipeline.interfaces import CheckResult, Delivery, DeliveryTarget
from pymaddy.pipeline.runner import PipelineRunner
from pymaddy.runtime.log import Logger, Output
from pymaddy.runtime.module import Module
from tests.confhelp import compile_text
from tests.dnsserver import DNSServer
from tests.runtime_helpers import bare_context, compile_graph

V6_LISTED = "2001:db8::1"
V6_CLEAN = "2001:db8::2"


class Capture(Output):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, stamp: float, debug: bool, msg: str) -> None:
        self.lines.append(msg)


def v6_key(ip: str) -> str:
    return query_name(ipaddress.ip_address(ip))


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    srv = DNSServer()
    # bl.example: a well-formed IP list (RFC 5782 §5 test entries present)
    srv.add("2.0.0.127.bl.example", "A", "127.0.0.2")
    srv.add(v6_key("::ffff:127.0.0.2") + ".bl.example", "A", "127.0.0.2")
    srv.add("10.2.0.192.bl.example", "A", "127.0.0.2")
    srv.add_txt("10.2.0.192.bl.example", "listed for spam, see https://bl.example/")
    srv.add("11.2.0.192.bl.example", "A", "127.0.0.10")
    srv.add("12.2.0.192.bl.example", "A", "127.1.0.1")  # outside the default 127.0.0.1/24
    srv.add(v6_key(V6_LISTED) + ".bl.example", "A", "127.0.0.2")
    srv.fail("13.2.0.192.bl.example")
    # bl2.example: lists 192.0.2.10 too, and lacks the test entry / lists 127.0.0.1
    srv.add("10.2.0.192.bl2.example", "A", "127.0.0.3")
    srv.add("1.0.0.127.bl2.example", "A", "127.0.0.2")
    # dbl.example: a domain list
    srv.add("test.dbl.example", "A", "127.0.0.2")
    srv.add("spammer.example.dbl.example", "A", "127.0.1.2")
    srv.add("other.example.dbl.example", "A", "127.0.1.4")
    with srv:
        yield srv


@asynccontextmanager
async def dnsbl(
    srv: DNSServer, block: str, out: Output | None = None, inst: ModuleInstance | None = None
) -> AsyncIterator[DNSBL]:
    graph = compile_graph(f"check.dnsbl chk {{\n{block}\n}}\n")
    ctx = bare_context(graph, logger=Logger(out=out or Capture()), dns_override=srv.override)
    obj = DNSBL(inst or graph.blocks["chk"], ctx)
    await obj.start()
    try:
        yield obj
    finally:
        await obj.stop()


def meta(ip: str, helo: str = "mail.example", port: int = 40000) -> MsgMeta:
    return MsgMeta(conn=ConnInfo(remote_ip=ip, remote_port=port, helo=helo))


async def judge(
    srv: DNSServer, block: str, ip: str, helo: str = "mail.example"
) -> tuple[SMTPError | None, CheckResult]:
    """(the early check's refusal, the result the message then sees at its connection stage)."""
    async with dnsbl(srv, block) as chk:
        m = meta(ip, helo)
        early = await chk.check_conn_early(m)
        st = await chk.state_for_msg(meta(ip, helo))
        return early, await st.check_connection()


def text(e: SMTPError | None) -> str:
    assert e is not None
    return f"{e.code} {e.enhanced_str} {e.message}"


def clean(res: CheckResult) -> bool:
    return res.reject is None and not res.quarantine and res.reason is None


LIST = "bl.example {\n client_ipv6 yes\n}"


def test_query_names() -> None:
    assert query_name(ipaddress.ip_address("192.0.2.99")) == "99.2.0.192"
    assert query_name(ipaddress.ip_address("::ffff:192.0.2.99")) == "99.2.0.192"
    # RFC 5782 §2.4: 32 nibbles, least significant first
    assert query_name(ipaddress.ip_address("2001:db8:1:2:3:4:567:89ab")) == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
    )


@pytest.mark.parametrize(
    ("ip", "listed"),
    [
        ("192.0.2.10", True),
        ("192.0.2.99", False),
        ("192.0.2.12", False),  # answer outside `responses`
        ("::ffff:192.0.2.10", True),
        (V6_LISTED, True),
        (V6_CLEAN, False),
    ],
)
def test_ip_lists_default_quarantine(dns_server: DNSServer, ip: str, listed: bool) -> None:
    early, res = asyncio.run(judge(dns_server, LIST, ip))
    assert early is None
    if listed:
        assert res.quarantine and res.reject is None  # score 1 ≥ quarantine_threshold 1
        assert text(res.reason) == "554 5.7.0 Client identity is listed in the used DNSBL"
    else:
        assert clean(res), res


def test_client_ip_toggles(dns_server: DNSServer) -> None:
    _, res = asyncio.run(judge(dns_server, "bl.example {\n client_ipv6 no\n}", V6_LISTED))
    assert clean(res)
    _, res = asyncio.run(judge(dns_server, "bl.example {\n client_ipv4 no\n}", "192.0.2.10"))
    assert clean(res)
    _, res = asyncio.run(judge(dns_server, "bl.example {\n}", V6_LISTED))  # list blocks default to IPv6 on
    assert res.quarantine


def test_reason_carries_txt(dns_server: DNSServer) -> None:
    _, res = asyncio.run(judge(dns_server, LIST, "192.0.2.10"))
    assert res.reason is not None
    assert res.reason.reason == "listed for spam, see https://bl.example/"
    _, res = asyncio.run(judge(dns_server, LIST, "192.0.2.11"))
    assert res.reason is not None and res.reason.reason == "127.0.0.10"


def test_responses_ranges(dns_server: DNSServer) -> None:
    block = "bl.example {\n responses 127.1.0.0/16 127.0.0.10\n}"
    assert asyncio.run(judge(dns_server, block, "192.0.2.12"))[1].quarantine
    assert asyncio.run(judge(dns_server, block, "192.0.2.11"))[1].quarantine
    assert clean(asyncio.run(judge(dns_server, block, "192.0.2.10"))[1])


def test_scores_add_up_to_reject(dns_server: DNSServer) -> None:
    block = "reject_threshold 3\nquarantine_threshold 2\nbl.example {\n score 1\n}\nbl2.example {\n score 2\n}"
    early, res = asyncio.run(judge(dns_server, block, "192.0.2.10"))  # 1 + 2 = 3
    assert early is None  # without check_early the EHLO passes; the message is refused
    assert text(res.reject) == "554 5.7.0 Client identity is listed in the used DNSBL"
    # only bl.example lists .11: 1 < quarantine 2 → nothing
    assert clean(asyncio.run(judge(dns_server, block, "192.0.2.11"))[1])


def test_scores_quarantine_between_thresholds(dns_server: DNSServer) -> None:
    block = "reject_threshold 4\nquarantine_threshold 2\nbl.example {\n score 1\n}\nbl2.example {\n score 2\n}"
    _, res = asyncio.run(judge(dns_server, block, "192.0.2.10"))
    assert res.quarantine and res.reject is None


def test_negative_score_whitelists(dns_server: DNSServer) -> None:
    block = "bl.example {\n score 1\n}\nbl2.example {\n score -5\n}"
    assert clean(asyncio.run(judge(dns_server, block, "192.0.2.10"))[1])


def test_check_early_rejects_ehlo(dns_server: DNSServer) -> None:
    block = "check_early yes\nreject_threshold 1\n" + LIST
    early, _ = asyncio.run(judge(dns_server, block, "192.0.2.10"))
    assert text(early) == "554 5.7.0 Client identity is listed in the used DNSBL"
    early, res = asyncio.run(judge(dns_server, block, "192.0.2.99"))
    assert early is None and clean(res)


def test_check_early_only_rejects(dns_server: DNSServer) -> None:
    # a quarantine verdict never refuses the EHLO; it flags the connection's messages
    early, res = asyncio.run(judge(dns_server, "check_early yes\n" + LIST, "192.0.2.10"))
    assert early is None and res.quarantine


def test_response_rules(dns_server: DNSServer) -> None:
    block = (
        "reject_threshold 10\nbl.example {\n"
        ' response 127.0.0.2 {\n  score 10\n  message "Listed as a spam source"\n }\n'
        " response 127.0.0.10/31 {\n  score 3\n }\n}"
    )
    _, res = asyncio.run(judge(dns_server, block, "192.0.2.10"))
    assert text(res.reject) == "554 5.7.0 Listed as a spam source"
    _, res = asyncio.run(judge(dns_server, block, "192.0.2.11"))
    assert res.quarantine and text(res.reason) == "554 5.7.0 Client identity is listed in the used DNSBL"
    assert clean(asyncio.run(judge(dns_server, block, "192.0.2.12"))[1])  # no rule matches


def test_custom_messages_joined(dns_server: DNSServer) -> None:
    block = (
        "reject_threshold 2\n"
        'bl.example {\n response 127.0.0.0/24 {\n  score 1\n  message "one"\n }\n}\n'
        'bl2.example {\n response 127.0.0.0/24 {\n  score 1\n  message "two"\n }\n}'
    )
    _, res = asyncio.run(judge(dns_server, block, "192.0.2.10"))
    assert text(res.reject) == "554 5.7.0 one; two"


def test_inline_zones_have_score_zero(dns_server: DNSServer) -> None:
    # maddy's shortcut lists: client_ipv4 only and score 0, so they never trigger
    async def run() -> CheckResult:
        res = compile_text("checks g {\n dnsbl bl.example bl2.example\n}\n")
        assert res.graph is not None
        (inst,) = res.graph.blocks["g"].settings["members"]
        async with dnsbl(dns_server, "", inst=inst) as chk:
            assert [lst.zone for lst in chk.lists] == ["bl.example", "bl2.example"]
            await chk.check_conn_early(meta("192.0.2.10"))
            return await (await chk.state_for_msg(meta("192.0.2.10"))).check_connection()

    assert clean(asyncio.run(run()))


@pytest.mark.parametrize(
    ("helo", "listed"),
    [
        ("spammer.example", True),
        ("SPAMMER.example", True),
        ("clean.example", False),
        ("[192.0.2.10]", False),  # address literals are not looked up
        ("x" * 70 + ".example", False),  # not a domain name: "no such host", not a DNS error
    ],
)
def test_domain_list_ehlo(dns_server: DNSServer, helo: str, listed: bool) -> None:
    block = "dbl.example {\n client_ipv4 no\n client_ipv6 no\n ehlo yes\n}"
    _, res = asyncio.run(judge(dns_server, block, "192.0.2.99", helo))
    assert res.quarantine is listed


def test_domain_list_ignores_responses(dns_server: DNSServer) -> None:
    # maddy applies `responses` to IP lookups only
    block = "dbl.example {\n client_ipv4 no\n client_ipv6 no\n ehlo yes\n responses 127.0.0.1\n}"
    assert asyncio.run(judge(dns_server, block, "192.0.2.99", "spammer.example"))[1].quarantine


def test_domain_list_rules(dns_server: DNSServer) -> None:
    block = "dbl.example {\n client_ipv4 no\n ehlo yes\n response 127.0.1.4 {\n  score 5\n }\n}"
    assert clean(asyncio.run(judge(dns_server, block, "192.0.2.99", "spammer.example"))[1])
    assert asyncio.run(judge(dns_server, block, "192.0.2.99", "other.example"))[1].quarantine


def test_mailfrom_lookups_never_happen(dns_server: DNSServer) -> None:
    # only connection-time data reaches the lists (maddy passes no MAIL FROM)
    block = "dbl.example {\n client_ipv4 no\n client_ipv6 no\n mailfrom yes\n}"

    async def run() -> CheckResult:
        async with dnsbl(dns_server, block) as chk:
            await chk.check_conn_early(meta("192.0.2.99", "clean.example"))
            st = await chk.state_for_msg(meta("192.0.2.99", "clean.example"))
            res = await st.check_connection()
            assert clean(await st.check_sender("user@spammer.example"))
            return res

    assert clean(asyncio.run(run()))
    assert dns_server.log.count("spammer.example.dbl.example") == 0


@pytest.mark.parametrize(
    ("ip", "reply"),
    [
        ("192.0.2.13", "451 4.7.0 DNS error during policy check"),  # SERVFAIL: temporary
    ],
)
def test_dns_errors_reject(dns_server: DNSServer, ip: str, reply: str) -> None:
    early, res = asyncio.run(judge(dns_server, LIST, ip))
    assert early is None
    assert text(res.reject) == reply


def test_dns_error_refuses_ehlo_with_check_early(dns_server: DNSServer) -> None:
    early, _ = asyncio.run(judge(dns_server, "check_early yes\n" + LIST, "192.0.2.13"))
    assert text(early) == "451 4.7.0 DNS error during policy check"


def test_results_are_per_connection(dns_server: DNSServer) -> None:
    async def run() -> tuple[CheckResult, CheckResult, CheckResult]:
        async with dnsbl(dns_server, LIST) as chk:
            await chk.check_conn_early(meta("192.0.2.10", port=1))
            await chk.check_conn_early(meta("192.0.2.99", port=2))
            a = await (await chk.state_for_msg(meta("192.0.2.10", port=1))).check_connection()
            b = await (await chk.state_for_msg(meta("192.0.2.99", port=2))).check_connection()
            # no early check ran for this connection (dnsbl outside the root `check`): no effect
            c = await (await chk.state_for_msg(meta("192.0.2.10", port=3))).check_connection()
            return a, b, c

    a, b, c = asyncio.run(run())
    assert a.quarantine and clean(b) and clean(c)


def test_non_ip_clients_skipped(dns_server: DNSServer) -> None:
    async def run() -> tuple[SMTPError | None, CheckResult]:
        async with dnsbl(dns_server, LIST) as chk:
            m = MsgMeta(conn=ConnInfo(remote_ip="", is_unix=True))
            return await chk.check_conn_early(m), await (await chk.state_for_msg(m)).check_connection()

    early, res = asyncio.run(run())
    assert early is None and clean(res)


def test_self_test_logs(dns_server: DNSServer) -> None:
    out = Capture()
    block = "bl.example {\n client_ipv6 no\n}\nbl2.example {\n client_ipv6 no\n}\ndbl.example {\n ehlo yes\n}"

    async def run() -> None:
        async with dnsbl(dns_server, block, out) as chk:
            await asyncio.gather(*chk.self_tests)

    asyncio.run(run())
    lines = [line for line in out.lines if "List" in line]
    assert not any('"bl.example"' in line for line in lines), lines
    assert any("List does not contain a test record for 127.0.0.2" in ln and "bl2.example" in ln for ln in lines)
    assert any("List contains a record for 127.0.0.1" in ln and "bl2.example" in ln for ln in lines)
    # dbl.example has `test` but lacks 127.0.0.2 (client_ipv4 defaults on)
    assert any("List does not contain a test record for 127.0.0.2" in ln and "dbl.example" in ln for ln in lines)
    assert not any("'test' TLD" in ln for ln in lines)


def test_self_test_bails_out_on_dns_errors(dns_server: DNSServer) -> None:
    dns_server.fail("2.0.0.127.broken.example")
    out = Capture()

    async def run() -> None:
        async with dnsbl(dns_server, "broken.example {\n}", out) as chk:
            await asyncio.gather(*chk.self_tests)

    asyncio.run(run())
    lines = [line for line in out.lines if "broken.example" in line]
    assert len(lines) == 1 and "lookup error, bailing out" in lines[0], lines


# -- through the pipeline of an smtp endpoint ------------------------------------------------------


class Recorder(DeliveryTarget):
    def __init__(self) -> None:
        self.quarantined: list[bool] = []

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        rec = self

        class D(Delivery):
            async def add_rcpt(self, rcpt: str) -> None:
                return None

            async def body(self, header: Header, body: Body) -> None:
                rec.quarantined.append(meta.quarantine)

            async def commit(self) -> None:
                return None

            async def abort(self) -> None:
                return None

        return D()


@asynccontextmanager
async def smtp_pipeline(tmp: Path, srv: DNSServer, check: str) -> AsyncIterator[tuple[PipelineRunner, Recorder]]:
    text = (
        f"state_dir {tmp}\nruntime_dir {tmp}\nhostname mx.example.net\ntls off\ndummy t\n"
        f"smtp tcp://127.0.0.1:1 {{\n check {{\n{check}\n }}\n deliver_to &t\n}}\n"
    )
    g = compile_graph(text, strict=True)
    ctx = bare_context(g, tmp, logger=Logger("", Capture()), dns_override=srv.override)
    target = Recorder()
    started: list[Module] = []
    for inst in g.instances:
        obj: Any
        if inst.name == "dummy":
            obj = target
        elif inst.name == "checks":
            obj = CheckGroup(inst, ctx)
        elif inst.name == "check.dnsbl":
            obj = DNSBL(inst, ctx)
        else:
            continue
        if isinstance(obj, Module):
            await obj.start()
            started.append(obj)
        ctx.objects[id(inst)] = obj
    try:
        yield PipelineRunner(g.endpoints[0].settings["pipeline"], ctx, ctx.logger, "mx.example.net"), target
    finally:
        for m in reversed(started):
            await m.stop()


async def session(runner: PipelineRunner, ip: str, port: int) -> SMTPError | None:
    """EHLO (early checks) then one message; the first refusal, if any."""
    conn = ConnInfo(remote_ip=ip, remote_port=port, helo="client.example")
    err = await runner.run_early_checks(MsgMeta(id="", conn=conn))
    if err is not None:
        return err
    try:
        d = await runner.start_delivery(MsgMeta(conn=conn), "a@example.org")
        await d.add_rcpt("b@example.net")
        await d.body(Header.parse(b"Subject: x\r\n"), Body(b"hi\r\n"))
        await d.commit()
    except SMTPError as e:
        return e
    return None


def test_pipeline_quarantine_and_reject(dns_server: DNSServer, tmp_path: Path) -> None:
    check = (
        "  dnsbl {\n   reject_threshold 2\n   bl.example {\n    score 1\n   }\n   bl2.example {\n    score 1\n   }\n  }"
    )

    async def go() -> tuple[SMTPError | None, SMTPError | None, SMTPError | None, list[bool]]:
        async with smtp_pipeline(tmp_path, dns_server, check) as (runner, target):
            clean_ = await session(runner, "192.0.2.99", 1)
            quarantined = await session(runner, "192.0.2.11", 2)
            rejected = await session(runner, "192.0.2.10", 3)
            return clean_, quarantined, rejected, target.quarantined

    clean_, quarantined, rejected, flags = asyncio.run(go())
    assert clean_ is None and quarantined is None
    assert flags == [False, True]
    assert text(rejected) == "554 5.7.0 Client identity is listed in the used DNSBL"


def test_pipeline_check_early(dns_server: DNSServer, tmp_path: Path) -> None:
    check = "  dnsbl {\n   check_early yes\n   reject_threshold 1\n   bl.example {\n   }\n  }"

    async def go() -> SMTPError | None:
        async with smtp_pipeline(tmp_path, dns_server, check) as (runner, _):
            return await session(runner, "192.0.2.10", 1)

    assert text(asyncio.run(go())) == "554 5.7.0 Client identity is listed in the used DNSBL"
