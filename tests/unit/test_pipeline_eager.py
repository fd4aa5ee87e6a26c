"""`gather_eager`: checks that finish without waiting cost no task; the ones that wait still
overlap, and errors and cancellation behave as with asyncio.gather."""

from __future__ import annotations

import asyncio

import pytest

from pymaddy.pipeline.runner import gather_eager


async def ready(v: int) -> int:
    return v


async def waits(v: int, gate: asyncio.Event, started: list[int]) -> int:
    started.append(v)
    await gate.wait()
    return v


async def fails_now() -> int:
    raise ValueError("at once")


async def fails_later(gate: asyncio.Event) -> int:
    await gate.wait()
    raise KeyError("later")


def test_ready_coroutines_run_without_tasks() -> None:
    async def main() -> None:
        before = len(asyncio.all_tasks())
        seen: list[int] = []

        async def count(v: int) -> int:
            seen.append(len(asyncio.all_tasks()))
            return v

        assert await gather_eager([count(1), ready(2), count(3)]) == [1, 2, 3]
        assert seen == [before, before]  # no task was created for them

    asyncio.run(main())


def test_waiting_coroutines_overlap_and_keep_their_order() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        started: list[int] = []

        async def opener() -> int:
            # runs only once both waiters are parked: they were started together
            while len(started) < 2:
                await asyncio.sleep(0)
            gate.set()
            return 0

        res = await gather_eager([waits(1, gate, started), ready(2), waits(3, gate, started), opener()])
        assert res == [1, 2, 3, 0]
        assert started == [1, 3]

    asyncio.run(main())


def test_a_sleeping_coroutine_is_resumed_correctly() -> None:
    async def steps() -> list[int]:
        out = []
        for i in range(3):
            await asyncio.sleep(0)  # a bare yield to the loop, not a future
            out.append(i)
        return out

    assert asyncio.run(gather_eager([steps(), steps()])) == [[0, 1, 2], [0, 1, 2]]


def test_first_error_is_raised_and_the_others_still_run() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        started: list[int] = []
        with pytest.raises(ValueError, match="at once"):
            await gather_eager([waits(1, gate, started), fails_now()])
        assert started == [1]
        gate.set()
        await asyncio.sleep(0.01)
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

        gate2 = asyncio.Event()
        gate2.set()
        with pytest.raises(KeyError):
            await gather_eager([fails_later(gate2), ready(1)])

    asyncio.run(main())


def test_cancelling_the_caller_cancels_the_waiting_ones() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        started: list[int] = []
        outer = asyncio.create_task(gather_eager([waits(1, gate, started), waits(2, gate, started)]))
        while len(started) < 2:
            await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        await asyncio.sleep(0)
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    asyncio.run(main())


def test_a_cancellation_raised_at_once_closes_the_rest() -> None:
    async def cancels() -> int:
        raise asyncio.CancelledError

    async def main() -> None:
        gate = asyncio.Event()
        started: list[int] = []
        with pytest.raises(asyncio.CancelledError):
            await gather_eager([waits(1, gate, started), cancels(), waits(2, gate, started)])
        assert started == [1]  # the third never ran, and was closed (no "never awaited" warning)
        await asyncio.sleep(0)
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    asyncio.run(main())
