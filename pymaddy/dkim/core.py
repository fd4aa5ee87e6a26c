"""DKIM signing and verification (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463).

Canonicalization of header fields and the choice of header instances come from
dkimpy (`dkim.canonicalization`, `dkim.select_headers`); the body is
canonicalized here, streaming, so a large spooled body is never read whole; the
cryptography is done with `cryptography`. dkimpy's own sign()/verify() are not
used because its sign() cannot write `x=` (maddy signs with a 120 h expiry) and
its Ed25519 support needs PyNaCl, and because maddy's verdicts and their
wording (go-msgauth's `dkim.Verify`, which the `reason=` of
Authentication-Results repeats) must be reproduced exactly: verification
follows go-msgauth's order of checks and error texts, classifying each failure
as permerror, temperror or fail.

DNS is not done here: `verify` takes an async TXT lookup, so the server's
resolver (and the tests' loopback DNS) answer the key queries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import Simple

from pymaddy.dkim.keys import SigningKey
from pymaddy.mail.message import Body, Header

TXTLookup = Callable[[str], Awaitable[list[str]]]
"""`name → TXT records` (strings of one record joined); raises an exception with a true
`.temporary` attribute (or TimeoutError) for temporary failures."""

_CHUNK = 64 * 1024
_GIL_MINSIZE = 2048  # CPython's HASHLIB_GIL_MINSIZE: hashlib releases the GIL from this size on
_WSP_RUN = re.compile(rb"[ \t]+")
# The b= tag's value (base64 with folding whitespace) and a final line break: what dkimpy's
# RE_BTAG removes for hashing (RFC 6376 §3.7). dkimpy's `(?:\s*[b64])*` is written as one
# character-class run that must end on a base64 character: the same match, without a
# group iteration per character.
B_TAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")
_REQUIRED_TAGS = ("v", "a", "b", "bh", "d", "h", "s")

# -- body ---------------------------------------------------------------------------


class BodyHasher:
    """SHA-256 of a canonicalized body (RFC 6376 §3.4.3, §3.4.4), fed in arbitrary chunks.

    Empty lines are held back until a non-empty line follows, which drops the
    trailing ones; bare LF is taken as a line end like CRLF.
    """

    def __init__(self, relaxed: bool, *, keep_gil: bool = False) -> None:
        self.relaxed = relaxed
        self.hash = hashlib.sha256()
        self.keep_gil = keep_gil
        self._partial = b""
        self._empty = 0
        self._written = False

    def _line(self, line: bytes) -> None:
        if self.relaxed:
            line = _WSP_RUN.sub(b" ", line).rstrip(b" ")
        if not line:
            self._empty += 1
            return
        if self._empty:
            self.hash.update(b"\r\n" * self._empty)
            self._empty = 0
        self.hash.update(line + b"\r\n")
        self._written = True

    def update(self, data: bytes) -> None:
        """Canonicalize every complete line of the data in a few C-speed passes (the same result
        as taking them one by one through _line, which a body of many short lines makes slow)."""
        buf = self._partial + data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._partial = buf
            return
        block, self._partial = buf[: cut + 1], buf[cut + 1 :]
        block = block.replace(b"\r\n", b"\n")  # each line loses one CR before its LF, as in _line
        if self.relaxed:
            # Every WSP run becomes one SP: tabs to spaces, then halve double spaces until none
            # is left (a few C-speed passes; a regex substitution costs far more per match).
            if b"\t" in block:
                block = block.replace(b"\t", b" ")
            while b"  " in block:
                block = block.replace(b"  ", b" ")
            block = block.replace(b" \n", b"\n")
        content = block.rstrip(b"\n")
        trailing = len(block) - len(content)  # line ends after the last non-empty line
        if not content:
            self._empty += trailing
            return
        if self._empty:
            self.hash.update(b"\r\n" * self._empty)
        self._hash(content.replace(b"\n", b"\r\n") + b"\r\n")
        self._empty = trailing - 1
        self._written = True

    def _hash(self, data: bytes) -> None:
        if self.keep_gil and len(data) >= _GIL_MINSIZE:
            # hashlib lets go of the GIL for 2 KiB or more: on the event loop that hands the GIL
            # to any waiting thread (the storage writer) and the loop then waits to get it back,
            # far longer than hashing a small body takes. Pieces under the limit keep it.
            view = memoryview(data)
            for i in range(0, len(data), _GIL_MINSIZE - 1):
                self.hash.update(view[i : i + _GIL_MINSIZE - 1])
            return
        self.hash.update(data)

    def digest(self) -> bytes:
        if self._partial:
            # An unterminated last line counts as terminated (§3.4.3, §3.4.4).
            self._line(self._partial[:-1] if self._partial.endswith(b"\r") else self._partial)
            self._partial = b""
        if not self._written and not self.relaxed:
            return hashlib.sha256(b"\r\n").digest()  # simple: an empty body is one CRLF
        return self.hash.digest()


SMALL_BODY = 256 * 1024


def is_small(body: Body | bytes) -> bool:
    """Whether hashing `body` on the event loop is cheaper than handing it to a thread."""
    if isinstance(body, bytes):
        return len(body) <= SMALL_BODY
    return body.path is None and body.size <= SMALL_BODY


def body_hash(body: Body | bytes, relaxed: bool) -> bytes:
    h = BodyHasher(relaxed, keep_gil=is_small(body))
    if isinstance(body, bytes):
        h.update(body)
        return h.digest()
    f: BinaryIO
    with body.open() as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


# -- header ---------------------------------------------------------------------------


def _split_fields(header: Header) -> list[tuple[bytes, bytes]]:
    """(name, value-with-CRLF) pairs as dkimpy's canonicalizers take them."""
    out = []
    for _, raw in header:
        colon = raw.find(b":")
        if colon < 0:
            continue
        value = raw[colon + 1 :]
        if not value.endswith(b"\n"):
            value += b"\r\n"
        elif not value.endswith(b"\r\n"):
            value = value[:-1] + b"\r\n"
        out.append((raw[:colon], value))
    return out


def relaxed_headers(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Relaxed header canonicalization (RFC 6376 §3.4.2), the same bytes as dkimpy's
    Relaxed.canonicalize_headers but with str methods instead of a regex per field: lower-case
    name, unfolded value with every WSP run one SP, trimmed."""
    out = []
    for name, value in fields:
        v = value.replace(b"\r\n", b"").replace(b"\n", b"")  # unfolding takes bare LF too, as dkimpy
        if b"\t" in v:
            v = v.replace(b"\t", b" ")
        while b"  " in v:
            v = v.replace(b"  ", b" ")
        out.append((name.lower().rstrip(), v.strip() + b"\r\n"))
    return out


def _select_headers(fields: list[tuple[bytes, bytes]], keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    """dkimpy's select_headers (RFC 6376 §5.4.2): each listed name takes the bottom-most instance
    not taken yet, a name with none left is skipped; with every field's name lowered once."""
    stacks: dict[bytes, list[int]] = {}
    for i, (name, _value) in enumerate(fields):
        stacks.setdefault(name.lower(), []).append(i)
    out = []
    for k in keys:
        left = stacks.get(k)
        if left:
            out.append(fields[left.pop()])
    return out


def _header_hash_input(
    fields: list[tuple[bytes, bytes]], keys: Iterable[str], relaxed: bool, sig_field: tuple[bytes, bytes]
) -> bytes:
    """The data whose hash is signed (RFC 6376 §3.7): the selected fields (bottom-up, absent
    instances skipped) then the signature field with an empty b= and no final CRLF."""
    canon = relaxed_headers if relaxed else Simple.canonicalize_headers
    chosen = _select_headers(fields, [k.strip().lower().encode("ascii", "replace") for k in keys])
    parts = [n + b":" + v for n, v in canon(chosen)]
    name, value = canon([(sig_field[0], B_TAG.sub(rb"\1", sig_field[1]))])[0]
    parts.append(name + b":" + value.rstrip())
    return b"".join(parts)


def _fold_b(value: str) -> str:
    """go-msgauth's foldHeaderField for ` b=…`: 75-character pieces joined by CRLF SP."""
    pieces = [value[i : i + 75] for i in range(0, len(value), 75)] or [""]
    return "\r\n ".join(pieces) + "\r\n"


def format_signature(params: dict[str, str]) -> str:
    """The whole field as go-msgauth writes it: tags sorted, lines kept under ~75 columns,
    b= last on its own folded lines."""
    out = "DKIM-Signature:"
    line = ""
    for k in sorted(p for p in params if p != "b"):
        v = params[k]
        if 3 + len(line) + len(v) + len(k) > 75:
            out += line + "\r\n"
            line = ""
        line += f" {k}={v};"
    out += line
    if "b" in params:
        out += "\r\n" + _fold_b(" b=" + params["b"])
    else:
        out += "\r\n"
    return out


# -- signing ---------------------------------------------------------------------------


@dataclass
class SignOptions:
    domain: str
    selector: str
    key: SigningKey
    header_keys: list[str]
    identifier: str = ""
    header_relaxed: bool = True
    body_relaxed: bool = True
    expiry: float = 0.0  # seconds after now for x=; 0 = no x=
    now: float | None = None


def sign(header: Header, body: Body | bytes, opts: SignOptions) -> bytes:
    """The raw `DKIM-Signature:` field (with CRLF) for the message; the caller prepends it."""
    now = int(opts.now if opts.now is not None else time.time())
    params = {
        "v": "1",
        "a": f"{opts.key.algo}-sha256",
        "bh": base64.b64encode(body_hash(body, opts.body_relaxed)).decode("ascii"),
        "c": ("relaxed" if opts.header_relaxed else "simple") + "/" + ("relaxed" if opts.body_relaxed else "simple"),
        "d": opts.domain,
        "s": opts.selector,
        "t": str(now),
        "h": ":".join(opts.header_keys),
    }
    if opts.identifier:
        params["i"] = opts.identifier
    if opts.expiry:
        params["x"] = str(now + int(opts.expiry))
    params["b"] = ""
    unsigned = format_signature(params).encode("utf-8")
    colon = unsigned.find(b":")
    data = _header_hash_input(
        _split_fields(header), opts.header_keys, opts.header_relaxed, (unsigned[:colon], unsigned[colon + 1 :])
    )
    sig = opts.key.sign(data)
    params["b"] = base64.b64encode(sig).decode("ascii")
    return format_signature(params).encode("utf-8")


# -- verification ----------------------------------------------------------------------


class DKIMError(Exception):
    """Why a signature is not valid. kind: `perm` (permerror), `temp` (temperror) or
    `fail` (fail); str() is go-msgauth's text without its `dkim: ` prefix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Verification:
    """The outcome for one DKIM-Signature field; `err` None means it verified."""

    domain: str = ""
    identifier: str = ""
    selector: str = ""
    signature: str = ""  # the b= value, whitespace removed
    header_keys: list[str] = field(default_factory=list)
    timestamp: int | None = None
    expiration: int | None = None
    err: DKIMError | None = None


def _strip_ws(s: str) -> str:
    return "".join(s.split())  # every whitespace character out, without a regex


def parse_params(value: str) -> dict[str, str]:
    """go-msgauth's parseHeaderParams: `k=v;` pairs, trimmed; ValueError when a non-empty part
    has no `=`."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        k, sep, v = part.partition("=")
        if not sep:
            if part.strip():
                raise ValueError("dkim: malformed header params")
            continue
        out[k.strip()] = v.strip()
    return out


def signature_tags(value: str) -> dict[str, str]:
    """Tags of a DKIM-Signature value (empty when malformed), e.g. to learn `d=` and `s=`."""
    try:
        return parse_params(value)
    except ValueError:
        return {}


def _tag_list(s: str) -> list[str]:
    return [_strip_ws(t) for t in s.split(":")]


def _parse_time(s: str) -> int:
    text = _strip_ws(s)
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f'strconv.ParseInt: parsing "{text}": invalid syntax')
    return int(text)


def _b64(s: str) -> bytes:
    return base64.b64decode(_strip_ws(s), validate=True)


@dataclass(frozen=True)
class _PublicKey:
    algo: str
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    hashes: list[str] | None
    services: list[str] | None


@functools.lru_cache(maxsize=256)
def parse_key_record(txt: str) -> _PublicKey:
    """A `v=DKIM1; k=…; p=…` record (RFC 6376 §3.6.1) as go-msgauth's parsePublicKey reads it.
    Remembered per record text: a sender's key is parsed once, not for every message."""
    try:
        params = parse_params(txt)
    except ValueError as e:
        raise DKIMError("perm", f"key syntax error: {e}") from None
    if "v" in params and params["v"] != "DKIM1":
        raise DKIMError("perm", "incompatible public key version")
    if "p" not in params:
        raise DKIMError("perm", "key syntax error: missing public key data")
    p = params["p"]
    if p == "":
        raise DKIMError("perm", "key revoked")
    try:
        blob = base64.b64decode(p.replace(" ", ""), validate=True)
    except (binascii.Error, ValueError) as e:
        raise DKIMError("perm", f"key syntax error: {e}") from None
    k = params.get("k", "")
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    if k in ("rsa", ""):
        try:
            loaded: Any = serialization.load_der_public_key(blob)
        except (ValueError, TypeError):
            try:
                # RSAPublicKey instead of SubjectPublicKeyInfo (erratum 3017)
                loaded = serialization.load_der_public_key(_pkcs1_to_spki(blob))
            except (ValueError, TypeError) as e:
                raise DKIMError("perm", f"key syntax error: {e}") from None
        if not isinstance(loaded, rsa.RSAPublicKey):
            raise DKIMError("perm", "key syntax error: not an RSA public key")
        bits = (loaded.key_size + 7) // 8 * 8
        if bits < 1024:  # RFC 8301 §3.2
            raise DKIMError("perm", f"key is too short: want 1024 bits, has {bits} bits")
        key, algo = loaded, "rsa"
    elif k == "ed25519":
        if len(blob) != 32:
            raise DKIMError("perm", f"invalid Ed25519 public key size: {len(blob)} bytes")
        key, algo = ed25519.Ed25519PublicKey.from_public_bytes(blob), "ed25519"
    else:
        raise DKIMError("perm", "unsupported key algorithm")
    services = None
    if "s" in params:
        svc = _tag_list(params["s"])
        if "*" not in svc:
            services = svc
    return _PublicKey(algo, key, _tag_list(params["h"]) if "h" in params else None, services)


def _pkcs1_to_spki(blob: bytes) -> bytes:
    """Wrap a DER RSAPublicKey in a SubjectPublicKeyInfo so it can be loaded."""

    def der_len(n: int) -> bytes:
        if n < 128:
            return bytes([n])
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([0x80 | len(b)]) + b

    alg = bytes.fromhex("300d06092a864886f70d0101010500")
    bitstr = b"\x03" + der_len(len(blob) + 1) + b"\x00" + blob
    inner = alg + bitstr
    return b"\x30" + der_len(len(inner)) + inner


def _is_temporary(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or bool(getattr(e, "temporary", False))


async def _query_key(name: str, lookup: TXTLookup) -> _PublicKey:
    """go-msgauth's queryDNSTXT: exactly one TXT record must hold the key (RFC 6376 §3.6.2.2)."""
    try:
        txts = await lookup(name)
    except Exception as e:
        if _is_temporary(e):
            raise DKIMError("temp", f"key unavailable: {e}") from None
        raise DKIMError("perm", f"no key for signature: {e}") from None
    if not txts:
        raise DKIMError("perm", "no valid key found")
    if len(txts) > 1:
        raise DKIMError("perm", "multiple TXT records found for key")
    return parse_key_record(txts[0])


async def verify_one(
    fields: list[tuple[bytes, bytes]],
    sig_field: tuple[bytes, bytes],
    body: Body | bytes,
    lookup: TXTLookup,
    *,
    now: float | None = None,
    body_hashes: dict[bool, bytes] | None = None,
    params: dict[str, str] | None = None,
) -> Verification:
    """Verify one signature field; every failure is reported in `.err`, never raised.
    `params` are the field's tags when the caller has parsed them already."""
    v = Verification()
    try:
        when = time.time() if now is None else now
        await _verify(v, fields, sig_field, body, lookup=lookup, now=when, cache=body_hashes, params=params)
    except DKIMError as e:
        v.err = e
    return v


async def _verify(
    v: Verification,
    fields: list[tuple[bytes, bytes]],
    sig_field: tuple[bytes, bytes],
    body: Body | bytes,
    *,
    lookup: TXTLookup,
    now: float,
    cache: dict[bool, bytes] | None,
    params: dict[str, str] | None = None,
) -> None:
    if params is None:
        try:
            params = parse_params(sig_field[1].decode("utf-8", "replace"))
        except ValueError as e:
            raise DKIMError("perm", f"malformed signature tags: {e}") from None
    if params.get("v") != "1":
        raise DKIMError("perm", "incompatible signature version")
    v.domain = _strip_ws(params.get("d", ""))
    v.selector = _strip_ws(params.get("s", ""))
    v.signature = _strip_ws(params.get("b", ""))
    for tag in _REQUIRED_TAGS:
        if tag not in params:
            raise DKIMError("perm", "signature missing required tag")
    if "i" in params:
        v.identifier = _strip_ws(params["i"])
        if not v.identifier.endswith("@" + v.domain) and not v.identifier.endswith("." + v.domain):
            raise DKIMError("perm", "domain mismatch")
    else:
        v.identifier = "@" + v.domain
    keys = _tag_list(params["h"])
    if not any(k.lower() == "from" for k in keys):
        raise DKIMError("perm", "From field not signed")
    v.header_keys = keys
    if "t" in params:
        try:
            v.timestamp = _parse_time(params["t"])
        except ValueError as e:
            raise DKIMError("perm", f"malformed time: {e}") from None
    if "x" in params:
        try:
            v.expiration = _parse_time(params["x"])
        except ValueError as e:
            raise DKIMError("perm", f"malformed expiration time: {e}") from None
        if now > v.expiration:
            raise DKIMError("perm", "signature has expired")

    methods = _tag_list(params["q"]) if "q" in params else ["dns/txt"]
    if "dns/txt" not in methods:
        raise DKIMError("perm", "unsupported public key query method")
    key = await _query_key(f"{v.selector}._domainkey.{v.domain}", lookup)

    key_algo, sep, hash_algo = _strip_ws(params["a"]).partition("-")
    if not sep:
        raise DKIMError("perm", "malformed algorithm name")
    if key.hashes is not None and hash_algo not in key.hashes:
        raise DKIMError("perm", "inappropriate hash algorithm")
    if hash_algo == "sha1":  # RFC 8301 §3.1
        raise DKIMError("perm", "hash algorithm too weak: sha1")
    if hash_algo != "sha256":
        raise DKIMError("perm", "unsupported hash algorithm")
    if key.algo != key_algo:
        raise DKIMError("perm", "inappropriate key algorithm")
    if key.services is not None and "email" not in key.services:
        raise DKIMError("perm", "inappropriate service")
    hcan, _, bcan = _strip_ws(params.get("c", "")).partition("/")
    hcan, bcan = hcan or "simple", bcan or "simple"
    if hcan not in ("simple", "relaxed"):
        raise DKIMError("perm", "unsupported header canonicalization algorithm")
    if bcan not in ("simple", "relaxed"):
        raise DKIMError("perm", "unsupported body canonicalization algorithm")
    if "l" in params:
        raise DKIMError("fail", "message contains an insecure body length tag")
    try:
        bh = _b64(params["bh"])
    except (binascii.Error, ValueError) as e:
        raise DKIMError("perm", f"malformed body hash: {e}") from None
    try:
        sig = base64.b64decode(v.signature, validate=True)  # _b64(params["b"]), stripped above
    except (binascii.Error, ValueError) as e:
        raise DKIMError("perm", f"malformed signature: {e}") from None

    relaxed_body = bcan == "relaxed"
    got = cache.get(relaxed_body) if cache is not None else None
    if got is None:
        got = body_hash(body, relaxed_body)
        if cache is not None:
            cache[relaxed_body] = got
    if got != bh:
        raise DKIMError("fail", "body hash did not verify")

    data = _header_hash_input(fields, keys, hcan == "relaxed", sig_field)
    try:
        if isinstance(key.key, rsa.RSAPublicKey):
            key.key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.key.verify(sig, hashlib.sha256(data).digest())
    except InvalidSignature:
        detail = "crypto/rsa: verification error" if key.algo == "rsa" else "dkim: invalid Ed25519 signature"
        raise DKIMError("fail", f"signature did not verify: {detail}") from None


async def verify(header: Header, body: Body | bytes, lookup: TXTLookup, now: float | None = None) -> list[Verification]:
    """One Verification per DKIM-Signature field, top to bottom (RFC 6376 §6.1)."""
    fields = _split_fields(header)
    sigs = [f for f in fields if f[0].strip().lower() == b"dkim-signature"]
    # Hash the body once per canonicalization in use, off the event loop: it may be a
    # large spool file.
    kinds = set()
    parsed: list[dict[str, str] | None] = []
    for s in sigs:
        try:
            tags: dict[str, str] | None = parse_params(s[1].decode("utf-8", "replace"))
        except ValueError:
            tags = None  # verify_one parses it again and reports why
        parsed.append(tags)
        c = _strip_ws(tags.get("c", "")) if tags is not None else ""
        kinds.add(c.partition("/")[2] == "relaxed")
    hashes_cache: dict[bool, bytes] = {}
    for relaxed in sorted(kinds):
        if is_small(body):
            hashes_cache[relaxed] = body_hash(body, relaxed)  # cheaper than a thread hop
        else:
            hashes_cache[relaxed] = await asyncio.to_thread(body_hash, body, relaxed)
    return [
        await verify_one(fields, s, body, lookup, now=now, body_hashes=hashes_cache, params=tags)
        for s, tags in zip(sigs, parsed, strict=True)
    ]


__all__ = [
    "BodyHasher",
    "DKIMError",
    "SignOptions",
    "TXTLookup",
    "Verification",
    "body_hash",
    "format_signature",
    "is_small",
    "parse_key_record",
    "parse_params",
    "sign",
    "signature_tags",
    "verify",
    "verify_one",
]
