"""Modified UTF-7 for mailbox names (RFC 3501 §5.1.3).

IMAP4rev1 clients that have not enabled UTF8=ACCEPT send mailbox names in this
encoding; the server stores and matches the decoded Unicode form, so both
directions live here. Decoding is strict (non-shortest or malformed forms are
refused) so that one Unicode name has exactly one wire spelling.
"""

from __future__ import annotations

import base64
import binascii


def _printable(c: str) -> bool:
    # RFC 3501 §5.1.3: characters 0x20-0x7e represent themselves ("&" is escaped as "&-").
    return 0x20 <= ord(c) <= 0x7E


def _b64(chunk: str) -> str:
    """One shifted run: UTF-16BE, base64 with "," for "/", no padding."""
    raw = chunk.encode("utf-16-be")
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode_mutf7(s: str) -> str:
    """Encode a Unicode mailbox name for the wire."""
    out: list[str] = []
    run: list[str] = []
    for c in s:
        if _printable(c):
            if run:
                out.append("&" + _b64("".join(run)) + "-")
                run = []
            out.append("&-" if c == "&" else c)
        else:
            run.append(c)
    if run:
        out.append("&" + _b64("".join(run)) + "-")
    return "".join(out)


_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _decode_run(b64: str) -> str:
    if not b64 or any(c not in _B64_CHARS for c in b64):
        raise ValueError("invalid modified base64")
    if len(b64) % 4 == 1:
        raise ValueError("truncated modified base64")
    padded = b64.replace(",", "/") + "=" * (-len(b64) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise ValueError("invalid modified base64") from exc
    if len(raw) % 2:
        raise ValueError("odd number of UTF-16 octets")
    try:
        text = raw.decode("utf-16-be")  # unpaired surrogates raise here
    except UnicodeDecodeError as exc:
        raise ValueError("invalid UTF-16 in modified base64") from exc
    # RFC 3501 §5.1.3: printable US-ASCII MUST NOT be base64-encoded; also reject
    # non-zero padding bits, both are non-canonical spellings of another name.
    if any(_printable(c) for c in text) or _b64(text) != b64:
        raise ValueError("non-canonical modified UTF-7")
    return text


def decode_mutf7(s: str) -> str:
    """Decode a wire mailbox name; ValueError if it is not valid modified UTF-7.

    Raw non-ASCII characters are refused too: without UTF8=ACCEPT a client must
    encode them (the parser turns the ValueError into a BAD reply).
    """
    out: list[str] = []
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "&":
            end = s.find("-", i + 1)
            if end < 0:
                raise ValueError("unterminated '&' shift in mailbox name")
            if end == i + 1:
                out.append("&")
            else:
                out.append(_decode_run(s[i + 1 : end]))
            i = end + 1
        elif _printable(c):
            out.append(c)
            i += 1
        else:
            raise ValueError("mailbox name contains a character that must be encoded")
    return "".join(out)
