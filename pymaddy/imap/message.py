"""A fast, tolerant MIME parser for the FETCH/SEARCH/SORT side of IMAP.

Why our own parser instead of the `email` package: FETCH needs exact byte
offsets of every part (BODY[1.2] must return the stored octets, CRLF or bare
LF alike) and a 10,000-message mailbox must be walked quickly.  The parser
only records offsets and the few header fields IMAP needs, using bytes.find
for the heavy lifting, and never raises on malformed input.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from email.utils import mktime_tz, parsedate_tz
from urllib.parse import unquote_to_bytes

from pymaddy.imap import wire
from pymaddy.imap.thread import base_subject
from pymaddy.imap.types import Section

__all__ = [
    "Address",
    "ParsedMessage",
    "SortInfo",
    "decode_header",
    "envelope_from_header",
    "header_fields",
    "parse_addresses",
    "sort_info",
]

MAX_DEPTH = 50  # deeper multipart/message nesting is treated as an opaque leaf

_DEFAULT_PARAMS: list[tuple[str, bytes]] = [("CHARSET", b"us-ascii")]
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_MESSAGE_SUBTYPES = frozenset({"rfc822", "global"})


# --------------------------------------------------------------------------- header helpers


def _split_header(raw: bytes, start: int, end: int) -> int:
    """Offset where the body starts: just after the first empty line (RFC 5322 §2.1).

    With no empty line at all the whole range is header, as most servers do.
    """
    if raw.startswith(b"\r\n", start) and start + 2 <= end:
        return start + 2
    if raw.startswith(b"\n", start) and start + 1 <= end:
        return start + 1
    i = raw.find(b"\n\r\n", start, end)
    j = raw.find(b"\n\n", start, end)
    if i < 0 and j < 0:
        return end
    if j < 0 or (0 <= i < j):
        return i + 3
    return j + 2


def _fields(raw: bytes, start: int, end: int) -> list[tuple[str, int, int, int]]:
    """Header fields in raw[start:end] as (lower-case name, field start, value start, field end).

    Continuation lines (leading WSP, RFC 5322 §2.2.3) extend the previous field; lines
    without a colon are skipped so garbage never hides the fields after it.
    """
    out: list[tuple[str, int, int, int]] = []
    pos = start
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        first = raw[pos]
        if first in (0x0D, 0x0A) and raw[pos:line_end].strip(b"\r\n") == b"":
            break  # the blank separator line
        if first in (0x20, 0x09):
            if out:
                name, fs, vs, _ = out[-1]
                out[-1] = (name, fs, vs, line_end)
        else:
            colon = raw.find(b":", pos, line_end)
            if colon > pos:
                name = raw[pos:colon].rstrip(b" \t").decode("latin-1").lower()
                out.append((name, pos, colon + 1, line_end))
        pos = line_end
    return out


_CRLF_RE = re.compile(rb"\r?\n")


def _unfold(value: bytes) -> bytes:
    """RFC 5322 §2.2.3 unfolding: drop the line breaks, keep the whitespace."""
    return _CRLF_RE.sub(b"", value).strip(b" \t\r\n")


_EW_RE = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")


def _decode_charset(data: bytes, charset: str) -> str:
    cs = charset.split("*", 1)[0].strip().lower()  # RFC 2231 §5 language suffix
    try:
        # bytes.decode refuses bytes-to-bytes codecs (hex, zlib, ...) that codecs.decode would run
        return data.decode(cs, "replace")
    except Exception:  # unknown or non-text codec: fall back rather than fail
        return data.decode("utf-8", "replace")


def _b64(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        try:
            return binascii.a2b_base64(data)
        except (binascii.Error, ValueError):
            return b""


def _qp(data: bytes, header: bool = False) -> bytes:
    try:
        return binascii.a2b_qp(data, header=header)
    except (binascii.Error, ValueError):
        return data


def decode_header(raw: bytes) -> str:
    """Unfold and RFC 2047-decode a header value (any charset, errors replaced).

    Raw 8-bit headers are taken as UTF-8 (RFC 6532).  Whitespace between adjacent
    encoded words is dropped (RFC 2047 §6.2) and adjacent words in one charset are
    decoded together so multi-byte characters split across words survive.
    """
    text = _unfold(raw).decode("utf-8", "replace")
    if "=?" not in text:
        return text
    out: list[str] = []
    pend_cs: str | None = None
    pend = b""
    pos = 0
    for m in _EW_RE.finditer(text):
        gap = text[pos : m.start()]
        if gap and (pend_cs is None or gap.strip(" \t")):
            if pend_cs is not None:
                out.append(_decode_charset(pend, pend_cs))
                pend_cs, pend = None, b""
            out.append(gap)
        cs, enc, payload = m.group(1), m.group(2).upper(), m.group(3).encode("latin-1", "replace")
        data = _b64(payload) if enc == "B" else _qp(payload, header=True)
        if pend_cs is not None and pend_cs.lower() != cs.lower():
            out.append(_decode_charset(pend, pend_cs))
            pend = b""
        pend_cs = cs
        pend += data
        pos = m.end()
    if pend_cs is not None:
        out.append(_decode_charset(pend, pend_cs))
    out.append(text[pos:])
    return "".join(out)


def header_fields(header: bytes, names: set[str], exclude: bool) -> bytes:
    """HEADER.FIELDS / HEADER.FIELDS.NOT selection (RFC 3501 §6.4.5).

    Fields are returned byte-for-byte (with their folding) and the result always
    ends with the blank line, in the header's own line-ending style.
    """
    wanted = {n.lower() for n in names}
    parts = [header[fs:fe] for name, fs, _, fe in _fields(header, 0, len(header)) if (name in wanted) != exclude]
    for i, p in enumerate(parts):
        if not p.endswith(b"\n"):
            parts[i] = p + b"\r\n"
    parts.append(b"\n" if b"\r\n" not in header and b"\n" in header else b"\r\n")
    return b"".join(parts)


# --------------------------------------------------------------------------- structured fields


def _parse_params(value: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    """Split `type/sub; a=b; c="d"` (RFC 2045 §5.1) into the value and its parameters.

    Comments are dropped, quoted strings unescaped; RFC 2231 continuations and
    charset-encoded values are joined and decoded to UTF-8.  Never raises.
    """
    s = value.decode("latin-1")
    if '"' not in s and "(" not in s and "*" not in s:
        # fast path for the common unquoted form: plain splitting is exact here
        head, *rest = s.split(";")
        simple: list[tuple[str, bytes]] = []
        for piece in rest:
            name, eq, val = piece.partition("=")
            name = "".join(name.split())
            if eq and name:
                simple.append((name, "".join(val.split()).encode("latin-1")))
        return "".join(head.split()), simple
    segs: list[list[str]] = [[]]
    i, n = 0, len(s)
    buf: list[str] = []
    while i < n:
        c = s[i]
        if c == '"':
            i += 1
            while i < n and s[i] != '"':
                if s[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(s[i])
                i += 1
            i += 1
            segs[-1].append("".join(buf))
            buf = []
            continue
        if c == "(":
            depth = 1
            i += 1
            while i < n and depth:
                if s[i] == "\\":
                    i += 1
                elif s[i] == "(":
                    depth += 1
                elif s[i] == ")":
                    depth -= 1
                i += 1
            continue
        if c == ";":
            if buf:
                segs[-1].append("".join(buf))
                buf = []
            segs.append([])
        elif c not in " \t\r\n":
            buf.append(c)
        elif buf:
            segs[-1].append("".join(buf))
            buf = []
        i += 1
    if buf:
        segs[-1].append("".join(buf))
    main = "".join(segs[0])
    raw_params: list[tuple[str, str]] = []
    for seg in segs[1:]:
        joined = "".join(seg)
        if "=" not in joined:
            continue
        # the first '=' splits name and value; a quoted value may contain '=' itself
        name_part = ""
        val_parts: list[str] = []
        found = False
        for tok in seg:
            if found:
                val_parts.append(tok)
            elif "=" in tok:
                a, b = tok.split("=", 1)
                name_part += a
                if b:
                    val_parts.append(b)
                found = True
            else:
                name_part += tok
        if name_part:
            raw_params.append((name_part, "".join(val_parts)))
    return main, _rfc2231(raw_params)


def _rfc2231(raw: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """Join RFC 2231 §3 continuations (name*0, name*1*) and decode §4 charset'lang'value."""
    plain: list[tuple[str, bytes]] = []
    cont: dict[str, list[tuple[int, str, bool]]] = {}
    order: list[str] = []
    for name, val in raw:
        lname = name.lower()
        if "*" not in lname:
            plain.append((name, val.encode("latin-1")))
            continue
        base, _, rest = name.partition("*")
        encoded = rest.endswith("*") or rest == ""
        idx_s = rest.rstrip("*")
        # ASCII digits only: latin-1 "²" is isdigit() but not int()-able; huge numbers are junk
        idx = int(idx_s) if idx_s.isascii() and idx_s.isdigit() and len(idx_s) < 6 else 0
        key = base.lower()
        if key not in cont:
            cont[key] = []
            order.append(base)
        cont[key].append((idx, val, encoded))
    out = plain
    for base in order:
        pieces = sorted(cont[base.lower()], key=lambda t: t[0])
        charset = ""
        data = b""
        for k, (_, val, encoded) in enumerate(pieces):
            v = val
            if encoded and k == 0 and v.count("'") >= 2:
                charset, _lang, v = v.split("'", 2)
            data += unquote_to_bytes(v) if encoded else v.encode("latin-1")
        text = _decode_charset(data, charset) if charset else data.decode("utf-8", "replace")
        out = [p for p in out if p[0].lower() != base.lower()]
        out.append((base, text.encode("utf-8")))
    return out


def _strip_comments(value: bytes) -> str:
    """A structured field's value without comments or parameters (Content-Transfer-Encoding)."""
    main, _ = _parse_params(value)
    return main


# --------------------------------------------------------------------------- addresses


@dataclass
class Address:
    """One ENVELOPE address (RFC 3501 §7.4.2); group markers have kind "start"/"end"."""

    name: bytes | None = None
    adl: bytes | None = None
    mailbox: bytes | None = None
    host: bytes | None = None
    kind: str = "addr"  # "addr", "start" (mailbox = group name), "end"

    def encode(self) -> bytes:
        return b"(%s %s %s %s)" % (
            wire.nstring(self.name),
            wire.nstring(self.adl),
            wire.nstring(self.mailbox),
            wire.nstring(self.host),
        )


_A_ATOM, _A_QUOTED, _A_COMMENT, _A_SPECIAL = 0, 1, 2, 3
_ADDR_SPECIALS = frozenset(b"<>@,;:.")
_ADDR_STOP = frozenset(b'<>@,;:."( \t\r\n[')


def _addr_tokens(v: bytes) -> list[tuple[int, bytes]]:
    toks: list[tuple[int, bytes]] = []
    i, n = 0, len(v)
    while i < n:
        c = v[i]
        if c in (0x20, 0x09, 0x0D, 0x0A):
            i += 1
        elif c == 0x22:  # quoted-string
            j = i + 1
            buf = bytearray()
            while j < n and v[j] != 0x22:
                if v[j] == 0x5C and j + 1 < n:
                    j += 1
                buf.append(v[j])
                j += 1
            toks.append((_A_QUOTED, bytes(buf)))
            i = j + 1
        elif c == 0x28:  # comment, nested (RFC 5322 §3.2.2)
            depth, j = 1, i + 1
            while j < n and depth:
                if v[j] == 0x5C:
                    j += 1
                elif v[j] == 0x28:
                    depth += 1
                elif v[j] == 0x29:
                    depth -= 1
                j += 1
            toks.append((_A_COMMENT, v[i + 1 : j - 1 if depth == 0 else j].strip()))
            i = j
        elif c == 0x5B:  # domain literal
            j = v.find(b"]", i)
            j = n if j < 0 else j + 1
            toks.append((_A_ATOM, v[i:j]))
            i = j
        elif c in _ADDR_SPECIALS:
            toks.append((_A_SPECIAL, v[i : i + 1]))
            i += 1
        else:
            j = i + 1
            while j < n and v[j] not in _ADDR_STOP:
                j += 1
            toks.append((_A_ATOM, v[i:j]))
            i = j
    return toks


def _phrase(toks: list[tuple[int, bytes]]) -> bytes | None:
    words: list[bytes] = []
    for kind, t in toks:
        if kind == _A_COMMENT:
            continue
        if t == b"." and words:
            words[-1] += b"."
        else:
            words.append(t)
    return b" ".join(words) if words else None


def _addr_spec(toks: list[tuple[int, bytes]]) -> tuple[bytes | None, bytes | None]:
    body = [t for t in toks if t[0] != _A_COMMENT]
    at = -1
    for k, (kind, t) in enumerate(body):
        if kind == _A_SPECIAL and t == b"@":
            at = k
    if at < 0:
        local = b"".join(t for _, t in body)
        return (local or None), None
    local = b"".join(t for _, t in body[:at])
    host = b"".join(t for _, t in body[at + 1 :])
    return (local or None), (host or None)


def _mailbox(toks: list[tuple[int, bytes]]) -> Address | None:
    lt = next((k for k, (kind, t) in enumerate(toks) if kind == _A_SPECIAL and t == b"<"), -1)
    adl: bytes | None = None
    if lt >= 0:
        name = _phrase(toks[:lt])
        inner = toks[lt + 1 :]
        gt = next((k for k, (kind, t) in enumerate(inner) if kind == _A_SPECIAL and t == b">"), len(inner))
        after = inner[gt + 1 :]
        inner = inner[:gt]
        colon = next((k for k, (kind, t) in enumerate(inner) if kind == _A_SPECIAL and t == b":"), -1)
        if colon >= 0:  # obs-route (RFC 5322 §4.4): <@a,@b:user@host>
            adl = b"".join(t for kind, t in inner[:colon] if kind != _A_COMMENT) or None
            inner = inner[colon + 1 :]
        local, host = _addr_spec(inner)
        if name is None:
            name = _phrase(after)
    else:
        local, host = _addr_spec(toks)
        comments = [t for kind, t in toks if kind == _A_COMMENT and t]
        name = comments[-1] if comments else None
    if local is None and host is None and name is None:
        return None
    # Dovecot's placeholders: a NIL host would read as a group marker (RFC 3501 §7.4.2)
    return Address(name, adl, local or b"MISSING_MAILBOX", host or b"MISSING_DOMAIN")


def parse_addresses(value: bytes) -> list[Address]:
    """Parse an RFC 5322 §3.4 address-list tolerantly into ENVELOPE addresses (groups included)."""
    out: list[Address] = []
    cur: list[tuple[int, bytes]] = []
    in_group = False
    angle = False

    def flush() -> None:
        a = _mailbox(cur)
        if a is not None:
            out.append(a)
        cur.clear()

    for tok in _addr_tokens(value):
        kind, t = tok
        if kind == _A_SPECIAL:
            if t == b"<":
                angle = True
            elif t == b">":
                angle = False
            elif not angle:
                if t == b",":
                    flush()
                    continue
                if t == b";":
                    flush()
                    if in_group:
                        out.append(Address(kind="end"))
                        in_group = False
                    continue
                if t == b":" and not in_group:
                    out.append(Address(mailbox=_phrase(cur) or b"", kind="start"))
                    in_group = True
                    cur.clear()
                    continue
        cur.append(tok)
    flush()
    if in_group:
        out.append(Address(kind="end"))
    return out


def _addr_list(value: bytes | None) -> bytes:
    if value is None:
        return b"NIL"
    addrs = parse_addresses(value)
    if not addrs:
        return b"NIL"
    return b"(" + b"".join(a.encode() for a in addrs) + b")"


# --------------------------------------------------------------------------- envelope


def _first_values(raw: bytes, flds: list[tuple[str, int, int, int]], names: frozenset[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, _, vs, fe in flds:
        if name in names and name not in out:
            out[name] = _unfold(raw[vs:fe])
    return out


_ENV_FIELDS = frozenset(
    {"date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc", "in-reply-to", "message-id"}
)


def _envelope(raw: bytes, flds: list[tuple[str, int, int, int]]) -> bytes:
    """RFC 3501 §7.4.2 ENVELOPE from already-located header fields."""
    v = _first_values(raw, flds, _ENV_FIELDS)
    frm = _addr_list(v.get("from"))
    sender = _addr_list(v.get("sender"))
    reply_to = _addr_list(v.get("reply-to"))
    # RFC 3501 §7.4.2: sender and reply-to default to from
    if sender == b"NIL":
        sender = frm
    if reply_to == b"NIL":
        reply_to = frm
    return b"(%s)" % b" ".join(
        [
            wire.nstring(v.get("date")),
            wire.nstring(v.get("subject")),
            frm,
            sender,
            reply_to,
            _addr_list(v.get("to")),
            _addr_list(v.get("cc")),
            _addr_list(v.get("bcc")),
            wire.nstring(v.get("in-reply-to")),
            wire.nstring(v.get("message-id")),
        ]
    )


def envelope_from_header(header: bytes) -> bytes:
    """ENVELOPE from the header alone (fast path for FETCH ENVELOPE without parsing the body)."""
    return _envelope(header, _fields(header, 0, len(header)))


# --------------------------------------------------------------------------- sort info


@dataclass
class SortInfo:
    """What SORT/THREAD (RFC 5256, RFC 5957) need from a header; INTERNALDATE is the caller's."""

    date: float | None = None
    subject: str = ""
    base_subject: str = ""
    from_mailbox: str = ""
    to_mailbox: str = ""
    cc_mailbox: str = ""
    from_display: str = ""
    to_display: str = ""
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)


_MSGID_RE = re.compile(r"<([^<>\s]+)>")


def _msgids(value: str) -> list[str]:
    return _MSGID_RE.findall(value)


def _parse_date(value: bytes) -> float | None:
    try:
        t = parsedate_tz(value.decode("latin-1"))
        return float(mktime_tz(t)) if t is not None else None
    except Exception:  # malformed dates are common; RFC 5256 §2.2 falls back to INTERNALDATE
        return None


def _first_addr(value: bytes | None) -> Address | None:
    if value is None:
        return None
    return next((a for a in parse_addresses(value) if a.kind == "addr"), None)


def _mbox(a: Address | None) -> str:
    # RFC 5256 §3 FROM/TO/CC: the addr-mailbox, compared case-insensitively
    if a is None or a.mailbox is None or a.mailbox == b"MISSING_MAILBOX":
        return ""
    return a.mailbox.decode("utf-8", "replace").lower()


def _display(a: Address | None) -> str:
    # RFC 5957 §3: the decoded display name, else the address itself
    if a is None:
        return ""
    if a.name:
        return decode_header(a.name)
    mbox = (a.mailbox or b"").decode("utf-8", "replace")
    host = (a.host or b"").decode("utf-8", "replace")
    return f"{mbox}@{host}" if host and host != "MISSING_DOMAIN" else mbox


_SORT_FIELDS = frozenset({"date", "subject", "from", "to", "cc", "message-id", "in-reply-to", "references"})


def sort_info(header: bytes) -> SortInfo:
    """SortInfo from the header alone (RFC 5256 §2, §3)."""
    v = _first_values(header, _fields(header, 0, len(header)), _SORT_FIELDS)
    subj = decode_header(v["subject"]) if "subject" in v else ""
    frm = _first_addr(v.get("from"))
    to = _first_addr(v.get("to"))
    mid = _msgids(v.get("message-id", b"").decode("utf-8", "replace"))
    irt = _msgids(v.get("in-reply-to", b"").decode("utf-8", "replace"))
    return SortInfo(
        date=_parse_date(v["date"]) if "date" in v else None,
        subject=subj,
        base_subject=base_subject(subj),
        from_mailbox=_mbox(frm),
        to_mailbox=_mbox(to),
        cc_mailbox=_mbox(_first_addr(v.get("cc"))),
        from_display=_display(frm),
        to_display=_display(to),
        message_id=mid[0] if mid else "",
        in_reply_to=irt[0] if irt else "",
        references=_msgids(v.get("references", b"").decode("utf-8", "replace")),
    )


# --------------------------------------------------------------------------- MIME tree


class _Entity:
    """One MIME entity: offsets into the raw message plus its parsed Content-* fields."""

    __slots__ = (
        "body_start",
        "children",
        "cte",
        "end",
        "fields",
        "message",
        "mtype",
        "opaque",
        "params",
        "start",
        "subtype",
    )

    def __init__(self, raw: bytes, start: int, end: int, depth: int, digest: bool) -> None:
        self.start = start
        self.end = end
        self.body_start = _split_header(raw, start, end)
        self.fields = _fields(raw, start, self.body_start)
        self.children: list[_Entity] = []
        self.message: _Entity | None = None
        self.opaque = depth > MAX_DEPTH
        ct = next((raw[vs:fe] for name, _, vs, fe in self.fields if name == "content-type"), None)
        self.mtype, self.subtype = ("message", "rfc822") if digest else ("text", "plain")
        self.params: list[tuple[str, bytes]] = [] if digest else list(_DEFAULT_PARAMS)
        if ct is not None:
            main, params = _parse_params(ct)
            t, slash, sub = main.partition("/")
            if slash and t and sub:  # RFC 2045 §5.2: an invalid type means the default
                self.mtype, self.subtype = t.lower(), sub.lower()
                self.params = [(k.upper(), v) for k, v in params]
                if self.mtype == "text" and not any(k == "CHARSET" for k, _ in self.params):
                    self.params.insert(0, _DEFAULT_PARAMS[0])  # RFC 2045 §5.2 default charset
        cte = self.field(raw, "content-transfer-encoding")
        self.cte = _strip_comments(cte).lower() if cte else ""
        if self.opaque:
            return
        if self.mtype == "multipart":
            self._split_multipart(raw, depth)
        elif self.mtype == "message" and self.subtype in _MESSAGE_SUBTYPES and self.cte in _IDENTITY_ENCODINGS:
            # RFC 2046 §5.2.1: only an unencoded message/rfc822 body is itself a message
            self.message = _Entity(raw, self.body_start, end, depth + 1, False)

    def param(self, name: str) -> bytes | None:
        name = name.upper()
        return next((v for k, v in self.params if k == name), None)

    def field(self, raw: bytes, name: str) -> bytes | None:
        return next((_unfold(raw[vs:fe]) for n, _, vs, fe in self.fields if n == name), None)

    def _split_multipart(self, raw: bytes, depth: int) -> None:
        """Split the body at boundary delimiter lines (RFC 2046 §5.1.1).

        The line break before a delimiter belongs to the delimiter, so each part ends
        before it; the preamble and epilogue belong to no part.  A missing close
        delimiter ends the last part at the end of the enclosing entity.
        """
        boundary = self.param("BOUNDARY")
        body_start, end = self.body_start, self.end
        starts: list[tuple[int, int]] = []  # (delimiter start, content start)
        closed_at = -1
        if boundary:
            delim = b"--" + boundary
            pos = body_start
            while True:
                i = raw.find(delim, pos, end)
                if i < 0:
                    break
                pos = i + len(delim)
                if i != body_start and raw[i - 1] != 0x0A:
                    continue  # not at the start of a line
                nl = raw.find(b"\n", pos, end)
                line_end = end if nl < 0 else nl + 1
                tail = raw[pos:line_end]
                if tail.startswith(b"--"):
                    closed_at = i
                    break
                if tail.strip(b" \t\r\n"):
                    continue  # the boundary was a prefix of some other text
                starts.append((i, line_end))
                pos = line_end
        digest = self.subtype == "digest"  # RFC 2046 §5.1.5: parts default to message/rfc822
        for k, (_, cstart) in enumerate(starts):
            cend = starts[k + 1][0] if k + 1 < len(starts) else closed_at
            if cend < 0:
                cend = end  # no close delimiter: the part runs to the end
            elif cend > cstart and raw[cend - 1] == 0x0A:
                # the line break before a delimiter is part of the delimiter
                cend -= 1
                if cend > cstart and raw[cend - 1] == 0x0D:
                    cend -= 1
            self.children.append(_Entity(raw, cstart, max(cstart, cend), depth + 1, digest))
        if not self.children:
            # IMAP needs at least one part (RFC 3501 §9 body-type-mpart): expose the body as one
            # header-less text/plain part
            child = _Entity(raw, body_start, body_start, depth + 1, False)
            child.end = end
            self.children.append(child)


class ParsedMessage:
    """A message parsed once; answers ENVELOPE, BODYSTRUCTURE, BODY[section] and SEARCH text."""

    __slots__ = ("_raw", "_root")

    def __init__(self, raw: bytes, root: _Entity) -> None:
        self._raw = raw
        self._root = root

    @classmethod
    def parse(cls, raw: bytes) -> ParsedMessage:
        return cls(raw, _Entity(raw, 0, len(raw), 0, False))

    @property
    def header_raw(self) -> bytes:
        return self._raw[: self._root.body_start]

    @property
    def size(self) -> int:
        return len(self._raw)

    def envelope(self) -> bytes:
        return _envelope(self._raw, self._root.fields)

    def bodystructure(self, extended: bool = True) -> bytes:
        return _bodystructure(self._raw, self._root, extended)

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [decode_header(self._raw[vs:fe]) for n, _, vs, fe in self._root.fields if n == lname]

    def section(self, sec: Section) -> bytes | None:
        """Bytes of BODY[sec] (RFC 3501 §6.4.5); None when the part or specifier does not apply."""
        raw = self._raw
        spec = sec.specifier.upper()
        target = self._root
        if sec.part:
            part = _find_part(self._root, sec.part)
            if part is None:
                return None
            if spec == "MIME":
                return raw[part.start : part.body_start]
            if spec == "":
                return raw[part.body_start : part.end]
            if part.message is None:
                return None  # HEADER/TEXT after part numbers need a message/rfc822 part
            target = part.message
        elif spec == "MIME":
            return None  # RFC 3501 §6.4.5: MIME needs part numbers
        if spec == "":
            return raw[target.start : target.end]
        if spec == "HEADER":
            return raw[target.start : target.body_start]
        if spec == "TEXT":
            return raw[target.body_start : target.end]
        if spec.startswith("HEADER.FIELDS"):
            return header_fields(raw[target.start : target.body_start], set(sec.fields), spec.endswith(".NOT"))
        return None

    def search_text(self, header: bool = True, body: bool = True) -> str:
        """Decoded text for SEARCH TEXT/BODY (RFC 3501 §6.4.4); lower-casing is the caller's job."""
        out: list[str] = []
        raw = self._raw
        if header:
            out.append(_header_text(raw, self._root))
        if body:
            _body_text(raw, self._root, out)
        return "\n".join(out)

    def part_paths(self) -> list[tuple[int, ...]]:
        """Every part number path that exists (for tests and for the server's own walks)."""
        out: list[tuple[int, ...]] = []

        def walk(container: _Entity, prefix: tuple[int, ...]) -> None:
            kids = container.children if container.mtype == "multipart" and container.children else [container]
            for k, c in enumerate(kids, 1):
                path = (*prefix, k)
                out.append(path)
                if c is not container and c.mtype == "multipart" and c.children:
                    walk(c, path)
                elif c.message is not None:
                    walk(c.message, path)

        walk(self._root, ())
        return out


def _find_part(root: _Entity, path: tuple[int, ...]) -> _Entity | None:
    """Resolve part numbers (RFC 3501 §6.4.5).

    Numbering descends into the message wrapped by the top level or by a
    message/rfc822 part: a multipart body yields its parts, anything else is part 1.
    """
    holder: _Entity | None = root  # the message whose body we number
    cur: _Entity | None = None
    for n in path:
        if holder is None or n < 1:
            return None
        if holder.mtype == "multipart" and holder.children and not holder.opaque:
            if n > len(holder.children):
                return None
            cur = holder.children[n - 1]
        elif n == 1:
            cur = holder
        else:
            return None
        # the next number indexes into this part: a multipart's children or an encapsulated message
        if cur.mtype == "multipart" and cur is not holder:
            holder = cur
        elif cur.message is not None:
            holder = cur.message
        else:
            holder = None
    return cur


def _header_text(raw: bytes, e: _Entity) -> str:
    return "\n".join(
        f"{raw[fs : vs - 1].decode('utf-8', 'replace')}: {decode_header(raw[vs:fe])}" for _, fs, vs, fe in e.fields
    )


def _body_text(raw: bytes, e: _Entity, out: list[str]) -> None:
    if e.opaque:
        return
    if e.mtype == "multipart":
        for c in e.children:
            _body_text(raw, c, out)
    elif e.message is not None:
        out.append(_header_text(raw, e.message))
        _body_text(raw, e.message, out)
    elif e.mtype == "text":
        data = _transfer_decode(raw[e.body_start : e.end], e.cte)
        cs = (e.param("CHARSET") or b"utf-8").decode("latin-1")
        if cs.lower() in ("us-ascii", "ascii"):
            cs = "utf-8"  # mislabelled 8-bit text is usually UTF-8
        out.append(_decode_charset(data, cs))


def _transfer_decode(data: bytes, enc: str) -> bytes:
    """RFC 2045 §6.7/§6.8 decoding, tolerant of junk (bad padding, stray characters)."""
    if enc == "base64":
        return _b64(re.sub(rb"[^A-Za-z0-9+/]", b"", data))
    if enc == "quoted-printable":
        return _qp(data)
    return data


# --------------------------------------------------------------------------- BODYSTRUCTURE


def _params_list(params: list[tuple[str, bytes]]) -> bytes:
    if not params:
        return b"NIL"
    return wire.plist([wire.quoted(k) + b" " + wire.quoted(v) for k, v in params])


def _lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _disposition(raw: bytes, e: _Entity) -> bytes:
    # RFC 2183 / RFC 3501 §9 body-fld-dsp
    v = e.field(raw, "content-disposition")
    if v is None:
        return b"NIL"
    main, params = _parse_params(v)
    if not main:
        return b"NIL"
    return b"(%s %s)" % (wire.quoted(main.upper()), _params_list([(k.upper(), val) for k, val in params]))


def _language(raw: bytes, e: _Entity) -> bytes:
    # RFC 3282 Content-Language: one tag -> string, several -> list
    v = e.field(raw, "content-language")
    if v is None:
        return b"NIL"
    tags = [t for t in re.split(r"[,\s]+", _strip_comments_keep_commas(v)) if t]
    if not tags:
        return b"NIL"
    if len(tags) == 1:
        return wire.quoted(tags[0])
    return wire.plist([wire.quoted(t) for t in tags])


def _strip_comments_keep_commas(v: bytes) -> str:
    return re.sub(r"\([^()]*\)", " ", v.decode("latin-1"))


def _ext_tail(raw: bytes, e: _Entity) -> list[bytes]:
    return [_disposition(raw, e), _language(raw, e), wire.nstring(e.field(raw, "content-location"))]


def _bodystructure(raw: bytes, e: _Entity, extended: bool) -> bytes:
    """RFC 3501 §7.4.2 BODYSTRUCTURE (extended) / BODY (not extended), §9 `body`."""
    if e.mtype == "multipart" and not e.opaque:
        items = b"".join(_bodystructure(raw, c, extended) for c in e.children)
        out = [items + b" " + wire.quoted(e.subtype.upper())]
        if extended:
            out.append(_params_list(e.params))
            out.extend(_ext_tail(raw, e))
        return b"(" + b" ".join(out) + b")"
    body = raw[e.body_start : e.end]
    enc_s = e.cte.upper()
    fields = [
        wire.quoted(e.mtype.upper()),
        wire.quoted(e.subtype.upper()),
        _params_list(e.params),
        wire.nstring(e.field(raw, "content-id")),
        wire.nstring(e.field(raw, "content-description")),
        wire.quoted(enc_s or "7BIT"),
        b"%d" % len(body),
    ]
    if e.message is not None:
        fields.append(_envelope(raw, e.message.fields))
        fields.append(_bodystructure(raw, e.message, extended))
        fields.append(b"%d" % _lines(body))
    elif e.mtype == "text":
        fields.append(b"%d" % _lines(body))
    if extended:
        fields.append(wire.nstring(e.field(raw, "content-md5")))
        fields.extend(_ext_tail(raw, e))
    return b"(" + b" ".join(fields) + b")"
