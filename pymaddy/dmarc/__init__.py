"""DMARC (RFC 7489) evaluation as maddy 0.9 does it (internal/dmarc, go-msgauth's dmarc).

A library: it knows records, alignment and policies, never the server's
configuration. The pipeline (`pymaddy.pipeline.runner`) starts `fetch_record`
while the body checks run and calls `apply` with the SPF and DKIM
Authentication-Results entries those checks produced (spec §D.4).

Behaviour worth knowing (maddy's, kept on purpose):

* The record is looked up at `_dmarc.<From domain>`, and only when that name has
  no TXT records at all at `_dmarc.<organizational domain>` (RFC 7489 §6.6.3).
  Several or zero `v=DMARC1` records mean "no record".
* Without both an SPF and a DKIM result the outcome is `none` ("Not enough
  information (required checks are disabled)").
* `pct` is applied as maddy does: the policy is skipped when a random number in
  [0, 100) is greater than `pct` (so `pct=0` still applies 1 % of the time).
* A temporary DNS error while fetching the policy is `temperror` with policy
  `reject` (maddy answers 450 4.7.1: "fail closed"); other lookup or parse
  errors are `permerror` without action.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymaddy.dns import DNSError
from pymaddy.mail.message import Header
from pymaddy.pipeline.interfaces import AuthResult

NONE = "none"
QUARANTINE = "quarantine"
REJECT = "reject"
STRICT = "s"
RELAXED = "r"

TxtLookup = Callable[[str], Awaitable[list[str]]]
TxtPeek = Callable[[str], list[str] | None]
"""`name → TXT records` from a cache, None when not cached (no DNS query is made)."""


class DMARCError(Exception):
    """A malformed record or an underivable organizational domain (→ `permerror`)."""


@dataclass
class Record:
    """A parsed DMARC record (RFC 7489 §6.3); reporting tags are kept but unused."""

    policy: str  # p
    subdomain_policy: str = ""  # sp ("" when absent)
    dkim_alignment: str = RELAXED  # adkim
    spf_alignment: str = RELAXED  # aspf
    percent: int | None = None  # pct
    failure_options: list[str] = field(default_factory=list)  # fo
    report_format: list[str] = field(default_factory=list)  # rf
    report_interval: int = 0  # ri, seconds
    rua: list[str] = field(default_factory=list)
    ruf: list[str] = field(default_factory=list)


def _policy(v: str, tag: str) -> str:
    if v not in (NONE, QUARANTINE, REJECT):
        raise DMARCError(f"dmarc: invalid policy for parameter '{tag}'")
    return v


def _alignment(v: str, tag: str) -> str:
    if v not in (RELAXED, STRICT):
        raise DMARCError(f"dmarc: invalid alignment mode for parameter '{tag}'")
    return v


def _int(v: str, tag: str) -> int:
    s = v[1:] if v[:1] in "+-" else v
    if not s.isascii() or not s.isdigit():
        raise DMARCError(f"dmarc: invalid parameter '{tag}': invalid syntax")
    return int(v)


def parse_record(txt: str) -> Record:
    """Parse a record as go-msgauth does: tags split at `;` then the first `=`, trimmed, values
    case-sensitive. Raises DMARCError (RFC 7489 §6.3/§6.4)."""
    params: dict[str, str] = {}
    for part in txt.split(";"):
        k, sep, v = part.partition("=")
        if not sep:
            if part.strip() == "":
                continue
            raise DMARCError("dmarc: malformed params")
        params[k.strip()] = v.strip()
    if params.get("v") != "DMARC1":
        raise DMARCError("dmarc: unsupported DMARC version")
    if "p" not in params:
        raise DMARCError("dmarc: record is missing a 'p' parameter")
    rec = Record(policy=_policy(params["p"], "p"))
    if "adkim" in params:
        rec.dkim_alignment = _alignment(params["adkim"], "adkim")
    if "aspf" in params:
        rec.spf_alignment = _alignment(params["aspf"], "aspf")
    if "fo" in params:
        for o in params["fo"].split(":"):
            if o.strip() not in ("0", "1", "d", "s"):
                raise DMARCError("dmarc: invalid failure option in parameter 'fo'")
            rec.failure_options.append(o.strip())
    if "pct" in params:
        pct = _int(params["pct"], "pct")
        if not 0 <= pct <= 100:
            raise DMARCError(f"dmarc: invalid parameter 'pct': value {pct} out of bounds")
        rec.percent = pct
    if "rf" in params:
        for f in params["rf"].split(":"):
            if f != "afrf":
                raise DMARCError("dmarc: invalid parameter 'rf'")
            rec.report_format.append(f)
    if "ri" in params:
        ri = _int(params["ri"], "ri")
        if ri <= 0:
            raise DMARCError("dmarc: invalid parameter 'ri': negative or zero duration")
        rec.report_interval = ri
    if "rua" in params:
        rec.rua = [u.strip() for u in params["rua"].split(",")]
    if "ruf" in params:
        rec.ruf = [u.strip() for u in params["ruf"].split(",")]
    if "sp" in params:
        rec.subdomain_policy = _policy(params["sp"], "sp")
    return rec


# -- organizational domains (RFC 7489 §3.2) ---------------------------------------------------

_PSL: Any = None


def _psl() -> Any:
    global _PSL
    if _PSL is None:
        from publicsuffixlist import PublicSuffixList

        _PSL = PublicSuffixList()  # ICANN and private sections, unknown TLDs as "*" (like Go's)
    return _PSL


def preload() -> None:
    """Load the public suffix list and the From-field parser now: a server calls this at start,
    so the first message does not pay for them (~0.1 s)."""
    _psl()
    _from_value_domain("<postmaster@example.org>")


@functools.lru_cache(maxsize=1024)
def public_suffix(domain: str) -> str:
    """The public suffix of `domain` (the `*` rule for unknown TLDs). Remembered per name: the
    list is fixed and every message asks again for the same few domains."""
    d = domain.rstrip(".").lower()
    return str(_psl().publicsuffix(d) or d)


@functools.lru_cache(maxsize=1024)
def organizational_domain(domain: str) -> str:
    """The public suffix plus one label; DMARCError when `domain` is itself a public suffix or
    has empty labels (Go's publicsuffix.EffectiveTLDPlusOne). Remembered per name (a failure
    is not, and is recomputed)."""
    d = domain.lower()
    if not d or d.startswith(".") or d.endswith(".") or ".." in d:
        raise DMARCError("publicsuffix: empty label in domain " + _go_quote(domain))
    org = _psl().privatesuffix(d)
    if not org:
        raise DMARCError("publicsuffix: cannot derive eTLD+1 for domain " + _go_quote(domain))
    return str(org)


def _go_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_aligned(from_domain: str, auth_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 §3.1): strict = same name, relaxed = same organizational
    domain (a From domain that is a public suffix must match exactly)."""
    if mode == STRICT:
        return from_domain.lower() == auth_domain.lower()
    if from_domain.lower() == public_suffix(from_domain):
        return from_domain.lower() == auth_domain.lower()
    try:
        return organizational_domain(from_domain) == organizational_domain(auth_domain)
    except DMARCError:
        return False


# -- the RFC5322.From domain (RFC 7489 §6.6.1) ------------------------------------------------


def extract_from_domain(header: Header) -> str:
    """The From domain DMARC judges; DMARCError with maddy's wording when the field is missing,
    repeated, malformed or holds several addresses (maddy's ExtractFromDomain)."""
    values = header.get_all("From")
    if len(values) > 1:
        raise DMARCError("dmarc: multiple From header fields are not allowed")
    if not values or values[0] == "":
        raise DMARCError("dmarc: missing From header field")
    found = _from_value_domain(values[0])
    if isinstance(found, DMARCError):
        raise DMARCError(str(found))
    return found


@functools.lru_cache(maxsize=1024)
def _from_value_domain(value: str) -> str | DMARCError:
    """The domain of a From field value holding one address, or the error to raise (a fresh copy
    is raised each time). Remembered per value: the pipeline and check.spf both ask for every
    message, and a sender's messages repeat the same From."""
    # Go's mail.ParseAddressList semantics live with check.authorize_sender (imported late:
    # that module pulls in the runtime).
    from pymaddy.checks.authorize_sender import AddressParseError, parse_address_list

    try:
        addrs = parse_address_list(value)
    except AddressParseError as e:
        return DMARCError(f"dmarc: malformed From header field: {str(e).removeprefix('mail: ')}")
    if len(addrs) > 1:
        return DMARCError("dmarc: multiple addresses in From field are not allowed")
    if not addrs:
        return DMARCError("dmarc: missing address in From field")
    domain = addrs[0].rpartition("@")[2]
    if not domain:
        return DMARCError("dmarc: malformed From header field: malformed address")
    return domain


# -- record discovery (RFC 7489 §6.6.3) -------------------------------------------------------


async def fetch_record(lookup: TxtLookup, from_domain: str) -> tuple[str, Record | None]:
    """(policy domain, record) for the RFC5322.From domain; ("", None) without a single
    `v=DMARC1` record. `lookup` returns [] for NXDOMAIN/NODATA. Raises DNSError (lookup) or
    DMARCError (bad record / org domain)."""
    policy_domain = from_domain
    txts = await lookup("_dmarc." + from_domain)
    if not txts:
        policy_domain = organizational_domain(from_domain)
        txts = await lookup("_dmarc." + policy_domain)
        if not txts:
            return "", None
    return _pick(policy_domain, txts)


def fetch_record_cached(peek: TxtPeek, from_domain: str) -> tuple[str, Record | None] | None:
    """fetch_record answered from cached DNS answers only (`peek` gives None for a name it has
    no answer for): None when a lookup would be needed. Lets the caller skip a task per
    message when the policy is already known. Raises DMARCError as fetch_record."""
    policy_domain = from_domain
    txts = peek("_dmarc." + from_domain)
    if txts is None:
        return None
    if not txts:
        policy_domain = organizational_domain(from_domain)
        txts = peek("_dmarc." + policy_domain)
        if txts is None:
            return None
        if not txts:
            return "", None
    return _pick(policy_domain, txts)


def _pick(policy_domain: str, txts: list[str]) -> tuple[str, Record | None]:
    """RFC 7489 §6.6.3: exactly one `v=DMARC1` record counts."""
    records = [t for t in txts if t.startswith("v=DMARC1")]
    if len(records) != 1:
        return "", None
    return policy_domain, _parsed_record(records[0])


@functools.lru_cache(maxsize=256)
def _parsed_record(txt: str) -> Record:
    """parse_record remembered per record text (the Record is shared: never modified)."""
    return parse_record(txt)


# -- evaluation ---------------------------------------------------------------------------


@dataclass
class EvalResult:
    """The `dmarc=` entry plus what alignment considered (for logs)."""

    authres: AuthResult
    spf: AuthResult | None = None
    spf_aligned: bool = False
    dkim: AuthResult | None = None
    dkim_aligned: bool = False


def _dmarc(value: str, from_domain: str, reason: str = "") -> AuthResult:
    return AuthResult("dmarc", value, reason, {"header.from": from_domain})


def evaluate_alignment(from_domain: str, record: Record, results: Sequence[AuthResult]) -> EvalResult:
    """Is an SPF- or DKIM-authenticated identifier aligned with the From domain (RFC 7489 §4.2)?

    The SPF identifier is `smtp.mailfrom` (the domain) or, for a null sender, `smtp.helo`; the
    DKIM one is each signature's `header.d`."""
    spf: AuthResult | None = None
    spf_aligned = False
    dkim: AuthResult | None = None
    dkim_aligned = dkim_temp = dkim_present = False
    for r in results:
        if r.method == "dkim":
            dkim_present = True
            if dkim is None or not dkim.result:
                dkim = r
            if is_aligned(from_domain, r.params.get("header.d", ""), record.dkim_alignment):
                dkim = r
                if r.result == "pass":
                    dkim_aligned = True
                elif r.result == "temperror":
                    dkim_temp = True
        elif r.method == "spf":
            spf = r
            ident = r.params.get("smtp.mailfrom", "") or r.params.get("smtp.helo", "")
            if is_aligned(from_domain, ident, record.spf_alignment) and r.result == "pass":
                spf_aligned = True
    out = EvalResult(_dmarc("", from_domain), spf, spf_aligned, dkim, dkim_aligned)
    if not dkim_present or spf is None or not spf.result:
        out.authres = _dmarc(NONE, from_domain, "Not enough information (required checks are disabled)")
    elif dkim_temp and not dkim_aligned and not spf_aligned:
        out.authres = _dmarc("temperror", from_domain, "DKIM authentication temp error")
    elif not dkim_aligned and spf.result == "temperror":
        out.authres = _dmarc("temperror", from_domain, "SPF authentication temp error")
    elif dkim_aligned or spf_aligned:
        out.authres = _dmarc("pass", from_domain)
    else:
        out.authres = _dmarc("fail", from_domain, "No aligned identifiers")
    return out


@dataclass
class Fetched:
    """The outcome of the policy lookup for one message."""

    from_domain: str = ""
    policy_domain: str = ""
    record: Record | None = None
    error: Exception | None = None


async def fetch(lookup: TxtLookup, from_domain: str) -> Fetched:
    """`fetch_record` with its errors captured (maddy's Verifier.FetchRecord)."""
    try:
        pd, rec = await fetch_record(lookup, from_domain)
    except (DNSError, DMARCError) as e:
        return Fetched(from_domain, error=e)
    return Fetched(from_domain, pd, rec)


def fetch_cached(peek: TxtPeek, from_domain: str) -> Fetched | None:
    """`fetch` from cached answers only; None when DNS would have to be asked."""
    try:
        found = fetch_record_cached(peek, from_domain)
    except DMARCError as e:
        return Fetched(from_domain, error=e)
    if found is None:
        return None
    return Fetched(from_domain, found[0], found[1])


def apply(
    fetched: Fetched, results: Sequence[AuthResult], rng: Callable[[int], int] = random.randrange
) -> tuple[EvalResult, str]:
    """The `dmarc=` result and the policy to enforce: none, quarantine or reject (RFC 7489 §6.6.4).

    `rng(100)` gives the sample for `pct` (§6.6.4: the policy applies to that share of mail)."""
    fd = fetched.from_domain
    err = fetched.error
    if err is not None:
        if isinstance(err, DNSError) and err.temporary:
            return EvalResult(_dmarc("temperror", fd, f"Policy lookup failed: {err}")), REJECT
        return EvalResult(_dmarc("permerror", fd, f"Policy lookup failed: {err}")), NONE
    rec = fetched.record
    if rec is None:
        return EvalResult(_dmarc(NONE, fd)), NONE
    res = evaluate_alignment(fd, rec, results)
    if res.authres.result in ("pass", NONE):
        return res, NONE
    if rec.percent is not None and rng(100) > rec.percent:
        return res, NONE
    policy = rec.policy
    if fetched.policy_domain.lower() != fd.lower() and rec.subdomain_policy:
        policy = rec.subdomain_policy
    return res, policy


__all__ = [
    "DMARCError",
    "EvalResult",
    "Fetched",
    "Record",
    "apply",
    "evaluate_alignment",
    "extract_from_domain",
    "fetch",
    "fetch_cached",
    "fetch_record",
    "fetch_record_cached",
    "is_aligned",
    "organizational_domain",
    "parse_record",
    "preload",
    "public_suffix",
]
