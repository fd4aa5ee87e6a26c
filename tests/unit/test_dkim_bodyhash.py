"""DKIM body canonicalization by blocks equals the line-by-line definition (RFC 6376 §3.4.3, §3.4.4)."""

from __future__ import annotations

import hashlib
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pymaddy.dkim.core import BodyHasher


def reference(body: bytes, relaxed: bool) -> bytes:
    """The canonical body straight from the RFC's words, one line at a time."""
    lines = body.split(b"\n")
    last = lines.pop()
    if last:
        lines.append(last)  # an unterminated last line counts as terminated
    out = []
    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if relaxed:
            line = re.sub(rb"[ \t]+", b" ", line).rstrip(b" ")
        out.append(line + b"\r\n")
    while out and out[-1] == b"\r\n":
        out.pop()  # trailing empty lines are ignored
    canon = b"".join(out)
    if not canon and not relaxed:
        canon = b"\r\n"  # simple: an empty body is one CRLF
    return hashlib.sha256(canon).digest()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b c", b" ", b"\t", b"\r", b"\n", b"\r\n", b"  x  "]), max_size=40),
       st.booleans(), st.lists(st.integers(1, 30), max_size=5))
def test_block_canonicalization_matches_the_rfc(parts: list[bytes], relaxed: bool, cuts: list[int]) -> None:
    body = b"".join(parts)
    h = BodyHasher(relaxed)
    pos = 0
    for c in cuts:  # arbitrary chunk boundaries, lines split across them
        h.update(body[pos : pos + c])
        pos += c
    h.update(body[pos:])
    assert h.digest() == reference(body, relaxed)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"Subject", b"FROM ", b"x-Y\t"]),
                          st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n ", b"\r\n\t", b"\r", b"\n", b"b c"]),
                                   max_size=10).map(lambda p: b"".join(p) + b"\r\n")), max_size=4))
def test_relaxed_headers_match_dkimpy(fields: list[tuple[bytes, bytes]]) -> None:
    from dkim.canonicalization import Relaxed

    from pymaddy.dkim.core import relaxed_headers

    assert relaxed_headers(fields) == Relaxed.canonicalize_headers(fields)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b" b=", b";b =", b"\tb\r\n =", b"abc+/=", b" ", b"\r\n ", b";", b"x=y", b"bh=z",
                                 b"\r\n"]), max_size=12).map(b"".join))
def test_b_tag_removal_matches_dkimpy(value: bytes) -> None:
    from dkim import RE_BTAG

    from pymaddy.dkim.core import B_TAG

    assert B_TAG.sub(rb"\1", value) == RE_BTAG.sub(rb"\1", value)
