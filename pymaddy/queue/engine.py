"""The queue's delivery engine: one per queue directory per process (spec §E).

Timers: one scheduler task and a heap of (due time, sequence, entry ID). An
entry in memory is a few slots (ID, due time, flags); its metadata is read from
disk at each attempt, so 10,000 messages waiting for an unreachable domain cost
a heap and a dict, not 10,000 sleeping tasks. Re-scheduling pushes a new heap
item and bumps the entry's sequence number; stale items are skipped when popped.

Hot reload: each configuration generation builds its own QueueTarget, but all
of them for one directory (by real path) share the engine kept in `_ENGINES`.
A generation `acquire`s it at start and `release`s it at stop; the newest
owner's settings (target, bounce pipeline, retry numbers) are used for the next
attempts. Messages committed by a draining generation go to the same engine,
so nothing is attempted twice and nothing is left behind. When the last owner
leaves, the engine stops, waiting a bounded time for attempts in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

from pymaddy.mail.errors import SMTPError
from pymaddy.mail.message import Body, Header, MsgMeta, new_msg_id
from pymaddy.pipeline.interfaces import Delivery, DeliveryTarget, PartialDelivery
from pymaddy.queue import control, dsn
from pymaddy.queue.schedule import NO_TRIES, next_attempt, retry_at
from pymaddy.queue.store import MetaError, MissingFiles, QueueMeta, RcptError, Store, valid_id
from pymaddy.runtime.log import Logger
from pymaddy.runtime.metrics import Gauge, Registry

SHUTDOWN_WAIT = 0.7  # the supervisor gives each module's stop() one second
FRESH_BODY_BYTES = 8 * 1024 * 1024  # at most this much of just-committed bodies kept for first attempts


@dataclass
class Config:
    """The settings of one generation's queue module, as the engine uses them."""

    target: DeliveryTarget
    log: Logger
    max_tries: int = 20
    max_parallelism: int = 16
    post_init_delay: float = 10.0
    initial_retry: float = 900.0
    retry_scale: float = 1.25
    hostname: str = ""
    autogen_domain: str = ""
    bounce: DeliveryTarget | None = None
    delay_notify_after: float | None = None
    name: str = ""  # instance name, the `module` label of maddy_queue_length
    metrics: Registry | None = None
    # Worker processes commit entries and hand them over (control "new"); every `rescan`
    # seconds the engine also looks for committed entries it was not told of. None: one process.
    rescan: float | None = None


class Entry:
    """One queued message as the scheduler knows it."""

    __slots__ = ("due", "fresh", "helo", "id", "removed", "running", "seq")

    def __init__(self, entry_id: str) -> None:
        self.id = entry_id
        self.due = 0.0
        self.seq = -1
        self.running = False
        self.removed = False
        # First attempt of a message committed in this process: its meta, header and the
        # client's HELO (maddy's Conn, which is not written to disk) are still in memory,
        # and so is a small body (None: read the file).
        self.fresh: tuple[QueueMeta, Header, str, bytes | None] | None = None
        self.helo = ""  # the client's HELO when a worker process handed the entry over


def to_rcpt_error(err: BaseException) -> RcptError:
    """maddy's toSMTPErr: an SMTP reply for any error; unknown errors are 451 4.0.0."""
    if isinstance(err, SMTPError):
        return RcptError(err.code, err.enhanced, err.message)
    return RcptError(451, (4, 0, 0), "Internal server error")


def is_temporary(err: BaseException) -> bool:
    """exterrors.IsTemporaryOrUnspec: only an explicit 5xx is permanent."""
    if isinstance(err, SMTPError):
        return not (500 <= err.code < 600)
    return True


async def _abort(d: Delivery, log: Logger, msg_id: str) -> None:
    try:
        await d.abort()
    except Exception as e:
        log.error("delivery.Abort failed", err=e, msg_id=msg_id)


class Engine:
    def __init__(self, location: str, runtime_dir: str, store: Store | None = None) -> None:
        self.location = location
        self.store = store or Store(location)
        self.entries: dict[str, Entry] = {}
        self.heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.owners: list[tuple[object, Config]] = []
        self.running: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._scanning: asyncio.Task[None] | None = None
        self._next_scan = 0.0
        self.fresh_bytes = 0  # sum of the bodies held in Entry.fresh
        self.control = control.Server(control.socket_path(runtime_dir, location), self.handle_control)

    @property
    def cfg(self) -> Config:
        return self.owners[-1][1]

    @property
    def log(self) -> Logger:
        return self.cfg.log

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        loaded, skipped, removed = await asyncio.to_thread(self._load_disk, cfg)
        for name in removed:
            cfg.log.printf(f"removed dangling file {name}")
        for entry_id, err in skipped:
            cfg.log.printf(f"failed to read meta-data, skipping: {err} (msg ID = {entry_id})")
        now = time.time()
        for entry_id, due in loaded:
            if entry_id in self.entries:
                continue
            # Never earlier than post_init_delay: a crash loop right after start must not hammer.
            self._schedule(self._entry(entry_id), max(due, now + cfg.post_init_delay))
        if loaded:
            cfg.log.printf(f"loaded {len(loaded)} saved queue entries")
        try:
            await self.control.start()
        except OSError as e:
            cfg.log.error("cannot open the queue control socket", err=e, path=self.control.path)
        self._task = asyncio.create_task(self._run())

    def _load_disk(self, cfg: Config) -> tuple[list[tuple[str, float]], list[tuple[str, str]], list[str]]:
        self.store.ensure_dir()
        scan = self.store.scan()
        loaded: list[tuple[str, float]] = []
        skipped: list[tuple[str, str]] = []
        for entry_id in scan.ids:
            try:
                meta = self.store.read_meta(entry_id)
            except (MetaError, OSError) as e:
                skipped.append((entry_id, str(e)))
                continue
            loaded.append((entry_id, next_attempt(meta.last_attempt, meta.tries, cfg.initial_retry,
                                                  cfg.retry_scale)))
        return loaded, skipped, scan.dangling_removed

    async def shutdown(self, timeout: float = SHUTDOWN_WAIT) -> None:
        self.stopping = True
        self.wake.set()
        for task in (self._task, self._scanning):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.control.stop()
        if self.running:
            _, pending = await asyncio.wait(set(self.running), timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=0.2)

    # -- scheduling -------------------------------------------------------------------------

    def _entry(self, entry_id: str) -> Entry:
        e = self.entries.get(entry_id)
        if e is None:
            e = self.entries[entry_id] = Entry(entry_id)
            self._count()
        return e

    def _gauge(self) -> Gauge | None:
        reg = self.cfg.metrics if self.owners else None
        if reg is None:
            return None
        return reg.gauge("maddy_queue_length", "Amount of queued messages", ("module", "location"))

    def _count(self) -> None:
        """maddy's maddy_queue_length{module, location} gauge."""
        g = self._gauge()
        if g is not None:
            g.set(len(self.entries), module=self.cfg.name, location=self.location)

    def _schedule(self, e: Entry, due: float) -> None:
        e.seq = next(self._seq)
        e.due = due
        heapq.heappush(self.heap, (due, e.seq, e.id))
        if self.heap[0][1] == e.seq:
            self.wake.set()

    def _take_fresh(self, e: Entry) -> tuple[QueueMeta, Header, str, bytes | None] | None:
        fresh, e.fresh = e.fresh, None
        if fresh is not None and fresh[3] is not None:
            self.fresh_bytes -= len(fresh[3])
        return fresh

    def _drop(self, e: Entry) -> None:
        self._take_fresh(e)
        if self.entries.get(e.id) is e:
            del self.entries[e.id]
            self._count()
        e.seq = -1

    def add_new(self, meta: QueueMeta, header: Header, helo: str, body: bytes | None = None) -> None:
        """A message just committed: first attempt at once (spec §E).

        `body`, the bytes just written, spares that attempt reading the file back; bounded
        by FRESH_BODY_BYTES in all, for a backlog of fresh messages must not fill memory."""
        e = self._entry(meta.msg.id)
        self._take_fresh(e)
        if body is not None and self.fresh_bytes + len(body) > FRESH_BODY_BYTES:
            body = None
        if body is not None:
            self.fresh_bytes += len(body)
        e.fresh = (meta, header, helo, body)
        e.removed = False
        self._schedule(e, 0.0)

    def adopt(self, entry_id: str, helo: str = "") -> bool:
        """An entry another process committed (a worker's target.queue): attempt it now.
        False when the engine knows it already (a second notice, or the scan was first)."""
        if entry_id in self.entries:
            return False
        e = self._entry(entry_id)
        e.helo = helo
        self._schedule(e, 0.0)
        return True

    def _rescan_due(self, now: float) -> float | None:
        """With worker processes: start a look for entries nobody announced when one is due;
        the seconds until the next one (None: no scanning)."""
        every = self.cfg.rescan if self.owners else None
        if not every:
            return None
        if self._next_scan == 0.0:
            self._next_scan = now + every
        if now >= self._next_scan:
            self._next_scan = now + every
            if self._scanning is None or self._scanning.done():  # else skip this turn
                self._scanning = asyncio.create_task(self._rescan())
        return max(0.0, self._next_scan - now)

    async def _rescan(self) -> None:
        try:
            ids = await asyncio.to_thread(self.store.committed_ids)
        except OSError as e:
            self.log.error("queue scan failed", err=e)
            return
        for entry_id in ids:
            if self.adopt(entry_id):
                self.log.msg("picked up a queued message the worker's notice did not announce", msg_id=entry_id)

    async def _run(self) -> None:
        while not self.stopping:
            self.wake.clear()
            now = time.time()
            limit = max(1, self.cfg.max_parallelism)
            while self.heap and self.heap[0][0] <= now and len(self.running) < limit:
                _, seq, entry_id = heapq.heappop(self.heap)
                e = self.entries.get(entry_id)
                if e is None or e.seq != seq or e.running:
                    continue
                self._start(e)
            timeout: float | None = None
            if self.heap and self.heap[0][0] > now:
                # Bounded, so a clock step cannot make the loop oversleep by much.
                timeout = min(self.heap[0][0] - now, 60.0)
            # else: nothing queued, or all slots busy (a finishing attempt sets `wake`)
            scan_in = self._rescan_due(now)
            if scan_in is not None:
                timeout = scan_in if timeout is None else min(timeout, scan_in)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    def _start(self, e: Entry) -> None:
        e.running = True
        task = asyncio.get_running_loop().create_task(self._attempt(e))
        self.running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self.wake.set()

    # -- one attempt ------------------------------------------------------------------------

    def _read(self, entry_id: str) -> tuple[QueueMeta, Header, Body]:
        meta = self.store.read_meta(entry_id)
        return meta, self.store.read_header(entry_id), self.store.body(entry_id)

    async def _attempt(self, e: Entry) -> None:
        cfg = self.cfg
        log = cfg.log
        try:
            try:
                fresh = self._take_fresh(e)
                if fresh is not None:
                    meta, header, helo, data = fresh
                    body = self.store.body(e.id) if data is None else Body(data)
                else:
                    meta, header, body = await asyncio.to_thread(self._read, e.id)
                    helo = e.helo
            except FileNotFoundError:
                self._drop(e)  # removed behind our back (the CLI with no server, an admin)
                return
            except MissingFiles as err:
                log.printf(f"{err}")
                await asyncio.to_thread(self.store.remove, e.id)
                self._drop(e)
                return
            except MetaError as err:
                log.error("read message", err=err, msg_id=e.id)
                await asyncio.to_thread(self.store.mark_broken, e.id)
                self._drop(e)
                return
            if e.removed:
                await asyncio.to_thread(self.store.remove, e.id)
                self._drop(e)
                return
            await self._try(cfg, e, meta, header, body, helo=helo)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            # maddy's panic handler: never retry an entry that crashes the queue.
            log.error("panic during queue dispatch", err=f"{type(err).__name__}: {err}", msg_id=e.id)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.store.mark_broken, e.id)
            self._drop(e)
        finally:
            e.running = False

    async def _try(self, cfg: Config, e: Entry, meta: QueueMeta, header: Header, body: Body, *,
                   helo: str) -> None:
        log = cfg.log
        msg_id = meta.msg.id
        errs = await self._deliver(cfg, meta, header, body)
        smallest = NO_TRIES
        retry: list[str] = []
        failed: list[str] = []
        for rcpt in meta.to:
            if rcpt not in errs:
                log.msg("delivered", attempt=meta.tries.get(rcpt, 0) + 1, msg_id=msg_id, rcpt=rcpt)
                continue
            err = errs[rcpt]
            log.error("delivery attempt failed", err=err, msg_id=msg_id, rcpt=rcpt)
            meta.rcpt_errs[rcpt] = to_rcpt_error(err)
            tries = meta.tries.get(rcpt, 0)
            if not is_temporary(err) or tries + 1 >= cfg.max_tries:
                meta.tries.pop(rcpt, None)
                log.msg("not delivered, permanent error", msg_id=msg_id, rcpt=rcpt)
                failed.append(rcpt)
                continue
            meta.tries[rcpt] = tries + 1
            retry.append(rcpt)
            smallest = min(smallest, tries + 1)
        meta.last_attempt = time.time()
        if failed:
            await self._dsn(cfg, meta, header, failed, action=dsn.FAILED, helo=helo)
        if not retry or e.removed:
            await asyncio.to_thread(self.store.remove, e.id)
            self._drop(e)
            log.debug("removed message from disk", msg_id=msg_id)
            return
        meta.to = retry
        if (cfg.delay_notify_after is not None and not meta.delay_notified
                and meta.last_attempt - meta.first_attempt >= cfg.delay_notify_after):
            meta.delay_notified = True
            await self._dsn(cfg, meta, header, retry, action=dsn.DELAYED, helo=helo)
        try:
            await asyncio.to_thread(self.store.write_meta, e.id, meta)
        except OSError as err:
            log.error("meta-data update", err=err, msg_id=msg_id)
        due = retry_at(time.time(), smallest, cfg.initial_retry, cfg.retry_scale)
        log.msg("will retry", attempts_count=dict(meta.tries), msg_id=msg_id,
                next_try_delay=max(0.0, due - time.time()), rcpts=list(retry))
        if self.entries.get(e.id) is e:
            self._schedule(e, due)

    async def _deliver(self, cfg: Config, meta: QueueMeta, header: Header, body: Body) -> dict[str, BaseException]:
        """One attempt to the target; the errors per recipient (a recipient absent = delivered)."""
        errs: dict[str, BaseException] = {}
        log = cfg.log
        mm = dataclasses.replace(meta.msg, id=f"{meta.msg.id}-{int(time.time()):x}",
                                 original_rcpts=dict(meta.msg.original_rcpts))
        try:
            d = await cfg.target.start_delivery(mm, meta.mail_from)
        except Exception as err:
            return {r: err for r in meta.to}
        try:
            accepted: list[str] = []
            for rcpt in meta.to:
                try:
                    await d.add_rcpt(rcpt)
                    accepted.append(rcpt)
                except Exception as err:
                    errs[rcpt] = err
            if not accepted:
                await _abort(d, log, meta.msg.id)
                return errs
            if isinstance(d, PartialDelivery):
                def status(rcpt: str, err: SMTPError | None) -> None:
                    if err is not None:
                        errs[rcpt] = err

                try:
                    await d.body_non_atomic(status, header.copy(), body)
                except Exception as err:
                    for r in accepted:
                        errs.setdefault(r, err)
            else:
                try:
                    await d.body(header.copy(), body)
                except Exception as err:
                    for r in accepted:
                        errs[r] = err
            if all(r in errs for r in accepted):
                await _abort(d, log, meta.msg.id)
                return errs
            try:
                await d.commit()
            except Exception as err:
                for r in accepted:
                    errs[r] = err
            return errs
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(_abort(d, log, meta.msg.id))
            raise

    # -- DSNs -------------------------------------------------------------------------------

    async def _dsn(self, cfg: Config, meta: QueueMeta, header: Header, rcpts: list[str], *, action: str,
                   helo: str) -> None:
        """RFC 3464 report to the original sender through the bounce pipeline (spec §E)."""
        if cfg.bounce is None or meta.msg.original_from == "":
            return  # no bounce block: no DSNs; null sender: never (RFC 5321 §4.5.5)
        log = cfg.log
        dsn_id = new_msg_id()
        env = dsn.Envelope(f"<{dsn_id}@{cfg.autogen_domain}>", f"MAILER-DAEMON@{cfg.autogen_domain}",
                           meta.msg.original_from)
        mta = dsn.MTAInfo(
            reporting_mta=cfg.hostname,
            received_from_mta="" if meta.msg.dont_trace_sender else helo,
            x_sender=meta.mail_from,
            x_message_id=meta.msg.id,
            arrival=meta.first_attempt,
            last_attempt=meta.last_attempt,
        )
        infos = []
        for rcpt in rcpts:
            err = meta.rcpt_errs.get(rcpt) or RcptError(451, (4, 0, 0), "Internal server error")
            enh = err.enhanced if err.enhanced[0] else (err.code // 100, 0, 0)
            infos.append(dsn.RcptInfo(meta.msg.original_rcpts.get(rcpt) or rcpt, action, enh,
                                      dsn.Diagnostic(err.code, err.enhanced, err.message)))
        try:
            dsn_header, dsn_body = dsn.generate(meta.msg.smtputf8, env, mta, infos, header)
        except Exception as err:
            log.error("failed to generate fail DSN", err=err, msg_id=meta.msg.id)
            return
        dmeta = MsgMeta(id=dsn_id, smtputf8=meta.msg.smtputf8, requiretls=meta.msg.requiretls)
        log.msg("generated failed DSN" if action == dsn.FAILED else "generated delayed DSN", dsn_id=dsn_id,
                msg_id=meta.msg.id)
        try:
            d = await cfg.bounce.start_delivery(dmeta, "")
        except Exception as err:
            log.error("failed to enqueue DSN", err=err, dsn_id=dsn_id, msg_id=meta.msg.id)
            return
        try:
            await d.add_rcpt(meta.mail_from)
            await d.body(dsn_header, Body(dsn_body))
            await d.commit()
        except Exception as err:
            log.error("failed to enqueue DSN", err=err, dsn_id=dsn_id, msg_id=meta.msg.id)
            await _abort(d, log, dsn_id)

    # -- control channel --------------------------------------------------------------------

    async def handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        op, entry_id = req.get("op"), req.get("id")
        if entry_id is not None and not (isinstance(entry_id, str) and valid_id(entry_id)):
            return {"ok": False, "error": "bad id"}
        if op == "new":
            if not entry_id:
                return {"ok": False, "error": "an entry ID is required"}
            self.adopt(entry_id, str(req.get("helo") or ""))
            return {"ok": True}
        if op == "flush":
            return self.flush(entry_id)
        if op == "remove":
            if not entry_id:
                return {"ok": False, "error": "an entry ID is required"}
            return await self.remove(entry_id)
        return {"ok": False, "error": f"unknown operation {op!r}"}

    def flush(self, entry_id: str | None) -> dict[str, Any]:
        """Make entries due now (a running attempt is left to finish)."""
        if entry_id:
            e = self.entries.get(entry_id)
            if e is None:
                return {"ok": False, "error": "no such queue entry"}
            targets = [e]
        else:
            targets = list(self.entries.values())
        now = time.time()
        n = 0
        for e in targets:
            if not e.running:
                self._schedule(e, now)
            n += 1
        self.wake.set()
        return {"ok": True, "count": n}

    async def remove(self, entry_id: str) -> dict[str, Any]:
        """Drop an entry without a DSN; one in flight is removed when its attempt ends."""
        e = self.entries.get(entry_id)
        if e is None:
            return {"ok": False, "error": "no such queue entry"}
        if e.running:
            e.removed = True
            return {"ok": True, "count": 1, "in_flight": True}
        self._drop(e)
        await asyncio.to_thread(self.store.remove, entry_id)
        return {"ok": True, "count": 1}


# -- the process-wide registry ------------------------------------------------------------------

_ENGINES: dict[str, Engine] = {}


def _key(location: str) -> str:
    return os.path.realpath(location)


async def acquire(owner: object, location: str, runtime_dir: str, cfg: Config) -> Engine:
    """The engine of `location`, started on first use; `owner`'s settings become current."""
    key = _key(location)
    eng = _ENGINES.get(key)
    if eng is not None and not eng.stopping:
        eng.owners.append((owner, cfg))
        eng.wake.set()
        return eng
    eng = Engine(location, runtime_dir)
    eng.owners.append((owner, cfg))
    _ENGINES[key] = eng
    try:
        await eng.start()
    except BaseException:
        if _ENGINES.get(key) is eng:
            del _ENGINES[key]
        raise
    return eng


async def release(owner: object, timeout: float = SHUTDOWN_WAIT) -> None:
    """Drop `owner`; the previous owner's settings become current again; the last one stops it."""
    for key, eng in list(_ENGINES.items()):
        before = len(eng.owners)
        eng.owners = [(o, c) for o, c in eng.owners if o is not owner]
        if len(eng.owners) == before:
            continue
        if not eng.owners:
            if _ENGINES.get(key) is eng:
                del _ENGINES[key]
            await eng.shutdown(timeout)


def engine_for(location: str) -> Engine | None:
    return _ENGINES.get(_key(location))


__all__ = ["Config", "Engine", "acquire", "engine_for", "is_temporary", "release", "to_rcpt_error"]
