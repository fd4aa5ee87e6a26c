"""The pipeline runtime (spec §D.2) on compiled configs, with recording fakes for targets/checks/modifiers."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from pymaddy.checks.require_tls import RequireTLS
from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.groups import CheckGroup, ModifierGroup, merge_results
from pymaddy.pipeline.interfaces import (
    OK,
    AuthResult,
    Check,
    CheckResult,
    CheckState,
    Delivery,
    DeliveryTarget,
    Modifier,
    ModifierState,
)
from pymaddy.pipeline.limits import Limits
from pymaddy.pipeline.runner import PipelineRunner, fold, format_auth_results, received_value
from tests.runtime_helpers import bare_context, compile_graph

# -- fakes -----------------------------------------------------------------------------------


class Recorder(DeliveryTarget):
    """A target that keeps everything it is given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = 0
        self.messages: list[dict[str, Any]] = []

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        self.started += 1
        rec: dict[str, Any] = {"from": mail_from, "rcpts": [], "committed": False, "aborted": False}
        self.messages.append(rec)
        target = self

        class D(Delivery):
            async def add_rcpt(self, rcpt: str) -> None:
                if rcpt.startswith("unknown@"):
                    raise SMTPError(501, (5, 1, 1), "User does not exist", target=target.name)
                rec["rcpts"].append(rcpt)

            async def body(self, header: Header, body: Body) -> None:
                rec["header"] = header.to_bytes()
                rec["body"] = body.read_all()

            async def commit(self) -> None:
                rec["committed"] = True

            async def abort(self) -> None:
                rec["aborted"] = True

        return D()


class FakeCheck(Check):
    """Behaviour by address: sender `bad@…` rejected, rcpt `spam@…` quarantined, body with `REJECT` rejected."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    async def state_for_msg(self, meta: MsgMeta) -> CheckState:
        chk = self

        class S(CheckState):
            async def check_connection(self) -> CheckResult:
                chk.calls.append("conn")
                return OK

            async def check_sender(self, mail_from: str) -> CheckResult:
                chk.calls.append("sender:" + mail_from)
                if mail_from.startswith("bad@"):
                    return CheckResult(reject=SMTPError(550, (5, 7, 1), "Sender refused"))
                return OK

            async def check_rcpt(self, rcpt: str) -> CheckResult:
                chk.calls.append("rcpt:" + rcpt)
                if rcpt.startswith("spam@"):
                    return CheckResult(quarantine=True)
                if rcpt.startswith("deny@"):
                    return CheckResult(reject=SMTPError(550, (5, 7, 2), "Rcpt refused"))
                return OK

            async def check_body(self, header: Header, body: Body) -> CheckResult:
                chk.calls.append("body")
                if b"REJECT" in body.read_all():
                    return CheckResult(reject=SMTPError(550, (5, 7, 3), "Body refused"))
                extra = Header()
                extra.add("X-Checked", chk.name)
                return CheckResult(
                    auth_results=[AuthResult("spf", "pass", "", {"smtp.mailfrom": "a.test"})], header=extra
                )

        return S()


class FakeModifier(Modifier):
    """`list@…` expands to two recipients; the sender gets `+mod` before `@`."""

    async def state_for_msg(self, meta: MsgMeta) -> ModifierState:
        class S(ModifierState):
            async def rewrite_sender(self, mail_from: str) -> str:
                return mail_from.replace("@", "+mod@", 1) if mail_from.startswith("rw") else mail_from

            async def rewrite_rcpt(self, rcpt: str) -> list[str]:
                if rcpt.startswith("list@"):
                    d = rcpt.split("@", 1)[1]
                    return [f"m1@{d}", f"m2@{d}"]
                return [rcpt]

            async def rewrite_body(self, header: Header, body: Body) -> None:
                header.add_top("X-Modified", "yes")

        return S()


class SenderSpy(Modifier):
    """Records the senders rewrite_sender sees; rewrites `spy-rw…` senders (which must be ignored)."""

    def __init__(self) -> None:
        self.senders: list[str] = []
        self.rcpts: list[str] = []

    async def state_for_msg(self, meta: MsgMeta) -> ModifierState:
        spy = self

        class S(ModifierState):
            async def rewrite_sender(self, mail_from: str) -> str:
                spy.senders.append(mail_from)
                return "changed@spy.test" if "spy-rw" in mail_from else mail_from

            async def rewrite_rcpt(self, rcpt: str) -> list[str]:
                spy.rcpts.append(rcpt)
                return [rcpt]

            async def rewrite_body(self, header: Header, body: Body) -> None:
                return None

        return S()


def build(conf: str) -> tuple[PipelineRunner, dict[str, Any]]:
    """Compile `conf` (one smtp endpoint); fakes stand in for dummy / require_mx_record / replace_rcpt."""
    text = f"state_dir /tmp/pm-state\nruntime_dir /tmp/pm-run\nhostname mx.test\ntls off\n{conf}\n"
    g = compile_graph(text, strict=True)
    ctx = bare_context(g, "/tmp/pm-state", "/tmp/pm-run")
    named: dict[str, Any] = {}
    for inst in g.instances:
        key = inst.instance or f"{inst.name}:{inst.node.line}"
        if inst.name == "dummy":
            obj: Any = Recorder(key)
        elif inst.name == "require_mx_record":
            obj = FakeCheck(key)
        elif inst.name == "modify.replace_rcpt":
            obj = FakeModifier()
        elif inst.name == "modify.replace_sender":
            obj = SenderSpy()
        elif inst.name == "checks":
            obj = CheckGroup(inst, ctx)
        elif inst.name == "require_tls":
            obj = RequireTLS(inst, ctx)
        elif inst.name == "modifiers":
            obj = ModifierGroup(inst, ctx)
        elif inst.name == "limits":
            obj = Limits(inst, ctx)
        else:
            continue
        ctx.objects[id(inst)] = obj
        named[key] = obj
    ep = g.endpoints[0]
    return PipelineRunner(ep.settings["pipeline"], ctx, ctx.logger, "mx.test", add_received=True), named


def meta() -> MsgMeta:
    return MsgMeta(id="0123abcd", conn=ConnInfo(remote_ip="127.0.0.1", remote_port=1, helo="client.test"))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


ROUTING = """
dummy t_a
dummy t_b
dummy t_c
smtp tcp://127.0.0.1:1 {
    source blocked.test { reject 550 5.7.1 "Sender blocked" }
    source vip@a.test {
        destination x.test { deliver_to &t_c }
        default_destination { deliver_to &t_a }
    }
    default_source {
        destination rejected.test { reject 541 5.1.1 "No such domain" }
        destination both.test {
            deliver_to &t_a
            deliver_to &t_b
        }
        destination a.test b.test { deliver_to &t_a }
        destination rr.test {
            reroute {
                destination inner@rr.test { deliver_to &t_b }
                default_destination { reject 550 5.1.2 "rerouted away" }
            }
        }
        default_destination { reject }
    }
}
"""


async def _send(runner: PipelineRunner, frm: str, rcpts: list[str], data: bytes = b"hi\r\n") -> list[Any]:
    d = await runner.start_delivery(meta(), frm)
    out: list[Any] = []
    for r in rcpts:
        try:
            await d.add_rcpt(r)
            out.append(None)
        except SMTPError as e:
            out.append((e.code, e.enhanced_str, e.message))
    h = Header()
    h.add("Subject", "t")
    try:
        await d.body(h, Body(data))
        await d.commit()
    except SMTPError as e:
        await d.abort()
        out.append(("body", e.code, e.message))
    return out


def test_destination_rules_and_one_delivery_per_target() -> None:
    runner, objs = build(ROUTING)
    res = run(_send(runner, "s@src.test", ["u@a.test", "v@b.test", "w@rejected.test", "x@both.test", "y@other.test"]))
    assert res[:2] == [None, None]
    assert res[2] == (541, "5.1.1", "No such domain")
    assert res[3] is None
    assert res[4] == (554, "5.7.0", "Message rejected due to a local policy")
    a, b = objs["t_a"], objs["t_b"]
    assert a.started == 1 and a.messages[0]["rcpts"] == ["u@a.test", "v@b.test", "x@both.test"]
    assert b.messages[0]["rcpts"] == ["x@both.test"]
    assert a.messages[0]["committed"] and b.messages[0]["committed"]
    assert a.messages[0]["body"] == b"hi\r\n"


def test_source_rules_exact_before_domain_and_null_sender_default() -> None:
    runner, objs = build(ROUTING)
    assert run(_send(runner, "vip@a.test", ["q@x.test", "r@y.test"])) == [None, None]
    assert objs["t_c"].messages[0]["rcpts"] == ["q@x.test"]
    assert objs["t_a"].messages[0]["rcpts"] == ["r@y.test"]
    # other addresses of a.test use default_source: x.test is rejected there
    assert run(_send(runner, "other@a.test", ["q@x.test"]))[0][0] == 554
    # the null sender ends in default_source
    assert run(_send(runner, "", ["u@a.test"])) == [None]


def test_reject_in_source_block_is_reported_per_rcpt() -> None:
    runner, _ = build(ROUTING)
    res = run(_send(runner, "s@blocked.test", ["u@a.test", "v@a.test"]))
    assert res[:2] == [(550, "5.7.1", "Sender blocked")] * 2


def test_reroute_runs_nested_pipeline() -> None:
    runner, objs = build(ROUTING)
    res = run(_send(runner, "s@src.test", ["inner@rr.test", "outer@rr.test"]))
    assert res[0] is None
    assert res[1] == (550, "5.1.2", "rerouted away")
    assert objs["t_b"].messages[0]["rcpts"] == ["inner@rr.test"]
    assert objs["t_b"].messages[0]["committed"]


def test_target_error_fails_rcpt() -> None:
    runner, _ = build(ROUTING)
    assert run(_send(runner, "s@src.test", ["unknown@a.test"]))[0] == (501, "5.1.1", "User does not exist")


CHECKS = """
dummy t_a
smtp tcp://127.0.0.1:1 {
    check { require_mx_record }
    modify {
        replace_rcpt static {
            entry a b
        }
    }
    source rw+mod@s.test {
        destination checked.test {
            check { require_mx_record }
            deliver_to &t_a
        }
        default_destination { deliver_to &t_a }
    }
    default_source {
        deliver_to &t_a
    }
}
"""


def _check(objs: dict[str, Any], line_hint: int = 0) -> FakeCheck:
    checks = sorted((k, v) for k, v in objs.items() if isinstance(v, FakeCheck))
    return checks[line_hint][1]


def test_sender_check_reject_and_modifier_expansion() -> None:
    runner, objs = build(CHECKS)

    async def go() -> None:
        with pytest.raises(SMTPError) as ei:
            await runner.start_delivery(meta(), "bad@s.test")
        assert ei.value.code == 550 and ei.value.message == "Sender refused"

    run(go())
    res = run(_send(runner, "ok@s.test", ["list@l.test", "deny@l.test"]))
    assert res[0] is None and res[1] == (550, "5.7.2", "Rcpt refused")
    msg = objs["t_a"].messages[-1]
    assert msg["rcpts"] == ["m1@l.test", "m2@l.test"]
    hdr = msg["header"].decode()
    # checks' header and A-R on top, then Received, then the original fields; modifiers ran last
    lines = hdr.split("\r\n")
    assert lines[0] == "X-Modified: yes"
    assert lines[1].startswith("X-Checked: ")
    assert lines[2] == "Authentication-Results: mx.test; spf=pass smtp.mailfrom=a.test"
    assert lines[3].startswith("Received: from client.test ([127.0.0.1]) by mx.test")
    assert "Subject: t" in hdr


DEST_MODIFIERS = """
dummy t_a
smtp tcp://127.0.0.1:1 {
    default_source {
        modify {
            replace_rcpt static {
                entry a b
            }
        }
        default_destination {
            modify {
                replace_sender static {
                    entry a b
                }
            }
            deliver_to &t_a
        }
    }
}
"""


def test_destination_modifiers_see_the_final_sender_once() -> None:
    """maddy's getRcptModifiers: RewriteSender(final sender) when a destination block's modifier
    state is created (so modify.dkim there picks its key by it); a change is logged and ignored."""
    runner, objs = build(DEST_MODIFIERS)
    [spy] = [o for o in objs.values() if isinstance(o, SenderSpy)]
    assert run(_send(runner, "rw@s.test", ["u@a.test", "v@a.test"])) == [None, None]
    assert spy.senders == ["rw+mod@s.test"]  # after the source modifiers, once per message
    assert spy.rcpts == ["u@a.test", "v@a.test"]
    assert objs["t_a"].messages[-1]["from"] == "rw+mod@s.test"

    spy.senders.clear()
    assert run(_send(runner, "spy-rw@s.test", ["u@a.test"])) == [None]
    assert spy.senders == ["spy-rw@s.test"]
    assert objs["t_a"].messages[-1]["from"] == "spy-rw@s.test"  # the rewrite is ignored


def test_body_check_reject_aborts_all() -> None:
    runner, objs = build(CHECKS)
    res = run(_send(runner, "ok@s.test", ["u@a.test"], b"REJECT me\r\n"))
    assert res[-1] == ("body", 550, "Body refused")
    assert objs["t_a"].messages[-1]["aborted"] and not objs["t_a"].messages[-1]["committed"]


def test_quarantine_flag_and_late_destination_check_replay() -> None:
    runner, objs = build(CHECKS)

    async def go() -> MsgMeta:
        m = meta()
        d = await runner.start_delivery(m, "rw@s.test")
        await d.add_rcpt("spam@x.test")
        await d.add_rcpt("u@checked.test")
        await d.body(Header([("Subject", b"Subject: x\r\n")]), Body(b"x\r\n"))
        await d.commit()
        return m

    m = run(go())
    assert m.quarantine
    # sender was rewritten by the global modifier before source matching
    assert objs["t_a"].messages[-1]["from"] == "rw+mod@s.test"
    checks = [c for c in objs.values() if isinstance(c, FakeCheck)]
    assert len(checks) == 2
    # the destination check was created at the 2nd RCPT and replayed connection, sender and
    # the earlier recipient first (maddy's checkStates); it knows the sender as rewritten by
    # the global modifiers, the global check saw it as given
    rest = ["rcpt:spam@x.test", "rcpt:u@checked.test", "body"]
    got = sorted(c.calls for c in checks)
    assert got == [["conn", "sender:rw+mod@s.test", *rest], ["conn", "sender:rw@s.test", *rest]]


# -- lmtp -----------------------------------------------------------------------------------


def test_lmtp_body_non_atomic_reports_per_original_rcpt() -> None:
    runner, objs = build(ROUTING)

    async def go() -> dict[str, Any]:
        d = await runner.start_delivery(meta(), "s@src.test")
        await d.add_rcpt("u@a.test")
        await d.add_rcpt("x@both.test")
        got: dict[str, Any] = {}
        await d.body_non_atomic(got.__setitem__, Header(), Body(b"x\r\n"))
        await d.commit()
        return got

    got = run(go())
    assert got == {"u@a.test": None, "x@both.test": None}
    assert "Received" not in objs["t_a"].messages[0]["header"].decode()


# -- headers --------------------------------------------------------------------------------


def test_received_format_and_fold() -> None:
    m = MsgMeta(id="9f2c41aa", conn=ConnInfo(remote_ip="127.109.97.100", helo="localhost", rdns="client.maddy.test"))
    when = datetime(2026, 1, 2, 15, 4, 5, tzinfo=timezone(timedelta(hours=-7)))
    v = received_value(m, "maddy.test", "sender@maddy.test", when)
    assert v == (
        "from localhost (client.maddy.test [127.109.97.100]) by maddy.test "
        "(envelope-sender <sender@maddy.test>) with ESMTP id 9f2c41aa; Fri, 02 Jan 2026 15:04:05 -0700"
    )
    raw = fold("Received", v).decode()
    assert raw.split("\r\n")[0] == "Received: from localhost (client.maddy.test [127.109.97.100]) by maddy.test"
    assert raw.split("\r\n")[1].startswith(" (envelope-sender <sender@maddy.test>) with ESMTP id 9f2c41aa;")
    # submission: no `from`; null sender: no envelope-sender; TLS + SMTPUTF8
    m.dont_trace_sender = True
    m.smtputf8 = True
    m.conn.proto = "ESMTPS"
    assert received_value(m, "maddy.test", "", when).startswith("by maddy.test with UTF8ESMTPS id 9f2c41aa; ")


def test_auth_results_format() -> None:
    v = format_auth_results(
        "mail.example.net",
        [
            AuthResult("dkim", "none"),
            AuthResult("spf", "none", "no DNS record found", {"smtp.mailfrom": "mail.example.net", "smtp.helo": "h"}),
        ],
    )
    want = 'mail.example.net; dkim=none ; spf=none reason="no DNS record found" smtp.helo=h '
    assert v == want + "smtp.mailfrom=mail.example.net"


LONG_WORD = "InCaseOf" + "Very" * 240 + "LongStringWeStillShouldComplyToTheHardLimitOf998Symbols"


@pytest.mark.parametrize(
    ("name", "value", "want"),
    [  # go-message v0.18.2 textproto formatHeaderFieldTests
        ("From", "Mitsuha Miyamizu <mitsuha.miyamizu@example.org>", None),
        (
            "Subject",
            "This is a very long subject, much longer than just the 76 characters limit that applies to message "
            "header fields",
            "Subject: This is a very long subject, much longer than just the 76\r\n characters limit that applies "
            "to message header fields\r\n",
        ),
        (
            "Subject",
            "This is        yet          \t  another    subject          \t                   with many         "
            "whitespace      characters",
            "Subject: This is        yet          \t  another    subject          \t       \r\n            with "
            "many         whitespace      characters\r\n",
        ),
        ("In-Reply-To", "<CAOzTU0ikmAnr1ebhLEfks2crdHcotR-cXeJ-7ySd4X4VJ-B2fg@mail.gmail.com>", None),
        (
            "Subject",
            "=?utf-8?q?=E2=80=9CShort subject=E2=80=9D=0A?= =?utf-8?q?=0AAuthor=0A=0AOil_on...?=",
            "Subject: =?utf-8?q?=E2=80=9CShort subject=E2=80=9D=0A?=\r\n =?utf-8?q?=0AAuthor=0A=0AOil_on...?=\r\n",
        ),
        ("Subject", LONG_WORD, "Subject: " + LONG_WORD[:988] + "\r\n " + LONG_WORD[988:] + "\r\n"),
        ("Bcc", "", "Bcc: \r\n"),
        ("Bcc", " ", "Bcc:  \r\n"),
    ],
)
def test_fold_matches_go_message(name: str, value: str, want: str | None) -> None:
    assert fold(name, value).decode() == (want if want is not None else f"{name}: {value}\r\n")


def test_auth_results_field_is_folded_like_go_message() -> None:
    v = format_auth_results(
        "mail.example.net",
        [
            AuthResult("dkim", "none"),
            AuthResult("spf", "none", "no DNS record found", {"smtp.mailfrom": "mail.example.net", "smtp.helo": "h"}),
            AuthResult("dmarc", "fail", "No aligned identifiers", {"header.from": "mail.example.net"}),
        ],
    )
    # folded at whitespace, inside quoted strings too (FWS, RFC 5322 §3.2.4)
    assert fold("Authentication-Results", v) == (
        b'Authentication-Results: mail.example.net; dkim=none ; spf=none reason="no\r\n'
        b' DNS record found" smtp.helo=h smtp.mailfrom=mail.example.net; dmarc=fail\r\n'
        b' reason="No aligned identifiers" header.from=mail.example.net\r\n'
    )


def test_auth_results_format_matches_go_msgauth() -> None:
    """authres.Format: address-like pvalues bare, other values quoted (only `"` escaped), reason
    first, empty params dropped, `host; none` without results."""
    assert format_auth_results("mx", []) == "mx; none"
    v = format_auth_results(
        "mx.example.net",
        [
            AuthResult("dkim", "pass", "", {"header.d": "example.org", "header.i": "@example.org"}),
            AuthResult("spf", "pass", "", {"smtp.mailfrom": "user+tag@example.org", "smtp.helo": ""}),
            AuthResult("dmarc", "fail", "No aligned identifiers", {"header.from": "example.org"}),
        ],
    )
    assert v == (
        "mx.example.net; dkim=pass header.d=example.org header.i=@example.org; "
        "spf=pass smtp.mailfrom=user+tag@example.org; "
        'dmarc=fail reason="No aligned identifiers" header.from=example.org'
    )
    odd = AuthResult("x", "pass", 'a "q" \\ b', {"a": "has space", "b": "x=y", "c": "tab\there", "d": "bücher.de"})
    assert format_auth_results("h", [odd]) == (
        'h; x=pass reason="a \\"q\\" \\ b" a="has space" b="x=y" c="tab\there" d=bücher.de'
    )
    # reason is a `value`: '@' or '/' force quotes there, unlike in other params
    assert format_auth_results("h", [AuthResult("m", "r", "a@b", {"p": "a/b"})]) == 'h; m=r reason="a@b" p=a/b'


def test_check_group_merge() -> None:
    e1, e2 = SMTPError(550, (5, 7, 1), "a"), SMTPError(550, (5, 7, 2), "b")
    r = merge_results([CheckResult(quarantine=True), CheckResult(reject=e1), CheckResult(reject=e2)])
    assert r.reject is e1 and r.quarantine


# -- limits ---------------------------------------------------------------------------------


def test_limits_concurrency_times_out_with_451(monkeypatch: pytest.MonkeyPatch) -> None:
    import pymaddy.pipeline.limits as L

    monkeypatch.setattr(L, "WAIT", 0.2)
    _, objs = build(
        "limits lim { all concurrency 1\n ip rate 0 }\nsmtp tcp://127.0.0.1:1 { limits &lim\n deliver_to dummy }"
    )
    lim = objs["lim"]

    async def go() -> None:
        await lim.take_msg("1.2.3.4", "a.test")
        t0 = time.monotonic()
        with pytest.raises(SMTPError) as ei:
            await lim.take_msg("1.2.3.5", "a.test")
        assert (ei.value.code, ei.value.enhanced_str, ei.value.message) == (451, "4.4.5", "High load, try again later")
        assert time.monotonic() - t0 >= 0.19
        lim.release_msg("1.2.3.4", "a.test")
        await lim.take_msg("1.2.3.5", "a.test")

    run(go())


def test_limits_rate_per_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    import pymaddy.pipeline.limits as L

    monkeypatch.setattr(L, "WAIT", 0.1)
    _, objs = build("limits lim { ip rate 2 10s }\nsmtp tcp://127.0.0.1:1 { limits &lim\n deliver_to dummy }")
    lim = objs["lim"]

    async def go() -> None:
        await lim.take_msg("1.1.1.1", "")
        await lim.take_msg("1.1.1.1", "")
        await lim.take_msg("2.2.2.2", "")  # another IP has its own bucket
        with pytest.raises(SMTPError):
            await lim.take_msg("1.1.1.1", "")

    run(go())


# -- require_tls ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "tls", "want"),
    [
        ("require_tls", False, (550, "5.7.1", "TLS conversation required", False)),
        ("require_tls", True, None),
        ("require_tls {\n            fail_action quarantine\n        }", False, "quarantine"),
        (
            'require_tls {\n            fail_action reject 451 4.7.1 "Later"\n        }',
            False,
            (451, "4.7.1", "Later", False),
        ),
        ("require_tls {\n            fail_action ignore\n        }", False, None),
    ],
)
def test_require_tls(block: str, tls: bool, want: Any) -> None:
    runner, _ = build(
        f"dummy t\nsmtp tcp://127.0.0.1:1 {{\n    check {{\n        {block}\n    }}\n    deliver_to &t\n}}"
    )

    async def go() -> Any:
        m = meta()
        m.conn.tls = tls
        try:
            d = await runner.start_delivery(m, "a@b.test")
            await d.add_rcpt("c@d.test")
            await d.body(Header(), Body(b"x\r\n"))
            await d.commit()
        except SMTPError as e:
            return (e.code, e.enhanced_str, e.message, m.quarantine)
        return "quarantine" if m.quarantine else None

    assert run(go()) == want


# -- the endpoint's DATA decoder against go-smtp 0.21's state machine ------------------------


def _go_smtp_data(data: bytes) -> tuple[bytes, bool]:
    """A byte-for-byte transcription of go-smtp 0.21.3 dataReader's states (reference)."""
    bol, dot, dotcr, cr, mid = range(5)
    st, out = bol, bytearray()
    for c in data:
        if st == bol:
            if c == 0x2E:
                st = dot
                continue
            st = cr if c == 0x0D else mid
        elif st == dot:
            if c == 0x0D:
                st = dotcr
                continue
            st = mid
        elif st == dotcr:
            if c == 0x0A:
                return bytes(out), True
            st = mid
        elif st == cr:
            st = bol if c == 0x0A else mid
        elif c == 0x0D:
            st = cr
        out.append(c)
    return bytes(out), False


def test_dot_decoder_matches_go_smtp() -> None:
    import random

    from pymaddy.endpoints.smtp.protocol import DotDecoder

    rnd = random.Random(2024)
    pieces = [b"\r", b"\n", b".", b"a", b"\r\n", b".\r\n", b"\n.\n", b"..", b"\r\r\n"]
    for _ in range(5000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 20))) + b"\r\n.\r\n"
        dec, out, end = DotDecoder(), b"", False
        for part in data.split(b"\n")[:-1]:  # the endpoint reads LF-terminated lines
            got, end = dec.line(part + b"\n")
            out += got
            if end:
                break
        want = _go_smtp_data(data)
        assert (out, end) == want, data
