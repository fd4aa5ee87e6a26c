"""When a queued message is tried again (spec §E).

maddy computes `initial * time.Duration(scale ** (n - 1))`: the power is
converted to an integer *before* the multiplication (issue #678), so the
delay grows in whole multiples of `initial` and stays flat at first
(15, 15, 15, 15, 30, 45, … minutes with the defaults). Kept exactly, so a
queue moved between maddy and pymaddy is retried on the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

NO_TRIES = 999999  # maddy's "smallest tries count" start value when no recipient is pending
MAX_DELAY = 30 * 86400.0  # beyond maddy: a power too big for Go's int64 would retry at once there


def retry_delay(failed_attempts: int, initial: float, scale: float) -> float:
    """Seconds to wait after the `failed_attempts`-th failed attempt (n >= 1)."""
    try:
        factor = math.pow(scale, failed_attempts - 1)
    except OverflowError:
        factor = math.inf
    if math.isnan(factor) or factor >= 2**63:
        return math.inf  # does not fit Go's int64 Duration; callers decide (see below)
    return initial * math.trunc(factor)


def smallest_tries(tries: dict[str, int], rcpts: Iterable[str] | None = None) -> int:
    """The smallest TriesCount among `rcpts` (all recorded ones when None): the retry delay follows
    the recipient that failed least often."""
    keys = tries.keys() if rcpts is None else [r for r in rcpts if r in tries]
    return min((tries[k] for k in keys), default=NO_TRIES)


def next_attempt(last_attempt: float, tries: dict[str, int], initial: float, scale: float) -> float:
    """Unix time of the next attempt of an entry loaded from disk (maddy's readDiskQueue formula).

    An entry never tried (no TriesCount) makes the power overflow; Go's conversion then yields a
    zero (or negative) delay, so such an entry is due at once — and the caller's post_init_delay
    applies."""
    delay = retry_delay(smallest_tries(tries), initial, scale)
    return last_attempt + (0.0 if math.isinf(delay) else delay)


def retry_at(now: float, failed_attempts: int, initial: float, scale: float) -> float:
    """Unix time of the retry after an attempt at `now` that left the smallest TriesCount at
    `failed_attempts`."""
    return now + min(retry_delay(failed_attempts, initial, scale), MAX_DELAY)
