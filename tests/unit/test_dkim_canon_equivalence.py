"""pymaddy's faster stand-ins for dkimpy's b= removal (RFC 6376 §3.7) and header selection
(§5.4.2) give dkimpy's results byte for byte, over generated inputs full of the awkward
characters (folding whitespace, `b=` look-alikes, repeated and odd-cased names); hashing a
body in pieces gives the same body hash."""

from __future__ import annotations

import random

import dkim

from pymaddy.dkim.core import B_TAG, BodyHasher, _select_headers

PIECES = [
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b"b",
    b"=",
    b";",
    b"a",
    b"Z",
    b"9",
    b"+",
    b"/",
    b"h",
    b"-",
    b"\x0b",
    b"b=",
    b"; b=",
    b" b =",
    b"bh=",
    b"\r\n b=",
]


def test_b_tag_removal_matches_dkimpy() -> None:
    rnd = random.Random(6376)
    for _ in range(20000):
        value = b"".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, 24)))
        assert B_TAG.sub(rb"\1", value) == dkim.RE_BTAG.sub(rb"\1", value), value


def test_b_tag_removal_of_a_real_signature() -> None:
    sig = (
        b" a=rsa-sha256; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; c=relaxed/relaxed;\r\n"
        b" d=example.org; h=From:To; s=sel; v=1;\r\n b=dGVzdA+/\r\n Zm9v\r\n YmFy==\r\n"
    )
    assert B_TAG.sub(rb"\1", sig).endswith(b" s=sel; v=1;\r\n b=")


def test_header_selection_matches_dkimpy() -> None:
    rnd = random.Random(5442)
    names = [b"From", b"from", b"FROM", b"To", b"Subject", b"X-A", b"from ", b"Date"]
    keys = [b"from", b"to", b"subject", b"x-a", b"date", b"from ", b"cc"]
    for _ in range(20000):
        fields = [(rnd.choice(names), b" v%d\r\n" % i) for i in range(rnd.randint(0, 9))]
        want = [rnd.choice(keys) for _ in range(rnd.randint(0, 9))]
        assert _select_headers(fields, want) == dkim.select_headers(fields, want), (fields, want)


def test_body_hash_in_small_pieces_is_the_same_hash() -> None:
    """A small body is hashed on the event loop in pieces under hashlib's GIL-release size."""
    rnd = random.Random(3443)
    for size in (0, 1, 2046, 2047, 2048, 2049, 4094, 4095, 9000):
        body = bytes(rnd.choice(b"ab \t\r\n") for _ in range(size))
        for relaxed in (False, True):
            digests = set()
            for keep_gil in (False, True):
                h = BodyHasher(relaxed, keep_gil=keep_gil)
                h.update(body)
                digests.add(h.digest())
            assert len(digests) == 1, (size, relaxed)
