"""`msgpipeline NAME { … }`: a named pipeline usable as a delivery target (`deliver_to &NAME`).

It adds no Received field (only an endpoint's pipeline does, spec §B.2).
"""

from __future__ import annotations

from pymaddy.mail.message import MsgMeta
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget
from pymaddy.pipeline.runner import PipelineRunner
from pymaddy.runtime.module import Module


class MsgPipeline(Module, DeliveryTarget):
    def log_name(self) -> str:
        return self.inst.instance or "msgpipeline"

    async def start(self) -> None:
        host = str(self.settings.get("hostname") or "")
        self.runner = PipelineRunner(self.settings["pipeline"], self.ctx, self.log, host)

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        if not hasattr(self, "runner"):
            await self.start()
        return await self.runner.start_delivery(meta, mail_from)
