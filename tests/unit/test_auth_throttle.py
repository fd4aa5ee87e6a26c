"""The login throttle's arithmetic, driven by a fake clock (the e2e side is tests/e2e/test_auth_throttle.py)."""

from __future__ import annotations

from pymaddy.auth.throttle import MAX_KEYS, Policy, Throttle, _Table


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(**kw: float) -> tuple[Throttle, Clock]:
    clock = Clock()
    return Throttle(Policy(**kw), clock), clock  # type: ignore[arg-type]


def test_delays_begin_after_delay_after_and_double_up_to_the_cap() -> None:
    t, _ = make(delay_after=2, max_delay=1.5, ip_limit=0, user_limit=0)
    delays = [t.failed("192.0.2.1", "u") for _ in range(7)]
    assert delays == [0.0, 0.0, 0.25, 0.5, 1.0, 1.5, 1.5]


def test_ip_is_refused_at_its_limit_then_released_after_lockout() -> None:
    t, clock = make(ip_limit=3, user_limit=0, lockout=60, window=600)
    for i in range(3):
        assert t.refused("192.0.2.1", f"user{i}") is None
        t.failed("192.0.2.1", f"user{i}")
    assert t.refused("192.0.2.1", "anyone") == "too many failed logins from this address"
    assert t.refused("192.0.2.2", "anyone") is None
    clock.t += 61
    assert t.refused("192.0.2.1", "anyone") is None


def test_failures_outside_the_window_do_not_count() -> None:
    t, clock = make(ip_limit=3, user_limit=0, window=100)
    t.failed("192.0.2.1", "a")
    t.failed("192.0.2.1", "a")
    clock.t += 101
    t.failed("192.0.2.1", "a")
    assert t.refused("192.0.2.1", "a") is None


def test_username_lockout_spares_addresses_that_logged_in_as_that_user() -> None:
    t, _ = make(ip_limit=0, user_limit=3)
    t.succeeded("192.0.2.10", "Alice@example.org")
    for _ in range(3):
        t.failed("198.51.100.7", "alice@example.org")
    assert t.refused("198.51.100.7", "alice@example.org") == "too many failed logins for this username"
    assert t.refused("203.0.113.1", "ALICE@example.org") is not None
    assert t.refused("192.0.2.10", "alice@example.org") is None


def test_success_clears_the_counts() -> None:
    t, _ = make(delay_after=1, ip_limit=3, user_limit=3)
    t.failed("192.0.2.1", "a")
    t.failed("192.0.2.1", "a")
    t.succeeded("192.0.2.1", "a")
    assert t.failed("192.0.2.1", "a") == 0.0
    assert t.refused("192.0.2.1", "a") is None


def test_zero_limit_never_locks() -> None:
    t, _ = make(ip_limit=0, user_limit=0, max_delay=0)
    for _ in range(50):
        t.failed("192.0.2.1", "a")
    assert t.refused("192.0.2.1", "a") is None


def test_tables_stay_bounded() -> None:
    table = _Table(5, Policy())
    for i in range(MAX_KEYS + 10):
        table.fail(f"k{i}", 1.0)
    assert len(table.entries) == MAX_KEYS
    assert "k0" not in table.entries
