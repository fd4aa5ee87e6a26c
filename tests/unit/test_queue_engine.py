"""The queue engine's scheduler and its hand-over between configuration generations (spec §E).

The target here is a tiny DeliveryTarget defined in the test: the engine's
contract with targets is the Delivery interface, and these tests look at what
the engine does around it (how many tasks wait, who attempts what), which no
real peer could show.
"""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from pathlib import Path

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget
from pymaddy.queue import engine
from pymaddy.queue.store import QueueMeta, Store, encode_meta
from pymaddy.runtime.log import Logger


class Recorder(DeliveryTarget):
    """Accepts everything and records each attempt's envelope."""

    def __init__(self, fail: SMTPError | None = None) -> None:
        self.attempts: list[tuple[str, list[str]]] = []
        self.fail = fail

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        if self.fail is not None:
            raise self.fail
        return _Delivery(self, meta)


class _Delivery(Delivery):
    def __init__(self, t: Recorder, meta: MsgMeta) -> None:
        self.t, self.meta, self.rcpts = t, meta, list[str]()

    async def add_rcpt(self, rcpt: str) -> None:
        self.rcpts.append(rcpt)

    async def body(self, header: Header, body: Body) -> None:
        return None

    async def commit(self) -> None:
        self.t.attempts.append((self.meta.id, self.rcpts))

    async def abort(self) -> None:
        return None


def _write_entries(d: Path, n: int, last_attempt: float) -> list[str]:
    ids = [f"{i:08x}" for i in range(n)]
    m = QueueMeta(msg=MsgMeta(id="ID"), mail_from="a@example.org", to=["b@unreachable.example"],
                  tries={"b@unreachable.example": 3}, first_attempt=last_attempt, last_attempt=last_attempt)
    meta = encode_meta(m)
    for i in ids:
        for ext, data in ((".header", b"Subject: x\r\n\r\n"), (".body", b"x\r\n"),
                          (".meta", meta.replace(b'"ID":"ID"', f'"ID":"{i}"'.encode()))):
            with open(d / (i + ext), "wb") as f:
                f.write(data)
    return ids


def _cfg(target: DeliveryTarget, **kw: float) -> engine.Config:
    return engine.Config(target=target, log=Logger("queue"), **kw)  # type: ignore[arg-type]


def test_thousands_of_waiting_messages_need_one_timer_task(tmp_path: Path) -> None:
    q, run = tmp_path / "q", tmp_path / "run"
    q.mkdir()
    run.mkdir()
    _write_entries(q, 1_000, time.time())

    async def main() -> tuple[int, int, int]:
        owner = object()
        before = len(asyncio.all_tasks())
        eng = await engine.acquire(owner, str(q), str(run), _cfg(Recorder(), initial_retry=3600.0))
        tasks = len(asyncio.all_tasks()) - before
        n = len(eng.entries)
        # What a waiting entry costs: its slots object and one heap item (metadata stays on disk).
        tracemalloc.start()
        for i in range(1000):
            eng._schedule(eng._entry(f"x{i:07x}"), time.time() + 3600)
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        await engine.release(owner)
        return tasks, n, size // 1000

    tasks, n, per_entry = asyncio.run(main())
    assert n == 1_000
    assert tasks == 1  # the scheduler; no task per message
    assert per_entry < 1024


def test_handover_keeps_one_engine_and_attempts_each_message_once(tmp_path: Path) -> None:
    q, run = tmp_path / "q", tmp_path / "run"
    q.mkdir()
    run.mkdir()
    [entry] = _write_entries(q, 1, time.time() - 7200)

    async def main() -> tuple[Recorder, Recorder, bool, list[str]]:
        old_gen, new_gen = object(), object()
        first, second = Recorder(SMTPError(451, (4, 4, 1), "down")), Recorder()
        eng = await engine.acquire(old_gen, str(q), str(run), _cfg(first, post_init_delay=0.0, initial_retry=0.0))
        again = await engine.acquire(new_gen, str(q), str(run), _cfg(second, post_init_delay=0.0))
        same = again is eng
        await engine.release(old_gen)  # the old generation drained: the new one's target is used
        deadline = time.monotonic() + 5
        while not second.attempts and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await engine.release(new_gen)
        return first, second, same, os.listdir(q)

    _, second, same, left = asyncio.run(main())
    assert same
    assert len(second.attempts) == 1
    assert second.attempts[0][0].startswith(entry + "-")  # per-attempt ID <msgid>-<unix hex>
    assert second.attempts[0][1] == ["b@unreachable.example"]
    assert left == []


def test_last_release_stops_the_engine(tmp_path: Path) -> None:
    async def main() -> tuple[bool, bool]:
        owner = object()
        eng = await engine.acquire(owner, str(tmp_path / "q"), str(tmp_path), _cfg(Recorder()))
        sock = os.path.exists(eng.control.path)
        await engine.release(owner)
        return sock, engine.engine_for(str(tmp_path / "q")) is None and not os.path.exists(eng.control.path)

    assert asyncio.run(main()) == (True, True)


class Bounces(DeliveryTarget):
    """Collects DSNs as the bounce pipeline would receive them."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], Header, bytes]] = []

    async def start_delivery(self, meta: MsgMeta, mail_from: str) -> Delivery:
        return _Bounce(self, mail_from)


class _Bounce(Delivery):
    def __init__(self, b: Bounces, mail_from: str) -> None:
        self.b, self.mail_from, self.rcpts = b, mail_from, list[str]()
        self.msg: tuple[Header, bytes] | None = None

    async def add_rcpt(self, rcpt: str) -> None:
        self.rcpts.append(rcpt)

    async def body(self, header: Header, body: Body) -> None:
        self.msg = (header, body.read_all())

    async def commit(self) -> None:
        assert self.msg is not None
        self.b.got.append((self.mail_from, self.rcpts, *self.msg))

    async def abort(self) -> None:
        return None


def _run_one(tmp_path: Path, target: DeliveryTarget, sender: str, **kw: float) -> Bounces:
    """Queue one message from `sender` through a real QueueDelivery-like commit and wait for the outcome."""
    q = tmp_path / "q"
    bounces = Bounces()

    async def main() -> None:
        owner = object()
        cfg = _cfg(target, **kw)
        cfg.bounce = bounces
        cfg.hostname, cfg.autogen_domain = "mx.example.org", "example.org"
        eng = await engine.acquire(owner, str(q), str(tmp_path), cfg)
        meta = QueueMeta(msg=MsgMeta(id="0000beef", original_from=sender), mail_from=sender,
                         to=["b@example.net"], first_attempt=time.time(), last_attempt=time.time())
        h = Header()
        h.add("Subject", "original")
        eng.store.write_message("0000beef", h.to_bytes() + b"\r\n", Body(b"x\r\n"))
        eng.store.commit_message("0000beef", meta)
        eng.add_new(meta, h, "client.example.org")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (("0000beef" in eng.entries and not bounces.got) or
                                               eng.running):
            await asyncio.sleep(0.01)
        await engine.release(owner)

    asyncio.run(main())
    return bounces


def test_permanent_failure_bounces_once_to_the_sender(tmp_path: Path) -> None:
    got = _run_one(tmp_path, Recorder(SMTPError(550, (5, 1, 1), "no such user")), "a@example.org").got
    [(mail_from, rcpts, header, body)] = got
    assert (mail_from, rcpts) == ("", ["a@example.org"])  # null reverse-path, RFC 5321 §4.5.5
    assert header.get("To") == "a@example.org"
    assert b"Diagnostic-Code: smtp; 550 5.1.1 no such user" in body
    assert b"Received-From-MTA: dns; client.example.org" in body
    assert os.listdir(tmp_path / "q") == []


def test_no_dsn_for_a_null_sender(tmp_path: Path) -> None:
    assert _run_one(tmp_path, Recorder(SMTPError(550, (5, 1, 1), "no such user")), "").got == []
    assert os.listdir(tmp_path / "q") == []


def test_delayed_dsn_is_sent_once_and_the_message_stays_queued(tmp_path: Path) -> None:
    got = _run_one(tmp_path, Recorder(SMTPError(451, (4, 4, 1), "connection refused")), "a@example.org",
                   delay_notify_after=0.0, initial_retry=3600.0).got
    [(_, _, header, body)] = got
    assert header.get("Subject") == "Delayed Mail (still being retried)"
    assert b"Action: delayed" in body
    meta = Store(str(tmp_path / "q")).read_meta("0000beef")
    assert meta.delay_notified
    assert meta.tries == {"b@example.net": 1}
