"""`auth.external`, `auth.pam`, `auth.shadow` (maddy's internal/auth/{external,pam,shadow}).

All three can run a helper program with maddy's protocol: the helper reads
`USERNAME\\n` and `PASSWORD\\n` on stdin and exits 0 (accepted), 1 (refused)
or anything else (error: a temporary failure, 454 over SMTP). The helper runs
as an asyncio subprocess with a timeout, never blocking the event loop.

- `auth.external`: `helper PATH` (default LIBEXEC/maddy-auth-helper; must exist
  at start) and the domain rules of `perdomain`/`domains` (maddy's
  auth.CheckDomainAuth, see `check_domain_auth`).
- `auth.pam`: PAM service `maddy` (/etc/pam.d/maddy) through libpam (ctypes, in a
  worker thread), or with `use_helper` through LIBEXEC/maddy-pam-helper.
  pymaddy drops root before modules start, and Linux-PAM's unix_chkpwd only
  checks the caller's own password, so pam_unix needs the server user in the
  `shadow` group (as for Dovecot); start-up warns when /etc/shadow is unreadable.
- `auth.shadow`: with `use_helper`, LIBEXEC/maddy-shadow-helper; without, it
  reads /etc/shadow itself, which works only when the server user may read it
  (member of group `shadow`, or root kept with PYMADDY_ALLOW_ROOT=1); otherwise
  start-up fails naming `use_helper`. Hashes are verified by the system's
  libcrypt (yescrypt, sha512-crypt, …; maddy knows only sha256/sha512-crypt).

pymaddy ships no helper: one must be installed setgid shadow or with
CAP_DAC_READ_SEARCH, which a Python script cannot be. maddy's
maddy-pam-helper and maddy-shadow-helper binaries work unchanged.
Helpers run at most HELPER_CONCURRENCY at a time per module.

Deliberate differences from maddy:
- `auth.pam` with `use_helper` only runs the helper (maddy then also calls
  libpam, which fails in builds without libpam);
- without `perdomain`, a username with more than one `@` is refused (maddy
  takes the part before the first `@` and skips the domain check);
- a username or password containing LF or NUL is refused before any helper
  or library sees it (LF would shift the helper's lines);
- PAM results meaning "this account may not log in" (expired, denied, new
  password required) are refusals, not errors.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pymaddy.auth import privhelper
from pymaddy.auth.base import PlainAuth
from pymaddy.mail.errors import AuthError, AuthTemporaryError
from pymaddy.runtime.module import Module, ModuleError

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

__all__ = ["ExternalAuth", "PAMAuth", "ShadowAuth", "check_domain_auth", "run_helper"]

HELPER_TIMEOUT = 30.0
HELPER_CONCURRENCY = 16  # helper processes at once per module; further checks wait their turn
MAX_STDERR = 4096
PAM_SERVICE = "maddy"
SHADOW_FILE = "/etc/shadow"


def _libexec(ctx: RuntimeContext) -> str:
    return str(getattr(ctx.options, "libexec", "") or "/usr/lib/maddy")


def _bad_chars(*values: str) -> bool:
    return any("\n" in v or "\x00" in v for v in values)


# -- the helper protocol -----------------------------------------------------------------------


async def run_helper(
    path: str, username: str, password: str, timeout: float = HELPER_TIMEOUT, slots: asyncio.Semaphore | None = None
) -> None:
    """maddy's AuthUsingHelper: None when accepted, AuthError on exit 1, AuthTemporaryError otherwise.

    `slots` bounds how many helpers run at once (a login flood must not fork without limit)."""
    if _bad_chars(username, password):
        raise AuthError("helperauth: LF or NUL in credentials")
    if slots is not None:
        async with slots:
            await _run_helper(path, username, password, timeout)
    else:
        await _run_helper(path, username, password, timeout)


async def _run_helper(path: str, username: str, password: str, timeout: float) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        raise AuthTemporaryError(f"helperauth: process start: {e.strerror or e}") from None
    try:
        _, err = await asyncio.wait_for(
            proc.communicate((username + "\n" + password + "\n").encode("utf-8")), timeout
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AuthTemporaryError(f"helperauth: {path} did not answer within {timeout:g}s") from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    code = proc.returncode
    if code == 0:
        return
    if code == 1:
        raise AuthError("helperauth: invalid credentials")
    detail = err[:MAX_STDERR].decode("utf-8", "replace").strip()
    status = f"exit status {code}" if code is not None and code >= 0 else f"signal {-(code or 0)}"
    raise AuthTemporaryError(f"helperauth: {status}" + (f": {detail}" if detail else ""))


def _require_helper(path: str, message: str) -> None:
    try:
        os.stat(path)
    except OSError:
        raise ModuleError(message) from None


# -- auth.external -----------------------------------------------------------------------------


def check_domain_auth(username: str, perdomain: bool, domains: list[str] | None) -> str | None:
    """maddy's auth.CheckDomainAuth: the account name to check, or None when the login is refused.

    perdomain: the full `local@domain` is kept and its domain must be listed.
    Otherwise the domain is stripped; a domain that is present must be listed
    (without `domains`, only bare usernames pass). Domains compare case-insensitively.
    """
    parts = username.split("@")
    if perdomain:
        if len(parts) != 2:
            return None
        account, domain = username, parts[1]
    else:
        if len(parts) > 2:
            return None  # maddy: parts[0], unchecked (see the module docstring)
        account, domain = parts[0], (parts[1] if len(parts) == 2 else "")
    if domain == "":
        return account
    if domains is None:
        return None
    folded = domain.casefold()
    return account if any(folded == d.casefold() for d in domains) else None


class ExternalAuth(Module, PlainAuth):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.perdomain = bool(self.settings.get("perdomain"))
        domains = self.settings.get("domains")
        self.domains: list[str] | None = list(domains) if domains is not None else None
        self.helper = str(self.settings.get("helper") or "") or os.path.join(_libexec(ctx), "maddy-auth-helper")
        self.slots: asyncio.Semaphore | None = None

    def log_name(self) -> str:
        return "auth.external"

    async def start(self) -> None:
        _require_helper(self.helper, f"auth.external: {self.helper} doesn't exist")
        self.slots = asyncio.Semaphore(HELPER_CONCURRENCY)
        self.log.debug("using helper", path=self.helper)

    async def auth_plain(self, username: str, password: str) -> None:
        account = check_domain_auth(username, self.perdomain, self.domains)
        if account is None:
            raise AuthError("auth.external: domain not allowed")
        await run_helper(self.helper, account, password, slots=self.slots)


# -- auth.pam ----------------------------------------------------------------------------------

# <security/_pam_types.h>
PAM_SUCCESS = 0
PAM_PROMPT_ECHO_OFF = 1
PAM_PROMPT_ECHO_ON = 2
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001
PAM_CONV_ERR = 19
PAM_AUTHINFO_UNAVAIL = 9
# Linux-PAM's unix_chkpwd only checks the calling user's own password, so pam_unix in an
# unprivileged server needs /etc/shadow itself.
_SHADOW_HINT = (
    "/etc/shadow is not readable by uid {uid}, so pam_unix cannot check passwords: "
    "add the server user to the `shadow` group or set `use_helper yes` (maddy-pam-helper)"
)
PAM_BUF_ERR = 5
# Results that say "not this user/password": refusals. Everything else is an error.
PAM_REFUSALS = {
    6: "permission denied",  # PAM_PERM_DENIED
    7: "authentication failure",  # PAM_AUTH_ERR
    8: "insufficient credentials",  # PAM_CRED_INSUFFICIENT
    10: "user unknown",  # PAM_USER_UNKNOWN
    11: "maximum tries exceeded",  # PAM_MAXTRIES
    12: "new password required",  # PAM_NEW_AUTHTOK_REQD
    13: "account expired",  # PAM_ACCT_EXPIRED
    27: "password expired",  # PAM_AUTHTOK_EXPIRED
}


class _PamMessage(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _PamResponse(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


_CONV_FUNC = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_PamMessage)),
    ctypes.POINTER(ctypes.POINTER(_PamResponse)),
    ctypes.c_void_p,
)


class _PamConv(ctypes.Structure):
    _fields_ = [("conv", _CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


@dataclass
class _Libpam:
    pam: Any
    libc: Any


_libpam: _Libpam | None = None
_libpam_lock = threading.Lock()


def _load_libpam() -> _Libpam:
    global _libpam
    with _libpam_lock:
        if _libpam is None:
            name = ctypes.util.find_library("pam") or "libpam.so.0"
            pam = ctypes.CDLL(name)
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            pam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_PamConv), ctypes.c_void_p]
            pam.pam_start.restype = ctypes.c_int
            for fn in (pam.pam_authenticate, pam.pam_acct_mgmt, pam.pam_end):
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int]
                fn.restype = ctypes.c_int
            pam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
            pam.pam_strerror.restype = ctypes.c_char_p
            libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
            libc.calloc.restype = ctypes.c_void_p
            libc.strdup.argtypes = [ctypes.c_char_p]
            libc.strdup.restype = ctypes.c_void_p
            libc.free.argtypes = [ctypes.c_void_p]
            _libpam = _Libpam(pam, libc)
        return _libpam


def pam_check(username: str, password: str, service: str = PAM_SERVICE) -> tuple[int, str]:
    """pam_authenticate then pam_acct_mgmt (blocking: call it in a thread); (status, message)."""
    lib = _load_libpam()
    secret = password.encode("utf-8")

    def conv(n: int, msgs: Any, resp: Any, _data: Any) -> int:
        # Answer every password prompt with the password; PAM frees what we allocate (libc).
        if n <= 0:
            return PAM_CONV_ERR
        arr = lib.libc.calloc(n, ctypes.sizeof(_PamResponse))
        if not arr:
            return PAM_BUF_ERR
        replies = ctypes.cast(arr, ctypes.POINTER(_PamResponse))
        for i in range(n):
            if msgs[i].contents.msg_style in (PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON):
                replies[i].resp = lib.libc.strdup(secret)
        resp[0] = replies
        return PAM_SUCCESS

    callback = _CONV_FUNC(conv)
    pconv = _PamConv(callback, None)
    handle = ctypes.c_void_p()
    status = lib.pam.pam_start(service.encode(), username.encode("utf-8"), ctypes.byref(pconv), ctypes.byref(handle))
    if status != PAM_SUCCESS:
        return status, "pam_start: " + _pam_err(lib, None, status)
    step = "pam_authenticate"
    try:
        status = lib.pam.pam_authenticate(handle, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
        if status == PAM_SUCCESS:
            step = "pam_acct_mgmt"
            status = lib.pam.pam_acct_mgmt(handle, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
        message = f"{step}: {_pam_err(lib, handle, status)}" if status != PAM_SUCCESS else ""
    finally:
        lib.pam.pam_end(handle, status)
    return status, message


def _pam_err(lib: _Libpam, handle: Any, status: int) -> str:
    s = lib.pam.pam_strerror(handle, status)
    return s.decode("utf-8", "replace") if s else f"error {status}"


def _priv_verdict(name: str, reply: dict[str, Any]) -> None:
    """The privileged helper's answer as the provider's outcome."""
    if reply.get("ok") is True:
        return
    reason = str(reply.get("reason") or "refused")
    if reply.get("temporary"):
        raise AuthTemporaryError(f"{name}: {reason}")
    raise AuthError(f"{name}: {reason}")


class PAMAuth(Module, PlainAuth):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.use_helper = bool(self.settings.get("use_helper"))
        self.helper = os.path.join(_libexec(ctx), "maddy-pam-helper")
        self.slots: asyncio.Semaphore | None = None
        self.priv: privhelper.PrivHelperClient | None = None

    def log_name(self) -> str:
        return "pam"

    async def start(self) -> None:
        if self.use_helper:
            _require_helper(self.helper, f"pam: no helper binary (maddy-pam-helper) found in {_libexec(self.ctx)}")
            self.slots = asyncio.Semaphore(HELPER_CONCURRENCY)
            return
        self.priv = privhelper.client()
        if self.priv is not None:
            self.log.debug("PAM runs in the privileged password helper")
            return
        try:
            await asyncio.to_thread(_load_libpam)
        except OSError as e:
            raise ModuleError(f"pam: cannot load libpam ({e}); install libpam0g or set use_helper") from None
        if not os.access(SHADOW_FILE, os.R_OK):
            # Not fatal: the PAM stack may not use pam_unix at all (LDAP, sssd, …).
            self.log.printf(_SHADOW_HINT.format(uid=os.geteuid()))

    async def auth_plain(self, username: str, password: str) -> None:
        if self.use_helper:
            await run_helper(self.helper, username, password, slots=self.slots)
            return
        if _bad_chars(username, password):
            raise AuthError("pam: LF or NUL in credentials")
        if self.priv is not None:
            _priv_verdict("pam", await self.priv.check("pam", username, password, PAM_SERVICE))
            return
        status, message = await asyncio.to_thread(pam_check, username, password)
        if status == PAM_SUCCESS:
            return
        if status in PAM_REFUSALS:
            raise AuthError(f"pam: invalid credentials or unknown user ({message})")
        if status == PAM_AUTHINFO_UNAVAIL and not os.access(SHADOW_FILE, os.R_OK):
            message += " (" + _SHADOW_HINT.format(uid=os.geteuid()) + ")"
        self.log.error("PAM error", err=message, username=username)
        raise AuthTemporaryError(f"pam: {message}")


# -- auth.shadow -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowEntry:
    """One /etc/shadow line (shadow(5)); -1 for an empty numeric field."""

    name: str
    hash: str
    last_change: int
    max_age: int
    inactivity: int
    expiry: int

    def account_valid(self, today: int) -> bool:
        return self.expiry == -1 or today < self.expiry

    def password_valid(self, today: int) -> bool:
        if -1 in (self.last_change, self.max_age, self.inactivity):
            return True
        return today < self.last_change + self.max_age + self.inactivity


def parse_shadow_line(line: str) -> ShadowEntry | None:
    parts = line.rstrip("\n").split(":")
    if len(parts) != 9:
        return None
    nums: list[int] = []
    for f in (parts[2], parts[4], parts[6], parts[7]):
        if f == "":
            nums.append(-1)
        elif f.lstrip("-").isdigit():
            nums.append(int(f))
        else:
            return None
    return ShadowEntry(parts[0], parts[1], *nums)


def shadow_lookup(username: str, path: str = SHADOW_FILE) -> ShadowEntry | None:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.split(":", 1)[0] == username:
                return parse_shadow_line(line)
    return None


_crypt_lock = threading.Lock()
_libcrypt: Any = None


def crypt_hash(password: str, setting: str) -> str | None:
    """crypt(3) from the system's libcrypt; None for an unsupported or invalid setting."""
    global _libcrypt
    with _crypt_lock:  # crypt() returns a static buffer
        if _libcrypt is None:
            lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
            lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            lib.crypt.restype = ctypes.c_char_p
            _libcrypt = lib
        out = _libcrypt.crypt(password.encode("utf-8"), setting.encode("utf-8"))
    if not out or out.startswith(b"*"):
        return None
    return str(out.decode("utf-8", "replace"))


def shadow_verify(username: str, password: str, path: str = SHADOW_FILE) -> str | None:
    """None when the password is right; else the refusal reason. OSError when unreadable."""
    ent = shadow_lookup(username, path)
    if ent is None:
        return "no such user"
    today = int(time.time() // 86400)
    if not ent.account_valid(today):
        return "account is expired"
    if not ent.password_valid(today):
        return "password is expired"
    if ent.hash == "":
        return "null password"
    if ent.hash[0] in "!*":
        return "locked password"
    computed = crypt_hash(password, ent.hash)
    if computed is None:
        return "unsupported password hash"
    if not hmac.compare_digest(computed.encode(), ent.hash.encode()):
        return "wrong password"
    return None


class ShadowAuth(Module, PlainAuth):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.use_helper = bool(self.settings.get("use_helper"))
        self.helper = os.path.join(_libexec(ctx), "maddy-shadow-helper")
        self.slots: asyncio.Semaphore | None = None
        self.priv: privhelper.PrivHelperClient | None = None

    def log_name(self) -> str:
        return "shadow"

    async def start(self) -> None:
        if self.use_helper:
            _require_helper(
                self.helper, f"shadow: no helper binary (maddy-shadow-helper) found in {_libexec(self.ctx)}"
            )
            self.slots = asyncio.Semaphore(HELPER_CONCURRENCY)
            return
        self.priv = privhelper.client()
        if self.priv is not None:
            self.log.debug(f"{SHADOW_FILE} is read by the privileged password helper")
            return
        try:
            with open(SHADOW_FILE, "rb"):
                pass
        except PermissionError:
            raise ModuleError(
                f"shadow: can't read {SHADOW_FILE} as uid {os.geteuid()} (pymaddy does not keep root): "
                "set `use_helper yes` and install maddy-shadow-helper in the libexec directory, "
                "or add the server user to the `shadow` group"
            ) from None
        except OSError as e:
            raise ModuleError(f"shadow: can't read {SHADOW_FILE}: {e.strerror or e}") from None

    async def auth_plain(self, username: str, password: str) -> None:
        if self.use_helper:
            await run_helper(self.helper, username, password, slots=self.slots)
            return
        if _bad_chars(username, password) or ":" in username:
            raise AuthError("shadow: invalid username or password")
        if self.priv is not None:
            _priv_verdict("shadow", await self.priv.check("shadow", username, password))
            return
        try:
            reason = await asyncio.to_thread(shadow_verify, username, password)
        except OSError as e:
            self.log.error("cannot read the shadow file", err=str(e))
            raise AuthTemporaryError(f"shadow: {e.strerror or e}") from None
        if reason is not None:
            raise AuthError(f"shadow: {reason}")
