"""Brute-force resistance for password logins (a pymaddy extension; maddy leaves this to fail2ban).

Failures are counted per client IP and per username within a sliding window.
After `delay_after` failures, each further failure is answered only after a
growing delay (doubling, capped at `max_delay`), which slows a guesser without
hurting a user who mistypes once or twice. Once a key reaches its limit,
logins are refused for `lockout` without asking the provider at all, so a
dictionary attack also stops costing bcrypt time.

Invariants:
- A username lockout never locks out an address that logged in successfully
  as that user within `window`: otherwise anyone could lock a user out of
  their own mailbox by guessing from elsewhere.
- A successful login clears its IP's and username's failure counts.
- Memory is bounded: at most `MAX_KEYS` keys per table; the oldest go first.

The state is process-wide per policy (`throttle_for`), so a config reload
does not hand a guesser a fresh budget.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pymaddy.mail.errors import AuthTemporaryError

__all__ = ["Policy", "Throttle", "Throttled", "guarded", "throttle_for"]

MAX_KEYS = 100_000


class Throttled(AuthTemporaryError):
    """Refused without checking the password: too many recent failures."""


@dataclass(frozen=True)
class Policy:
    """The `auth_throttle` settings; defaults are the documented defaults."""

    delay_after: int = 3  # failures answered at once before delays begin
    max_delay: float = 4.0  # seconds
    ip_limit: int = 10  # failures per IP within `window` before the IP is refused
    user_limit: int = 10  # failures per username within `window` before the name is refused
    window: float = 900.0
    lockout: float = 900.0


@dataclass
class _Entry:
    failures: list[float] = field(default_factory=list)  # monotonic times within the window
    locked_until: float = 0.0


class _Table:
    def __init__(self, limit: int, policy: Policy) -> None:
        self.limit = limit
        self.p = policy
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def _get(self, key: str, now: float) -> _Entry | None:
        e = self.entries.get(key)
        if e is None:
            return None
        cutoff = now - self.p.window
        if e.failures and e.failures[0] < cutoff:
            e.failures = [t for t in e.failures if t >= cutoff]
        if not e.failures and e.locked_until <= now:
            del self.entries[key]
            return None
        return e

    def locked(self, key: str, now: float) -> bool:
        e = self._get(key, now)
        return e is not None and e.locked_until > now

    def fail(self, key: str, now: float) -> int:
        e = self._get(key, now)
        if e is None:
            e = self.entries[key] = _Entry()
            if len(self.entries) > MAX_KEYS:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        e.failures.append(now)
        if self.limit > 0 and len(e.failures) >= self.limit:
            e.locked_until = now + self.p.lockout
        return len(e.failures)

    def clear(self, key: str) -> None:
        self.entries.pop(key, None)

    def export(self) -> list[list[Any]]:
        return [[k, e.failures, e.locked_until] for k, e in self.entries.items()]

    def merge(self, rows: list[Any]) -> None:
        """Entries from another process (time.monotonic() is one clock for the whole machine)."""
        for row in rows:
            key, failures, until = str(row[0]), [float(t) for t in row[1]], float(row[2])
            e = self.entries.get(key)
            if e is None:
                e = self.entries[key] = _Entry()
            e.failures = sorted(set(e.failures) | set(failures))
            e.locked_until = max(e.locked_until, until)
        while len(self.entries) > MAX_KEYS:
            self.entries.popitem(last=False)


class Throttle:
    """Counts login failures and says how long to wait or whether to refuse."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._now = clock
        self._ips = _Table(policy.ip_limit, policy)
        self._users = _Table(policy.user_limit, policy)
        # username → IPs that logged in as it recently (exempt from that name's lockout)
        self._good: OrderedDict[str, dict[str, float]] = OrderedDict()

    @staticmethod
    def _user_key(username: str) -> str:
        return username.strip().lower()

    def refused(self, ip: str, username: str) -> str | None:
        """Why a login from `ip` as `username` is refused without a password check, or None."""
        now = self._now()
        if ip and self._ips.locked(ip, now):
            return "too many failed logins from this address"
        user = self._user_key(username)
        if user and self._users.locked(user, now):
            good = self._good.get(user)
            if not good or good.get(ip, 0.0) < now - self.policy.window:
                return "too many failed logins for this username"
        return None

    def failed(self, ip: str, username: str) -> float:
        """Record a failure; the delay (seconds) to wait before answering it."""
        _share(self, "fail", ip, username)
        return self._failed(ip, username)

    def _failed(self, ip: str, username: str) -> float:
        now = self._now()
        n = self._ips.fail(ip, now) if ip else 0
        user = self._user_key(username)
        if user:
            n = max(n, self._users.fail(user, now))
        over = n - self.policy.delay_after
        if over <= 0:
            return 0.0
        return float(min(self.policy.max_delay, 0.25 * (2 ** min(over - 1, 16))))

    def succeeded(self, ip: str, username: str) -> None:
        _share(self, "ok", ip, username)
        self._succeeded(ip, username)

    def _succeeded(self, ip: str, username: str) -> None:
        now = self._now()
        user = self._user_key(username)
        if ip:
            self._ips.clear(ip)
        if user:
            self._users.clear(user)
            good = self._good.setdefault(user, {})
            self._good.move_to_end(user)
            if ip:
                good[ip] = now
            if len(good) > 64:
                del good[min(good, key=good.__getitem__)]
            if len(self._good) > MAX_KEYS:
                self._good.popitem(last=False)


_throttles: dict[Policy, Throttle] = {}


# With worker processes (runtime/workers.py) every process counts every failure: each tells
# the others through the peer bus, so spreading attempts over processes gains nothing.
def _policy_key(policy: Policy) -> str:
    return repr(policy)


def _share(t: Throttle, event: str, ip: str, username: str) -> None:
    if _bus_publish is not None:
        _bus_publish("auth_throttle", {"k": _policy_key(t.policy), "e": event, "ip": ip, "u": username})


def _on_peer_event(p: dict[str, Any]) -> None:
    for policy, t in _throttles.items():
        if _policy_key(policy) == p.get("k"):
            ip, user = str(p.get("ip") or ""), str(p.get("u") or "")
            if p.get("e") == "fail":
                t._failed(ip, user)
            elif p.get("e") == "ok":
                t._succeeded(ip, user)


STATE_CHUNK = 20  # keys per state line (the bus reads lines of at most 4 KiB)


def _state_lines(t: Throttle) -> list[dict[str, Any]]:
    key = _policy_key(t.policy)
    out: list[dict[str, Any]] = []
    for name, rows in (("ips", t._ips.export()), ("users", t._users.export()),
                       ("good", [[u, list(g.items())] for u, g in t._good.items()])):
        for i in range(0, len(rows), STATE_CHUNK):
            out.append({"k": key, name: rows[i : i + STATE_CHUNK]})
    return out


def _on_peer_state(p: dict[str, Any]) -> None:
    for policy, t in _throttles.items():
        if _policy_key(policy) != p.get("k"):
            continue
        t._ips.merge(p.get("ips") or [])
        t._users.merge(p.get("users") or [])
        for user, ips in p.get("good") or []:
            good = t._good.setdefault(str(user), {})
            for ip, when in ips:
                good[str(ip)] = max(good.get(str(ip), 0.0), float(when))


_bus_publish: Callable[[str, dict[str, Any]], None] | None = None


def join_peer_bus(hand_over: bool = False) -> None:
    """Called once a process has joined runtime.peerbus (kept out of import time: check-config
    imports this module for Policy and must not pull asyncio in). With `hand_over` (the
    supervisor, which outlives workers), a process that joins later gets the current counts,
    so a lockout survives the workers a reload replaces."""
    global _bus_publish
    from pymaddy.runtime import peerbus

    peerbus.subscribe("auth_throttle", _on_peer_event)
    peerbus.subscribe("auth_throttle_state", _on_peer_state)
    if hand_over:
        peerbus.on_join(_hand_over)
    _bus_publish = peerbus.publish


def _hand_over(pid: int) -> None:
    from pymaddy.runtime import peerbus

    peerbus.send_bulk(pid, "auth_throttle_state", [line for t in _throttles.values() for line in _state_lines(t)])


def throttle_for(policy: Policy | None) -> Throttle | None:
    """The process-wide throttle for `policy` (None: throttling is off)."""
    if policy is None:
        return None
    t = _throttles.get(policy)
    if t is None:
        t = _throttles[policy] = Throttle(policy)
    return t


async def guarded(
    throttle: Throttle | None, ip: str, username: str, check: Callable[[], Awaitable[Exception | None]]
) -> Exception | None:
    """Run one password check under `throttle`: refuse locked-out clients without calling
    `check`, delay the answer to repeated failures, clear the counts on success.

    Temporary failures (the directory is down) are not the client's fault and are not counted.
    """
    if throttle is None:
        return await check()
    why = throttle.refused(ip, username)
    if why is not None:
        return Throttled(why)
    err = await check()
    if err is None:
        throttle.succeeded(ip, username)
    elif not isinstance(err, AuthTemporaryError):
        delay = throttle.failed(ip, username)
        if delay > 0:
            import asyncio  # here, not at the top: check-config imports this module for Policy

            await asyncio.sleep(delay)
    return err
