"""DMARC in the pipeline (spec §D.4, §I.2, RFC 7489 §6.6) with check.spf + check.dkim against the
loopback DNS server, delivering into storage.imapsql (quarantine ⇒ Junk)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from pymaddy.dkim.core import SignOptions, sign
from pymaddy.dkim.keys import dns_record, generate_key
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.runner import PipelineRunner
from pymaddy.storage.imapsql import IMAPSQL
from tests.dnsserver import DNSServer
from tests.runtime_helpers import Runtime

CLIENT_IP = "192.0.2.10"
KEY = generate_key("ed25519")


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    srv = DNSServer()
    for d in ("example.org", "example.net", "example.com", "nodmarc.test", "temp.test"):
        srv.add_txt(d, "v=spf1 ip4:192.0.2.0/24 -all")
        srv.add_txt(f"sel._domainkey.{d}", dns_record(KEY))
    srv.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    srv.add_txt("_dmarc.example.net", "v=DMARC1; p=quarantine; adkim=s")
    srv.add_txt("_dmarc.example.com", "v=DMARC1; p=none")
    srv.fail("_dmarc.temp.test", "TXT")
    with srv:
        yield srv


def config(tmp: Path, dmarc: str = "dmarc yes") -> str:
    return f"""state_dir {tmp}
hostname mx.example.net
tls off
storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}
smtp tcp://127.0.0.1:0 {{
    {dmarc}
    check {{
        spf
        dkim
    }}
    default_source {{
        default_destination {{
            deliver_to &local_mailboxes
        }}
    }}
}}
"""


Scenario = Callable[[PipelineRunner, IMAPSQL], Awaitable[None]]


def run(tmp: Path, srv: DNSServer, fn: Scenario, dmarc: str = "dmarc yes") -> None:
    async def main() -> None:
        rt = Runtime(config(tmp, dmarc), tmp, ["checks", "local_mailboxes"])
        rt.ctx.options = dataclasses.replace(rt.ctx.options, dns_override=srv.override)
        async with rt:
            st = rt.block("local_mailboxes", IMAPSQL)
            await st.create_account("bob@example.net")
            pipe = rt.graph.endpoints[0].settings["pipeline"]
            await fn(PipelineRunner(pipe, rt.ctx, rt.logger, "mx.example.net", add_received=True), st)

    asyncio.run(main())


def message(from_hdr: str, dkim_domain: str | None = None) -> tuple[Header, Body]:
    header = Header.parse(
        f"From: Alice <{from_hdr}>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example>\r\n".encode()
    )
    body = Body(b"Hello, Bob.\r\n")
    if dkim_domain is not None:
        opts = SignOptions(dkim_domain, "sel", KEY, ["From", "To", "Subject", "Date"], identifier="@" + dkim_domain)
        header.add_raw_top(Header.parse(sign(header, body, opts)))
    return header, body


async def deliver(runner: PipelineRunner, mail_from: str, header: Header, body: Body) -> MsgMeta:
    meta = MsgMeta(conn=ConnInfo(remote_ip=CLIENT_IP, helo="mx.example.com"), original_from=mail_from)
    d = await runner.start_delivery(meta, mail_from)
    try:
        await d.add_rcpt("bob@example.net")
        await d.body(header, body)
        await d.commit()
    except BaseException:
        await d.abort()
        raise
    return meta


async def stored(st: IMAPSQL, mailbox: str = "INBOX") -> list[bytes]:
    return [await st.read_message(m) for m in await st.list_messages("bob@example.net", mailbox)]


def auth_results(raw: bytes) -> list[str]:
    """The entries of the single Authentication-Results field (unfolded), after the host."""
    hdr = Header.parse(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    [value] = hdr.get_all("Authentication-Results")
    host, *entries = value.split("; ")
    assert host == "mx.example.net"
    return entries


def test_aligned_pass_is_delivered_with_spf_dkim_dmarc_results(tmp_path: Path, dns_server: DNSServer) -> None:
    async def t(runner: PipelineRunner, st: IMAPSQL) -> None:
        header, body = message("alice@example.org", dkim_domain="example.org")
        meta = await deliver(runner, "alice@example.org", header, body)
        assert not meta.quarantine
        [raw] = await stored(st)
        entries = auth_results(raw)
        # spf and dkim in completion order, dmarc last (spec §I.2)
        assert entries[-1] == "dmarc=pass header.from=example.org"
        assert sorted(entries[:-1]) == [
            "dkim=pass header.d=example.org header.i=@example.org",
            'spf=pass reason="matched ip" smtp.helo=mx.example.com smtp.mailfrom=example.org',
        ]
        # above Received (RFC 8601 §4 / maddy GH #135)
        lines = raw.split(b"\r\n")
        names = [ln.split(b":", 1)[0] for ln in lines if ln and not ln[:1].isspace()]
        assert names.index(b"Authentication-Results") < names.index(b"Received")

    run(tmp_path, dns_server, t)


def test_unaligned_with_p_reject_is_rejected(tmp_path: Path, dns_server: DNSServer) -> None:
    async def t(runner: PipelineRunner, st: IMAPSQL) -> None:
        # SPF passes for example.com and the signature is example.com's: neither aligns with From.
        header, body = message("alice@example.org", dkim_domain="example.com")
        with pytest.raises(SMTPError) as ei:
            await deliver(runner, "mallory@example.com", header, body)
        e = ei.value
        assert (e.code, e.enhanced, e.message, e.check) == (550, (5, 7, 1), "DMARC check failed", "dmarc")
        assert e.reason == "No aligned identifiers"
        assert e.fields["spf_res"] == "pass" and e.fields["dkim_domain"] == "example.com"
        assert await stored(st) == []

    run(tmp_path, dns_server, t)


def test_p_quarantine_lands_in_junk(tmp_path: Path, dns_server: DNSServer) -> None:
    async def t(runner: PipelineRunner, st: IMAPSQL) -> None:
        # adkim=s: a signature by example.net would align, but mail.example.net's does not
        header, body = message("alice@example.net", dkim_domain="mail.example.net")
        meta = await deliver(runner, "mallory@nodmarc.test", header, body)
        assert meta.quarantine
        assert await stored(st) == []
        [raw] = await stored(st, "Junk")
        assert auth_results(raw)[-1] == 'dmarc=fail reason="No aligned identifiers" header.from=example.net'

    run(tmp_path, dns_server, t)


def test_p_none_and_no_record_are_delivered(tmp_path: Path, dns_server: DNSServer) -> None:
    async def t(runner: PipelineRunner, st: IMAPSQL) -> None:
        header, body = message("alice@example.com")
        assert not (await deliver(runner, "mallory@nodmarc.test", header, body)).quarantine
        header, body = message("alice@nodmarc.test")
        assert not (await deliver(runner, "mallory@example.org", header, body)).quarantine
        first, second = await stored(st)
        a1, a2 = auth_results(first), auth_results(second)
        assert a1[-1] == 'dmarc=fail reason="No aligned identifiers" header.from=example.com'
        assert "dkim=none " in a1
        assert a2[-1] == "dmarc=none header.from=nodmarc.test"

    run(tmp_path, dns_server, t)


def test_policy_lookup_temperror_fails_closed(tmp_path: Path, dns_server: DNSServer) -> None:
    async def t(runner: PipelineRunner, st: IMAPSQL) -> None:
        header, body = message("alice@temp.test", dkim_domain="temp.test")
        with pytest.raises(SMTPError) as ei:
            await deliver(runner, "alice@temp.test", header, body)
        assert (ei.value.code, ei.value.enhanced, ei.value.message) == (450, (4, 7, 1), "DMARC check failed")
        assert ei.value.reason.startswith("Policy lookup failed: ")

    run(tmp_path, dns_server, t)


def test_dmarc_off_adds_no_result_and_never_rejects(tmp_path: Path, dns_server: DNSServer) -> None:
    async def t(runner: PipelineRunner, st: IMAPSQL) -> None:
        header, body = message("alice@example.org", dkim_domain="example.com")
        await deliver(runner, "mallory@example.com", header, body)
        [raw] = await stored(st)
        assert not any(e.startswith("dmarc=") for e in auth_results(raw))

    run(tmp_path, dns_server, t, dmarc="dmarc no")


def test_malformed_from_is_a_permerror_without_action(tmp_path: Path, dns_server: DNSServer) -> None:
    async def t(runner: PipelineRunner, st: IMAPSQL) -> None:
        header, body = message("alice@example.org")
        header.add("From", "second@example.org")
        await deliver(runner, "alice@example.org", header, body)
        [raw] = await stored(st)
        assert auth_results(raw)[-1] == (
            'dmarc=permerror reason="Policy lookup failed: dmarc: multiple From header fields are not allowed"'
        )

    run(tmp_path, dns_server, t)
