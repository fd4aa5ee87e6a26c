"""RFC 4515 filter and RFC 4514 DN escaping of untrusted usernames."""

from __future__ import annotations

import warnings

import pytest

with warnings.catch_warnings():  # ldap3 2.9.1 uses pyasn1 names deprecated in pyasn1 0.6
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import parse_dn

from pymaddy.auth.ldapescape import escape_dn_value, escape_filter_value


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("alice", "alice"),
        ("alice@example.org", "alice@example.org"),
        ("*", r"\2a"),
        ("a*b", r"a\2ab"),
        (")(uid=*", r"\29\28uid=\2a"),
        ("bob)(description=prefix*", r"bob\29\28description=prefix\2a"),
        ("x\x00y", r"x\00y"),
        ("back\\slash", r"back\5cslash"),
        ("jörg", r"j\c3\b6rg"),
        ("", ""),
    ],
)
def test_filter_escaping(raw: str, escaped: str) -> None:
    assert escape_filter_value(raw) == escaped


def test_filter_escape_leaves_no_filter_syntax() -> None:
    nasty = "*()\\\x00&|!=<>~:"
    out = escape_filter_value(nasty)
    assert not set("*()\x00") & set(out)
    # every backslash starts a two-hex-digit escape (RFC 4515 §3 `escaped`)
    i = 0
    while (i := out.find("\\", i)) != -1:
        assert all(c in "0123456789abcdef" for c in out[i + 1:i + 3])
        i += 3
    # agrees with ldap3's escaper on the characters both escape
    assert escape_filter_value("a*(b)\\") == escape_filter_chars("a*(b)\\")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("alice", "alice"),
        ("a,ou=admins", r"a\,ou\=admins"),
        ("x+cn=y", r"x\+cn\=y"),
        ('q"<>;', r'q\"\<\>\;'),
        ("back\\slash", r"back\\slash"),
        (" lead", r"\ lead"),
        ("#hash", r"\#hash"),
        ("trail ", r"trail\ "),
        ("mid space", "mid space"),
        ("nul\x00", r"nul\00"),
        ("jörg", "jörg"),
    ],
)
def test_dn_escaping(raw: str, escaped: str) -> None:
    assert escape_dn_value(raw) == escaped


@pytest.mark.parametrize("raw", ["a,ou=admins", "x+cn=y", " #both ", 'q"<>;\\', "=,=,"])
def test_escaped_dn_value_stays_one_rdn(raw: str) -> None:
    dn = f"uid={escape_dn_value(raw)},ou=people,dc=example,dc=org"
    parts = parse_dn(dn)
    assert [p[0] for p in parts] == ["uid", "ou", "dc", "dc"]
