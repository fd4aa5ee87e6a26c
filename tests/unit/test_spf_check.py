"""check.spf module behaviour (spec §B.4, §I.2, §I.4) against the loopback DNS server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from pymaddy.checks.spf import SPFCheck, organizational_domain, prepare_mail_from
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.interfaces import CheckResult
from tests.dnsserver import DNSServer
from tests.runtime_helpers import bare_context, compile_graph

GOOD_IP = "192.0.2.10"
BAD_IP = "203.0.113.5"


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    srv = DNSServer()
    srv.add_txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all")
    srv.add_txt("soft.example.org", "v=spf1 ip4:192.0.2.0/24 ~all")
    srv.add_txt("neutral.example.org", "v=spf1 ?all")
    srv.add_txt("perm.example.org", "v=spf1 ip4:192.0.2.0/33 -all")
    srv.add_txt("temp.example.org", "v=spf1 include:broken.example.net -all")
    srv.fail("broken.example.net")
    srv.add_txt("mx.example.com", "v=spf1 a -all")
    srv.add("mx.example.com", "A", BAD_IP)
    srv.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    srv.add_txt("_dmarc.example.net", "v=DMARC1; p=none")
    srv.add_txt("_dmarc.example.com", "v=DMARC1; p=none; sp=quarantine")
    with srv:
        yield srv


@asynccontextmanager
async def checker(srv: DNSServer, block: str = "") -> AsyncIterator[SPFCheck]:
    graph = compile_graph(f"check.spf chk {{\n{block}\n}}\n")
    ctx = bare_context(graph, dns_override=srv.override)
    chk = SPFCheck(graph.blocks["chk"], ctx)
    ctx.objects[id(chk.inst)] = chk
    await chk.start()
    try:
        yield chk
    finally:
        await chk.stop()


def meta(mail_from: str, ip: str = GOOD_IP, helo: str = "mx.example.com") -> MsgMeta:
    m = MsgMeta(conn=ConnInfo(remote_ip=ip, helo=helo))
    m.original_from = mail_from
    return m


async def full(chk: SPFCheck, m: MsgMeta, from_hdr: str = "a@example.net") -> tuple[CheckResult, CheckResult]:
    st = await chk.state_for_msg(m)
    conn = await st.check_connection()
    sender = await st.check_sender(m.original_from)
    assert sender.reject is None
    body = await st.check_body(Header.parse(f"From: {from_hdr}\r\n".encode()), Body(b"x\r\n"))
    await st.close()
    return conn, body


def err(e: SMTPError | None) -> str:
    assert e is not None
    return f"{e.code} {'.'.join(map(str, e.enhanced))} {e.message}"


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_pass_deferred(dns_server: DNSServer) -> None:
    async def main() -> None:
        async with checker(dns_server) as chk:
            conn, body = await full(chk, meta("user@example.org"))
            assert conn.auth_results == [] and conn.reason is None
            assert body.reject is None and not body.quarantine and body.reason is None
            (ar,) = body.auth_results
            assert (ar.method, ar.result, ar.reason) == ("spf", "pass", "matched ip")
            assert ar.params == {"smtp.helo": "mx.example.com", "smtp.mailfrom": "example.org"}

    run(main())


def test_fail_quarantines_by_default(dns_server: DNSServer) -> None:
    async def main() -> None:
        async with checker(dns_server) as chk:
            _, body = await full(chk, meta("user@example.org", ip=BAD_IP))
            assert body.quarantine and body.reject is None
            assert err(body.reason) == "550 5.7.23 SPF authentication failed"
            assert (body.auth_results[0].result, body.auth_results[0].reason) == ("fail", "matched all")

    run(main())


def test_fail_suppressed_by_dmarc_policy(dns_server: DNSServer) -> None:
    async def main() -> None:
        async with checker(dns_server, "fail_action reject") as chk:
            # From domain example.org publishes p=reject: DMARC decides, SPF only reports
            _, body = await full(chk, meta("user@example.org", ip=BAD_IP), from_hdr="Boss <boss@example.org>")
            assert body.reject is None and not body.quarantine
            assert body.auth_results[0].result == "fail"
            # p=none does not suppress
            _, body = await full(chk, meta("user@example.org", ip=BAD_IP), from_hdr="a@example.net")
            assert err(body.reject) == "550 5.7.23 SPF authentication failed"
            # sp=quarantine applies to a subdomain found through the organizational domain
            _, body = await full(chk, meta("user@example.org", ip=BAD_IP), from_hdr="a@sub.example.com")
            assert body.reject is None
            # no DMARC record at all
            _, body = await full(chk, meta("user@example.org", ip=BAD_IP), from_hdr="a@nodmarc.example")
            assert body.reject is not None

    run(main())


def test_enforce_early_acts_at_mail_from(dns_server: DNSServer) -> None:
    async def main() -> None:
        async with checker(dns_server, "enforce_early yes\nfail_action reject") as chk:
            conn, body = await full(chk, meta("user@example.org", ip=BAD_IP), from_hdr="b@example.org")
            assert err(conn.reject) == "550 5.7.23 SPF authentication failed"
            assert conn.auth_results[0].result == "fail"
            assert body.auth_results == [] and body.reject is None

    run(main())


def test_null_sender_uses_postmaster_at_helo(dns_server: DNSServer) -> None:
    async def main() -> None:
        async with checker(dns_server, "fail_action reject") as chk:
            _, body = await full(chk, meta("", ip=BAD_IP, helo="mx.example.com"))
            assert body.auth_results[0].result == "pass"
            assert body.auth_results[0].params == {"smtp.helo": "mx.example.com", "smtp.mailfrom": ""}
            _, body = await full(chk, meta("", ip=GOOD_IP, helo="mx.example.com"))
            assert body.auth_results[0].result == "fail"
            assert body.reject is not None

    run(main())


@pytest.mark.parametrize(
    ("sender", "block", "result", "reply"),
    [
        ("u@soft.example.org", "softfail_action reject", "softfail", "550 5.7.23 SPF authentication soft-failed"),
        ("u@neutral.example.org", "neutral_action reject", "neutral", "550 5.7.23 Neutral SPF result is not permitted"),
        ("u@none.example.org", "none_action reject", "none", "550 5.7.23 No SPF policy"),
        (
            "u@perm.example.org",
            "permerr_action reject",
            "permerror",
            "550 5.7.23 SPF authentication failed with a permanent error",
        ),
        (
            "u@temp.example.org",
            "temperr_action reject",
            "temperror",
            "451 4.7.23 SPF authentication failed with a temporary error",
        ),
    ],
)
def test_result_actions(dns_server: DNSServer, sender: str, block: str, result: str, reply: str) -> None:
    async def main() -> None:
        async with checker(dns_server) as chk:  # defaults: all ignore
            _, body = await full(chk, meta(sender, ip=BAD_IP))
            assert body.reject is None and not body.quarantine
            assert body.reason is not None  # logged as "no check action"
            assert body.auth_results[0].result == result
        async with checker(dns_server, block) as chk:
            _, body = await full(chk, meta(sender, ip=BAD_IP))
            assert err(body.reject) == reply
            assert body.auth_results[0].result == result

    run(main())


def test_none_reason_and_override(dns_server: DNSServer) -> None:
    async def main() -> None:
        async with checker(dns_server, 'fail_action reject 550 5.7.1 "Go away"') as chk:
            _, body = await full(chk, meta("u@none.example.org"))
            assert body.auth_results[0].reason == "no DNS record found"
            _, body = await full(chk, meta("u@example.org", ip=BAD_IP))
            assert err(body.reject) == "550 5.7.1 Go away"
            assert body.reject is not None and body.reject.reason == "SPF authentication failed"

    run(main())


def test_skips_non_ip_clients_and_rejects_malformed_sender(dns_server: DNSServer) -> None:
    async def main() -> None:
        async with checker(dns_server, "fail_action reject") as chk:
            m = meta("u@example.org", ip=BAD_IP)
            m.conn.is_unix = True
            m.conn.remote_ip = ""
            conn, body = await full(chk, m)
            assert conn.auth_results == [] and body.auth_results == [] and body.reject is None
            conn, _ = await full(chk, meta("no-at-sign"))
            assert err(conn.reject) == "550 5.1.7 Malformed address"

    run(main())


def test_helpers() -> None:
    assert prepare_mail_from("User@Bücher.example") == "User@xn--bcher-kva.example"
    assert prepare_mail_from("пользователь@example.org") == "@example.org"
    assert prepare_mail_from("postmaster") == "postmaster@"
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"


def test_authentication_results_text(dns_server: DNSServer) -> None:
    """The §I.2 example (issue #855): `spf=none reason="no DNS record found" smtp.helo=… smtp.mailfrom=…`."""
    from pymaddy.pipeline.runner import format_auth_results

    async def main() -> None:
        async with checker(dns_server) as chk:
            m = meta("postmaster@mail.example.net", helo="mail.example.net")
            _, body = await full(chk, m)
            assert format_auth_results("mail.example.net", body.auth_results) == (
                'mail.example.net; spf=none reason="no DNS record found" '
                "smtp.helo=mail.example.net smtp.mailfrom=mail.example.net"
            )
            _, body = await full(chk, meta("u@example.org"))
            assert format_auth_results("mx", body.auth_results) == (
                'mx; spf=pass reason="matched ip" smtp.helo=mx.example.com smtp.mailfrom=example.org'
            )

    run(main())
