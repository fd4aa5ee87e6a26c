"""The server process as a user and systemd see it: start, reload, signals, logs, sd_notify."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pymaddy import __version__
from pymaddy.compiler.registry import registry
from tests.e2e.harness import (
    ROOT,
    Notifications,
    Server,
    free_port,
    get,
    metrics_config,
    refused,
    running,
    wait_until,
)

pytestmark = pytest.mark.e2e

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_start_serves_metrics_and_logs_started_once(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, port))
    with running(cfg) as srv:
        srv.started()
        status, body = get(port)
        assert status == 200
        assert "# TYPE maddy_up gauge\nmaddy_up 1\n" in body
        assert "pymaddy_config_reloads_total 0" in body
        assert "process_open_fds" in body
        assert get(port, "/nope") == (404, "404 page not found\n")
        assert (tmp_path / "state").is_dir() and (tmp_path / "run").is_dir()
        assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(5) == 0
    assert sum(ln.startswith("server started\t") for ln in srv.lines) == 1
    assert f'server started\t{{"version":"{__version__}"}}' in srv.lines
    assert f"openmetrics: listening on tcp://127.0.0.1:{port}\t" in srv.lines
    assert srv.lines[-2:] == ["server stopping...\t", "server stopped\t"]


def test_config_errors_are_listed_and_exit_1(tmp_path: Path) -> None:
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, free_port(), block="  bogus 1\n  debug maybe"))
    srv = Server(cfg)
    try:
        assert srv.wait_exit() == 1
    finally:
        srv.close()
    errors = [ln for ln in srv.lines if ln.startswith("Error: ")]
    assert f"Error: {cfg}:4: unexpected directive: bogus" in errors
    assert any(e.startswith(f"Error: {cfg}:5: ") for e in errors), srv.lines
    assert "server started" not in srv.output
    assert "Traceback" not in srv.output


def test_module_without_runtime_is_refused(tmp_path: Path) -> None:
    # Modules that exist in maddy but have no runtime here must make run refuse, naming each
    # one and why — never start a server that silently ignores them. auth.netauth is refused
    # for good (issue 7); check-config still accepts it, as maddy configs must validate.
    missing = sorted(n for n, s in registry().items() if s.runtime is None)
    assert "auth.netauth" in missing
    text = (
        f"state_dir {tmp_path}/state\nruntime_dir {tmp_path}/run\n"
        "hostname example.org\n"
        f"submission tcp://127.0.0.1:{free_port()} {{\n  tls off\n  auth &netauth\n  deliver_to dummy\n}}\n"
        "auth.netauth netauth { }\n"
    )
    cfg = write(tmp_path / "maddy.conf", text)
    check = subprocess.run([sys.executable, "-m", "pymaddy", "-config", str(cfg), "check-config"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30,
                           check=False)
    assert check.returncode == 0, check.stderr
    srv = Server(cfg)
    try:
        assert srv.wait_exit() == 1
    finally:
        srv.close()
    assert (
        f"Error: {tmp_path}/maddy.conf:9: module auth.netauth is not supported by pymaddy: "
        "NetAuth has no maintained Python client; use auth.ldap or auth.external with a helper"
    ) in srv.lines, srv.lines
    assert "server started" not in srv.output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs to run as root")
def test_allow_root_stays_root_and_says_so(tmp_path: Path) -> None:
    """PYMADDY_ALLOW_ROOT=1 (the harness default) opts out of the privilege drop, with a warning;
    the drop itself is covered by test_privileges.py."""
    port = free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, port))
    with running(cfg, allow_root=True) as srv:
        srv.started()
        assert get(port)[0] == 200
        with open(f"/proc/{srv.proc.pid}/status") as f:
            uid_line = next(ln for ln in f if ln.startswith("Uid:"))
        assert uid_line.split()[1:] == ["0"] * 4
    assert "running as root: PYMADDY_ALLOW_ROOT=1 is set, privileges are not dropped\t" in srv.lines
    assert "dropped privileges" not in srv.output


def test_relative_state_dir_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path / "maddy.conf", f"state_dir state\nopenmetrics tcp://127.0.0.1:{free_port()}\n")
    srv = Server(cfg)
    try:
        assert srv.wait_exit() == 1
    finally:
        srv.close()
    assert "Error: statedir should be absolute" in srv.lines


def test_reload_with_broken_config_keeps_old_server(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, port))
    with running(cfg) as srv:
        srv.started()
        write(cfg, metrics_config(tmp_path, port, block="  no_such_directive"))
        srv.signal(signal.SIGUSR2)
        srv.wait_for("failed to load new configuration")
        line = next(ln for ln in srv.lines if "failed to load new configuration" in ln)
        reason = f"{cfg}:4: unexpected directive: no_such_directive"
        assert line == f'failed to load new configuration\t{{"reason":"{reason}"}}'
        status, body = get(port)
        assert status == 200
        assert "pymaddy_config_reload_failures_total 1" in body
        assert "pymaddy_config_last_reload_successful 0" in body
        assert srv.count("new server started") == 0
        # A fixed config reloads fine afterwards.
        write(cfg, metrics_config(tmp_path, port))
        srv.signal(signal.SIGUSR2)
        srv.wait_for("new server started")
        assert get(port)[0] == 200


def test_reload_that_cannot_bind_keeps_old_server(tmp_path: Path) -> None:
    a = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        b = busy.getsockname()[1]
        cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, a))
        with running(cfg) as srv:
            srv.started()
            write(cfg, metrics_config(tmp_path, a, b))
            srv.signal(signal.SIGUSR2)
            srv.wait_for("failed to load new configuration")
            assert f"openmetrics: listen tcp://127.0.0.1:{b}: Address already in use" in srv.output
            assert get(a)[0] == 200
            assert srv.count("new server started") == 0


def test_reload_moves_ports_and_old_connection_finishes_on_old_server(tmp_path: Path) -> None:
    a, b = free_port(), free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, a))
    with running(cfg) as srv:
        srv.started()
        conn = http.client.HTTPConnection("127.0.0.1", a, timeout=5)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Connection") is None
            resp.read()
            sock_before = conn.sock
            write(cfg, metrics_config(tmp_path, b))
            srv.signal(signal.SIGUSR2)
            srv.wait_for("new server started")
            assert refused(a)  # port a is gone from the config: its socket is closed
            assert get(b)[0] == 200
            # ...but the keep-alive connection made before the reload still works.
            for _ in range(2):
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                assert resp.status == 200
                assert "pymaddy_config_reloads_total 1" in resp.read().decode()
            assert conn.sock is sock_before
        finally:
            conn.close()
        srv.wait_for("old server stopped")
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(5) == 0


def test_reload_keeps_shared_port_accepting(tmp_path: Path) -> None:
    a, b, c = free_port(), free_port(), free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, a, b))
    with running(cfg) as srv:
        srv.started()
        stop = threading.Event()
        ok: list[int] = []
        failures: list[str] = []

        def hammer() -> None:
            deadline = time.monotonic() + 15
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    status, _ = get(a, timeout=3)
                    ok.append(status)
                except OSError as e:
                    failures.append(repr(e))

        t = threading.Thread(target=hammer)
        t.start()
        try:
            wait_until(lambda: len(ok) >= 5, what="first requests")
            for n, ports in enumerate(((a, c), (a, b), (a, c)), start=1):
                write(cfg, metrics_config(tmp_path, *ports))
                before = len(ok)
                srv.signal(signal.SIGUSR2)
                srv.wait_for("new server started", count=n)

                def enough(target: int = before + 5) -> bool:
                    return len(ok) >= target

                wait_until(enough, what="requests after reload")
        finally:
            stop.set()
            t.join(10)
        assert not failures, failures
        assert set(ok) == {200}
        assert get(c)[0] == 200
        assert refused(b)


def test_editing_the_config_file_reloads(tmp_path: Path) -> None:
    a, b = free_port(), free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, a))
    with running(cfg, watch=True) as srv:
        srv.started()
        # An editor-style save: write a new file, rename it over the old one.
        tmp = write(tmp_path / ".maddy.conf.swp", metrics_config(tmp_path, a, b))
        os.replace(tmp, cfg)
        srv.wait_for("new server started")
        assert get(b)[0] == 200
        assert any("configuration file changed" in ln for ln in srv.lines)
        assert srv.count("signal received") == 0
        # An in-place write works too; a change elsewhere in the directory does not reload.
        write(tmp_path / "unrelated.txt", "x")
        write(cfg, metrics_config(tmp_path, b))
        srv.wait_for("new server started", count=2)
        wait_until(lambda: refused(a), what="port a closed")
        assert srv.count("new server started") == 2


def test_sigterm_stops_within_5s_even_with_idle_keepalive(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, port))
    with running(cfg) as srv:
        srv.started()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            conn.getresponse().read()
            t0 = time.monotonic()
            srv.signal(signal.SIGTERM)
            assert srv.wait_exit(5) == 0
            assert time.monotonic() - t0 < 2.0  # idle sessions do not hold the exit
        finally:
            conn.close()
    assert "signal received (terminated), next signal will force immediate shutdown.\t" in srv.lines
    assert srv.lines[-1] == "server stopped\t"


def test_sighup_stops_not_reloads(tmp_path: Path) -> None:
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, free_port()))
    with running(cfg) as srv:
        srv.started()
        srv.signal(signal.SIGHUP)
        assert srv.wait_exit(5) == 0
    assert "signal received (hangup), next signal will force immediate shutdown.\t" in srv.lines
    assert srv.count("reloading") == 0
    assert srv.lines[-1] == "server stopped\t"


def test_second_signal_forces_exit_1(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, port))
    with running(cfg) as srv:
        srv.started()
        # A request whose head never completes keeps a session busy, so the stop waits for it.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            # Once a later connection is answered, the server has read that request line.
            assert get(port)[0] == 200
            srv.signal(signal.SIGTERM)
            srv.wait_for("server stopping...")
            t0 = time.monotonic()
            srv.signal(signal.SIGINT)
            assert srv.wait_exit(5) == 1
            assert time.monotonic() - t0 < 2.0
    assert "forced shutdown due to signal (interrupt)!\t" in srv.lines
    assert srv.count("server stopped") == 0


def test_sigusr1_reopens_log_file_after_rotation(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "logs" / "maddy.log"
    log.parent.mkdir()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, port, extra="log logs/maddy.log\n"))
    with running(cfg) as srv:
        wait_until(lambda: log.exists() and "server started" in log.read_text(), what="server started in log file")
        assert srv.lines == ["loading configuration...\t"]  # everything after the config is read goes to the file
        rotated = log.with_name("maddy.log.1")
        os.rename(log, rotated)
        srv.signal(signal.SIGUSR1)
        wait_until(log.exists, what="log file re-created")
        assert "rotating logs" in rotated.read_text()
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(5) == 0
    new = log.read_text().splitlines()
    assert [TS.sub("", ln) for ln in new][-2:] == ["server stopping...\t", "server stopped\t"]
    assert all(TS.match(ln) for ln in new)
    assert "server stopping" not in rotated.read_text()
    assert oct(log.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_log_flag_overrides_config_and_stderr_ts(tmp_path: Path) -> None:
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, free_port(), extra="log off\n"))
    with running(cfg, args=("--log", "stderr_ts")) as srv:
        srv.started()
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(5) == 0
    started = next(ln for ln in srv.lines if "server started" in ln)
    assert TS.match(started) and started.endswith(f'server started\t{{"version":"{__version__}"}}')


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify(tmp_path: Path, abstract: bool) -> None:
    addr = f"@pymaddy-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    notes = Notifications(addr)
    a, b = free_port(), free_port()
    cfg = write(tmp_path / "maddy.conf", metrics_config(tmp_path, a))
    try:
        with running(cfg, env={"NOTIFY_SOCKET": addr}) as srv:
            ready = notes.wait_for("READY=1")
            assert ready == "READY=1\nSTATUS=Configuration running."
            srv.started()  # logged before READY=1; our reader thread may lag behind the datagram
            write(cfg, metrics_config(tmp_path, b))
            srv.signal(signal.SIGUSR2)
            assert notes.wait_for("RELOADING=1").startswith("RELOADING=1")
            notes.wait_for("READY=1")
            srv.wait_for("new server started")
            srv.signal(signal.SIGTERM)
            notes.wait_for("STOPPING=1")
            assert srv.wait_exit(5) == 0
        assert sum(ln.startswith("server started\t") for ln in srv.lines) == 1
        states = [m.split("\n")[0] for m in notes.messages]
        assert states == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    finally:
        notes.close()
