"""Password hashes as maddy's pass_table stores them: `ALGO:DATA`.

* `bcrypt:` the modular-crypt string, `$2a$COST$…` (Go writes `$2a$`; `$2b$`/`$2y$` verify too).
* `argon2:TIME:MEMORY_KiB:THREADS:b64(salt):b64(key)`: argon2id v1.3, 16-byte salt,
  64-byte key, standard base64 with padding.
* `sha256:b64(salt):b64(sha256(salt + password))`, 32-byte salt: maddy enables it only
  in its own tests; so do we (`enable_sha256()`).

Hashing and verifying are CPU-bound (bcrypt cost 10 is ~50 ms): async callers
use `verify_async` / `compute_async`, which run in a pool of their own, one
thread per CPU, at a lower scheduling priority (nice +10). So a login storm
neither queues the server's other worker-thread jobs (SQLite, fsync) behind
bcrypt nor takes the CPU from the event loop: sessions stay responsive while
logins wait their turn. Every comparison of derived keys is constant-time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import bcrypt as _bcrypt
from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw

HASH_SHA256 = "sha256"
HASH_BCRYPT = "bcrypt"
HASH_ARGON2 = "argon2"
DEFAULT_HASH = HASH_BCRYPT
# What `--hash` advertises (maddy lists sha256 although it cannot compute it outside tests).
HASHES = (HASH_SHA256, HASH_BCRYPT, HASH_ARGON2)

ARGON2_SALT = 16
ARGON2_SIZE = 64
ARGON2_VERSION = 0x13

BCRYPT_MIN_COST = 4
BCRYPT_MAX_COST = 31
BCRYPT_DEFAULT_COST = 10
BCRYPT_MAX_PASSWORD = 72


class HashError(ValueError):
    """A stored hash that cannot be used (malformed, unknown algorithm) or a hash that cannot be made."""


class HashMismatch(Exception):
    """The password does not match the stored hash."""


@dataclass(frozen=True)
class HashOpts:
    """Parameters for new hashes (stored with the hash, so verifying needs none)."""

    bcrypt_cost: int = BCRYPT_DEFAULT_COST
    argon2_time: int = 2
    argon2_memory: int = 1024
    argon2_threads: int = 1


# -- bcrypt -------------------------------------------------------------------------------------


def _compute_bcrypt(opts: HashOpts, password: str) -> str:
    pw = password.encode("utf-8")
    if len(pw) > BCRYPT_MAX_PASSWORD:
        raise HashError("bcrypt: password length exceeds 72 bytes")
    cost = opts.bcrypt_cost
    if cost < BCRYPT_MIN_COST:
        cost = BCRYPT_DEFAULT_COST  # as Go's bcrypt.GenerateFromPassword
    if cost > BCRYPT_MAX_COST:
        raise HashError(f"crypto/bcrypt: cost {cost} is outside allowed range ({BCRYPT_MIN_COST},{BCRYPT_MAX_COST})")
    return _bcrypt.hashpw(pw, _bcrypt.gensalt(cost, prefix=b"2a")).decode("ascii")


def _verify_bcrypt(password: str, data: str) -> None:
    try:
        hashed = data.encode("ascii")
    except UnicodeEncodeError:
        raise HashError("crypto/bcrypt: invalid hash") from None
    # Go's CompareHashAndPassword uses only the first 72 bytes of the password.
    pw = password.encode("utf-8")[:BCRYPT_MAX_PASSWORD]
    try:
        ok = _bcrypt.checkpw(pw, hashed)
    except ValueError as e:
        raise HashError(f"crypto/bcrypt: {e}") from None
    if not ok:
        raise HashMismatch("crypto/bcrypt: hashedPassword is not the hash of the given password")


# -- argon2id ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(s: str) -> bytes:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise HashError(f"pass_table: malformed hash string: {e}") from None


def argon2_key(password: bytes, salt: bytes, time: int, memory: int, threads: int) -> bytes:
    """argon2id, as golang.org/x/crypto/argon2.IDKey with maddy's 64-byte key."""
    try:
        return hash_secret_raw(
            password, salt, time_cost=time, memory_cost=memory, parallelism=threads,
            hash_len=ARGON2_SIZE, type=Type.ID, version=ARGON2_VERSION,
        )
    except HashingError as e:
        raise HashError(f"argon2: {e}") from None


def _compute_argon2(opts: HashOpts, password: str) -> str:
    if not (1 <= opts.argon2_threads <= 255):
        raise HashError("argon2: threads must be between 1 and 255")
    if opts.argon2_time < 1:
        raise HashError("argon2: time must be at least 1")
    salt = os.urandom(ARGON2_SALT)
    key = argon2_key(password.encode("utf-8"), salt, opts.argon2_time, opts.argon2_memory, opts.argon2_threads)
    return f"{opts.argon2_time}:{opts.argon2_memory}:{opts.argon2_threads}:{_b64(salt)}:{_b64(key)}"


def _parse_uint(s: str, bits: int) -> int:
    if not s or not s.isascii() or not s.isdigit():
        raise HashError(f'pass_table: malformed hash string: strconv.ParseUint: parsing "{s}": invalid syntax')
    v = int(s)
    if v >= 1 << bits:
        raise HashError(f'pass_table: malformed hash string: strconv.ParseUint: parsing "{s}": value out of range')
    return v


def parse_argon2(data: str) -> tuple[int, int, int, bytes, bytes]:
    """(time, memory KiB, threads, salt, key) of the DATA part of an `argon2:` hash."""
    parts = data.split(":", 4)
    if len(parts) != 5:
        raise HashError("pass_table: malformed hash string")
    time = _parse_uint(parts[0], 32)
    memory = _parse_uint(parts[1], 32)
    threads = _parse_uint(parts[2], 8)
    return time, memory, threads, _unb64(parts[3]), _unb64(parts[4])


def _verify_argon2(password: str, data: str) -> None:
    time, memory, threads, salt, want = parse_argon2(data)
    if time < 1 or threads < 1:
        raise HashError("pass_table: malformed hash string: zero time or threads")
    got = argon2_key(password.encode("utf-8"), salt, time, memory, threads)
    if not hmac.compare_digest(got, want):
        raise HashMismatch("pass_table: hash mismatch")


# -- sha256 (tests only) ---------------------------------------------------------------------------


def _compute_sha256(opts: HashOpts, password: str) -> str:
    salt = os.urandom(32)
    return _b64(salt) + ":" + _b64(hashlib.sha256(salt + password.encode("utf-8")).digest())


def _verify_sha256(password: str, data: str) -> None:
    parts = data.split(":")
    if len(parts) != 2:
        raise HashError("pass_table: malformed hash string, no salt")
    salt, want = _unb64(parts[0]), _unb64(parts[1])
    if not hmac.compare_digest(hashlib.sha256(salt + password.encode("utf-8")).digest(), want):
        raise HashMismatch("pass_table: hash mismatch")


ComputeFunc = Callable[[HashOpts, str], str]
VerifyFunc = Callable[[str, str], None]

COMPUTE: dict[str, ComputeFunc] = {HASH_BCRYPT: _compute_bcrypt, HASH_ARGON2: _compute_argon2}
VERIFY: dict[str, VerifyFunc] = {HASH_BCRYPT: _verify_bcrypt, HASH_ARGON2: _verify_argon2}


def enable_sha256() -> None:
    """Register the sha256 scheme (maddy does so only in its tests)."""
    COMPUTE[HASH_SHA256] = _compute_sha256
    VERIFY[HASH_SHA256] = _verify_sha256


# -- API ------------------------------------------------------------------------------------------


def compute(algo: str, password: str, opts: HashOpts | None = None) -> str:
    """`ALGO:DATA` for a new password; HashError for an unknown algorithm or bad options."""
    fn = COMPUTE.get(algo)
    if fn is None:
        raise HashError(f"unknown hash function: {algo}")
    return algo + ":" + fn(opts or HashOpts(), password)


def verify(password: str, stored: str) -> None:
    """Return when `password` matches `stored` (`ALGO:DATA`); HashMismatch when it does not,
    HashError when `stored` is unusable (no tag, unknown algorithm, malformed)."""
    algo, sep, data = stored.partition(":")
    if not sep:
        raise HashError("no hash tag")
    fn = VERIFY.get(algo)
    if fn is None:
        raise HashError(f"unknown hash: {algo}")
    fn(password, data)


def check(password: str, stored: str) -> bool:
    """True when `password` matches; False for a mismatch or an unusable hash."""
    try:
        verify(password, stored)
    except (HashMismatch, HashError):
        return False
    return True


HASH_NICE = 10
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _lower_priority() -> None:
    # Linux schedules threads as tasks, so a thread can lower its own priority (never raise it back).
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICE)


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="hash",
                                       initializer=_lower_priority)
        return _pool


def _reset_pool() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_reset_pool)


async def verify_async(password: str, stored: str) -> None:
    await asyncio.get_running_loop().run_in_executor(_hash_pool(), verify, password, stored)


async def compute_async(algo: str, password: str, opts: HashOpts | None = None) -> str:
    return await asyncio.get_running_loop().run_in_executor(_hash_pool(), compute, algo, password, opts)


__all__ = [
    "ARGON2_SALT",
    "ARGON2_SIZE",
    "BCRYPT_DEFAULT_COST",
    "BCRYPT_MAX_COST",
    "BCRYPT_MIN_COST",
    "COMPUTE",
    "DEFAULT_HASH",
    "HASHES",
    "VERIFY",
    "HashError",
    "HashMismatch",
    "HashOpts",
    "argon2_key",
    "check",
    "compute",
    "compute_async",
    "enable_sha256",
    "parse_argon2",
    "verify",
    "verify_async",
]
