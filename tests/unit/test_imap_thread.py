"""pymaddy.imap.thread: RFC 5256 base subject, SORT, ORDEREDSUBJECT and REFERENCES."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymaddy.imap.message import SortInfo, sort_info
from pymaddy.imap.thread import (
    Thread,
    ThreadMsg,
    base_subject,
    base_subject_ext,
    format_threads,
    sort_ids,
    thread_orderedsubject,
    thread_references,
)


@pytest.mark.parametrize(
    ("subject", "base", "reply"),
    [
        ("Re: hello", "hello", True),
        ("RE: [list] Re: Fwd: hello (fwd)", "hello", True),
        ("[fwd: Re: test]", "test", True),
        ("[list] hello", "hello", False),
        ("[only]", "[only]", False),
        ("  multiple   spaces\t here  ", "multiple spaces here", False),
        ("Re [blob]: x", "x", True),
        ("Fw:x", "x", True),
        ("Rex: y", "Rex: y", False),
        ("[a][b] re: z", "z", True),
        ("hello (FWD)  (fwd)", "hello", True),
        ("re: re: ", "", True),
        ("", "", False),
    ],
)
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    assert base_subject_ext(subject) == (base, reply)
    assert base_subject(subject) == base


def _msg(
    id: int,
    *,
    subject: str = "",
    date: float | None = None,
    internaldate: float = 0.0,
    size: int = 0,
    frm: str = "",
    to: str = "",
    cc: str = "",
    mid: str = "",
    refs: tuple[str, ...] = (),
    irt: str = "",
) -> ThreadMsg:
    info = SortInfo(
        date=date,
        subject=subject,
        base_subject=base_subject(subject),
        from_mailbox=frm,
        to_mailbox=to,
        cc_mailbox=cc,
        from_display=frm.upper(),
        to_display=to,
        message_id=mid,
        in_reply_to=irt,
        references=list(refs),
    )
    return ThreadMsg(id=id, info=info, internaldate=internaldate, size=size)


def test_sort_ids_keys_reverse_and_ties() -> None:
    msgs = [
        _msg(1, subject="Re: b", date=30, internaldate=3, size=10, frm="zed", to="a", cc="m"),
        _msg(2, subject="a", date=None, internaldate=15, size=5, frm="Amy", to="b"),
        _msg(3, subject="B", date=10, internaldate=1, size=10, frm="bob", to="a", cc="c"),
        _msg(4, subject="[x] a", date=20, internaldate=2, size=7, frm="amy", to="c"),
    ]
    assert sort_ids(msgs, [("ARRIVAL", False)]) == [3, 4, 1, 2]
    assert sort_ids(msgs, [("DATE", False)]) == [3, 2, 4, 1]  # 2 falls back to its INTERNALDATE
    assert sort_ids(msgs, [("DATE", True)]) == [1, 4, 2, 3]
    assert sort_ids(msgs, [("SIZE", False)]) == [2, 4, 1, 3]  # 1 and 3 tie: sequence order
    assert sort_ids(msgs, [("SIZE", True)]) == [1, 3, 4, 2]  # REVERSE keeps ties in sequence order
    assert sort_ids(msgs, [("SUBJECT", False), ("SIZE", True)]) == [4, 2, 1, 3]
    assert sort_ids(msgs, [("FROM", False)]) == [2, 4, 3, 1]
    assert sort_ids(msgs, [("TO", False), ("ARRIVAL", True)]) == [1, 3, 2, 4]
    assert sort_ids(msgs, [("CC", False)]) == [2, 4, 3, 1]  # missing CC sorts first
    assert sort_ids(msgs, [("DISPLAYFROM", True)]) == [1, 3, 2, 4]
    assert sort_ids(msgs, [("displayto", False)]) == [1, 3, 2, 4]
    assert sort_ids([], [("DATE", False)]) == []


def test_format_threads_rfc5256_example() -> None:
    # RFC 5256 §4: "(2)(3 6 (4 23)(44 7 96))" and a dummy-rooted "((1)(3 6 (4 23)(44 7 96)))"
    tree = Thread(3, [Thread(6, [Thread(4, [Thread(23)]), Thread(44, [Thread(7, [Thread(96)])])])])
    assert format_threads([Thread(2), tree]) == b"(2)(3 6 (4 23)(44 7 96))"
    assert format_threads([Thread(None, [Thread(1), tree])]) == b"((1)(3 6 (4 23)(44 7 96)))"
    assert format_threads([]) == b""


def test_orderedsubject() -> None:
    msgs = [
        _msg(1, subject="Hello", date=5),
        _msg(2, subject="Re: hello", date=3),
        _msg(3, subject="other", date=4),
        _msg(4, subject="Fwd: Hello", date=9),
        _msg(5, subject="Re: re: HELLO", date=7),
        _msg(6, subject="other", date=4),
    ]
    threads = thread_orderedsubject(msgs)
    # the hello thread starts with its earliest message (2) and holds the rest flat, by date
    assert format_threads(threads) == b"(2 (1)(5)(4))(3 6)"


def test_references_full() -> None:
    msgs = [
        _msg(1, subject="A", date=1, mid="a@x"),
        _msg(2, subject="Re: A", date=2, mid="b@x", refs=("a@x",)),
        _msg(3, subject="Re: A", date=3, mid="c@x", refs=("a@x", "b@x")),
        _msg(4, subject="B", date=4, mid="d@x", refs=("gone@x",)),
        _msg(5, subject="Re: B", date=5, mid="e@x", refs=("gone@x",)),
        _msg(6, subject="Re: A", date=6, mid="f@x"),  # lost its references: joins "A" by subject
        _msg(7, subject="C", date=0),  # no Message-ID at all
        _msg(8, subject="D", date=8, mid="g@x"),
        _msg(9, subject="D", date=9, mid="h@x"),  # same subject, neither a reply: a dummy holds both
        _msg(10, subject="E", date=10, mid="i@x", irt="h@x"),  # In-Reply-To when References is absent
    ]
    assert format_threads(thread_references(msgs)) == b"(7)(1 (2 3)(6))((4)(5))((8)(9 10))"


def test_references_truncated_chain_and_dummy_in_the_middle() -> None:
    msgs = [
        _msg(1, subject="T", date=1, mid="1@x"),
        # 2 references 1 through a message we do not have (m@x): the dummy is spliced out
        _msg(2, subject="Re: T", date=2, mid="2@x", refs=("1@x", "m@x")),
        # 3's References was truncated: only its direct parent is known, and that wins (step 1.B)
        _msg(3, subject="Re: T", date=3, mid="3@x", refs=("2@x",)),
        _msg(4, subject="Re: T", date=4, mid="4@x", refs=("1@x",)),
    ]
    assert format_threads(thread_references(msgs)) == b"(1 (2 3)(4))"


def test_references_loops_and_duplicates_do_not_hang() -> None:
    msgs = [
        _msg(1, subject="x", date=1, mid="a", refs=("b",)),
        _msg(2, subject="y", date=2, mid="b", refs=("a",)),
        _msg(3, subject="z", date=3, mid="a"),  # duplicate Message-ID: treated as unique
        _msg(4, subject="w", date=4, mid="self", refs=("self",)),
        _msg(5, subject="v", date=5, mid="c", refs=("c", "d", "c")),
    ]
    out = thread_references(msgs)
    ids: list[int] = []

    def walk(t: Thread) -> None:
        if t.id is not None:
            ids.append(t.id)
        for c in t.children:
            walk(c)

    for t in out:
        walk(t)
    assert sorted(ids) == [1, 2, 3, 4, 5]
    assert format_threads(out) == b"(2 1)(3)(4)(5)"  # 1 named b as its parent first


def test_threading_from_real_headers() -> None:
    h1 = b"Message-ID: <1@x>\r\nSubject: Lunch\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n"
    h2 = (
        b"Message-ID: <2@x>\r\nIn-Reply-To: <1@x>\r\nReferences: <1@x>\r\nSubject: Re: Lunch\r\n"
        b"Date: Mon, 1 Jan 2024 09:00:00 -0200\r\n\r\n"
    )
    h3 = b"Message-ID: <3@x>\r\nSubject: =?utf-8?q?Re=3A_lunch?=\r\n\r\n"
    msgs = [ThreadMsg(i, sort_info(h), internaldate=1e10 + i, size=0) for i, h in enumerate((h1, h2, h3), 1)]
    assert format_threads(thread_references(msgs)) == b"(1 (2)(3))"
    assert format_threads(thread_orderedsubject(msgs)) == b"(1 (2)(3))"
    assert sort_ids(msgs, [("DATE", True)]) == [3, 2, 1]


def _walk(t: Thread, top: bool, seen: list[int]) -> None:
    if t.id is None:
        assert top and len(t.children) >= 2  # dummies survive only at the root with 2+ children
    else:
        seen.append(t.id)
    for c in t.children:
        _walk(c, False, seen)


_ids = st.sampled_from(["a", "b", "c", "d", "e", ""])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            _ids,
            st.lists(_ids.filter(bool), max_size=4),
            st.sampled_from(["s", "Re: s", "t", "[x] t", "", "Fwd: s"]),
            st.one_of(st.none(), st.integers(0, 5).map(float)),
        ),
        max_size=12,
    )
)
def test_threads_contain_every_message_once(specs: list[tuple[str, list[str], str, float | None]]) -> None:
    msgs = [
        _msg(i, mid=mid, refs=tuple(refs), subject=subj, date=date, internaldate=float(i))
        for i, (mid, refs, subj, date) in enumerate(specs, 1)
    ]
    for threads in (thread_references(msgs), thread_orderedsubject(msgs)):
        seen: list[int] = []
        for t in threads:
            _walk(t, True, seen)
        assert sorted(seen) == list(range(1, len(msgs) + 1))
        wire = format_threads(threads)
        assert wire.count(b"(") == wire.count(b")")
    assert sorted(sort_ids(msgs, [("SUBJECT", True), ("DATE", False)])) == list(range(1, len(msgs) + 1))


def test_deep_reply_chain_is_not_recursive() -> None:
    n = 5000  # deeper than the interpreter's recursion limit
    msgs = [
        _msg(i, subject="Re: x" if i > 1 else "x", date=float(i), mid=f"{i}@x", refs=(f"{i - 1}@x",) if i > 1 else ())
        for i in range(1, n + 1)
    ]
    wire = format_threads(thread_references(msgs))
    assert wire == b"(" + b" ".join(b"%d" % i for i in range(1, n + 1)) + b")"


@given(st.text(alphabet="reRfwdFWD:[]() \t\u00e9x", max_size=40))
def test_base_subject_is_idempotent(subject: str) -> None:
    base = base_subject(subject)
    assert base_subject(base) == base
    assert base == base.strip(" ")
