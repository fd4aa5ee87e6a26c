"""pymaddy.mtasts: RFC 8461 policy and TXT parsing, MX matching, HTTPS fetch, the policy cache."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymaddy.mtasts import (
    Cache,
    FetchError,
    FSStore,
    NoPolicy,
    Policy,
    PolicyError,
    RAMStore,
    fetch_policy,
    match_mx,
    parse_policy,
    parse_txt,
)
from tests.httpsserver import HTTPSServer
from tests.testca import CA

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n"


# -- policy file (RFC 8461 §3.2) ---------------------------------------------------------------


def test_policy_parses_crlf_and_lf() -> None:
    p = parse_policy(POLICY)
    assert p == Policy("enforce", 604800, ("mail.example.com", "*.example.net"))
    assert parse_policy(POLICY.replace("\r\n", "\n")) == p


def test_policy_ignores_unknown_keys_and_keeps_first_value() -> None:
    p = parse_policy("version: STSv1\nmode: testing\nmode: enforce\nfoo: bar\nmx: a.example\nmax_age: 5\n")
    assert (p.mode, p.max_age, p.mx) == ("testing", 5, ("a.example",))


def test_policy_max_age_is_capped_at_one_year() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 99999999\n").max_age == 31557600


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
        "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmax_age: 10\n",  # enforce without mx
        "version: STSv1\nmode: enforce\nmx: bad host\nmax_age: 10\n",
        "version: STSv1\ngarbage line\n",
    ],
)
def test_malformed_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_policy_round_trips_through_its_text() -> None:
    p = parse_policy(POLICY)
    assert parse_policy(p.to_text()) == p


# -- TXT record (RFC 8461 §3.1) ----------------------------------------------------------------


def test_txt_id_among_other_records() -> None:
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert parse_txt(["v=STSv1;id=abc"]) == "abc"


@pytest.mark.parametrize(
    "records,exc",
    [
        ([], NoPolicy),
        (["v=spf1 -all"], NoPolicy),
        (["v=STSv1; id=a", "v=STSv1; id=b"], NoPolicy),  # several records: no policy
        (["v=STSv1;"], PolicyError),  # no id
        (["v=STSv1; id=not-alnum!"], PolicyError),
        (["v=STSv1; id=" + "a" * 33], PolicyError),
    ],
)
def test_txt_errors(records: list[str], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        parse_txt(records)


# -- MX matching (RFC 8461 §4.1) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern,mx,ok",
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.COM.", True),
        ("mail.example.com", "mx.example.com", False),
        ("*.example.net", "mx1.example.net", True),
        ("*.example.net", "example.net", False),
        ("*.example.net", "a.b.example.net", False),  # one label only
        ("*.example.net", "mx1.example.org", False),
    ],
)
def test_match_mx(pattern: str, mx: str, ok: bool) -> None:
    assert match_mx(pattern, mx) is ok


# -- cache (RFC 8461 §5.1) ---------------------------------------------------------------------


class World:
    """TXT answers and policies the cache sees, and a clock."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {}
        self.policies: dict[str, Policy | Exception] = {}
        self.fetches: list[str] = []
        self.now = 1_000_000.0

    async def lookup_txt(self, name: str) -> list[str]:
        return self.txt.get(name, [])

    async def fetch(self, domain: str) -> Policy:
        self.fetches.append(domain)
        p = self.policies[domain]
        if isinstance(p, Exception):
            raise p
        return p

    def cache(self, store: RAMStore | FSStore) -> Cache:
        return Cache(store, self.lookup_txt, self.fetch, clock=lambda: self.now)


ENFORCE = Policy("enforce", 3600, ("mx.example.com",))


def test_cache_fetches_once_per_id_and_refetches_when_id_changes() -> None:
    w = World()
    w.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
    w.policies["example.com"] = ENFORCE
    c = w.cache(RAMStore())

    async def run() -> None:
        assert await c.get("example.com") == ENFORCE
        assert await c.get("Example.COM.") == ENFORCE
        assert w.fetches == ["example.com"]
        w.txt["_mta-sts.example.com"] = ["v=STSv1; id=two"]
        testing = Policy("testing", 3600, ("mx.example.com",))
        w.policies["example.com"] = testing
        assert await c.get("example.com") == testing
        assert len(w.fetches) == 2

    asyncio.run(run())


def test_cached_policy_survives_txt_removal_and_fetch_failure_until_max_age() -> None:
    w = World()
    w.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
    w.policies["example.com"] = ENFORCE
    c = w.cache(RAMStore())

    async def run() -> None:
        await c.get("example.com")
        del w.txt["_mta-sts.example.com"]
        assert await c.get("example.com") == ENFORCE  # TXT gone: cached policy still applies
        w.txt["_mta-sts.example.com"] = ["v=STSv1; id=changed"]
        w.policies["example.com"] = FetchError("connection refused")
        assert await c.get("example.com") == ENFORCE  # fetch failed: cached policy still applies
        w.now += 3601
        with pytest.raises(NoPolicy):
            await c.get("example.com")

    asyncio.run(run())


def test_no_record_means_no_policy() -> None:
    w = World()
    with pytest.raises(NoPolicy):
        asyncio.run(w.cache(RAMStore()).get("example.org"))
    assert w.fetches == []


def test_fs_store_persists_between_caches(tmp_path: Path) -> None:
    w = World()
    w.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
    w.policies["example.com"] = ENFORCE

    async def run() -> None:
        assert await w.cache(FSStore(str(tmp_path / "c"))).get("example.com") == ENFORCE
        assert (tmp_path / "c" / "example.com").exists()
        assert await w.cache(FSStore(str(tmp_path / "c"))).get("example.com") == ENFORCE
        assert w.fetches == ["example.com"]  # the second cache read the file, same id: no fetch

    asyncio.run(run())


def test_refresh_drops_expired_entries(tmp_path: Path) -> None:
    w = World()
    w.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
    w.policies["example.com"] = ENFORCE
    store = FSStore(str(tmp_path))
    c = w.cache(store)

    async def run() -> None:
        await c.get("example.com")
        w.now += 7200
        await c.refresh()
        assert await store.domains() == []

    asyncio.run(run())


# -- fetch over HTTPS (RFC 8461 §3.3) ----------------------------------------------------------


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HTTPSServer, ssl.SSLContext]]:
    tmp = tmp_path_factory.mktemp("https")
    ca = CA()
    cert, key = ca.issue("mta-sts.example.com", "mta-sts.redirect.example", "mta-sts.html.example").write(tmp, "sts")
    ctx = ssl.create_default_context(cadata=ca.pem.decode())
    with HTTPSServer(cert, key) as srv:
        srv.policy("example.com", POLICY)
        srv.policy("html.example", POLICY, ctype="text/html")
        srv.route("mta-sts.redirect.example", "/.well-known/mta-sts.txt", 301, "text/plain", b"", Location="/x")
        yield srv, ctx


async def _loopback(host: str) -> list[str]:
    return ["127.0.0.1"]


def test_fetch_policy(https: tuple[HTTPSServer, ssl.SSLContext]) -> None:
    srv, ctx = https
    p = asyncio.run(fetch_policy("example.com", _loopback, ctx, port=srv.port, timeout=10))
    assert p.mode == "enforce" and p.match("mail.example.com")


@pytest.mark.parametrize("domain", ["redirect.example", "html.example"])
def test_fetch_refuses_redirects_and_wrong_content_type(https: tuple[HTTPSServer, ssl.SSLContext], domain: str) -> None:
    srv, ctx = https
    with pytest.raises(FetchError):
        asyncio.run(fetch_policy(domain, _loopback, ctx, port=srv.port, timeout=10))


def test_fetch_requires_a_valid_certificate_for_the_name(https: tuple[HTTPSServer, ssl.SSLContext]) -> None:
    srv, ctx = https
    with pytest.raises(FetchError):  # the certificate does not name mta-sts.other.example
        asyncio.run(fetch_policy("other.example", _loopback, ctx, port=srv.port, timeout=10))
    with pytest.raises(FetchError):  # an untrusted CA
        asyncio.run(fetch_policy("example.com", _loopback, ssl.create_default_context(), port=srv.port, timeout=10))
