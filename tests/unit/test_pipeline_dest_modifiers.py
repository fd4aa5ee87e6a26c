"""Destination-block modifiers see the final envelope sender (maddy's getRcptModifiers calls
RewriteSender): modify.dkim in `default_destination` signs for the domain a source modifier
rewrote the sender to (spec §D.2 step 3, §I.3)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from pymaddy.dkim.core import signature_tags
from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget
from pymaddy.pipeline.runner import PipelineRunner
from tests.runtime_helpers import Runtime


class Recorder(DeliveryTarget):
    def __init__(self) -> None:
        self.got: list[tuple[str, Header]] = []

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        rec = self

        class D(Delivery):
            async def add_rcpt(self, rcpt: str) -> None:
                return None

            async def body(self, header: Header, body: Body) -> None:
                rec.got.append((mail_from, header))

            async def commit(self) -> None:
                return None

            async def abort(self) -> None:
                return None

        return D()


CONF = """state_dir {tmp}
hostname mx.example.org
tls off
dummy out
submission tcp://127.0.0.1:0 {{
    auth dummy
    default_source {{
        modify {{
            replace_sender static {{
                entry alice@example.com alice@example.org
            }}
        }}
        default_destination {{
            modify {{
                dkim example.org default {{
                    newkey_algo ed25519
                }}
            }}
            deliver_to &out
        }}
    }}
}}
"""


def test_dkim_in_destination_block_signs_for_the_rewritten_sender(tmp_path: Path) -> None:
    async def main() -> list[tuple[str, Header]]:
        rt = Runtime(CONF.format(tmp=tmp_path), tmp_path, ["modifiers"])
        async with rt:
            rec = Recorder()
            [out] = [i for i in rt.graph.instances if i.name == "dummy" and i.instance == "out"]
            rt.ctx.objects[id(out)] = cast(Any, rec)  # a recording stand-in for `dummy`
            runner = PipelineRunner(rt.graph.endpoints[0].settings["pipeline"], rt.ctx, rt.logger, "mx.example.org")
            meta = MsgMeta(conn=ConnInfo(remote_ip="127.0.0.1", helo="client"), original_from="alice@example.com")
            d = await runner.start_delivery(meta, "alice@example.com")
            await d.add_rcpt("bob@example.net")
            header = Header.parse(b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n")
            await d.body(header, Body(b"hello\r\n"))
            await d.commit()
            return rec.got

    [(mail_from, header)] = asyncio.run(main())
    assert mail_from == "alice@example.org"
    sig = header.get("DKIM-Signature")
    assert sig is not None, "modify.dkim did not see the rewritten sender"
    tags = signature_tags(sig)
    assert (tags["d"], tags["s"], tags["i"]) == ("example.org", "default", "@example.org")
