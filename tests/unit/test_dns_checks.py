"""require_mx_record and require_matching_rdns against the loopback DNS server (spec §B.4)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from pymaddy.checks.dns_checks import RequireMatchingRDNS, RequireMXRecord
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import ConnInfo, MsgMeta
from pymaddy.pipeline.interfaces import CheckResult
from pymaddy.runtime.module import Module
from tests.dnsserver import DNSServer
from tests.runtime_helpers import bare_context, compile_graph


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    srv = DNSServer()
    srv.add("example.org", "MX", "10 mx.example.org.")
    srv.add("mx.example.org", "A", "192.0.2.1")
    srv.add("nullmx.example.org", "MX", "0 .")
    srv.add("nomx.example.org", "A", "192.0.2.2")
    srv.fail("broken.example.org")
    srv.add("1.2.0.192.in-addr.arpa", "PTR", "mx.example.org.")
    srv.add("2.2.0.192.in-addr.arpa", "PTR", "other.example.org.")
    srv.fail("3.2.0.192.in-addr.arpa")
    with srv:
        yield srv


@asynccontextmanager
async def check(srv: DNSServer, cls: type[Module], name: str, block: str = "") -> AsyncIterator[Module]:
    graph = compile_graph(f"{name} chk {{\n{block}\n}}\n")
    ctx = bare_context(graph, dns_override=srv.override)
    obj = cls(graph.blocks["chk"], ctx)
    await obj.start()
    try:
        yield obj
    finally:
        await obj.stop()


def err(e: SMTPError | None) -> str:
    assert e is not None
    return f"{e.code} {'.'.join(map(str, e.enhanced))} {e.message}"


async def mx(srv: DNSServer, mail_from: str, block: str = "") -> CheckResult:
    async with check(srv, RequireMXRecord, "require_mx_record", block) as chk:
        assert isinstance(chk, RequireMXRecord)
        st = await chk.state_for_msg(MsgMeta(conn=ConnInfo(remote_ip="192.0.2.1")))
        return await st.check_sender(mail_from)


async def rdns(srv: DNSServer, ip: str, helo: str, block: str = "") -> CheckResult:
    async with check(srv, RequireMatchingRDNS, "require_matching_rdns", block) as chk:
        assert isinstance(chk, RequireMatchingRDNS)
        st = await chk.state_for_msg(MsgMeta(conn=ConnInfo(remote_ip=ip, helo=helo)))
        return await st.check_connection()


def ok(res: CheckResult) -> bool:
    return res.reject is None and res.reason is None and not res.quarantine


@pytest.mark.parametrize(
    ("mail_from", "reply"),
    [
        ("user@example.org", None),
        ("", None),
        ("user@EXAMPLE.org", None),
        ("user@nullmx.example.org", "501 5.7.27 Domain in MAIL FROM has null MX record"),
        ("user@nomx.example.org", "501 5.7.27 Domain in MAIL FROM does not have any MX records"),
        ("user@missing.example.org", "550 5.7.0 DNS error during policy check"),
        ("user@broken.example.org", "450 4.7.0 DNS error during policy check"),
        ("no-at-sign", "501 5.1.8 Malformed sender address"),
        ("postmaster", "501 5.1.8 No domain part in address"),
    ],
)
def test_require_mx_record(dns_server: DNSServer, mail_from: str, reply: str | None) -> None:
    res = asyncio.run(mx(dns_server, mail_from))
    if reply is None:
        assert ok(res), res
    else:
        assert res.quarantine and res.reject is None  # default fail_action quarantine
        assert err(res.reason) == reply


def test_require_mx_record_reject(dns_server: DNSServer) -> None:
    res = asyncio.run(mx(dns_server, "user@nullmx.example.org", "fail_action reject"))
    assert err(res.reject) == "501 5.7.27 Domain in MAIL FROM has null MX record"


@pytest.mark.parametrize(
    ("ip", "helo", "reply"),
    [
        ("192.0.2.1", "mx.example.org", None),
        ("192.0.2.1", "MX.example.org.", None),
        ("192.0.2.2", "mx.example.org", "550 5.7.25 rDNS name does not match source hostname"),
        ("192.0.2.9", "mx.example.org", "550 5.7.25 No PTR record found"),
        ("192.0.2.3", "mx.example.org", "450 4.7.25 DNS error during policy check"),
        ("", "mx.example.org", None),  # unix socket client: skipped
    ],
)
def test_require_matching_rdns(dns_server: DNSServer, ip: str, helo: str, reply: str | None) -> None:
    res = asyncio.run(rdns(dns_server, ip, helo))
    if reply is None:
        assert ok(res), res
    else:
        assert res.quarantine and res.reject is None
        assert err(res.reason) == reply


def test_require_matching_rdns_reject_override(dns_server: DNSServer) -> None:
    res = asyncio.run(rdns(dns_server, "192.0.2.2", "mx.example.org", 'fail_action reject 554 5.7.1 "Go away"'))
    assert err(res.reject) == "554 5.7.1 Go away"
