"""Started as root, pymaddy binds what needs root and then runs as an unprivileged user.

These start the real server as root without PYMADDY_ALLOW_ROOT. The target user
(PYMADDY_USER, else maddy, else nobody) must be able to reach the test files, so
they live in a world-traversable directory under /tmp rather than in tmp_path
(whose parents are 0700 root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Server, free_port, get, metrics_config, running

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="needs to run as root")]

CAP_NET_BIND_SERVICE = 1 << 10
NO_CAPSET = "could not keep CAP_NET_BIND_SERVICE"


def target_user() -> pwd.struct_passwd:
    """The account the server drops to, chosen the way the server chooses it."""
    wanted = os.environ.get("PYMADDY_USER")
    if wanted:
        return pwd.getpwnam(wanted)
    try:
        return pwd.getpwnam("maddy")
    except KeyError:
        return pwd.getpwnam("nobody")


def low_port(*exclude: int) -> int:
    """A free loopback port below 1024 (binding it needs root or CAP_NET_BIND_SERVICE)."""
    for port in range(600, 1000):
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port between 600 and 999 on 127.0.0.1")


def proc_status(pid: int, task: str | None = None) -> dict[str, list[str]]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    out: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.split()
    return out


@pytest.fixture
def shared() -> Iterator[Path]:
    """A test directory the target user can traverse (0755, under /tmp)."""
    d = Path(tempfile.mkdtemp(prefix="pymaddy-priv-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_root_start_drops_privileges_binds_low_ports_and_reloads(shared: Path) -> None:
    user = target_user()
    port = low_port()
    # A state_dir left by an earlier root run: its root-owned entries go to the user, but
    # nothing deeper, no symlink target and no hard-linked file.
    state = shared / "state"
    (state / "sub").mkdir(parents=True)
    (state / "old.db").write_text("x")
    (state / "sub" / "deep").write_text("x")
    outside = shared / "outside"
    outside.write_text("x")
    os.link(outside, state / "hardlink")
    linked = shared / "linked"
    linked.write_text("x")
    (state / "symlink").symlink_to(linked)
    cfg = shared / "maddy.conf"
    cfg.write_text(metrics_config(shared, port))
    cfg.chmod(0o644)

    with running(cfg, allow_root=False) as srv:
        srv.started()
        status, body = get(port)
        assert status == 200
        assert "maddy_up 1\n" in body
        assert f'dropped privileges\t{{"gid":{user.pw_gid},"uid":{user.pw_uid},"user":"{user.pw_name}"}}' in srv.lines
        assert "running as root" not in srv.output

        pid = srv.proc.pid
        st = proc_status(pid)
        assert st["Uid"] == [str(user.pw_uid)] * 4, st["Uid"]
        assert st["Gid"] == [str(user.pw_gid)] * 4, st["Gid"]
        assert "0" not in st["Uid"] + st["Gid"] + st.get("Groups", [])
        for task in os.listdir(f"/proc/{pid}/task"):  # every thread, not just the main one
            ts = proc_status(pid, task)
            assert "0" not in ts["Uid"] + ts["Gid"], (task, ts["Uid"], ts["Gid"])
        # No capability but (at most) CAP_NET_BIND_SERVICE is left.
        for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert int(st[key][0], 16) & ~CAP_NET_BIND_SERVICE == 0, (key, st[key])

        for d in (state, shared / "run"):
            assert (d.stat().st_uid, d.stat().st_gid) == (user.pw_uid, user.pw_gid), d
        assert (state / "old.db").stat().st_uid == user.pw_uid
        assert (state / "sub").stat().st_uid == user.pw_uid
        assert (state / "sub" / "deep").stat().st_uid == 0
        assert (state / "hardlink").stat().st_uid == 0
        assert linked.stat().st_uid == 0
        assert (state / "symlink").lstat().st_uid == 0
        assert cfg.stat().st_uid == 0  # the config is only read

        # A reload that adds another port below 1024 needs the kept capability.
        if NO_CAPSET in srv.output:
            line = next(ln for ln in srv.lines if NO_CAPSET in ln)
            pytest.skip(f"capset is not permitted in this container: {line}")
        assert int(st["CapEff"][0], 16) == CAP_NET_BIND_SERVICE, st["CapEff"]
        port2 = low_port(port)
        cfg.write_text(metrics_config(shared, port, port2))
        srv.signal(signal.SIGUSR2)
        srv.wait_for("new server started")
        assert "failed to load new configuration" not in srv.output
        assert get(port2)[0] == 200
        assert get(port)[0] == 200
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(5) == 0


def test_config_unreadable_by_target_user_fails_at_start(shared: Path) -> None:
    user = target_user()
    port = free_port()
    cfg = shared / "maddy.conf"
    cfg.write_text(metrics_config(shared, port))
    cfg.chmod(0o600)
    srv = Server(cfg, allow_root=False)
    try:
        assert srv.wait_exit() == 1
    finally:
        srv.close()
    errors = [ln for ln in srv.lines if ln.startswith("Error: ")]
    expected = f"Error: configuration file {cfg} is not readable by user {user.pw_name} (uid {user.pw_uid})"
    assert any(e.startswith(expected) for e in errors), srv.lines
    assert "server started" not in srv.output
    assert "Traceback" not in srv.output


def test_unknown_target_user_fails_at_start(shared: Path) -> None:
    cfg = shared / "maddy.conf"
    cfg.write_text(metrics_config(shared, free_port()))
    srv = Server(cfg, allow_root=False, env={"PYMADDY_USER": "no-such-user-pymaddy"})
    try:
        assert srv.wait_exit() == 1
    finally:
        srv.close()
    assert "Error: PYMADDY_USER=no-such-user-pymaddy: no such user" in srv.lines
    assert not (shared / "state").exists()
