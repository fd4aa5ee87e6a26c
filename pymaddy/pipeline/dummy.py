"""`dummy`: a target that accepts and discards, an auth that accepts anything, a table that never matches.

Meant for tests and for `reject`-everything setups; maddy registers one module
for all three roles and so do we.
"""

from __future__ import annotations

from pymaddy.auth.base import PlainAuth
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget
from pymaddy.runtime.module import Module
from pymaddy.tables.base import Table


class _DummyDelivery(Delivery):
    async def add_rcpt(self, rcpt: str) -> None:
        return None

    async def body(self, header: Header, body: Body) -> None:
        return None

    async def commit(self) -> None:
        return None

    async def abort(self) -> None:
        return None


class Dummy(Module, DeliveryTarget, PlainAuth, Table):
    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        return _DummyDelivery()

    async def auth_plain(self, username: str, password: str) -> None:
        return None

    async def lookup_multi(self, key: str) -> list[str]:
        return []
