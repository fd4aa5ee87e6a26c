"""The DMARC library (RFC 7489, maddy's internal/dmarc): records, org domains, alignment, policy."""

from __future__ import annotations

import asyncio

import pytest

from pymaddy import dmarc
from pymaddy.dns import DNSError
from pymaddy.mail.message import Header
from pymaddy.pipeline.interfaces import AuthResult


def spf(result: str, mailfrom: str, helo: str = "mx.example.com") -> AuthResult:
    return AuthResult("spf", result, "", {"smtp.mailfrom": mailfrom, "smtp.helo": helo})


def dkim(result: str, d: str) -> AuthResult:
    return AuthResult("dkim", result, "", {"header.d": d, "header.i": "@" + d})


# -- records (RFC 7489 §6.3) --------------------------------------------------------------


def test_parse_record_defaults_and_tags() -> None:
    r = dmarc.parse_record("v=DMARC1; p=none")
    assert (r.policy, r.subdomain_policy, r.dkim_alignment, r.spf_alignment, r.percent) == ("none", "", "r", "r", None)
    r = dmarc.parse_record(
        "v=DMARC1;p=reject; sp=quarantine ; adkim=s; aspf=s; pct=20; fo=0:d; rf=afrf; ri=3600; "
        "rua=mailto:a@example.org, mailto:b@example.org; ruf=mailto:f@example.org;"
    )
    assert (r.policy, r.subdomain_policy, r.dkim_alignment, r.spf_alignment, r.percent) == (
        "reject",
        "quarantine",
        "s",
        "s",
        20,
    )
    assert r.failure_options == ["0", "d"] and r.report_interval == 3600
    assert r.rua == ["mailto:a@example.org", "mailto:b@example.org"] and r.ruf == ["mailto:f@example.org"]


@pytest.mark.parametrize(
    ("txt", "msg"),
    [
        ("v=DMARC2; p=none", "dmarc: unsupported DMARC version"),
        ("v=dmarc1; p=none", "dmarc: unsupported DMARC version"),
        ("v=DMARC1", "dmarc: record is missing a 'p' parameter"),
        ("v=DMARC1; p=Reject", "dmarc: invalid policy for parameter 'p'"),
        ("v=DMARC1; p=none; sp=drop", "dmarc: invalid policy for parameter 'sp'"),
        ("v=DMARC1; p=none; adkim=x", "dmarc: invalid alignment mode for parameter 'adkim'"),
        ("v=DMARC1; p=none; aspf=", "dmarc: invalid alignment mode for parameter 'aspf'"),
        ("v=DMARC1; p=none; pct=101", "dmarc: invalid parameter 'pct': value 101 out of bounds"),
        ("v=DMARC1; p=none; pct=x", "dmarc: invalid parameter 'pct': invalid syntax"),
        ("v=DMARC1; p=none; garbage", "dmarc: malformed params"),
        ("v=DMARC1; p=none; fo=2", "dmarc: invalid failure option in parameter 'fo'"),
        ("v=DMARC1; p=none; ri=0", "dmarc: invalid parameter 'ri': negative or zero duration"),
    ],
)
def test_parse_record_errors(txt: str, msg: str) -> None:
    with pytest.raises(dmarc.DMARCError) as ei:
        dmarc.parse_record(txt)
    assert str(ei.value) == msg


# -- organizational domains and alignment (RFC 7489 §3.1, §3.2) ------------------------------


def test_organizational_domain_uses_the_public_suffix_list() -> None:
    assert dmarc.organizational_domain("mail.sub.example.org") == "example.org"
    assert dmarc.organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert dmarc.organizational_domain("Example.ORG") == "example.org"
    assert dmarc.organizational_domain("x.y.test") == "y.test"  # unknown TLD: the "*" rule
    for bad in ("co.uk", "org"):
        with pytest.raises(dmarc.DMARCError, match="cannot derive eTLD"):
            dmarc.organizational_domain(bad)
    with pytest.raises(dmarc.DMARCError, match="empty label"):
        dmarc.organizational_domain("a..example.org")


def test_alignment_modes() -> None:
    assert dmarc.is_aligned("example.org", "mail.example.org", "r")
    assert dmarc.is_aligned("news.example.org", "example.org", "r")
    assert dmarc.is_aligned("EXAMPLE.org", "example.ORG", "s")
    assert not dmarc.is_aligned("news.example.org", "example.org", "s")
    assert not dmarc.is_aligned("example.org", "example.net", "r")
    assert not dmarc.is_aligned("example.co.uk", "other.co.uk", "r")
    # a From domain that is a public suffix aligns only with itself
    assert dmarc.is_aligned("co.uk", "co.uk", "r")
    assert not dmarc.is_aligned("co.uk", "example.co.uk", "r")
    assert not dmarc.is_aligned("example.org", "", "r")


REC = dmarc.parse_record("v=DMARC1; p=reject")
STRICT = dmarc.parse_record("v=DMARC1; p=reject; adkim=s; aspf=s")


@pytest.mark.parametrize(
    ("rec", "results", "want"),
    [
        (REC, [spf("pass", "example.org"), dkim("none", "")], ("pass", "", True, False)),
        (REC, [spf("fail", "example.org"), dkim("pass", "mail.example.org")], ("pass", "", False, True)),
        (
            STRICT,
            [spf("pass", "mail.example.org"), dkim("pass", "mail.example.org")],
            ("fail", "No aligned", False, False),
        ),
        (REC, [spf("pass", "example.net"), dkim("pass", "example.net")], ("fail", "No aligned", False, False)),
        # null sender: the HELO domain is SPF's identifier
        (REC, [spf("pass", "", "mx.example.org"), dkim("none", "")], ("pass", "", True, False)),
        # without one of the two checks DMARC cannot say anything
        (REC, [spf("pass", "example.org")], ("none", "Not enough information", True, False)),
        (REC, [dkim("pass", "example.org")], ("none", "Not enough information", False, True)),
        (REC, [spf("fail", "example.org"), dkim("temperror", "example.org")], ("temperror", "DKIM", False, False)),
        (REC, [spf("temperror", "example.org"), dkim("fail", "example.org")], ("temperror", "SPF", False, False)),
        # an aligned pass wins over an unaligned temperror
        (REC, [spf("temperror", "example.org"), dkim("pass", "example.org")], ("pass", "", False, True)),
    ],
)
def test_evaluate_alignment(rec: dmarc.Record, results: list[AuthResult], want: tuple[str, str, bool, bool]) -> None:
    res = dmarc.evaluate_alignment("example.org", rec, results)
    assert res.authres.method == "dmarc" and res.authres.params == {"header.from": "example.org"}
    assert res.authres.result == want[0]
    assert res.authres.reason.startswith(want[1]) and bool(res.authres.reason) == bool(want[1])
    assert (res.spf_aligned, res.dkim_aligned) == want[2:]


def test_aligned_dkim_result_is_reported_over_the_first_one() -> None:
    res = dmarc.evaluate_alignment(
        "example.org", REC, [spf("fail", "x.net"), dkim("pass", "x.net"), dkim("fail", "example.org")]
    )
    assert res.authres.result == "fail" and res.dkim is not None and res.dkim.params["header.d"] == "example.org"


# -- record discovery and policy (RFC 7489 §6.6.3, §6.6.4) ------------------------------------


def lookup_from(zone: dict[str, list[str]], fail: dict[str, DNSError] | None = None) -> dmarc.TxtLookup:
    async def txt(name: str) -> list[str]:
        if fail and name in fail:
            raise fail[name]
        return zone.get(name, [])

    return txt


def fetch(zone: dict[str, list[str]], domain: str, fail: dict[str, DNSError] | None = None) -> dmarc.Fetched:
    return asyncio.run(dmarc.fetch(lookup_from(zone, fail), domain))


def test_fetch_record_org_domain_fallback() -> None:
    zone = {"_dmarc.example.org": ["v=DMARC1; p=reject; sp=quarantine"], "_dmarc.sub.example.org": []}
    f = fetch(zone, "example.org")
    assert f.policy_domain == "example.org" and f.record is not None and f.record.policy == "reject"
    f = fetch(zone, "a.sub.example.org")
    assert f.policy_domain == "example.org" and f.record is not None
    # Records at the From domain that are not DMARC mean "no record"; no fallback then (maddy).
    zone["_dmarc.b.example.org"] = ["some other text"]
    assert fetch(zone, "b.example.org").record is None
    # Two DMARC records: none.
    zone["_dmarc.c.example.org"] = ["v=DMARC1; p=none", "v=DMARC1; p=reject"]
    assert fetch(zone, "c.example.org").record is None
    assert fetch({}, "example.net").record is None


def test_fetch_errors() -> None:
    temp = DNSError("lookup _dmarc.example.org: server failure", True)
    f = fetch({}, "example.org", {"_dmarc.example.org": temp})
    assert f.error is temp
    res, policy = dmarc.apply(f, [])
    assert (res.authres.result, policy) == ("temperror", "reject")
    assert res.authres.reason == "Policy lookup failed: lookup _dmarc.example.org: server failure"

    f = fetch({"_dmarc.example.org": ["v=DMARC1; p=bogus"]}, "example.org")
    res, policy = dmarc.apply(f, [])
    assert (res.authres.result, policy) == ("permerror", "none")
    assert res.authres.reason == "Policy lookup failed: dmarc: invalid policy for parameter 'p'"

    res, policy = dmarc.apply(fetch({}, "co.uk"), [])  # no eTLD+1 to fall back to
    assert (res.authres.result, policy) == ("permerror", "none")


def test_apply_policies() -> None:
    zone = {
        "_dmarc.example.org": ["v=DMARC1; p=reject; sp=quarantine"],
        "_dmarc.example.net": ["v=DMARC1; p=quarantine"],
        "_dmarc.example.com": ["v=DMARC1; p=none"],
    }
    bad = [spf("fail", "evil.test"), dkim("none", "")]

    def outcome(domain: str, results: list[AuthResult]) -> tuple[str, str]:
        res, policy = dmarc.apply(fetch(zone, domain), results)
        assert res.authres.params.get("header.from") == domain
        return res.authres.result, policy

    assert outcome("example.org", bad) == ("fail", "reject")
    assert outcome("news.example.org", bad) == ("fail", "quarantine")  # sp= at the org domain
    assert outcome("example.net", bad) == ("fail", "quarantine")
    assert outcome("example.com", bad) == ("fail", "none")
    assert outcome("example.org", [spf("pass", "example.org"), dkim("none", "")]) == ("pass", "none")
    assert outcome("unknown.test", bad) == ("none", "none")
    res, _ = dmarc.apply(fetch(zone, "unknown.test"), bad)
    assert res.authres.reason == ""


def test_pct_sampling_as_maddy() -> None:
    f = fetch({"_dmarc.example.org": ["v=DMARC1; p=reject; pct=30"]}, "example.org")
    bad = [spf("fail", "evil.test"), dkim("none", "")]
    assert dmarc.apply(f, bad, rng=lambda n: 30)[1] == "reject"  # sample <= pct: applied
    assert dmarc.apply(f, bad, rng=lambda n: 31)[1] == "none"
    f0 = fetch({"_dmarc.example.org": ["v=DMARC1; p=reject; pct=0"]}, "example.org")
    assert dmarc.apply(f0, bad, rng=lambda n: 0)[1] == "reject"  # maddy's rand.Int31n(100) > pct
    assert dmarc.apply(f0, bad, rng=lambda n: 1)[1] == "none"
    # the sample is taken from [0, 100)
    seen: list[int] = []

    def rng(n: int) -> int:
        seen.append(n)
        return 0

    dmarc.apply(f, bad, rng=rng)
    assert seen == [100]


# -- the From domain (RFC 7489 §6.6.1) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        (b"From: Alice <alice@Example.ORG>\r\n", "Example.ORG"),
        (b"From: alice@example.org\r\nFrom: bob@example.net\r\n", "dmarc: multiple From header fields are not allowed"),
        (b"Subject: x\r\n", "dmarc: missing From header field"),
        (b"From: a@example.org, b@example.net\r\n", "dmarc: multiple addresses in From field are not allowed"),
        (b"From: undisclosed:;\r\n", "dmarc: missing address in From field"),
        (b"From: <not an address\r\n", "dmarc: malformed From header field: "),
    ],
)
def test_extract_from_domain(fields: bytes, want: str) -> None:
    header = Header.parse(fields)
    if want.startswith("dmarc:"):
        with pytest.raises(dmarc.DMARCError) as ei:
            dmarc.extract_from_domain(header)
        assert str(ei.value).startswith(want)
    else:
        assert dmarc.extract_from_domain(header) == want


def test_fetch_cached_agrees_with_fetch_and_asks_for_dns_when_unknown() -> None:
    zone = {
        "_dmarc.example.org": ["v=DMARC1; p=reject; sp=quarantine"],
        "_dmarc.sub.example.org": [],
        "_dmarc.b.example.org": ["some other text"],
        "_dmarc.c.example.org": ["v=DMARC1; p=bogus"],
    }
    for domain in ("example.org", "sub.example.org", "b.example.org", "c.example.org"):
        cached = dmarc.fetch_cached(zone.get, domain)
        want = fetch(zone, domain)
        assert cached is not None
        assert (cached.from_domain, cached.policy_domain, cached.record) == (
            want.from_domain,
            want.policy_domain,
            want.record,
        )
        assert str(cached.error) == str(want.error)
    # A name the cache does not hold: None (the caller then does the lookup).
    assert dmarc.fetch_cached(zone.get, "example.net") is None
    assert dmarc.fetch_cached(zone.get, "x.sub.example.org") is None  # _dmarc.x.sub… is not cached
    # The org-domain fallback from the cache: sub.example.org has no record, example.org does.
    f = dmarc.fetch_cached(zone.get, "sub.example.org")
    assert f is not None and f.policy_domain == "example.org" and f.record is not None
    assert f.record.subdomain_policy == "quarantine"
    # A From domain that is a public suffix: the error, without a lookup.
    f = dmarc.fetch_cached({"_dmarc.co.uk": []}.get, "co.uk")
    assert f is not None and isinstance(f.error, dmarc.DMARCError)


def test_extract_from_domain_errors_repeat_identically() -> None:
    """The From parse is remembered per value: a repeated bad From still raises the same error."""
    header = Header.parse(b"From: a@example.org, b@example.net\r\n")
    for _ in range(2):
        with pytest.raises(dmarc.DMARCError, match="multiple addresses in From field"):
            dmarc.extract_from_domain(header)
    assert dmarc.extract_from_domain(Header.parse(b"From: <a@Example.org>\r\n")) == "Example.org"
