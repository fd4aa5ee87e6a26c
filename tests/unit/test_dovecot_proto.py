"""The Dovecot auth protocol library (pymaddy.auth.dovecot_proto): escaping, lines, handshake, requests, replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymaddy.auth import dovecot_proto as dp


def test_escape_matches_dovecot_str_tabescape() -> None:
    assert dp.escape("plain") == "plain"
    assert dp.escape("a\tb\nc\rd\x01e\x00") == "a\x01tb\x01nc\x01rd\x011e\x010"
    assert dp.unescape("a\x01tb\x01nc\x01rd\x011e\x010") == "a\tb\nc\rd\x01e\x00"
    assert dp.unescape("x\x01q") == "xq"  # unknown escape: the character stays
    assert dp.unescape("end\x01") == "end"


@given(st.text())
def test_escape_round_trip(s: str) -> None:
    esc = dp.escape(s)
    assert not any(c in esc for c in "\t\n\r\x00")
    assert dp.unescape(esc) == s


@given(st.text(min_size=1).filter(lambda s: "\t" not in s and "\n" not in s and "\r" not in s),
       st.lists(st.text(), max_size=5))
def test_line_round_trip(cmd: str, args: list[str]) -> None:
    line = dp.encode_line(cmd, *args)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert dp.decode_line(line) == (cmd, args)


def test_decode_line_errors() -> None:
    with pytest.raises(dp.ProtocolError):
        dp.decode_line(b"\n")
    with pytest.raises(dp.ProtocolError):
        dp.decode_line(b"\xff\xfe\n")
    with pytest.raises(dp.ProtocolError):
        dp.decode_line(b"A" * (dp.MAX_LINE + 1))
    assert dp.decode_line(b"DONE\r\n") == ("DONE", [])


def test_server_handshake_as_dovecot_sends_it() -> None:
    hs = dp.ServerHandshake()
    lines = (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nMECH\tGSSAPI\tprivate\n"
             b"SPID\t9360\nCUID\t1\nCOOKIE\tc2f01b42\nFUTURE\tx\nDONE\n").splitlines(keepends=True)
    assert [hs.feed(ln) for ln in lines] == [False] * 8 + [True]
    assert hs.version == (1, 2)
    assert list(hs.mechanisms) == ["PLAIN", "LOGIN", "GSSAPI"]
    assert hs.mechanisms["GSSAPI"].private and not hs.mechanisms["PLAIN"].private
    assert (hs.spid, hs.cuid, hs.cookie) == ("9360", "1", "c2f01b42")
    # and what our server writes parses back the same
    again = dp.ServerHandshake()
    out = hs.lines().splitlines(keepends=True)
    assert out[0] == b"VERSION\t1\t2\n" and out[-1] == b"DONE\n"
    assert [again.feed(ln) for ln in out][-1] is True
    assert again.mechanisms == hs.mechanisms


def test_handshake_errors() -> None:
    with pytest.raises(dp.ProtocolError, match="incompatible"):
        dp.ServerHandshake().feed(b"VERSION\t2\t0\n")
    with pytest.raises(dp.ProtocolError, match="expected VERSION"):
        dp.ServerHandshake().feed(b"MECH\tPLAIN\n")
    with pytest.raises(dp.ProtocolError):
        dp.ServerHandshake().feed(b"VERSION\tx\n")
    with pytest.raises(dp.ProtocolError):
        dp.parse_client_version(["0", "9"])
    assert dp.parse_client_version(["1", "0"]) == (1, 0)
    assert dp.client_handshake(42) == b"VERSION\t1\t2\nCPID\t42\n"


def test_auth_request_as_postfix_sends_it() -> None:
    cmd, args = dp.decode_line(b"AUTH\t7\tplain\tservice=smtp\tnologin\tlip=127.0.0.1\trip=10.0.0.9\tsecured"
                               b"\tresp=AGFsaWNlAHB3\n")
    assert cmd == "AUTH"
    req = dp.AuthRequest.parse(args)
    assert (req.id, req.mechanism, req.initial) == ("7", "PLAIN", b"\x00alice\x00pw")
    assert req.params == {"service": "smtp", "nologin": "", "lip": "127.0.0.1", "rip": "10.0.0.9", "secured": ""}
    assert req.remote == "10.0.0.9:0"
    req.params["rport"] = "2525"
    assert req.remote == "10.0.0.9:2525"
    assert dp.AuthRequest("1", "PLAIN", {"rip": "::1", "rport": "5"}).remote == "[::1]:5"
    assert dp.AuthRequest("1", "PLAIN").remote == ""
    # resp= is always written last; an empty initial response is `resp=`
    line = dp.AuthRequest("3", "PLAIN", {"service": "smtp", "secured": ""}, b"").line()
    assert line == b"AUTH\t3\tPLAIN\tservice=smtp\tsecured\tresp=\n"
    assert dp.AuthRequest.parse(dp.decode_line(line)[1]).initial == b""


def test_auth_request_errors() -> None:
    for args in ([], ["1"], ["x", "PLAIN"], ["", "PLAIN"], ["1", "PLAIN", "resp=!!"]):
        with pytest.raises(dp.ProtocolError):
            dp.AuthRequest.parse(args)


def test_replies() -> None:
    ok = dp.AuthReply.parse("OK", ["1", "user=alice@example.org"])
    assert (ok.kind, ok.id, ok.user, ok.temporary) == ("OK", "1", "alice@example.org", False)
    assert ok.line() == b"OK\t1\tuser=alice@example.org\n"
    fail = dp.AuthReply.parse("FAIL", ["2", "user=a", "code=temp_fail"])  # Dovecot 2.3
    assert fail.temporary
    assert dp.AuthReply.parse("FAIL", ["2", "temp"]).temporary  # Dovecot 2.2
    assert not dp.AuthReply.parse("FAIL", ["2", "reason=bad"]).temporary
    cont = dp.AuthReply.parse("CONT", ["3", "VXNlcm5hbWU6"])
    assert cont.data == b"Username:"
    assert cont.line() == b"CONT\t3\tVXNlcm5hbWU6\n"
    assert dp.AuthReply("CONT", "4", data=b"").line() == b"CONT\t4\t\n"
    assert dp.AuthReply("FAIL", "5", {"user": "a\tb"}).line() == b"FAIL\t5\tuser=a\x01tb\n"
    with pytest.raises(dp.ProtocolError):
        dp.AuthReply.parse("DONE", ["1"])
    with pytest.raises(dp.ProtocolError):
        dp.AuthReply.parse("OK", [])
    assert dp.parse_cont(["9", "YWI="]) == ("9", b"ab")
    with pytest.raises(dp.ProtocolError):
        dp.parse_cont([])


def test_params() -> None:
    assert dp.parse_params(["a=1", "flag", "b=x=y", "a=2"]) == {"a": "2", "flag": "", "b": "x=y"}
