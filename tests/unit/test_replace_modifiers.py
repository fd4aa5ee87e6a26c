"""modify.replace_rcpt / modify.replace_sender at run time (spec §B.5, maddy's replace_addr.go)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from pymaddy.mail.message import MsgMeta
from pymaddy.modify.replace import ReplaceRcpt, ReplaceSender, RewriteError, valid_address
from pymaddy.pipeline.interfaces import Modifier, ModifierState
from pymaddy.runtime.module import Module
from pymaddy.tables.base import Table
from tests.runtime_helpers import Runtime

T = TypeVar("T")

FIXTURES = Path("/work/shared/fixtures/maddy-upstream")
DEFAULT_CONF = FIXTURES / "default" / "maddy.conf"


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def modifiers(body: str) -> str:
    return "modifiers m {\n" + body + "\n}\n"


async def state_of(mod: Module) -> ModifierState:
    assert isinstance(mod, Modifier)
    return await mod.state_for_msg(MsgMeta())


async def rewrite_rcpts(text: str, state: Path, rcpts: list[str], index: int = 0) -> list[list[str] | str]:
    """Each recipient's rewrite through the index-th replace_rcpt, or the error text."""
    async with Runtime(text, state, ["modify.replace_rcpt"]) as rt:
        st = await state_of(rt.all("modify.replace_rcpt", ReplaceRcpt)[index])
        out: list[list[str] | str] = []
        for r in rcpts:
            try:
                out.append(await st.rewrite_rcpt(r))
            except RewriteError as e:
                out.append(f"error: {e}")
        return out


async def rewrite_senders(text: str, state: Path, senders: list[str]) -> list[str]:
    async with Runtime(text, state, ["modify.replace_sender"]) as rt:
        st = await state_of(rt.first("modify.replace_sender", ReplaceSender))
        out: list[str] = []
        for s in senders:
            try:
                out.append(await st.rewrite_sender(s))
            except RewriteError as e:
                out.append(f"error: {e}")
        return out


def test_default_config_replace_rcpt(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("info@example.org: alice@example.org, bob@example.org\n")
    text = DEFAULT_CONF.read_text().replace("/etc/maddy/aliases", str(aliases))
    got = run(
        rewrite_rcpts(
            text,
            tmp_path,
            [
                "foo+tag@example.org",
                "Foo+Tag@Example.ORG",
                "postmaster",
                "POSTMASTER",
                "info+x@example.org",
                "Bob@example.org",
            ],
        )
    )
    assert got == [
        ["foo@example.org"],
        ["foo@example.org"],
        ["postmaster@example.org"],
        ["postmaster@example.org"],
        ["alice@example.org", "bob@example.org"],
        # The chain passes an unknown address through: the normalized form comes back.
        ["bob@example.org"],
    ]


def test_envelope_docs_aliases(tmp_path: Path) -> None:
    """The aliases file of maddy's modifiers docs: local-part fallback, whole-address priority, 1:N."""
    src = FIXTURES / "docs-examples" / "reference__modifiers__envelope__3.aliases"
    (tmp_path / "aliases").write_text(src.read_text())
    got = run(
        rewrite_rcpts(
            modifiers("replace_rcpt file aliases"),
            tmp_path,
            [
                "cat@example.net",
                "CAT@Example.NET",
                "cat@example.org",
                "cat2@example.net",
                "cat2@example.org",
                "cat3@example.com",
                "cat3@example.org",
                "dog@example.org",
            ],
        )
    )
    assert got == [
        ["dog@example.net"],  # local part looked up, re-attached to the domain
        ["dog@example.net"],
        ["cat@example.com"],  # the whole address takes priority
        ["dog@example.net", "mouse@example.net"],
        ["cat@example.com", "cat@example.net"],
        ["dog@example.com", "mouse@example.com"],
        ["cat@example.com", "cat@example.net"],
        ["dog@example.org"],  # no entry: unchanged (as given, not normalized)
    ]


def test_envelope_docs_modifiers(tmp_path: Path) -> None:
    text = (FIXTURES / "docs-examples" / "reference__modifiers__envelope__2.conf").read_text()
    text = text.replace("/etc/maddy/aliases", str(tmp_path / "missing")).replace("modify {", "modifiers m {")
    keys = ["a@example.org", "c@example.org", "x@example.net", "x@example.org"]
    assert run(rewrite_rcpts(text, tmp_path, keys, 1)) == [
        ["b@example.org"],
        ["c1@example.org", "c2@example.org"],
        ["x@example.net"],
        ["x@example.org"],
    ]
    assert run(rewrite_rcpts(text, tmp_path, keys, 3)) == [
        ["a@example.org"],
        ["c@example.org"],
        ["x@example.org", "x@example.com"],
        ["x@example.org"],
    ]


def test_catch_all_recipe(tmp_path: Path) -> None:
    text = modifiers('replace_rcpt regexp ".*" "catchall@example.org"')
    assert run(rewrite_rcpts(text, tmp_path, ["anyone@example.org", "postmaster"])) == [
        ["catchall@example.org"],
        ["catchall@example.org"],
    ]


def test_local_part_values(tmp_path: Path) -> None:
    text = modifiers(
        "replace_rcpt static {\n"
        " entry joe joe.smith\n"
        ' entry quoted "\\"a@b\\""\n'
        " entry full someone@elsewhere.example\n"
        " entry multi m1 m2@other.example\n"
        "}"
    )
    got = run(
        rewrite_rcpts(text, tmp_path, ["joe@example.org", "quoted@example.org", "full@example.org", "multi@x.example"])
    )
    assert got == [
        ["joe.smith@example.org"],
        ['"a@b"@example.org'],  # a quoted value with @ is still a local part
        ["someone@elsewhere.example"],  # a value with @ is used whole
        ["m1@x.example", "m2@other.example"],
    ]


def test_not_recursive(tmp_path: Path) -> None:
    text = modifiers("replace_rcpt static {\n entry a@x.example b@x.example\n entry b@x.example c@x.example\n}")
    assert run(rewrite_rcpts(text, tmp_path, ["a@x.example"])) == [["b@x.example"]]


def test_invalid_replacements(tmp_path: Path) -> None:
    text = modifiers(
        "replace_rcpt static {\n"
        " entry bad@example.org not-an-address\n"
        " entry badlocal a@b@\n"
        " entry baddomain@example.org x@a..b\n"
        " entry ok@example.org good@example.org\n"
        "}"
    )
    got = run(
        rewrite_rcpts(
            text, tmp_path, ["bad@example.org", "badlocal@example.org", "baddomain@example.org", "ok@example.org", "a@"]
        )
    )
    assert got == [
        "error: refusing to replace recipient with the invalid address not-an-address",
        "error: refusing to replace recipient with invalid address a@b@",
        "error: refusing to replace recipient with the invalid address x@a..b",
        ["good@example.org"],
        "error: malformed address: 'a@'",
    ]


def test_replace_sender_first_value(tmp_path: Path) -> None:
    text = modifiers(
        "replace_sender static {\n"
        " entry from@example.org one@example.org two@example.org\n"
        " entry local first second\n"
        " entry broken@example.org nope\n"
        "}"
    )
    got = run(
        rewrite_senders(
            text, tmp_path, ["From@Example.org", "local@d.example", "other@example.org", "broken@example.org"]
        )
    )
    assert got == [
        "one@example.org",
        "first@d.example",
        "other@example.org",
        "error: refusing to replace recipient with the invalid address nope",
    ]


def test_sender_and_rcpt_modules_leave_the_other_alone(tmp_path: Path) -> None:
    text = modifiers(
        "replace_rcpt static {\n entry a@x.example b@x.example\n}\n"
        "replace_sender static {\n entry a@x.example b@x.example\n}"
    )

    async def go() -> tuple[str, list[str]]:
        async with Runtime(text, tmp_path, ["modify.replace_rcpt", "modify.replace_sender"]) as rt:
            rcpt = await state_of(rt.first("modify.replace_rcpt", ReplaceRcpt))
            sender = await state_of(rt.first("modify.replace_sender", ReplaceSender))
            return await rcpt.rewrite_sender("a@x.example"), await sender.rewrite_rcpt("a@x.example")

    assert run(go()) == ("a@x.example", ["a@x.example"])


def test_table_failure_propagates(tmp_path: Path) -> None:
    class Boom(Table):
        async def lookup_multi(self, key: str) -> list[str]:
            raise OSError("backend down")

    async def go() -> None:
        async with Runtime(modifiers("replace_rcpt identity"), tmp_path, ["modify.replace_rcpt"]) as rt:
            mod = rt.first("modify.replace_rcpt", ReplaceRcpt)
            mod._table = Boom()
            with pytest.raises(OSError, match="backend down"):
                await mod.rewrite_rcpt("a@b.example")

    run(go())


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ("a@example.org", True),
        ("postmaster", True),
        ("a..b@example.org", True),  # maddy is lenient about dots
        ("first_last@my_host.example", True),
        ('"a b"@example.org', True),
        ("a b@example.org", False),
        ("@example.org", False),
        ("a@", False),
        ("a@.example.org", False),
        ("a@example..org", False),
        ("ünï@exämple.org", True),
        ("x" * 310 + "@example.org", False),
    ],
)
def test_valid_address(addr: str, ok: bool) -> None:
    assert valid_address(addr) is ok


def test_helpers_type(tmp_path: Path) -> None:
    check: Callable[[object], bool] = lambda o: isinstance(o, Modifier) and isinstance(o, ModifierState)  # noqa: E731

    async def go() -> bool:
        async with Runtime(modifiers("replace_rcpt identity"), tmp_path, ["modify.replace_rcpt"]) as rt:
            return check(rt.first("modify.replace_rcpt", ReplaceRcpt))

    assert run(go())
