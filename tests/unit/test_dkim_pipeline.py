"""DKIM through the message pipeline: signed on submission's default_destination, judged by
check.dkim on the receiving side, with the result in Authentication-Results (spec §D.2, §I.2, §I.3)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pymaddy.checks.dkim import DKIMCheck
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.modify.dkim import DKIMSigner
from pymaddy.pipeline.groups import CheckGroup, ModifierGroup
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget
from pymaddy.pipeline.runner import PipelineRunner
from pymaddy.runtime.module import Module
from tests.runtime_helpers import bare_context, compile_graph
from tests.unit.test_dkim_helpers import MESSAGE, split_message


class Recorder(DeliveryTarget):
    def __init__(self) -> None:
        self.messages: list[tuple[Header, bytes]] = []

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        rec = self

        class D(Delivery):
            async def add_rcpt(self, rcpt: str) -> None:
                return None

            async def body(self, header: Header, body: Body) -> None:
                rec.messages.append((header, body.read_all()))

            async def commit(self) -> None:
                return None

            async def abort(self) -> None:
                return None

        return D()


async def pipeline(tmp: Path, conf: str, records: dict[str, str]) -> tuple[PipelineRunner, Recorder]:
    text = f"state_dir {tmp}\nruntime_dir {tmp}\nhostname mx.example.net\ntls off\ndummy t\n{conf}\n"
    g = compile_graph(text, strict=True)
    ctx = bare_context(g, str(tmp))
    target = Recorder()

    async def txt(name: str) -> list[str]:
        return [records[name]]

    for inst in g.instances:
        obj: Any
        if inst.name == "dummy":
            obj = target
        elif inst.name == "checks":
            obj = CheckGroup(inst, ctx)
        elif inst.name == "modifiers":
            obj = ModifierGroup(inst, ctx)
        elif inst.name == "modify.dkim":
            obj = DKIMSigner(inst, ctx)
        elif inst.name == "check.dkim":
            obj = DKIMCheck(inst, ctx)
            obj.lookup = txt
        else:
            continue
        if isinstance(obj, Module):
            await obj.start()
        ctx.objects[id(inst)] = obj
    return PipelineRunner(g.endpoints[0].settings["pipeline"], ctx, ctx.logger, "mx.example.net"), target


async def deliver(runner: PipelineRunner, frm: str, header: Header, body: Body) -> None:
    meta = MsgMeta(conn=ConnInfo(remote_ip="127.0.0.1", helo="client.example.org"), original_from=frm)
    d = await runner.start_delivery(meta, frm)
    await d.add_rcpt("bob@example.net")
    await d.body(header, body)
    await d.commit()


SUBMISSION = """
submission tcp://127.0.0.1:1 {
    auth dummy
    default_source {
        default_destination {
            modify {
                dkim example.org default {
                    newkey_algo ed25519
                }
            }
            deliver_to &t
        }
    }
}
"""

RECEIVER = """
smtp tcp://127.0.0.1:2 {
    check {
        dkim
    }
    default_source {
        default_destination {
            deliver_to &t
        }
    }
}
"""


def test_signed_on_submission_passes_on_receipt(tmp_path: Path) -> None:
    async def go() -> tuple[Header, bytes]:
        sub, out = await pipeline(tmp_path / "a", SUBMISSION, {})
        header, body = split_message(MESSAGE)
        await deliver(sub, "alice@example.org", header, body)
        [(signed_header, signed_body)] = out.messages
        assert signed_header.get("DKIM-Signature") is not None

        record = (tmp_path / "a" / "dkim_keys" / "example.org_default.dns").read_text()
        rcv, inbox = await pipeline(tmp_path / "b", RECEIVER, {"default._domainkey.example.org": record})
        await deliver(rcv, "alice@example.org", signed_header.copy(), Body(signed_body))
        [(got, _)] = inbox.messages

        # The same message, tampered on the way: the receiver records a failure (and accepts it:
        # broken_sig_action defaults to ignore, DMARC decides).
        rcv2, inbox2 = await pipeline(tmp_path / "c", RECEIVER, {"default._domainkey.example.org": record})
        await deliver(rcv2, "alice@example.org", signed_header.copy(), Body(signed_body.replace(b"noon", b"one")))
        [(bad, _)] = inbox2.messages
        assert (bad.get("Authentication-Results") or "").startswith(
            'mx.example.net; dkim=fail reason="body hash did not verify" header.d=example.org'
        )
        return got, signed_body

    got, _ = asyncio.run(go())
    ar = got.get("Authentication-Results") or ""
    assert ar.startswith("mx.example.net; dkim=pass header.d=example.org header.i="), ar


def test_unsigned_mail_gets_dkim_none(tmp_path: Path) -> None:
    async def go() -> Header:
        rcv, inbox = await pipeline(tmp_path, RECEIVER, {})
        header, body = split_message(MESSAGE)
        await deliver(rcv, "alice@example.org", header, body)
        return inbox.messages[0][0]

    assert asyncio.run(go()).get("Authentication-Results") == "mx.example.net; dkim=none"
