"""pymaddy.dns.Resolver against the loopback DNS server (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from pymaddy.dns import DNSError, Resolver, from_options, parse_hostport, resolver_for
from pymaddy.runtime.options import RunOptions
from tests.dnsserver import DNSServer

ZONE = """
$TTL 300
@        IN SOA ns hostmaster 1 3600 600 86400 30
@        IN MX 10 mx
@        IN MX 20 mx2.example.net.
@        IN TXT "v=spf1 " "ip4:192.0.2.0/24 -all"
mx       IN A 192.0.2.1
mx       IN AAAA 2001:db8::1
v4only   IN A 192.0.2.9
www      IN CNAME mx
ext      IN CNAME host.example.net.
loop1    IN CNAME loop2
loop2    IN CNAME loop1
short    5 IN A 192.0.2.5
nullmx   IN MX 0 .
_25._tcp.mx IN TLSA 3 1 1 0000000000000000000000000000000000000000000000000000000000000000
"""


@pytest.fixture
def server() -> Iterator[DNSServer]:
    srv = DNSServer(zones={"example.org": ZONE})
    srv.add("host.example.net", "A", "198.51.100.7")
    srv.add("1.2.0.192.in-addr.arpa", "PTR", "mx.example.org.")
    with srv:
        yield srv


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def test_basic_types(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        assert await r.mx("example.org") == [(10, "mx.example.org"), (20, "mx2.example.net")]
        assert await r.txt("example.org") == ["v=spf1 ip4:192.0.2.0/24 -all"]  # strings joined (RFC 7208 §3.3)
        assert await r.a("mx.example.org") == ["192.0.2.1"]
        assert await r.aaaa("mx.example.org") == ["2001:db8::1"]
        assert sorted(await r.addrs("mx.example.org")) == ["192.0.2.1", "2001:db8::1"]
        assert await r.addrs("v4only.example.org") == ["192.0.2.9"]
        assert await r.ptr("192.0.2.1") == ["mx.example.org"]
        assert await r.mx("nullmx.example.org") == [(0, ".")]
        recs, ad = await r.tlsa("_25._tcp.mx.example.org")
        assert recs == [(3, 1, 1, bytes(32))]
        assert ad is False

    run(main())


def test_cname_followed_inside_and_across_zones(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        assert await r.a("www.example.org") == ["192.0.2.1"]
        ans = await r.lookup("ext.example.org", "A")
        assert [str(x) for x in ans.records] == ["198.51.100.7"]
        assert ans.cname == "host.example.net"
        with pytest.raises(DNSError) as ei:
            await r.a("loop1.example.org")
        assert not ei.value.temporary
        assert ei.value.kind == "cname-loop"

    run(main())


def test_nxdomain_and_nodata_are_empty(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        assert await r.txt("missing.example.org") == []
        assert (await r.lookup("missing.example.org", "TXT")).nxdomain
        assert await r.a("example.org") == []  # NODATA
        assert not (await r.lookup("example.org", "A")).nxdomain
        assert await r.ptr("192.0.2.77") == []

    run(main())


def test_cache_honours_ttl(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        for _ in range(3):
            assert await r.a("mx.example.org") == ["192.0.2.1"]
        assert server.log.count("mx.example.org", "A") == 1
        assert r.stats.cache_hits == 2
        # a record with TTL 5 expires: pretend 6 seconds passed
        assert await r.a("short.example.org") == ["192.0.2.5"]
        for key, ent in r._cache.items():
            if key[0] == "short.example.org.":
                assert ent.expires - time.monotonic() <= 5
                ent.expires = time.monotonic() - 1
        assert await r.a("short.example.org") == ["192.0.2.5"]
        assert server.log.count("short.example.org", "A") == 2

    run(main())


def test_negative_cache_uses_soa_minimum(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        assert await r.txt("missing.example.org") == []
        assert await r.txt("missing.example.org") == []
        assert server.log.count("missing.example.org", "TXT") == 1
        ans = await r.lookup("missing.example.org", "TXT")
        assert ans.ttl == 30  # min(SOA TTL 300, MINIMUM 30) — RFC 2308 §5

    run(main())


def test_negative_cache_capped() -> None:
    srv = DNSServer(zones={"example.com": "@ 86400 IN SOA ns hm 1 3600 600 86400 86400\n"})
    with srv:
        r = Resolver([srv.address], timeout=1, negative_ttl_cap=120)
        ans = run(r.lookup("nope.example.com", "A"))
        assert ans.ttl == 120


def test_cache_is_bounded(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1, cache_size=3)

    async def main() -> None:
        for name in ("mx", "v4only", "www", "short", "ext"):
            await r.a(f"{name}.example.org")
        assert len(r._cache) == 3

    run(main())


def test_servfail_is_temporary(server: DNSServer) -> None:
    server.fail("broken.example.org")
    server.fail("mx.example.org", "AAAA")
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        with pytest.raises(DNSError) as ei:
            await r.txt("broken.example.org")
        assert ei.value.temporary
        assert "server misbehaving" in str(ei.value)
        # a failure is not cached
        with pytest.raises(DNSError):
            await r.txt("broken.example.org")
        assert server.log.count("broken.example.org", "TXT") == 2
        # addrs() succeeds when one of A/AAAA answers
        assert await r.addrs("mx.example.org") == ["192.0.2.1"]

    run(main())


def test_timeout_is_temporary(server: DNSServer) -> None:
    server.drop("slow.example.org")
    r = Resolver([server.address], timeout=0.2)

    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(DNSError) as ei:
            await r.a("slow.example.org")
        assert ei.value.temporary
        assert ei.value.kind == "timeout"
        assert time.monotonic() - t0 < 2

    run(main())


def test_next_server_after_failure(server: DNSServer) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()
    sock.close()  # nothing listens there any more
    r = Resolver([dead, server.address], timeout=0.3)
    assert run(r.a("mx.example.org")) == ["192.0.2.1"]


def test_refused_is_permanent() -> None:
    srv = DNSServer()
    with srv:
        # FORMERR/REFUSED-like rcodes: a name the server rejects
        r = Resolver([srv.address], timeout=1)
        srv_answer = srv.answer

        def refused(wire: bytes, transport: str) -> bytes | None:
            import dns.message
            import dns.rcode

            q = dns.message.from_wire(wire)
            resp = dns.message.make_response(q)
            resp.set_rcode(dns.rcode.REFUSED)
            return resp.to_wire()

        srv.answer = refused  # type: ignore[method-assign]
        with pytest.raises(DNSError) as ei:
            run(r.a("example.org"))
        assert not ei.value.temporary
        srv.answer = srv_answer  # type: ignore[method-assign]


def test_invalid_name_is_permanent() -> None:
    r = Resolver([("127.0.0.1", 9)], timeout=0.2)
    with pytest.raises(DNSError) as ei:
        run(r.txt("a..b"))
    assert not ei.value.temporary
    assert ei.value.kind == "invalid-name"


def test_tcp_fallback_for_large_txt(server: DNSServer) -> None:
    server.add_txt("big.example.org", *(["x" * 250] * 12))  # 3000 bytes: over any UDP limit we advertise
    r = Resolver([server.address], timeout=1)
    txt = run(r.txt("big.example.org"))
    assert txt == ["x" * 3000]
    assert [e[2] for e in server.log.entries if e[0] == "big.example.org"] == ["udp", "tcp"]
    assert r.stats.tcp_fallbacks == 1


def test_ad_bit_exposed(server: DNSServer) -> None:
    server.authenticate("example.org")
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        recs, ad = await r.tlsa("_25._tcp.mx.example.org")
        assert recs
        assert ad is True
        assert (await r.lookup("mx.example.org", "A")).authenticated
        # CNAME into an unauthenticated zone: the whole answer is not authenticated
        assert not (await r.lookup("ext.example.org", "A")).authenticated

    run(main())


def test_override_and_shared_resolver(server: DNSServer) -> None:
    assert parse_hostport("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_hostport("[::1]:53") == ("::1", 53)
    assert parse_hostport("192.0.2.1") == ("192.0.2.1", 53)
    r = from_options(server.override)
    assert r.nameservers == [server.address]
    assert run(r.a("mx.example.org")) == ["192.0.2.1"]

    class Ctx:
        options = RunOptions(config="x", dns_override=server.override)

    a = resolver_for(Ctx())  # type: ignore[arg-type]
    b = resolver_for(Ctx())  # type: ignore[arg-type]
    assert a is b
    assert a.nameservers == [server.address]


def test_concurrent_identical_questions_share_one_query(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        results = await asyncio.gather(*(r.a("mx.example.org") for _ in range(10)))
        assert results == [["192.0.2.1"]] * 10
        assert server.log.count("mx.example.org", "A") == 1

    run(main())


def test_cancelled_caller_does_not_break_others(server: DNSServer) -> None:
    server.drop("slow.example.org")
    r = Resolver([server.address], timeout=0.3)

    async def main() -> None:
        first = asyncio.ensure_future(r.a("slow.example.org"))
        second = asyncio.ensure_future(r.a("slow.example.org"))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(DNSError):
            await second
        assert first.cancelled()

    run(main())


def test_cached_answers_without_asking(server: DNSServer) -> None:
    r = Resolver([server.address], timeout=1)

    async def main() -> None:
        assert r.cached("example.org", "TXT") is None  # never asked: no query is made for it
        assert r.txt_cached("example.org") is None
        assert server.log.count("example.org", "TXT") == 0
        assert await r.txt("example.org") == ["v=spf1 ip4:192.0.2.0/24 -all"]
        assert r.txt_cached("example.org") == ["v=spf1 ip4:192.0.2.0/24 -all"]
        assert r.txt_cached("missing.example.org") is None
        assert await r.txt("missing.example.org") == []
        assert r.txt_cached("missing.example.org") == []  # the negative answer is cached too (SOA)
        assert server.log.count("example.org", "TXT") == 1
        # an expired entry is not an answer
        for ent in r._cache.values():
            ent.expires = time.monotonic() - 1
        assert r.txt_cached("example.org") is None

    run(main())
