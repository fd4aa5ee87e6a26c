"""The fast path of parse_address_list gives what the full parser gives, for every input it takes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymaddy.checks import authorize_sender as A


def full_parse(value: str) -> list[str] | str:
    saved = A._SIMPLE_ADDRESS
    A._SIMPLE_ADDRESS = re.compile(r"(?!)")  # never matches: the email package decides
    try:
        return A.parse_address_list(value)
    except A.AddressParseError:
        return "error"
    finally:
        A._SIMPLE_ADDRESS = saved


atom = st.text(alphabet="abcXYZ09!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=5)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
word = st.one_of(atom, st.text(alphabet="ab ,;:<>@()[].", max_size=6).map(lambda t: f'"{t}"'))
phrase = st.lists(word, min_size=0, max_size=3).map(" ".join)
pieces = st.sampled_from(["", " ", "\t", "<", ">", "@", ",", ";", ":", '"', "(", ")", ".", "x", "\\"])


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.builds(lambda lp, d, sp: f"{sp}{lp}@{d}{sp}", dot_atom, dot_atom, st.sampled_from(["", " ", "\t"])),
    st.builds(lambda ph, lp, d: f"{ph} <{lp}@{d}>", phrase, dot_atom, dot_atom),
    st.lists(pieces, max_size=10).map("".join),
))
def test_fast_path_agrees_with_the_full_parser(value: str) -> None:
    if A._SIMPLE_ADDRESS.fullmatch(value) is None:
        return  # not a fast-path input
    assert A.parse_address_list(value) == full_parse(value), value


@pytest.mark.parametrize("value", ["Alice <alice@example.org>", "a.b+c@d.example", '"Bob, Jr" <bob@x.y>'])
def test_common_forms_take_the_fast_path(value: str) -> None:
    assert A._SIMPLE_ADDRESS.fullmatch(value) is not None
    assert A.parse_address_list(value) == full_parse(value)
