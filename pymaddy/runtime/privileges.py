"""Dropping root privileges at start-up, the way Postfix and Dovecot users expect.

pymaddy never serves as root. Started as root (euid 0), the supervisor does
everything that needs root first — create and chown `state_dir`/`runtime_dir`,
open log files, bind the listening sockets (ports below 1024 included) — and
then becomes the target user before any module starts or any connection is
accepted:

- target: `$PYMADDY_USER` (a name or a numeric uid) if set, else `maddy` if
  that user exists, else `nobody`; with its primary group and the supplementary
  groups /etc/group gives it (initgroups), never uid 0 or gid 0;
- order: keep-caps flag on, initgroups, setgid, setuid; then only
  CAP_NET_BIND_SERVICE stays (effective, permitted, inheritable and, if the
  kernel allows, ambient) so a reload that adds a port below 1024 can still
  bind it; if that fails the server runs without it and says so;
- verified: `setuid(0)` must fail, real/effective/saved ids and every
  thread's ids must be non-root, no supplementary group 0.

`PYMADDY_ALLOW_ROOT=1` is the explicit opt-out ("really stay root").

Credentials are per thread in Linux; glibc applies set*id/setgroups to every
thread of the process, but the keep-caps flag and capset() only to the
calling one. The supervisor calls `drop()` on the event-loop (main) thread,
which is the one that binds sockets on reload.

The process is left non-dumpable (the kernel's default after a uid change):
other processes of the same user (`nobody`!) cannot ptrace it and take the
root-opened descriptors.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import platform
import pwd
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALLOW_ROOT_ENV = "PYMADDY_ALLOW_ROOT"
USER_ENV = "PYMADDY_USER"
DEFAULT_USERS = ("maddy", "nobody")

# <linux/prctl.h>, <linux/capability.h>
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_NET_BIND_SERVICE = 10

# capset(2) numbers, for a libc without a capset() wrapper.
_SYS_CAPSET = {
    "x86_64": 126,
    "amd64": 126,
    "i386": 185,
    "i686": 185,
    "armv7l": 185,
    "armv6l": 185,
    "aarch64": 91,
    "arm64": 91,
    "riscv64": 91,
    "loongarch64": 91,
    "ppc64le": 184,
    "ppc64": 184,
    "s390x": 185,
}


class PrivilegeError(Exception):
    """Privileges cannot be dropped safely; the message is for the user."""


@dataclass(frozen=True)
class Target:
    """The account pymaddy runs as after the drop."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class DropResult:
    """What `drop()` managed beyond the mandatory part."""

    bind_cap: bool  # CAP_NET_BIND_SERVICE kept (effective)
    ambient: bool  # ... and raised in the ambient set (inherited by helpers)
    cap_error: str | None = None  # why it was not kept


def running_as_root() -> bool:
    return os.geteuid() == 0


def allow_root(env: Mapping[str, str] | None = None) -> bool:
    """The explicit opt-out: stay root."""
    return (os.environ if env is None else env).get(ALLOW_ROOT_ENV) == "1"


def must_drop(env: Mapping[str, str] | None = None) -> bool:
    return running_as_root() and not allow_root(env)


def resolve_target(env: Mapping[str, str] | None = None) -> Target:
    """The account to become: $PYMADDY_USER, else maddy, else nobody."""
    env = os.environ if env is None else env
    wanted = env.get(USER_ENV, "").strip()
    entry: pwd.struct_passwd | None = None
    if wanted:
        try:
            entry = pwd.getpwnam(wanted)
        except KeyError:
            if wanted.isdigit():
                try:
                    entry = pwd.getpwuid(int(wanted))
                except KeyError:
                    entry = None
        if entry is None:
            raise PrivilegeError(f"{USER_ENV}={wanted}: no such user")
    else:
        for name in DEFAULT_USERS:
            try:
                entry = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        if entry is None:
            raise PrivilegeError(
                f"started as root and neither user maddy nor nobody exists: set {USER_ENV} to the user to run as"
            )
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise PrivilegeError(
            f"refusing to run as user {entry.pw_name}: its uid or primary group is 0 (root); "
            f"set {USER_ENV} to an unprivileged user (or {ALLOW_ROOT_ENV}=1 to stay root)"
        )
    return Target(entry.pw_name, entry.pw_uid, entry.pw_gid)


# -- ownership -------------------------------------------------------------------------


def _chown_entry(dirfd: int, name: str, target: Target) -> None:
    """chown one root-owned regular file or directory inside `dirfd`, never through a link."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return
    if st.st_uid != 0:
        return
    if stat.S_ISREG(st.st_mode):
        # A second hard link could be /etc/shadow planted by whoever can write here.
        if st.st_nlink != 1:
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    elif stat.S_ISDIR(st.st_mode):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
    else:
        return
    try:
        fd = os.open(name, flags, dir_fd=dirfd)
    except OSError:
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and now.st_uid == 0:
            os.fchown(fd, target.uid, target.gid)
    except OSError:
        pass
    finally:
        os.close(fd)


def chown_dir(path: str, target: Target) -> bool:
    """Give a root-owned state/runtime directory and the root-owned files directly in it to
    `target`. Conservative: a directory owned by someone else, shared (world-writable, like
    /tmp) or `/` is left alone, as is anything below the first level, links and special files.
    Returns whether the directory itself was changed."""
    if os.path.realpath(path) == "/":
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & stat.S_IWOTH:
            return False
        os.fchown(fd, target.uid, target.gid)
        for name in os.listdir(fd):
            _chown_entry(fd, name, target)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def chown_new_file(path: str, target: Target) -> None:
    """chown a file pymaddy itself just created as root (a log file), if it still is one."""
    parent, name = os.path.split(path)
    try:
        dirfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _chown_entry(dirfd, name, target)
    finally:
        os.close(dirfd)


def chown_socket(path: str, target: Target) -> None:
    """A unix socket bound as root: hand it to `target`, as if it had bound it."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.chown(path, target.uid, target.gid, follow_symlinks=False)
    except OSError:
        pass


def missing_files(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if not os.path.lexists(p)]


# -- capabilities -------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    fn = _libc().prctl
    fn.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    fn.restype = ctypes.c_int
    _check(fn(option, arg2, arg3, arg4, arg5))


def capset_only(cap: int | None) -> None:
    """This thread's capability sets become exactly {cap} (None: empty): effective,
    permitted, inheritable."""
    libc = _libc()
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if cap is not None:
        word, bit = divmod(cap, 32)
        data[word].effective = data[word].permitted = data[word].inheritable = 1 << bit
    fn = getattr(libc, "capset", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        _check(fn(ctypes.byref(header), data))
        return
    number = _SYS_CAPSET.get(platform.machine().lower())
    if number is None:
        raise OSError(38, "capset: no system call number for " + platform.machine())
    libc.syscall.restype = ctypes.c_long
    _check(libc.syscall(ctypes.c_long(number), ctypes.byref(header), data))


# -- the drop ----------------------------------------------------------------------------------


def _status_ids(path: str) -> tuple[list[int], list[int]]:
    """The Uid and Gid fields of a /proc status file (read as bytes: no codec lookup,
    which could need an import the dropped user cannot read)."""
    uids: list[int] = []
    gids: list[int] = []
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"Uid:"):
                uids = [int(x) for x in line.split()[1:]]
            elif line.startswith(b"Gid:"):
                gids = [int(x) for x in line.split()[1:]]
    return uids, gids


def _thread_ids() -> list[tuple[str, list[int], list[int]]]:
    """(tid, Uid fields, Gid fields) of every thread, from /proc."""
    out: list[tuple[str, list[int], list[int]]] = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            uids, gids = _status_ids(f"/proc/self/task/{tid}/status")
        except (OSError, ValueError):
            continue  # a thread that just ended
        out.append((tid, uids, gids))
    return out


def _own_caps() -> dict[str, int]:
    """This thread's Cap* lines from /proc (empty if unavailable)."""
    caps: dict[str, int] = {}
    for path in ("/proc/thread-self/status", "/proc/self/status"):
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.startswith(b"Cap"):
                        key, _, value = line.partition(b":")
                        caps[key.decode()] = int(value.strip(), 16)
            return caps
        except (OSError, ValueError):
            continue
    return caps


def verify_dropped() -> None:
    """Raise PrivilegeError unless root is gone for good."""
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("privileges were not dropped: setuid(0) still succeeds")
    if 0 in (*os.getresuid(), *os.getresgid()):
        raise PrivilegeError(f"privileges were not dropped: uids {os.getresuid()}, gids {os.getresgid()}")
    if 0 in os.getgroups():
        raise PrivilegeError("privileges were not dropped: still in supplementary group 0 (root)")
    extra = {k: v for k, v in _own_caps().items() if k in ("CapEff", "CapPrm") and v & ~(1 << CAP_NET_BIND_SERVICE)}
    if extra:
        left = ", ".join(f"{k} {v:#x}" for k, v in extra.items())
        raise PrivilegeError(f"privileges were not dropped: capabilities left ({left})")
    for tid, uids, gids in _thread_ids():
        if 0 in uids or 0 in gids:
            raise PrivilegeError(f"privileges were not dropped in thread {tid}: Uid {uids}, Gid {gids}")


def drop(target: Target) -> DropResult:
    """Become `target` for good, keeping only CAP_NET_BIND_SERVICE if the kernel lets us."""
    keep_error: str | None = None
    try:
        prctl(PR_SET_KEEPCAPS, 1)
    except OSError as e:
        keep_error = f"prctl(PR_SET_KEEPCAPS): {e.strerror or e}"
    try:
        try:
            os.initgroups(target.name, target.gid)
        except OSError:
            os.setgroups([])
        os.setgid(target.gid)
        os.setuid(target.uid)
    except OSError as e:
        raise PrivilegeError(
            f"cannot drop privileges to user {target.name} (uid {target.uid}, gid {target.gid}): {e.strerror or e}"
        ) from None

    bind_cap, ambient, cap_error = False, False, keep_error
    if keep_error is None:
        try:
            capset_only(CAP_NET_BIND_SERVICE)
            bind_cap = True
        except OSError as e:
            cap_error = f"capset: {e.strerror or e}"
            # The keep-caps flag kept every permitted capability: they must go.
            try:
                capset_only(None)
            except OSError as e2:
                raise PrivilegeError(f"cannot clear capabilities after setuid: {e2.strerror or e2}") from None
        if bind_cap:
            with contextlib.suppress(OSError):
                prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE)
                ambient = True
        with contextlib.suppress(OSError):
            prctl(PR_SET_KEEPCAPS, 0)
    verify_dropped()
    return DropResult(bind_cap=bind_cap, ambient=ambient, cap_error=cap_error)


def unreadable(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(path, reason) for each file the current user cannot open for reading."""
    bad: list[tuple[str, str]] = []
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            bad.append((path, e.strerror or str(e)))
    return bad


# -- the interpreter after the drop --------------------------------------------------------------

# Imported lazily by the standard library (codec lookups, thread pools); loaded before the
# drop in case the Python installation is not readable by the target user.
LAZY_STDLIB = (
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.utf_8_sig",
    "encodings.idna",
    "encodings.punycode",
    "concurrent.futures.thread",
)

# What the config watcher (watchfiles on anyio) imports once it runs.
WATCHER_MODULES = ("watchfiles", "anyio", "anyio._backends._asyncio", "anyio.to_thread", "anyio.lowlevel")


# Packages imported whole (every submodule) before the drop: pymaddy itself and what it
# imports lazily, down to the standard library's own lazy imports (codecs, email).
PRELOAD_TREES = (
    "pymaddy", "cryptography", "precis_i18n", "argon2", "bcrypt", "lark", "email", "encodings",
    "concurrent", "json", "sqlite3", "http", "urllib", "asyncio", "importlib",
)


def preload_trees(packages: Iterable[str]) -> list[tuple[str, str]]:
    """Import each package and all of its submodules; (module, error) for failures."""
    import pkgutil

    failed: list[tuple[str, str]] = []
    for name in packages:
        try:
            pkg = importlib.import_module(name)
        except Exception as e:
            failed.append((name, f"{type(e).__name__}: {e}"))
            continue
        path = getattr(pkg, "__path__", None)
        if path is None:
            continue
        for info in pkgutil.walk_packages(path, prefix=name + ".", onerror=lambda n: None):
            if ".tests" in info.name or info.name.endswith(("__main__", ".test")) or "._test" in info.name:
                continue
            try:
                importlib.import_module(info.name)
            except BaseException as e:  # optional platform modules may fail in any way
                if isinstance(e, KeyboardInterrupt):
                    raise
                failed.append((info.name, f"{type(e).__name__}: {e}"))
    return failed


def preload(modules: Iterable[str]) -> list[tuple[str, str]]:
    """Import `modules` now (while root can read every file); (module, error) for failures,
    which are left for the code that imports them later to report."""
    failed: list[tuple[str, str]] = []
    for name in dict.fromkeys(modules):
        try:
            importlib.import_module(name)
        except Exception as e:
            failed.append((name, f"{type(e).__name__}: {e}"))
    return failed


def unreadable_import_paths(paths: Iterable[str]) -> list[str]:
    """The paths (sys.path entries that existed before the drop) the current user cannot read."""
    out: list[str] = []
    for path in dict.fromkeys(p for p in paths if p):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError:
            out.append(path)
            continue
        mode = os.R_OK | os.X_OK if stat.S_ISDIR(st.st_mode) else os.R_OK
        if not os.access(path, mode):
            out.append(path)
    return out
