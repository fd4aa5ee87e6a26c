"""pymaddy.imap.message: ENVELOPE, BODYSTRUCTURE, BODY[section], SEARCH text and SORT data."""

from __future__ import annotations

import re
from typing import cast

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pymaddy.imap.message import (
    MAX_DEPTH,
    ParsedMessage,
    decode_header,
    envelope_from_header,
    header_fields,
    parse_addresses,
    sort_info,
)
from pymaddy.imap.types import Section

# --------------------------------------------------------------------------- fixtures

PLAIN = (
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US,\r\n John Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
    b"Hello\r\nWorld\r\n"
)
ALT = (
    b'From: "Doe, Jane" <jane@example.org>\n'
    b"To: team: alice@example.org, Bob <bob@example.org>;, carol@example.net (Carol C)\n"
    b"Subject: =?UTF-8?B?SGVsbG8g4pyT?= again\n"
    b'Content-Type: multipart/alternative; boundary="=_alt"\n'
    b"\n"
    b"This is a MIME message.\n"
    b"--=_alt\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"Content-Transfer-Encoding: quoted-printable\n"
    b"\n"
    b"caf=C3=A9 =\n"
    b"ok\n"
    b"--=_alt\n"
    b'Content-Type: text/html; charset="iso-8859-1"\n'
    b"\n"
    b"<p>caf\xe9</p>\n"
    b"--=_alt--\n"
)
MIXED = (
    b"From: a@example.com\r\n"
    b"To: b@example.com\r\n"
    b"Subject: report\r\n"
    b"Content-Type: multipart/mixed; boundary=XYZ\r\n"
    b"\r\n"
    b"--XYZ\r\n"
    b"\r\n"
    b"See attached.\r\n"
    b"--XYZ\r\n"
    b'Content-Type: application/pdf; name="r.pdf"\r\n'
    b'Content-Disposition: attachment;\r\n filename="r.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-ID: <part2@x>\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--XYZ--\r\n"
)
RFC822 = (
    b"From: a@example.com\r\n"
    b"Subject: fwd\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"see below\r\n"
    b"--b1\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Disposition: inline\r\n"
    b"\r\n"
    b"From: Inner <in@example.net>\r\n"
    b"Subject: inner\r\n"
    b"Message-ID: <in@example.net>\r\n"
    b"\r\n"
    b"inner body\r\n"
    b"--b1--\r\n"
)


def _env_addr(name: str, mbox: str, host: str) -> str:
    return f'(("{name}" NIL "{mbox}" "{host}"))' if name != "NIL" else f'((NIL NIL "{mbox}" "{host}"))'


# --------------------------------------------------------------------------- ENVELOPE


def test_envelope_plain_rfc3501_example() -> None:
    gray = _env_addr("Terry Gray", "gray", "cac.washington.edu")
    expected = (
        '("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
        f"{gray} {gray} {gray} "
        '((NIL NIL "imap" "cac.washington.edu")) '
        '((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
        'NIL NIL "<B27397-0100000@cac.washington.edu>")'
    ).encode()
    p = ParsedMessage.parse(PLAIN)
    assert p.envelope() == expected
    assert envelope_from_header(p.header_raw) == expected


def test_envelope_groups_quoted_names_comments_and_raw_subject() -> None:
    jane = _env_addr("Doe, Jane", "jane", "example.org")
    expected = (
        '(NIL "=?UTF-8?B?SGVsbG8g4pyT?= again" '
        f"{jane} {jane} {jane} "
        '((NIL NIL "team" NIL)(NIL NIL "alice" "example.org")("Bob" NIL "bob" "example.org")(NIL NIL NIL NIL)'
        '("Carol C" NIL "carol" "example.net")) NIL NIL NIL NIL)'
    ).encode()
    assert ParsedMessage.parse(ALT).envelope() == expected


def test_envelope_sender_reply_to_explicit_and_8bit_literal() -> None:
    hdr = (
        "From: a@x\r\nSender: s@x\r\nReply-To: r@x\r\nSubject: caf\u00e9\r\n"
        "In-Reply-To: <p@x>\r\nBcc: Undisclosed recipients:;\r\n\r\n"
    ).encode()
    env = envelope_from_header(hdr)
    assert env == (
        b'(NIL {5}\r\ncaf\xc3\xa9 ((NIL NIL "a" "x")) ((NIL NIL "s" "x")) ((NIL NIL "r" "x")) NIL NIL '
        b'((NIL NIL "Undisclosed recipients" NIL)(NIL NIL NIL NIL)) "<p@x>" NIL)'
    )


def test_envelope_empty_header() -> None:
    assert envelope_from_header(b"") == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_parse_addresses_odd_forms() -> None:
    a = parse_addresses(b'"J. \\"Q\\" Public" <@r1,@r2:jq@Example.COM>, bare, <>, , x@y (c1) (c2)')
    assert [(x.name, x.adl, x.mailbox, x.host) for x in a] == [
        (b'J. "Q" Public', b"@r1,@r2", b"jq", b"Example.COM"),
        (None, None, b"bare", b"MISSING_DOMAIN"),
        (b"c2", None, b"x", b"y"),  # a trailing comment stands in for the display name
    ]
    # obs-phrase with dots, unterminated group and angle addr
    a = parse_addresses(b"John Q. Public <jqp@x>, grp: m@n")
    assert [x.kind for x in a] == ["addr", "start", "addr", "end"]
    assert a[0].name == b"John Q. Public"


# --------------------------------------------------------------------------- BODYSTRUCTURE


def test_bodystructure_plain() -> None:
    p = ParsedMessage.parse(PLAIN)
    assert p.bodystructure() == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 14 2 NIL NIL NIL NIL)'
    assert p.bodystructure(extended=False) == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 14 2)'


def test_bodystructure_default_content_type() -> None:
    p = ParsedMessage.parse(b"Subject: x\n\nhi\n")
    assert p.bodystructure(False) == b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 3 1)'


def test_bodystructure_alternative_bare_lf() -> None:
    p = ParsedMessage.parse(ALT)
    assert p.bodystructure() == (
        b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 14 2 NIL NIL NIL NIL)'
        b'("TEXT" "HTML" ("CHARSET" "iso-8859-1") NIL NIL "7BIT" 11 1 NIL NIL NIL NIL) '
        b'"ALTERNATIVE" ("BOUNDARY" "=_alt") NIL NIL NIL)'
    )
    assert p.bodystructure(False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 14 2)'
        b'("TEXT" "HTML" ("CHARSET" "iso-8859-1") NIL NIL "7BIT" 11 1) "ALTERNATIVE")'
    )


def test_bodystructure_mixed_attachment() -> None:
    p = ParsedMessage.parse(MIXED)
    assert p.bodystructure() == (
        b'(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 13 1 NIL NIL NIL NIL)'
        b'("APPLICATION" "PDF" ("NAME" "r.pdf") "<part2@x>" NIL "BASE64" 12 NIL '
        b'("ATTACHMENT" ("FILENAME" "r.pdf")) NIL NIL) "MIXED" ("BOUNDARY" "XYZ") NIL NIL NIL)'
    )


def test_bodystructure_message_rfc822() -> None:
    inner_from = b'(("Inner" NIL "in" "example.net"))'
    assert ParsedMessage.parse(RFC822).bodystructure() == (
        b'(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 9 1 NIL NIL NIL NIL)'
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 88 '
        b'(NIL "inner" ' + inner_from + b" " + inner_from + b" " + inner_from + b' NIL NIL NIL NIL "<in@example.net>") '
        b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 10 1 NIL NIL NIL NIL) 5 NIL ("INLINE" NIL) NIL NIL) '
        b'"MIXED" ("BOUNDARY" "b1") NIL NIL NIL)'
    )


def test_bodystructure_extension_fields_and_rfc2231() -> None:
    msg = (
        b"Content-Type: multipart/mixed; boundary=B\r\nContent-Language: en, de\r\n"
        b"Content-Location: http://x/\r\n\r\n"
        b"--B\r\nContent-Type: application/octet-stream;\r\n name*0*=utf-8''%C3%A9t;\r\n name*1=\"e.bin\"\r\n"
        b"Content-Disposition: attachment; filename*=iso-8859-1'en'%E9.bin\r\nContent-Language: fr\r\n"
        b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\nContent-Description: a file\r\n\r\nxx\r\n--B--\r\n"
    )
    assert ParsedMessage.parse(msg).bodystructure() == (
        b'(("APPLICATION" "OCTET-STREAM" ("NAME" {8}\r\n\xc3\xa9te.bin) NIL "a file" "7BIT" 2 '
        b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("ATTACHMENT" ("FILENAME" {6}\r\n\xc3\xa9.bin)) "fr" NIL) "MIXED" '
        b'("BOUNDARY" "B") NIL ("en" "de") "http://x/")'
    )


def test_multipart_without_parts_has_one_part() -> None:
    msg = b"Content-Type: multipart/mixed; boundary=nope\r\n\r\njust text\r\n"
    p = ParsedMessage.parse(msg)
    assert p.bodystructure(False) == b'(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 11 1) "MIXED")'
    assert p.section(Section((1,))) == b"just text\r\n"


def test_missing_close_delimiter_and_boundary_prefix() -> None:
    msg = b"Content-Type: multipart/mixed; boundary=ab\n\n--ab\n\none\n--abc not a delimiter\n--ab  \n\ntwo\n"
    p = ParsedMessage.parse(msg)
    assert p.section(Section((1,))) == b"one\n--abc not a delimiter"
    assert p.section(Section((2,))) == b"two\n"
    assert p.section(Section((3,))) is None


def test_digest_parts_default_to_message() -> None:
    msg = b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: in\n\nbody\n--d--\n"
    p = ParsedMessage.parse(msg)
    assert p.bodystructure(False).startswith(b'(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 17 (NIL "in" ')
    assert p.section(Section((1, 1))) == b"body"


def test_deep_nesting_is_capped() -> None:
    depth = MAX_DEPTH + 20
    msg = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth))
    msg += b"\nleaf\n"
    p = ParsedMessage.parse(msg)
    bs = p.bodystructure()
    assert _balanced(bs)
    assert bs.count(b'"MULTIPART" "MIXED"') == 1  # the first too-deep multipart becomes an opaque leaf
    assert p.section(Section((1,) * 10)) is not None


# --------------------------------------------------------------------------- sections


def test_sections_plain() -> None:
    p = ParsedMessage.parse(PLAIN)
    body = b"Hello\r\nWorld\r\n"
    assert p.section(Section()) == PLAIN
    assert p.section(Section((), "TEXT")) == body
    assert p.section(Section((), "HEADER")) == p.header_raw == PLAIN[: -len(body)]
    assert p.section(Section((1,))) == body
    assert p.section(Section((1,), "MIME")) == p.header_raw
    assert p.section(Section((), "MIME")) is None
    assert p.section(Section((2,))) is None
    assert p.section(Section((1, 1))) is None
    assert p.section(Section((1,), "HEADER")) is None
    assert p.section(Section((), "HEADER.FIELDS", ("FROM", "CC"))) == (
        b"From: Terry Gray <gray@cac.washington.edu>\r\ncc: minutes@CNRI.Reston.VA.US,\r\n"
        b" John Klensin <KLENSIN@MIT.EDU>\r\n\r\n"
    )
    assert p.size == len(PLAIN)


def test_sections_message_rfc822() -> None:
    p = ParsedMessage.parse(RFC822)
    inner_hdr = b"From: Inner <in@example.net>\r\nSubject: inner\r\nMessage-ID: <in@example.net>\r\n\r\n"
    assert p.section(Section((1,))) == b"see below"
    assert p.section(Section((1,), "MIME")) == b"Content-Type: text/plain\r\n\r\n"
    assert p.section(Section((2,))) == inner_hdr + b"inner body"
    assert p.section(Section((2,), "MIME")) == b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
    assert p.section(Section((2,), "HEADER")) == inner_hdr
    assert p.section(Section((2,), "TEXT")) == b"inner body"
    assert p.section(Section((2, 1))) == b"inner body"
    assert p.section(Section((2,), "HEADER.FIELDS.NOT", ("FROM", "MESSAGE-ID"))) == b"Subject: inner\r\n\r\n"
    assert p.section(Section((2, 2))) is None
    assert p.section(Section((0,))) is None
    assert p.part_paths() == [(1,), (2,), (2, 1)]


def test_sections_lf_offsets_exact() -> None:
    p = ParsedMessage.parse(ALT)
    assert p.section(Section((1,))) == b"caf=C3=A9 =\nok"
    assert p.section(Section((2,))) == b"<p>caf\xe9</p>"
    assert p.section(Section((2,), "MIME")) == b'Content-Type: text/html; charset="iso-8859-1"\n\n'


def test_header_fields_selection() -> None:
    hdr = b"A: 1\r\nB: 2\r\n  cont\r\nc: 3\r\n\r\n"
    assert header_fields(hdr, {"B", "C"}, exclude=False) == b"B: 2\r\n  cont\r\nc: 3\r\n\r\n"
    assert header_fields(hdr, {"b"}, exclude=True) == b"A: 1\r\nc: 3\r\n\r\n"
    assert header_fields(hdr, {"NONE"}, exclude=False) == b"\r\n"
    assert header_fields(b"A: 1\nB: 2\n\n", {"A"}, exclude=False) == b"A: 1\n\n"


# --------------------------------------------------------------------------- SEARCH and SORT data


def test_header_values_decoding() -> None:
    msg = (
        "Subject: =?iso-8859-1?q?caf=E9?=\r\n =?UTF-8?B?IOKckw==?= plain\r\n"
        "Subject: raw utf8 \u00fcber\r\nX-Bad: =?nonesuch?q?a=FF?= =?utf-8?b?###?=\r\n\r\n"
    ).encode()
    p = ParsedMessage.parse(msg)
    assert p.header_values("SUBJECT") == ["caf\u00e9 \u2713 plain", "raw utf8 \u00fcber"]
    assert p.header_values("x-bad")[0].startswith("a")
    assert p.header_values("missing") == []
    # a multi-byte character split across two encoded words
    assert decode_header(b"=?utf-8?q?=E2=9C?= =?utf-8?q?=93?=") == "\u2713"


def test_search_text_decodes_parts() -> None:
    p = ParsedMessage.parse(ALT)
    text = p.search_text()
    assert "Hello \u2713 again" in text
    assert "caf\u00e9 ok" in text
    assert "<p>caf\u00e9</p>" in text
    body_only = p.search_text(header=False)
    assert "Subject" not in body_only and "caf\u00e9 ok" in body_only
    assert "caf\u00e9" not in p.search_text(body=False)
    b64 = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\nw7xiZXI=\r\n"
    assert ParsedMessage.parse(b64).search_text(header=False) == "\u00fcber"
    # attachments are not searched as text
    assert "JVBER" not in ParsedMessage.parse(MIXED).search_text()
    assert "inner body" in ParsedMessage.parse(RFC822).search_text(header=False)


def test_sort_info() -> None:
    info = sort_info(ParsedMessage.parse(PLAIN).header_raw)
    assert info.date == 837595405.0
    assert (info.from_mailbox, info.to_mailbox, info.cc_mailbox) == ("gray", "imap", "minutes")
    assert (info.from_display, info.to_display) == ("Terry Gray", "imap@cac.washington.edu")
    assert info.message_id == "B27397-0100000@cac.washington.edu"
    hdr = (
        b"Subject: =?utf-8?q?Re=3A_=5Blist=5D_Fwd=3A_hello?= (fwd)\r\nFrom: =?utf-8?q?J=C3=B6rg?= <J@X>\r\n"
        b"Date: garbage\r\nIn-Reply-To: <a@b> (comment)\r\nReferences: <r1@x>\r\n  <r2@x> junk <a@b>\r\n\r\n"
    )
    info = sort_info(hdr)
    assert info.date is None
    assert info.subject == "Re: [list] Fwd: hello (fwd)"
    assert info.base_subject == "hello"
    assert (info.from_mailbox, info.from_display) == ("j", "J\u00f6rg")
    assert info.in_reply_to == "a@b"
    assert info.references == ["r1@x", "r2@x", "a@b"]


# --------------------------------------------------------------------------- properties


def _balanced(data: bytes) -> bool:
    """Parentheses balance outside quoted strings and literals (RFC 3501 §4.3)."""
    depth = 0
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x22:
            i += 1
            while i < n and data[i] != 0x22:
                i += 2 if data[i] == 0x5C else 1
            if i >= n:
                return False
        elif c == 0x7B:
            m = re.match(rb"\{(\d+)\}\r\n", data[i:])
            if m is None:
                return False
            i += m.end() + int(m.group(1)) - 1
        elif c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


_NASTY = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r\n\r\n",
        b"--b\r\n",
        b"--b--\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Type: text/plain; charset*0*=x'y'%ZZ; a*1=\"q\r\n",
        b'From: "unterminated <a@b>, (comment ((, grp: ; <\r\n',
        b"To: a:b:c;;;,,<<>>@@\r\n",
        b"Subject: =?x?q?=?= =?utf-8?b?====?=\r\n",
        b" folded\r\n",
        b"\x00\xff\x80:\xfe\r\n",
        b'("{5}\r\n',
    ]
)


def _check_outputs(p: ParsedMessage) -> None:
    assert _balanced(p.envelope())
    assert _balanced(p.bodystructure())
    assert _balanced(p.bodystructure(extended=False))
    p.search_text()
    p.header_values("subject")
    sort_info(p.header_raw)
    for path in p.part_paths():
        assert p.section(Section(path)) is not None
        assert p.section(Section(path, "MIME")) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.lists(_NASTY | st.binary(max_size=20), max_size=30).map(b"".join))
def test_parse_never_raises(raw: bytes) -> None:
    p = ParsedMessage.parse(raw)
    _check_outputs(p)
    assert p.section(Section()) == raw
    assert p.header_raw + (p.section(Section((), "TEXT")) or b"") == raw
    envelope_from_header(raw)
    header_fields(raw, {"FROM", "SUBJECT"}, exclude=False)
    header_fields(raw, {"FROM"}, exclude=True)


# A generated MIME tree: ("leaf", content-type, body lines) | ("multi", subtype, children) | ("msg", child)
_LEAF = st.tuples(
    st.just("leaf"),
    st.sampled_from(["text/plain", "application/octet-stream", 'text/html; charset="utf-8"', ""]),
    st.lists(st.text(alphabet="ab -\u00e9", max_size=12), max_size=4),
)
_TREE = st.recursive(
    _LEAF,
    lambda kids: (
        st.tuples(st.just("multi"), st.sampled_from(["mixed", "alternative"]), st.lists(kids, min_size=1, max_size=4))
        | st.tuples(st.just("msg"), kids)
    ),
    max_leaves=10,
)

Parts = dict[tuple[int, ...], tuple[bytes, bytes]]  # part path -> (MIME header, body)


class _Builder:
    """Renders a generated tree and records, independently of the parser, what each part number holds."""

    def __init__(self, eol: bytes) -> None:
        self.eol = eol
        self.counter = 0

    def render(self, node: tuple[object, ...], extra: bytes = b"") -> tuple[bytes, bytes, str, Parts]:
        """(header, body, kind, numbering of the parts inside this entity)."""
        eol = self.eol
        kind = str(node[0])
        if kind == "leaf":
            ctype = str(node[1]).encode()
            hdr = extra + (b"Content-Type: " + ctype + eol if ctype else b"") + eol
            lines = cast("list[str]", node[2])
            return hdr, eol.join(line.encode() for line in lines), kind, {}
        if kind == "msg":
            inner = self.render(cast("tuple[object, ...]", node[1]), b"Subject: inner" + eol)
            return extra + b"Content-Type: message/rfc822" + eol + eol, inner[0] + inner[1], kind, self.numbering(inner)
        self.counter += 1
        b = b"=_b%d" % self.counter
        hdr = extra + b"Content-Type: multipart/" + str(node[1]).encode() + b'; boundary="' + b + b'"' + eol + eol
        body = b"preamble" + eol
        parts: Parts = {}
        for k, child in enumerate(cast("list[tuple[object, ...]]", node[2]), 1):
            ch, cb, _, sub = self.render(child)
            body += b"--" + b + eol + ch + cb + eol
            parts[(k,)] = (ch, cb)
            parts.update({(k, *p): v for p, v in sub.items()})
        body += b"--" + b + b"--" + eol + b"epilogue" + eol
        return hdr, body, kind, parts

    @staticmethod
    def numbering(entity: tuple[bytes, bytes, str, Parts]) -> Parts:
        """RFC 3501 §6.4.5: a multipart message numbers its parts, anything else is part 1."""
        hdr, body, kind, sub = entity
        if kind == "multi":
            return sub
        return {(1,): (hdr, body), **{(1, *p): v for p, v in sub.items()}}


@settings(max_examples=200, deadline=None)
@given(_TREE, st.sampled_from([b"\r\n", b"\n"]))
def test_generated_mime_trees_round_trip(tree: tuple[object, ...], eol: bytes) -> None:
    builder = _Builder(eol)
    top = builder.render(tree, b"Subject: top" + eol)
    raw = top[0] + top[1]
    expected = builder.numbering(top)
    p = ParsedMessage.parse(raw)
    _check_outputs(p)
    assert p.header_raw == top[0]
    assert sorted(p.part_paths()) == sorted(expected)
    for path, (hdr, body) in expected.items():
        assert p.section(Section(path, "MIME")) == hdr, path
        assert p.section(Section(path)) == body, path
    # text/* line counts and sizes show up in BODYSTRUCTURE for every leaf
    assert p.bodystructure().count(b"(") >= len(expected)


def test_bytes_to_bytes_codecs_are_not_charsets() -> None:
    # hex/zlib/rot13 are codecs but not charsets: they must not turn headers into bytes or raise
    assert decode_header(b"=?hex?q?6869?= =?rot13?q?uryyb?=") == "6869uryyb"
    msg = b"Content-Type: text/plain; charset=zlib\r\nContent-Transfer-Encoding: base64\r\n\r\neJzLSM3JyQcABiwCFQ==\r\n"
    assert isinstance(ParsedMessage.parse(msg).search_text(), str)


def test_top_level_message_rfc822() -> None:
    msg = b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nbody\r\n"
    p = ParsedMessage.parse(msg)
    assert p.section(Section((1,))) == b"Subject: in\r\n\r\nbody\r\n"
    assert p.section(Section((1,), "HEADER")) == b"Subject: in\r\n\r\n"
    assert p.section(Section((1,), "TEXT")) == b"body\r\n"
    assert p.section(Section((1, 1))) == b"body\r\n"
    assert p.part_paths() == [(1,), (1, 1)]


def test_base64_message_rfc822_is_opaque() -> None:
    # RFC 2046 §5.2.1: an encoded message/rfc822 cannot be parsed as a message, so it is a basic part
    msg = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogeA0KDQo=\r\n"
    p = ParsedMessage.parse(msg)
    assert p.bodystructure(False) == b'("MESSAGE" "RFC822" NIL NIL NIL "BASE64" 22)'
    assert p.section(Section((1,), "HEADER")) is None


_PARAM_TEXT = st.text(alphabet='ab=; \t"()*\\/', max_size=30)


@given(_PARAM_TEXT)
def test_content_type_fast_path_agrees_with_full_parser(value: str) -> None:
    from pymaddy.imap import message

    main, params = message._parse_params(value.encode())
    # the same value with a harmless trailing comment takes the slow path
    main2, params2 = message._parse_params(value.encode() + b" ()")
    if '"' not in value and "(" not in value and "*" not in value and "\\" not in value:
        assert (main, params) == (main2, params2)


@settings(max_examples=300, deadline=None)
@example(b"\xb2=x", "A")
@example(b"9" * 5000 + b"=x", "B")
@given(st.binary(max_size=80) | st.text(max_size=40).map(lambda s: s.encode("utf-8")), st.sampled_from(["A", "B"]))
def test_structured_fields_never_raise(value: bytes, which: str) -> None:
    # Content-Type/-Disposition/-Language values of any shape, incl. RFC 2231 oddities (name*²=, name*99999999=)
    value = value.replace(b"\r", b"").replace(b"\n", b"")
    for v in (value, b"x; a*" + value, b"x; a*0*=" + value + b"; a*1=" + value):
        msg = (
            b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: text/plain; " + v + b"\r\n"
            b"Content-Disposition: " + v + b"\r\nContent-Language: " + v + b"\r\n\r\nx\r\n--q--\r\n"
        )
        p = ParsedMessage.parse(msg if which == "A" else msg.replace(b"\r\n", b"\n"))
        _check_outputs(p)
