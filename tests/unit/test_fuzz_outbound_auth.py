"""Property tests for the parsers added with outbound delivery and the auth providers: whatever
arrives (a hostile MTA-STS server, a Dovecot peer, a damaged queue file, a username), the
parser answers with its own error type, never an uncaught exception that would reach a user."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pymaddy.auth import dovecot_proto as dp
from pymaddy.auth.ldapescape import escape_dn_value, escape_filter_value
from pymaddy.mtasts.policy import PolicyError, match_mx, parse_policy
from pymaddy.queue.store import MetaError, decode_meta, encode_meta

POLICY_TOKENS = st.sampled_from([
    "version: STSv1", "version:STSv1", "mode: enforce", "mode: testing", "mode: none", "mode: x",
    "max_age: 86400", "max_age: -1", "max_age: 99999999999", "mx: mail.example.org", "mx: *.example.org",
    "mx: *", "mx:", ":", "", " ", "\t", "\r", "é", "\x00", "key: value", "#",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(POLICY_TOKENS, max_size=12), st.sampled_from(["\n", "\r\n", "\r"]))
def test_mtasts_policy_parser_only_raises_policy_errors(lines: list[str], eol: str) -> None:
    try:
        pol = parse_policy(eol.join(lines))
    except PolicyError:
        return
    assert pol.mode in ("enforce", "testing", "none")
    for pattern in pol.mx:
        assert isinstance(match_mx(pattern, "mail.example.org"), bool)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_dovecot_lines_decode_or_raise_protocol_error(line: bytes) -> None:
    try:
        cmd, args = dp.decode_line(line)
    except dp.ProtocolError:
        return
    if cmd == "AUTH":
        with contextlib.suppress(dp.ProtocolError):
            dp.AuthRequest.parse(args)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=6))
def test_dovecot_escaping_round_trips(args: list[str]) -> None:
    cmd, got = dp.decode_line(dp.encode_line("CMD", *args))
    assert (cmd, got) == ("CMD", args)


JSONISH: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
META_KEYS = st.sampled_from(["ID", "From", "To", "FailedRcpts", "TemporaryFailedRcpts", "RcptErrs", "TriesCount",
                             "FirstAttempt", "LastAttempt", "MsgMeta", "OriginalFrom", "SMTPOpts", "Conn"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(META_KEYS, JSONISH, max_size=8) | JSONISH)
def test_damaged_queue_meta_is_a_meta_error(obj: Any) -> None:
    try:
        meta = decode_meta(json.dumps(obj).encode())
    except MetaError:
        return
    saved = encode_meta(meta)
    assert encode_meta(decode_meta(saved)) == saved  # what loads, saves and reloads to the same file


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_ldap_escaping_leaves_no_metacharacter(name: str) -> None:
    f = escape_filter_value(name)
    assert not any(c in f for c in "*()\x00")
    dn = escape_dn_value(name)
    assert "\x00" not in dn
