"""check.authorize_sender (spec §B.4): MAIL FROM and From/Sender against the SASL user."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from pymaddy.checks.authorize_sender import AuthorizeSender, parse_address_list
from pymaddy.cli.blocks import dependencies
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.interfaces import CheckResult
from pymaddy.runtime import metrics
from pymaddy.runtime.log import Logger, NopOutput
from pymaddy.runtime.module import RuntimeContext
from pymaddy.runtime.options import RunOptions
from pymaddy.runtime.supervisor import load_class
from tests.confhelp import STANDALONE_NOISE, compile_text


@asynccontextmanager
async def checker(block: str = "") -> AsyncIterator[AuthorizeSender]:
    res = compile_text(f"check.authorize_sender chk {{\n{block}\n}}\n")
    errs = [str(e) for e in res.errors if not any(n in str(e) for n in STANDALONE_NOISE)]
    assert not errs, errs
    assert res.graph is not None
    ctx = RuntimeContext(
        options=RunOptions(config="maddy.conf"), graph=res.graph, generation=0,
        logger=Logger(out=NopOutput()), metrics=metrics.REGISTRY, state_dir="/nonexistent", runtime_dir="/nonexistent",
    )
    objs = []
    for inst in dependencies(res.graph.blocks["chk"]):
        assert inst.schema.runtime is not None
        obj = load_class(inst.schema.runtime)(inst, ctx)
        ctx.objects[id(inst)] = obj
        objs.append(obj)
    for obj in objs:
        await obj.start()
    try:
        chk = objs[-1]
        assert isinstance(chk, AuthorizeSender)
        yield chk
    finally:
        for obj in reversed(objs):
            await obj.stop()


def meta(user: str) -> MsgMeta:
    return MsgMeta(conn=ConnInfo(remote_ip="192.0.2.1", auth_user=user))


async def sender(chk: AuthorizeSender, user: str, mail_from: str) -> CheckResult:
    st = await chk.state_for_msg(meta(user))
    return await st.check_sender(mail_from)


async def body(chk: AuthorizeSender, user: str, header: str) -> CheckResult:
    st = await chk.state_for_msg(meta(user))
    return await st.check_body(Header.parse(header.encode()), Body(b"hi\r\n"))


def rejected(res: CheckResult) -> str:
    assert res.reject is not None, res
    e = res.reject
    return f"{e.code} {e.enhanced_str} {e.message}"


def ok(res: CheckResult) -> bool:
    return res.reject is None and res.reason is None and not res.quarantine


def run(coro_fn: object) -> None:
    asyncio.run(coro_fn())  # type: ignore[operator]


def test_unauthenticated_is_rejected() -> None:
    async def main() -> None:
        async with checker() as chk:
            assert rejected(await sender(chk, "", "user@example.org")) == "530 5.7.0 Authentication required"
            # As maddy: in the header stage any failure ends as the no-match error.
            assert rejected(await body(chk, "", "From: user@example.org\r\n")) == (
                "553 5.7.0 Unauthorized use of sender address"
            )
            assert (await sender(chk, "", "x@y")).reject.check == "check.authorize_sender"  # type: ignore[union-attr]

    run(main)


def test_identity_defaults() -> None:
    async def main() -> None:
        async with checker() as chk:
            assert ok(await sender(chk, "user@example.org", "user@example.org"))
            assert ok(await sender(chk, "User@EXAMPLE.org", "uSer@example.ORG"))  # both normalized
            assert ok(await sender(chk, "\uff55\uff53\uff45\uff52@example.org", "user@example.org"))
            bad = "553 5.7.0 Unauthorized use of sender address"
            assert rejected(await sender(chk, "user@example.org", "other@example.org")) == bad
            assert rejected(await sender(chk, "user", "user@example.org")) == bad
            # An address that cannot be normalized (null sender, spaces).
            assert rejected(await sender(chk, "user@example.org", "")) == "553 5.1.7 Unable to normalize sender address"
            assert rejected(await sender(chk, "a b", "user@example.org")) == (
                "535 5.7.8 Unable to normalize authorization username"
            )

    run(main)


def test_tables_domains_and_wildcard() -> None:
    block = """
    user_to_email static {
        entry "alice" "alice@example.org" "example.net"
        entry "admin" "*"
    }
    prepare_email static {
        entry "a.lice@example.org" "alice@example.org"
    }
    """

    async def main() -> None:
        async with checker(block) as chk:
            assert ok(await sender(chk, "alice", "alice@example.org"))
            assert ok(await sender(chk, "Alice", "ALICE@example.org"))
            assert ok(await sender(chk, "alice", "anything@example.net"))  # bare domain entry
            assert ok(await sender(chk, "alice", "a.lice@example.org"))  # prepare_email alias
            assert rejected(await sender(chk, "alice", "bob@example.org")).startswith("553 5.7.0")
            assert ok(await sender(chk, "admin", "whoever@wherever.test"))  # `*`
            assert rejected(await sender(chk, "bob", "bob@example.org")).startswith("553 5.7.0")  # no mapping

    run(main)


def test_header_checks() -> None:
    async def main() -> None:
        async with checker() as chk:
            u = "user@example.org"
            assert ok(await body(chk, u, "From: User <user@example.org>\r\nSubject: x\r\n"))
            assert rejected(await body(chk, u, "Subject: x\r\n")) == "550 5.7.0 Missing From header"
            assert rejected(await body(chk, u, "From: not an address\r\n")) == "550 5.7.0 Malformed From header"
            assert rejected(await body(chk, u, "From: a@example.org, user@example.org\r\n")) == (
                "550 5.7.0 Multiple From addresses are not allowed"
            )
            assert rejected(await body(chk, u, "From: other@example.org\r\n")) == (
                "553 5.7.0 Unauthorized use of sender address"
            )
            # Sender may authorise the message when From does not.
            assert ok(await body(chk, u, "From: list@example.org\r\nSender: user@example.org\r\n"))
            assert rejected(await body(chk, u, "From: list@example.org\r\nSender: x@example.org\r\n")) == (
                "553 5.7.0 Unauthorized use of sender address"
            )
            assert rejected(await body(chk, u, "From: user@example.org\r\nSender: <>\r\n")) == (
                "550 5.7.0 Malformed Sender header"
            )
            # Folded From header.
            assert ok(await body(chk, u, "From: \"A long\r\n name\" <user@example.org>\r\n"))

    run(main)


def test_check_header_off() -> None:
    async def main() -> None:
        async with checker("check_header no") as chk:
            assert ok(await body(chk, "user@example.org", "Subject: no from\r\n"))
            assert ok(await body(chk, "user@example.org", "From: other@example.org\r\n"))

    run(main)


def test_actions() -> None:
    block = """
    unauth_action ignore
    no_match_action quarantine
    err_action reject 450 4.7.1 "Try later"
    """

    async def main() -> None:
        async with checker(block) as chk:
            res = await sender(chk, "", "user@example.org")
            assert res.reject is None and not res.quarantine
            assert res.reason is not None and res.reason.code == 530
            res = await sender(chk, "user@example.org", "other@example.org")
            assert res.reject is None and res.quarantine
            assert res.reason is not None and res.reason.code == 553
            assert rejected(await body(chk, "user@example.org", "Subject: x\r\n")) == "450 4.7.1 Try later"

    run(main)


def test_normalize_settings() -> None:
    async def main() -> None:
        async with checker("auth_normalize noop\nfrom_normalize noop") as chk:
            assert ok(await sender(chk, "user@example.org", "user@example.org"))
            assert rejected(await sender(chk, "User@example.org", "user@example.org")).startswith("553 5.7.0")

    run(main)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@b.c", ["a@b.c"]),
        ("Foo <A@B.c>", ["A@B.c"]),
        ('"john doe"@x.org', ["john doe@x.org"]),
        ("=?utf-8?q?J=C3=B6rg?= <j@x.y>", ["j@x.y"]),
        ("a@b, c@d", ["a@b", "c@d"]),
    ],
)
def test_parse_address_list(value: str, expected: list[str]) -> None:
    assert parse_address_list(value) == expected
