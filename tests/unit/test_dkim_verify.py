"""check.dkim and the verifier: verdicts, reasons and actions as maddy's (spec §B.4, §I.2, §I.4).

Keys come from tests/data/dkim; DNS is a dict behind the TXT-lookup seam,
except where the loopback DNS server is the point.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import Relaxed, Simple

from pymaddy.checks.dkim import DKIMCheck, TXTLookupError, _dnspython_lookup
from pymaddy.dkim.core import BodyHasher, SignOptions, body_hash, sign
from pymaddy.dkim.keys import SigningKey, dns_record, load_key
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import CheckResult
from pymaddy.pipeline.runner import format_auth_results
from tests.unit.test_dkim_helpers import MESSAGE, ZoneServer, build, split_message

DATA = Path(__file__).resolve().parents[1] / "data" / "dkim"
RSA = load_key(str(DATA / "rsa2048-pkcs8.key"))
ED = load_key(str(DATA / "ed25519-pkcs8.key"))
KEYS = {"rsa2048": RSA, "ed25519": ED}
SELECTOR = "sel._domainkey.example.org"
ALL_KEYS = ["From", "From", "To", "To", "Subject", "Subject", "Date", "Date", "Message-Id"]
NOW = 1_700_000_000  # in the past


def signed(
    key: SigningKey = RSA,
    *,
    raw: bytes = MESSAGE,
    canon: str = "relaxed",
    keys: list[str] | None = None,
    domain: str = "example.org",
    identifier: str = "@example.org",
    expiry: float = 0,
    now: float | None = None,
) -> tuple[Header, Body]:
    header, body = split_message(raw)
    opts = SignOptions(
        domain=domain,
        selector="sel",
        key=key,
        header_keys=keys or ALL_KEYS,
        identifier=identifier,
        header_relaxed=canon == "relaxed",
        body_relaxed=canon == "relaxed",
        expiry=expiry,
        now=now,
    )
    header.add_raw_top(Header.parse(sign(header, body, opts)))
    return header, body


class FakeDNS:
    """TXT answers from a dict; a value that is an exception is raised."""

    def __init__(self, records: dict[str, list[str] | Exception]) -> None:
        self.records = records
        self.asked: list[str] = []

    async def __call__(self, name: str) -> list[str]:
        self.asked.append(name)
        ans = self.records.get(name)
        if ans is None:
            raise TXTLookupError(f"lookup {name}: no such host", temporary=False)
        if isinstance(ans, Exception):
            raise ans
        return ans


def check(
    tmp: Path, header: Header, body: Body, dns: FakeDNS | None = None, conf: str = ""
) -> tuple[CheckResult, list[str]]:
    chk, out = build(f"check.dkim {{\n{conf}\n}}\n", tmp, "check.dkim", DKIMCheck)
    chk.lookup = dns or FakeDNS({SELECTOR: [dns_record(RSA)], "ed._domainkey.example.org": [dns_record(ED)]})

    async def go() -> CheckResult:
        await chk.start()
        st = await chk.state_for_msg(MsgMeta())
        return await st.check_body(header, body)

    return asyncio.run(go()), out.lines


def results(res: CheckResult) -> list[tuple[str, str]]:
    return [(r.result, r.reason) for r in res.auth_results]


def dns_for(key: SigningKey) -> FakeDNS:
    return FakeDNS({SELECTOR: [dns_record(key)]})


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["rsa2048", "ed25519"])
@pytest.mark.parametrize("canon", ["relaxed", "simple"])
def test_round_trip_passes(tmp_path: Path, algo: str, canon: str) -> None:
    header, body = signed(KEYS[algo], canon=canon, expiry=3600)
    dns = dns_for(KEYS[algo])
    res, _ = check(tmp_path, header, body, dns)
    assert [(r.method, r.result, r.reason, r.params) for r in res.auth_results] == [
        ("dkim", "pass", "", {"header.d": "example.org", "header.i": "@example.org"})
    ]
    assert res.reason is None and res.reject is None and not res.quarantine
    assert dns.asked == [SELECTOR]


@pytest.mark.parametrize("algo", ["rsa2048", "ed25519"])
@pytest.mark.parametrize("canon", ["relaxed", "simple"])
def test_tampering_fails(tmp_path: Path, algo: str, canon: str) -> None:
    header, body = signed(KEYS[algo], canon=canon)
    bad_body = Body(body.read_all().replace(b"noon", b"nine"))
    res, _ = check(tmp_path, header, bad_body, dns_for(KEYS[algo]))
    assert results(res) == [("fail", "body hash did not verify")]

    raw = header.to_bytes().replace(b"Subject: Lunch", b"Subject: Dinner")
    res, _ = check(tmp_path, Header.parse(raw), body, dns_for(KEYS[algo]))
    detail = "crypto/rsa: verification error" if algo == "rsa2048" else "dkim: invalid Ed25519 signature"
    assert results(res) == [("fail", "signature did not verify: " + detail)]
    assert res.reason is not None and res.reason.code == 550 and res.reason.enhanced == (5, 7, 20)
    assert res.reject is None  # broken_sig_action: ignore


def test_relaxed_survives_refolding_simple_does_not(tmp_path: Path) -> None:
    for canon, want in (("relaxed", "pass"), ("simple", "fail")):
        header, body = signed(canon=canon)
        raw = header.to_bytes().replace(
            b"Subject: Lunch  tomorrow?\r\n\tat noon", b"Subject:   Lunch tomorrow?  at noon"
        )
        res, _ = check(tmp_path, Header.parse(raw), Body(body.read_all() + b"\r\n\r\n"), dns_for(RSA))
        assert res.auth_results[0].result == want, canon


def test_added_header_breaks_oversigned_field(tmp_path: Path) -> None:
    header, body = signed()
    header.add("Subject", "second subject")
    res, _ = check(tmp_path, header, body, dns_for(RSA))
    assert res.auth_results[0].result == "fail"
    header, body = signed()
    header.add("X-Unsigned", "fine")
    res, _ = check(tmp_path, header, body, dns_for(RSA))
    assert res.auth_results[0].result == "pass"


def test_expired_signature(tmp_path: Path) -> None:
    header, body = signed(expiry=3600, now=NOW)
    res, _ = check(tmp_path, header, body, dns_for(RSA))
    assert results(res) == [("permerror", "signature has expired")]
    header, body = signed(expiry=3600)
    res, _ = check(tmp_path, header, body, dns_for(RSA))
    assert results(res) == [("pass", "")]


# -- check.dkim verdicts ------------------------------------------------------------------------


def test_no_signature(tmp_path: Path) -> None:
    header, body = split_message(MESSAGE)
    res, _ = check(tmp_path, header, body)
    assert [(r.result, r.params) for r in res.auth_results] == [("none", {})]
    assert format_auth_results("mx", res.auth_results) == "mx; dkim=none "
    assert res.reason is not None and str(res.reason) == "No DKIM signatures"
    assert (res.reason.code, res.reason.enhanced) == (550, (5, 7, 20))
    assert res.reject is None and not res.quarantine

    res, _ = check(tmp_path, header, body, conf="no_sig_action reject")
    assert res.reject is not None and res.reject.code == 550 and res.reject.message == "No DKIM signatures"
    res, lines = check(tmp_path, header, body, conf="no_sig_action quarantine")
    assert res.quarantine and res.reject is None
    assert lines and lines[0].startswith("check.dkim: no signatures present\t")


def test_broken_sig_action_with_custom_reply(tmp_path: Path) -> None:
    header, body = signed()
    header = Header.parse(header.to_bytes().replace(b"Subject: Lunch", b"Subject: Brunch"))
    res, _ = check(tmp_path, header, body, dns_for(RSA), conf='broken_sig_action reject 554 5.7.9 "Bad DKIM"')
    assert res.reject is not None
    assert (res.reject.code, res.reject.enhanced, res.reject.message) == (554, (5, 7, 9), "Bad DKIM")
    assert res.reject.reason == "No passing DKIM signatures"
    assert [r.result for r in res.auth_results] == ["fail"]  # results still recorded

    res, _ = check(tmp_path, header, body, dns_for(RSA), conf="broken_sig_action quarantine")
    assert res.quarantine and res.reject is None


def test_required_fields(tmp_path: Path) -> None:
    header, body = signed(keys=["From", "To"])
    res, _ = check(tmp_path, header, body, dns_for(RSA))
    assert results(res) == [("permerror", "some header fields are not signed")]
    assert res.reason is not None and res.reason.message == "No passing DKIM signatures"
    res, _ = check(tmp_path, header, body, dns_for(RSA), conf="required_fields from TO")
    assert results(res) == [("pass", "")]


def test_one_good_signature_is_enough(tmp_path: Path) -> None:
    header, body = signed()
    # A second, broken signature by another domain on top.
    other, _ = signed(ED, domain="example.com", identifier="@example.com")
    sig = next(raw for name, raw in other if name == "DKIM-Signature")
    header.add_raw_top(Header.parse(sig.replace(b"d=example.com", b"d=example.com; l=5")))
    dns = FakeDNS({SELECTOR: [dns_record(RSA)], "sel._domainkey.example.com": [dns_record(ED)]})
    res, _ = check(tmp_path, header, body, dns)
    assert [(r.result, r.reason, r.params["header.d"]) for r in res.auth_results] == [
        ("fail", "message contains an insecure body length tag", "example.com"),
        ("pass", "", "example.org"),
    ]
    assert res.reason is None


def test_temporary_dns_error(tmp_path: Path) -> None:
    header, body = signed()
    dns = FakeDNS({SELECTOR: TXTLookupError("lookup sel._domainkey.example.org: i/o timeout", temporary=True)})
    res, _ = check(tmp_path, header, body, dns)
    assert res.reject is not None
    assert (res.reject.code, res.reject.enhanced, res.reject.message) == (
        421,
        (4, 7, 20),
        "Temporary error during DKIM verification",
    )
    assert res.auth_results == []

    res, _ = check(tmp_path, header, body, dns, conf="fail_open yes")
    assert results(res) == [("temperror", "key unavailable: lookup sel._domainkey.example.org: i/o timeout")]
    assert res.reject is None and res.reason is not None  # broken_sig_action ignore

    res, _ = check(tmp_path, header, body, FakeDNS({SELECTOR: TimeoutError("timed out")}), conf="fail_open yes")
    assert results(res) == [("temperror", "key unavailable: timed out")]


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ({}, "no key for signature: lookup sel._domainkey.example.org: no such host"),
        ({SELECTOR: []}, "no valid key found"),
        ({SELECTOR: ["v=DKIM1; p=" + "A" * 8, "v=DKIM1; p="]}, "multiple TXT records found for key"),
        ({SELECTOR: ["v=DKIM1; k=rsa; p="]}, "key revoked"),
        ({SELECTOR: ["v=DKIM2; p=AAAA"]}, "incompatible public key version"),
        ({SELECTOR: ["v=DKIM1; k=rsa"]}, "key syntax error: missing public key data"),
        ({SELECTOR: ["v=DKIM1; k=dsa; p=AAAA"]}, "unsupported key algorithm"),
        ({SELECTOR: [dns_record(ED)]}, "inappropriate key algorithm"),
        ({SELECTOR: [dns_record(RSA).replace("k=rsa;", "k=rsa; h=sha1;")]}, "inappropriate hash algorithm"),
        ({SELECTOR: [dns_record(RSA).replace("k=rsa;", "k=rsa; s=tlsrpt;")]}, "inappropriate service"),
        ({SELECTOR: ["v=DKIM1; k=ed25519; p=AAAA"]}, "invalid Ed25519 public key size: 3 bytes"),
    ],
)
def test_key_record_problems(tmp_path: Path, records: dict[str, list[str] | Exception], reason: str) -> None:
    header, body = signed()
    res, _ = check(tmp_path, header, body, FakeDNS(records))
    assert results(res) == [("permerror", reason)]


def test_pkcs1_public_key_record_accepted(tmp_path: Path) -> None:
    """RSAPublicKey instead of SubjectPublicKeyInfo in p= (RFC 6376 erratum 3017)."""
    assert isinstance(RSA.key, rsa.RSAPrivateKey)
    der = RSA.key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    header, body = signed()
    res, _ = check(tmp_path, header, body, FakeDNS({SELECTOR: ["k=rsa; p=" + base64.b64encode(der).decode()]}))
    assert results(res) == [("pass", "")]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ((b"v=1;", b"v=2;"), "incompatible signature version"),
        ((b" s=sel;", b""), "signature missing required tag"),
        ((b"i=@example.org", b"i=@evil.example"), "domain mismatch"),
        ((b"h=From:From:", b"h="), "From field not signed"),
        ((b"a=rsa-sha256", b"a=rsa-sha1"), "hash algorithm too weak: sha1"),
        ((b"a=rsa-sha256", b"a=rsa-sha512"), "unsupported hash algorithm"),
        ((b"a=rsa-sha256", b"a=rsasha256"), "malformed algorithm name"),
        ((b"c=relaxed/relaxed", b"c=relaxed/fancy"), "unsupported body canonicalization algorithm"),
        ((b"t=", b"t=x"), 'malformed time: strconv.ParseInt: parsing "x'),
        ((b"v=1;", b"v=1; q=dns/other;"), "unsupported public key query method"),
        ((b"v=1;", b"v=1; garbage;"), "malformed signature tags: dkim: malformed header params"),
    ],
)
def test_signature_tag_problems(tmp_path: Path, edit: tuple[bytes, bytes], reason: str) -> None:
    header, body = signed()
    raw = header.to_bytes()
    assert edit[0] in raw
    res, _ = check(tmp_path, Header.parse(raw.replace(edit[0], edit[1], 1)), body, dns_for(RSA))
    [(result, got)] = results(res)
    assert result == "permerror" and got.startswith(reason), got


def test_through_loopback_dns(tmp_path: Path) -> None:
    """The fallback resolver of the DNS seam, pointed at a loopback server by -debug.dnsoverride."""
    header, body = signed(ED)
    net, _ = signed(ED, domain="example.net", identifier="@example.net")
    com, _ = signed(ED, domain="example.com", identifier="@example.com")
    with ZoneServer({SELECTOR: [dns_record(ED)]}, servfail=frozenset({"sel._domainkey.example.com"})) as srv:
        for h, conf, want in [
            (header, "", [("pass", "")]),
            (net, "", [("permerror", "no key for signature: lookup sel._domainkey.example.net: no such host")]),
            (
                com,
                "fail_open yes",
                [("temperror", "key unavailable: lookup sel._domainkey.example.com: server misbehaving")],
            ),
        ]:
            chk, _ = build(f"check.dkim {{\n{conf}\n}}\n", tmp_path, "check.dkim", DKIMCheck, dns_override=srv.addr)

            async def go(h: Header, c: DKIMCheck = chk) -> CheckResult:
                await c.start()
                return await (await c.state_for_msg(MsgMeta())).check_body(h, body)

            res = asyncio.run(go(h))
            assert results(res) == want
        assert "sel._domainkey.example.org" in srv.queries


def test_long_key_record_split_in_strings(tmp_path: Path) -> None:
    """A 4096-bit key's record exceeds 255 bytes: the strings of one TXT record are joined."""
    big = SigningKey(rsa.generate_private_key(65537, 4096))
    header, body = signed(big)
    with ZoneServer({SELECTOR: [dns_record(big)]}) as srv:
        assert len(dns_record(big)) > 255
        chk, _ = build("check.dkim {\n}\n", tmp_path, "check.dkim", DKIMCheck, dns_override=srv.addr)

        async def go() -> CheckResult:
            await chk.start()
            return await (await chk.state_for_msg(MsgMeta())).check_body(header, body)

        assert results(asyncio.run(go())) == [("pass", "")]


# -- body canonicalization agrees with dkimpy's -------------------------------------------------


def test_streaming_body_hash_matches_dkimpy() -> None:
    rng = random.Random(8463)
    alphabet = [b"a", b"b", b" ", b"\t", b"\r\n", b"\r\n", b"\n", b"\r"]
    for _ in range(400):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        crlf = body.replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n")
        if crlf and not crlf.endswith(b"\r\n"):
            crlf += b"\r\n"  # SMTP bodies end with CRLF; without one dkimpy and go-msgauth differ
        for relaxed, canon in ((True, Relaxed), (False, Simple)):
            want = hashlib.sha256(canon.canonicalize_body(crlf)).digest()
            assert body_hash(crlf, relaxed) == want, (crlf, relaxed)
            assert body_hash(Body(crlf), relaxed) == want
            # Chunk boundaries anywhere, including between CR and LF.
            h = BodyHasher(relaxed)
            pos = 0
            while pos < len(crlf):
                step = rng.randint(1, 5)
                h.update(crlf[pos : pos + step])
                pos += step
            assert h.digest() == want, (crlf, relaxed)


def test_dnspython_fallback_lookup() -> None:
    """The seam's own stub resolver, used while the shared DNS layer is absent."""
    with ZoneServer({SELECTOR: ["v=DKIM1; p=" + "A" * 300]}, servfail=frozenset({"bad.example"})) as srv:
        txt = _dnspython_lookup(srv.addr)

        async def go() -> list[object]:
            out: list[object] = [await txt(SELECTOR)]
            for name in ("missing.example", "bad.example"):
                try:
                    await txt(name)
                except TXTLookupError as e:
                    out.append((str(e), e.temporary))
            return out

        assert asyncio.run(go()) == [
            ["v=DKIM1; p=" + "A" * 300],
            ("lookup missing.example: no such host", False),
            ("lookup bad.example: server misbehaving", True),
        ]
