"""maddy's queue directory format and its crash safety (spec §E)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.queue.store import (
    MetaError,
    QueueMeta,
    RcptError,
    Store,
    decode_meta,
    encode_meta,
    format_time,
    parse_header_block,
    parse_time,
)

# A .meta written by maddy 0.9 (encoding/json of QueueMetadata) after two failed attempts.
MADDY_META = (
    '{"MsgMeta":{"ID":"5a0b1c2d","OriginalFrom":"alice@example.org","DontTraceSender":true,'
    '"Quarantine":false,"OriginalRcpts":{"bob@example.net":"Bob@example.net"},'
    '"SMTPOpts":{"Body":"8BITMIME","Size":1234,"RequireTLS":false,"UTF8":true,"Return":"HDRS",'
    '"EnvelopeID":"env-1","Auth":null},"Conn":null,"TLSRequireOverride":false},'
    '"From":"alice@example.org","To":["bob@example.net","carol@example.net"],"FailedRcpts":null,'
    '"TemporaryFailedRcpts":null,"RcptErrs":{"bob@example.net":{"Code":451,"EnhancedCode":[4,4,2],'
    '"Message":"Connection refused"},"carol@example.net":{"Code":421,"EnhancedCode":[4,0,0],'
    '"Message":"Try later"}},"TriesCount":{"bob@example.net":2,"carol@example.net":1},'
    '"FirstAttempt":"2024-03-01T10:00:00.123456789+01:00","LastAttempt":"2024-03-01T10:30:00Z"}\n'
)


def test_maddy_meta_loads() -> None:
    m = decode_meta(MADDY_META.encode())
    assert m.msg.id == "5a0b1c2d"
    assert m.msg.original_from == "alice@example.org"
    assert m.msg.dont_trace_sender and m.msg.smtputf8 and m.msg.body_8bit
    assert m.msg.size == 1234
    assert m.msg.original_rcpts == {"bob@example.net": "Bob@example.net"}
    assert m.mail_from == "alice@example.org"
    assert m.to == ["bob@example.net", "carol@example.net"]
    assert m.rcpt_errs["bob@example.net"] == RcptError(451, (4, 4, 2), "Connection refused")
    assert m.tries == {"bob@example.net": 2, "carol@example.net": 1}
    assert m.first_attempt == pytest.approx(1709283600.123456)
    assert m.last_attempt == 1709289000.0


def test_maddy_meta_round_trips_with_go_field_names() -> None:
    original = json.loads(MADDY_META)
    again = json.loads(encode_meta(decode_meta(MADDY_META.encode())))
    # Same keys everywhere, same values except the timestamps' written form (UTC here).
    assert again.keys() == original.keys()
    assert again["MsgMeta"].keys() == original["MsgMeta"].keys()
    assert again["MsgMeta"]["SMTPOpts"] == original["MsgMeta"]["SMTPOpts"]  # Return/EnvelopeID kept
    for k in ("From", "To", "RcptErrs", "TriesCount", "FailedRcpts", "TemporaryFailedRcpts"):
        assert again[k] == original[k]
    assert again["MsgMeta"]["Conn"] is None
    assert parse_time(again["FirstAttempt"]) == parse_time(original["FirstAttempt"])


def test_our_meta_round_trips() -> None:
    m = QueueMeta(
        msg=MsgMeta(id="0123abcd", original_from="a@example.org", requiretls=True, size=9,
                    original_rcpts={"x@example.net": "X@example.net"}),
        mail_from="a@example.org",
        to=["x@example.net"],
        rcpt_errs={"x@example.net": RcptError(450, (4, 2, 0), "Mailbox busy")},
        tries={"x@example.net": 3},
        first_attempt=1700000000.5,
        last_attempt=1700000100.0,
        delay_notified=True,
    )
    back = decode_meta(encode_meta(m))
    assert back.msg == m.msg
    assert (back.to, back.rcpt_errs, back.tries, back.delay_notified) == (m.to, m.rcpt_errs, m.tries, True)
    assert (back.first_attempt, back.last_attempt) == (m.first_attempt, m.last_attempt)
    obj = json.loads(encode_meta(m))
    assert obj["FirstAttempt"] == "2023-11-14T22:13:20.5Z"
    assert obj["MsgMeta"]["SMTPOpts"]["RequireTLS"] is True


def test_go_zero_time() -> None:
    assert format_time(0) == "0001-01-01T00:00:00Z"
    assert parse_time("0001-01-01T00:00:00Z") == 0.0


@pytest.mark.parametrize("bad", [b"{", b"[]", b'{"To": "x"}', b'{"TriesCount": {"a": "1"}}',
                                 b'{"RcptErrs": {"a": {"EnhancedCode": [4, 4]}}}', b'{"FirstAttempt": "yesterday"}'])
def test_malformed_meta_is_an_error(bad: bytes) -> None:
    with pytest.raises(MetaError):
        decode_meta(bad)


def test_header_file_ends_with_empty_line() -> None:
    h = parse_header_block(b"Subject: x\r\nTo: y\r\n\r\n")
    assert [n for n, _ in h] == ["Subject", "To"]
    assert parse_header_block(b"Subject: x\n\n").get("Subject") == "x"


# -- crash safety ------------------------------------------------------------------------------


def _meta(entry_id: str) -> QueueMeta:
    return QueueMeta(msg=MsgMeta(id=entry_id), mail_from="a@example.org", to=["b@example.net"],
                     first_attempt=1.0, last_attempt=1.0)


def _header() -> bytes:
    h = Header()
    h.add("Subject", "hello")
    return h.to_bytes() + b"\r\n"


class Failure(Exception):
    """An I/O error at that step: the queue cleans up and the client gets a 4xx."""


class Crash(BaseException):
    """The process dies at that step: no clean-up code runs."""


POINTS = ["header.write", "body.write", "header.fsync", "body.fsync", "meta.write", "meta.fsync", "meta.rename",
          "dir.fsync"]


def _at(point: str, exc: type[BaseException]) -> Callable[[str], None]:
    def fault(p: str) -> None:
        if p == point:
            raise exc(p)

    return fault


@pytest.mark.parametrize("point", POINTS)
def test_a_failure_at_any_step_leaves_nothing(tmp_path: Path, point: str) -> None:
    st = Store(str(tmp_path), _at(point, Failure))
    with pytest.raises(Failure):
        st.write_message("00000001", _header(), Body(b"body\r\n"))
        st.commit_message("00000001", _meta("00000001"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_any_step_leaves_a_whole_entry_or_none(tmp_path: Path, point: str) -> None:
    st = Store(str(tmp_path), _at(point, Crash))
    with pytest.raises(Crash):
        st.write_message("00000001", _header(), Body(b"body\r\n"))
        st.commit_message("00000001", _meta("00000001"))
    # The commit never returned: the client was not told 250. A restart sees either nothing
    # or a complete entry (only a crash after the rename can leave one).
    fresh = Store(str(tmp_path))
    scan = fresh.scan()
    if point == "dir.fsync":
        assert scan.ids == ["00000001"]
        assert fresh.read_meta("00000001").to == ["b@example.net"]
        assert fresh.body("00000001").read_all() == b"body\r\n"
    else:
        assert scan.ids == []
        assert os.listdir(tmp_path) == []


def test_committed_entry_is_complete(tmp_path: Path) -> None:
    st = Store(str(tmp_path))
    st.write_message("00000002", _header(), Body(b"line\r\n" * 1000))
    st.commit_message("00000002", _meta("00000002"))
    assert sorted(os.listdir(tmp_path)) == ["00000002.body", "00000002.header", "00000002.meta"]
    assert st.read_header("00000002").get("Subject") == "hello"
    assert st.body("00000002").read_all() == b"line\r\n" * 1000


@pytest.mark.parametrize("point", ["meta.write", "meta.fsync", "meta.rename"])
def test_interrupted_meta_update_keeps_the_old_meta(tmp_path: Path, point: str) -> None:
    st = Store(str(tmp_path))
    st.write_message("00000003", _header(), Body(b"x"))
    st.commit_message("00000003", _meta("00000003"))
    updated = _meta("00000003")
    updated.tries = {"b@example.net": 4}

    with pytest.raises(Crash):
        Store(str(tmp_path), _at(point, Crash)).write_meta("00000003", updated)
    fresh = Store(str(tmp_path))
    assert fresh.scan().ids == ["00000003"]  # a leftover .meta.new is dropped
    assert fresh.read_meta("00000003").tries == {}
    assert not (tmp_path / "00000003.meta.new").exists()


def test_taken_id_is_refused_not_overwritten(tmp_path: Path) -> None:
    st = Store(str(tmp_path))
    st.write_message("00000004", _header(), Body(b"first"))
    st.commit_message("00000004", _meta("00000004"))
    with pytest.raises(FileExistsError):
        st.write_message("00000004", _header(), Body(b"second"))
    assert st.body("00000004").read_all() == b"first"


def test_scan_removes_incomplete_entries_and_keeps_broken_ones(tmp_path: Path) -> None:
    st = Store(str(tmp_path))
    for i in ("0000000a", "0000000b", "0000000c"):
        st.write_message(i, _header(), Body(b"x"))
        st.commit_message(i, _meta(i))
    os.unlink(tmp_path / "0000000a.header")  # maddy: meta without header → deleted
    os.unlink(tmp_path / "0000000b.body")
    st.mark_broken("0000000c")
    (tmp_path / "0000000d.body").write_bytes(b"orphan")  # crash before commit
    scan = st.scan()
    assert scan.ids == []
    assert sorted(os.listdir(tmp_path)) == ["0000000c.body", "0000000c.header", "0000000c.meta_broken"]
