"""The retry schedule of target.queue (spec §E, maddy issue #678: the power is truncated)."""

from __future__ import annotations

import math

import pytest

from pymaddy.queue.schedule import MAX_DELAY, NO_TRIES, next_attempt, retry_at, retry_delay, smallest_tries

# spec §E: failed attempts n → next delay in minutes with the defaults (15m, 1.25)
TABLE = [15, 15, 15, 15, 30, 45, 45, 60, 75, 105, 135, 165, 210, 270, 330, 420, 525, 660, 825]


@pytest.mark.parametrize(("n", "minutes"), list(enumerate(TABLE, start=1)))
def test_default_schedule_matches_maddy(n: int, minutes: int) -> None:
    assert retry_delay(n, 900.0, 1.25) == minutes * 60


def test_whole_schedule_spans_about_66_hours() -> None:
    # attempt 1 at t=0, attempt 20 after the 19 delays
    assert sum(TABLE) * 60 / 3600 == pytest.approx(66.0, abs=0.5)


def test_scale_one_keeps_the_initial_delay() -> None:
    assert [retry_delay(n, 1.0, 1.0) for n in (1, 5, 50)] == [1.0, 1.0, 1.0]


def test_smallest_tries_count_decides() -> None:
    assert smallest_tries({"a": 3, "b": 1, "c": 7}) == 1
    assert smallest_tries({"a": 3, "b": 1}, ["a"]) == 3
    assert smallest_tries({}) == NO_TRIES


def test_loaded_entry_is_due_after_last_attempt_plus_delay() -> None:
    assert next_attempt(1000.0, {"a": 5, "b": 9}, 900.0, 1.25) == 1000.0 + 30 * 60


def test_never_tried_entry_is_due_at_once() -> None:
    # Go: time.Duration(+Inf) does not fit, the product wraps: the entry is due at once
    assert next_attempt(1000.0, {}, 900.0, 1.25) == 1000.0
    assert math.isinf(retry_delay(NO_TRIES, 900.0, 1.25))


def test_overflowing_power_is_capped_for_retries() -> None:
    assert retry_at(0.0, 10_000, 900.0, 1.25) == MAX_DELAY
