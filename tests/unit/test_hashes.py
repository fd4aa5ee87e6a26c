"""Password hashes in maddy's formats, the normalizers, auth.pass_table and auth.plain_separate."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import bcrypt
import pytest
from argon2 import PasswordHasher
from argon2.low_level import Type

from pymaddy.auth import hashes, normalize
from pymaddy.auth.base import PlainAuth
from pymaddy.auth.pass_table import PassTable, UserDBError
from pymaddy.auth.plain_separate import PlainSeparate
from pymaddy.cli.blocks import dependencies
from pymaddy.mail.errors import AuthError, AuthTemporaryError
from pymaddy.runtime import metrics
from pymaddy.runtime.log import Logger, NopOutput
from pymaddy.runtime.module import Module, RuntimeContext
from pymaddy.runtime.options import RunOptions
from pymaddy.runtime.supervisor import load_class
from pymaddy.tables.base import MutableTable
from tests.confhelp import STANDALONE_NOISE, compile_text

# Hashes written by other implementations (crypt_blowfish's and maddy's own test vectors).
BCRYPT_VECTORS = [
    ("U*U", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"),
    ("", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.7uG0VCzI2bS7j6ymqJi9CdcdxiRTWNy"),
    ("password", "$2y$10$4tEJtJ6dApmhETg8tJ4WHOeMtmYXQwmHDKIyfg09Bw1F/smhLjlaa"),
    ("123", "$2a$10$E.AuCH3oYbaRrETXfXwc0.4jRAQBbanpZiCfudsJz9bHzLr/qj6ti"),
]
# Made by maddy's Go code (golang.org/x/crypto/argon2.IDKey): time 1, 8 KiB, 1 thread, 8-byte salt.
GO_ARGON2 = (
    "argon2:1:8:1:U0FBQUFBTFQ=:KHUshl3DcpHR3AoVd28ZeBGmZ1Fj1gwJgNn98Ia8DAvGHqI0BvFOMJPxtaAfO8F+"
    "qomm2O3h0P0yV50QGwXI/Q=="
)
GO_SHA256 = "sha256:U0FMVA==:8PDRAgaUqaLSk34WpYniXjaBgGM93Lc6iF4pw2slthw="


# -- bcrypt ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("password", "hashed"), BCRYPT_VECTORS)
def test_bcrypt_vectors(password: str, hashed: str) -> None:
    hashes.verify(password, "bcrypt:" + hashed)
    with pytest.raises(hashes.HashMismatch):
        hashes.verify(password + "x", "bcrypt:" + hashed)


def test_bcrypt_made_by_library_verifies() -> None:
    stored = "bcrypt:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    assert hashes.check("s3cret", stored)
    assert not hashes.check("S3cret", stored)


def test_bcrypt_compute_is_go_style() -> None:
    stored = hashes.compute("bcrypt", "pw", hashes.HashOpts(bcrypt_cost=4))
    assert stored.startswith("bcrypt:$2a$04$")
    assert bcrypt.checkpw(b"pw", stored.removeprefix("bcrypt:").encode())
    # Go: a cost below the minimum means the default cost.
    assert hashes.compute("bcrypt", "pw", hashes.HashOpts(bcrypt_cost=1)).startswith("bcrypt:$2a$10$")
    with pytest.raises(hashes.HashError, match="outside allowed range"):
        hashes.compute("bcrypt", "pw", hashes.HashOpts(bcrypt_cost=32))
    with pytest.raises(hashes.HashError, match="72 bytes"):
        hashes.compute("bcrypt", "x" * 73)


def test_bcrypt_long_password_compares_first_72_bytes() -> None:
    stored = "bcrypt:" + bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(4)).decode()
    assert hashes.check("a" * 72, stored)
    assert hashes.check("a" * 80, stored)  # as Go's CompareHashAndPassword


# -- argon2 ------------------------------------------------------------------------------------------


def test_argon2_go_vector() -> None:
    hashes.verify("password", GO_ARGON2)
    assert not hashes.check("different-password", GO_ARGON2)


def _unpadded(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def test_argon2_independent_derivation_in_maddy_format() -> None:
    # argon2-cffi's high-level hasher writes PHC strings; rebuild maddy's format from one.
    ph = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1, hash_len=64, salt_len=16, type=Type.ID)
    phc = ph.hash("correct horse")
    _, variant, version, params, salt_b64, key_b64 = phc.split("$")
    assert (variant, version, params) == ("argon2id", "v=19", "m=1024,t=2,p=1")
    salt, key = _unpadded(salt_b64), _unpadded(key_b64)
    stored = f"argon2:2:1024:1:{base64.b64encode(salt).decode()}:{base64.b64encode(key).decode()}"
    hashes.verify("correct horse", stored)
    assert not hashes.check("correct horse!", stored)


def test_argon2_compute_format_and_round_trip() -> None:
    stored = hashes.compute("argon2", "pässword", hashes.HashOpts(argon2_time=1, argon2_memory=64, argon2_threads=2))
    algo, data = stored.split(":", 1)
    assert algo == "argon2"
    t, m, p, salt, key = hashes.parse_argon2(data)
    assert (t, m, p, len(salt), len(key)) == (1, 64, 2, hashes.ARGON2_SALT, hashes.ARGON2_SIZE)
    assert data.split(":")[3] == base64.b64encode(salt).decode()  # std base64 with padding
    # The key is argon2id over the UTF-8 password, checked with argon2-cffi's PHC verifier.
    phc = (
        f"$argon2id$v=19$m=64,t=1,p=2${base64.b64encode(salt).decode().rstrip('=')}"
        f"${base64.b64encode(key).decode().rstrip('=')}"
    )
    assert PasswordHasher().verify(phc, "pässword")
    hashes.verify("pässword", stored)
    assert not hashes.check("password", stored)


def test_default_hash_options_match_maddy() -> None:
    stored = hashes.compute("argon2", "x")
    assert stored.startswith("argon2:2:1024:1:")


@pytest.mark.parametrize(
    "stored",
    [
        "argon2:1:8:1:U0FBQUFBTFQ=",  # too few fields
        "argon2:x:8:1:U0FBQUFBTFQ=:AAAA",
        "argon2:1:8:256:U0FBQUFBTFQ=:AAAA",  # threads is 8 bits
        "argon2:1:8:1:not*base64:AAAA",
        "bcrypt:$2a$10$short",
        "nohashtag",
        "md5:abcdef",
        "sha256:U0FMVA==:8PDRAgaUqaLSk34WpYniXjaBgGM93Lc6iF4pw2slthw=",  # not enabled outside tests
    ],
)
def test_unusable_hashes(stored: str) -> None:
    saved = dict(hashes.VERIFY)
    hashes.VERIFY.pop("sha256", None)
    try:
        with pytest.raises(hashes.HashError):
            hashes.verify("password", stored)
        assert not hashes.check("password", stored)
    finally:
        hashes.VERIFY.clear()
        hashes.VERIFY.update(saved)


def test_sha256_test_only_scheme() -> None:
    saved_c, saved_v = dict(hashes.COMPUTE), dict(hashes.VERIFY)
    try:
        hashes.enable_sha256()
        hashes.verify("password", GO_SHA256)
        assert not hashes.check("different-password", GO_SHA256)
        stored = hashes.compute("sha256", "pw")
        salt, digest = stored.removeprefix("sha256:").split(":")
        assert len(base64.b64decode(salt)) == 32 and len(base64.b64decode(digest)) == 32
        assert hashes.check("pw", stored)
    finally:
        hashes.COMPUTE.clear()
        hashes.COMPUTE.update(saved_c)
        hashes.VERIFY.clear()
        hashes.VERIFY.update(saved_v)
    with pytest.raises(hashes.HashError, match="unknown hash function"):
        hashes.compute("sha256", "pw")


def test_verify_async_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def fake(password: str, data: str) -> None:
        seen.append(threading.get_ident())

    monkeypatch.setitem(hashes.VERIFY, "bcrypt", fake)

    async def main() -> int:
        await hashes.verify_async("x", "bcrypt:whatever")
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert seen and seen[0] != loop_thread


# -- normalizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("auto", "Foo@EXAMPLE.org", "foo@example.org"),
        ("auto", "\uff26\uff2f\uff2f", "foo"),  # width mapping + case mapping
        ("auto", "Straße@xn--bcher-kva.de.", "straße@bücher.de"),
        ("precis_casefold", "Foo@Bar", "foo@bar"),
        ("precis_casefold_email", "Foo@EXAMPLE.ORG", "foo@example.org"),
        ("precis_email", "Foo@EXAMPLE.ORG", "Foo@example.org"),
        ("precis", "FooBar", "FooBar"),
        ("precis", "\uff46\uff4f\uff4f", "foo"),
        ("casefold", "Foo Bar", "foo bar"),
        ("noop", " Foo ", " Foo "),
        ("auto", "e\u0301", "\u00e9"),  # NFC
    ],
)
def test_normalizers(name: str, value: str, expected: str) -> None:
    assert normalize.get(name)(value) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("auto", "a b"),
        ("auto", ""),
        ("precis_casefold", "tab\there"),
        ("precis_casefold_email", "no-at-sign"),
        ("precis_email", "@example.org"),
        ("precis", "ctrl\x01"),
    ],
)
def test_normalizers_refuse(name: str, value: str) -> None:
    with pytest.raises(normalize.NormalizeError):
        normalize.get(name)(value)


def test_every_configurable_normalizer_exists() -> None:
    from pymaddy.config.values import NORMALIZERS

    assert set(NORMALIZERS) == set(normalize.NORMALIZERS)
    with pytest.raises(normalize.NormalizeError):
        normalize.get("nope")


# -- auth.pass_table / auth.plain_separate over real module objects --------------------------------


@asynccontextmanager
async def started(text: str, name: str) -> AsyncIterator[Module]:
    """Compile `text`, build and start block `name` and what it references (no directories touched)."""
    res = compile_text(text)
    errs = [str(e) for e in res.errors if not any(n in str(e) for n in STANDALONE_NOISE)]
    assert not errs, errs
    assert res.graph is not None
    ctx = RuntimeContext(
        options=RunOptions(config="maddy.conf"), graph=res.graph, generation=0,
        logger=Logger(out=NopOutput()), metrics=metrics.REGISTRY, state_dir="/nonexistent", runtime_dir="/nonexistent",
    )
    objs = []
    for inst in dependencies(res.graph.blocks[name]):
        assert inst.schema.runtime is not None, inst.schema.name
        obj = load_class(inst.schema.runtime)(inst, ctx)
        ctx.objects[id(inst)] = obj
        objs.append(obj)
    for obj in objs:
        await obj.start()
    try:
        yield ctx.objects[id(res.graph.blocks[name])]
    finally:
        for obj in reversed(objs):
            await obj.stop()


PASS_TABLE_CONF = f"""
auth.pass_table local_authdb {{
    table static {{
        entry foxcpp "bcrypt:{BCRYPT_VECTORS[2][1]}"
        entry "user@example.org" "{GO_ARGON2}"
        entry broken "nohashtag"
        entry weird "md5:abc"
    }}
}}
"""


def test_pass_table_auth_plain() -> None:
    async def main() -> None:
        async with started(PASS_TABLE_CONF, "local_authdb") as mod:
            assert isinstance(mod, PassTable)
            await mod.auth_plain("foxcpp", "password")
            await mod.auth_plain("FOXCPP", "password")  # key is PRECIS-case-mapped
            await mod.auth_plain("\uff26\uff2f\uff38\uff23\uff30\uff30", "password")  # and width-mapped
            await mod.auth_plain("User@Example.ORG", "password")
            for user, pw in [("foxcpp", "nope"), ("nobody", "password"), ("broken", "x"), ("weird", "x"),
                             ("has space", "password"), ("", "")]:
                with pytest.raises(AuthError):
                    await mod.auth_plain(user, pw)
            # As a table: username → stored hash.
            assert await mod.lookup("FoxCPP") == "bcrypt:" + BCRYPT_VECTORS[2][1]
            assert await mod.lookup("nobody") is None
            with pytest.raises(UserDBError, match="not mutable"):
                await mod.list_users()
            with pytest.raises(UserDBError, match="not mutable"):
                await mod.create_user("x", "y")

    asyncio.run(main())


class _MemTable(MutableTable):
    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.fail = False

    async def lookup_multi(self, key: str) -> list[str]:
        if self.fail:
            raise RuntimeError("database is locked")
        return [self.data[key]] if key in self.data else []

    async def keys(self) -> list[str]:
        return sorted(self.data)

    async def set_key(self, key: str, value: str) -> None:
        self.data[key] = value

    async def remove_key(self, key: str) -> None:
        self.data.pop(key, None)


def test_pass_table_user_management() -> None:
    async def main() -> None:
        async with started(PASS_TABLE_CONF, "local_authdb") as mod:
            assert isinstance(mod, PassTable)
            mem = _MemTable()
            mod._table = mem
            assert await mod.list_users() == []
            await mod.create_user("Alice@Example.org", "pw1", "bcrypt", hashes.HashOpts(bcrypt_cost=4))
            assert mem.data["alice@example.org"].startswith("bcrypt:$2a$04$")
            with pytest.raises(UserDBError, match=r"^credentials for alice@example.org already exist$"):
                await mod.create_user("ALICE@example.org", "pw2")
            await mod.create_user("bob", "pw", "argon2", hashes.HashOpts(argon2_time=1, argon2_memory=64))
            assert mem.data["bob"].startswith("argon2:1:64:1:")
            with pytest.raises(UserDBError, match="unknown hash function: md5"):
                await mod.create_user("carol", "pw", "md5")
            assert await mod.list_users() == ["alice@example.org", "bob"]
            await mod.auth_plain("alice@example.org", "pw1")
            await mod.auth_plain("Bob", "pw")
            await mod.set_user_password("BOB", "new")
            assert mem.data["bob"].startswith("bcrypt:$2a$10$")
            await mod.auth_plain("bob", "new")
            with pytest.raises(AuthError):
                await mod.auth_plain("bob", "pw")
            await mod.delete_user("Bob")
            assert await mod.list_users() == ["alice@example.org"]
            with pytest.raises(UserDBError, match="create user"):
                await mod.create_user("a b", "x")
            mem.fail = True
            with pytest.raises(AuthTemporaryError):
                await mod.auth_plain("alice@example.org", "pw1")

    asyncio.run(main())


PLAIN_SEPARATE_CONF = f"""
auth.pass_table passwords {{
    table static {{
        entry alice "bcrypt:{BCRYPT_VECTORS[3][1]}"
        entry bob "bcrypt:{BCRYPT_VECTORS[3][1]}"
    }}
}}
auth.plain_separate combined {{
    user static {{
        entry alice ""
    }}
    user static {{
        entry carol ""
    }}
    pass &passwords
}}
auth.plain_separate anyone {{
    pass &passwords
}}
auth.plain_separate nopass {{
}}
"""


def test_plain_separate() -> None:
    async def main() -> None:
        async with started(PLAIN_SEPARATE_CONF, "combined") as mod:
            assert isinstance(mod, PlainSeparate) and isinstance(mod, PlainAuth)
            await mod.auth_plain("alice", "123")
            with pytest.raises(AuthError):
                await mod.auth_plain("alice", "1234")
            with pytest.raises(AuthError, match="not found"):
                await mod.auth_plain("bob", "123")  # valid password, not in a user table
            with pytest.raises(AuthError):
                await mod.auth_plain("carol", "123")  # in a user table, no password
            assert await mod.lookup("alice") == ""
            assert await mod.lookup("bob") is None
        async with started(PLAIN_SEPARATE_CONF, "anyone") as mod:
            assert isinstance(mod, PlainSeparate)
            await mod.auth_plain("bob", "123")
            assert await mod.lookup("anything") == ""
        async with started(PLAIN_SEPARATE_CONF, "nopass") as mod:
            assert isinstance(mod, PlainSeparate)
            with pytest.raises(AuthError):
                await mod.auth_plain("bob", "123")

    asyncio.run(main())
