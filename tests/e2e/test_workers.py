"""`workers 2`: a worker process shares the IMAP listeners with the supervisor.

Which process takes a connection is the kernel's choice; the tests decide it by
stopping one process (SIGSTOP) while the other accepts, so a session is known to
live in the worker or in the supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Server, wait_until
from tests.e2e.imap_helpers import Transcript, message
from tests.e2e.scenario_helpers import MailEnv, make_env

pytestmark = pytest.mark.timeout(90)

USER = "user@example.org"  # has credentials and an IMAP account in scenario_helpers
PASSWORD = "user-secret-1"


def workers_of(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:  # threads come and go
            out += [int(x) for x in f.read().split()]
    return [p for p in out if b"pymaddy.runtime.worker" in _cmdline(p) and alive(p)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Only the other process accepts meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[MailEnv, Server]]:
    e = make_env(tmp_path)
    e.conf.write_text(e.conf.read_text() + "\nworkers 2\n")
    srv = e.server().started()
    try:
        wait_until(lambda: len(workers_of(srv.proc.pid)) == 1, what="one worker process")
        srv.wait_for("worker started")
        yield e, srv
    finally:
        srv.close()


def session(e: MailEnv) -> Transcript:
    t = Transcript(e.ports["imaps"], tls=True)
    assert t.login(USER, PASSWORD).ok
    return t


def test_the_worker_serves_imap_while_the_supervisor_is_stopped(env: tuple[MailEnv, Server]) -> None:
    e, srv = env
    with stopped(srv.proc.pid), session(e) as t:
        assert t.cmd("SELECT INBOX").ok
        r = t.cmd("APPEND INBOX", message("served by the worker"))
        assert r.ok, r.text()
        assert t.cmd("UID SEARCH SUBJECT worker").untagged == [b"* SEARCH 1"]
    # SMTP stays with the supervisor: the worker never took port 25's socket.
    worker = workers_of(srv.proc.pid)[0]
    with open(f"/proc/{worker}/cmdline", "rb") as f:
        assert b"--processes\x002" in f.read()


def test_sessions_in_different_processes_see_each_others_changes_at_once(env: tuple[MailEnv, Server]) -> None:
    e, srv = env
    worker = workers_of(srv.proc.pid)[0]
    with stopped(srv.proc.pid):
        a = session(e)  # in the worker
    with stopped(worker):
        b = session(e)  # in the supervisor
    try:
        assert a.cmd("SELECT INBOX").ok and b.cmd("SELECT INBOX").ok
        tag = a.tag()
        a.send(f"{tag} IDLE\r\n".encode())
        assert a.line().startswith(b"+")
        # An APPEND in the supervisor reaches the worker's IDLE through the update pipe, well
        # before the IDLE session's own 5 s poll.
        t0 = time.monotonic()
        assert b.cmd("APPEND INBOX", message("from the supervisor")).ok
        assert a.line() == b"* 1 EXISTS"
        assert time.monotonic() - t0 < 2.0
        # Mail delivered over SMTP (the supervisor) and by the CLI (another process) too.
        t0 = time.monotonic()
        with smtplib.SMTP("127.0.0.1", e.ports["mx"], timeout=10) as s:
            s.sendmail("bob@example.net", [USER], message("over smtp", to=USER))
        assert a.line() == b"* 2 EXISTS"
        r = e.cli("imap-msgs", "add", USER, "INBOX", input_=message("from the cli").decode())
        assert r.returncode == 0, r.stderr
        assert a.line() == b"* 3 EXISTS"
        assert time.monotonic() - t0 < 4.0
        a.send(b"DONE\r\n")
        assert a.until(tag).ok
        # And the other way: flags set in the worker reach an IDLE in the supervisor.
        assert b"* 3 EXISTS" in b.cmd("NOOP").untagged
        tag = b.tag()
        b.send(f"{tag} IDLE\r\n".encode())
        assert b.line().startswith(b"+")
        t0 = time.monotonic()
        assert a.cmd("STORE 2 +FLAGS (\\Flagged)").ok
        line = b.line()
        assert line.startswith(b"* 2 FETCH (") and line.endswith(b"FLAGS (\\Flagged))"), line
        assert time.monotonic() - t0 < 2.0
        b.send(b"DONE\r\n")
        assert b.until(tag).ok
    finally:
        a.close()
        b.close()


def test_a_killed_worker_is_replaced_and_a_reload_retires_workers_gently(env: tuple[MailEnv, Server]) -> None:
    e, srv = env
    first = workers_of(srv.proc.pid)[0]
    os.kill(first, signal.SIGKILL)
    srv.wait_for("worker process exited, restarting it")
    wait_until(lambda: workers_of(srv.proc.pid) not in ([], [first]), what="a new worker")
    second = workers_of(srv.proc.pid)[0]
    srv.wait_for("worker started", count=2)
    with stopped(srv.proc.pid):
        old = session(e)  # in the second worker
    try:
        srv.signal(signal.SIGUSR2)
        srv.wait_for("new server started")
        wait_until(lambda: any(p != second for p in workers_of(srv.proc.pid)), what="the new generation's worker")
        # The retired worker keeps its session going until the client leaves.
        assert old.cmd("SELECT INBOX").ok and old.cmd("NOOP").ok
        assert alive(second)
    finally:
        old.cmd("LOGOUT")
        old.close()
    wait_until(lambda: not alive(second), what="the retired worker to exit")
    # The new worker serves.
    new = [p for p in workers_of(srv.proc.pid) if p != second]
    assert len(new) == 1
    with stopped(srv.proc.pid), session(e) as t:
        assert t.cmd("SELECT INBOX").ok


def test_workers_end_with_the_supervisor(env: tuple[MailEnv, Server]) -> None:
    e, srv = env
    worker = workers_of(srv.proc.pid)[0]
    srv.signal(signal.SIGTERM)
    assert srv.wait_exit() == 0
    wait_until(lambda: not alive(worker), what="the worker to exit with the server")


def test_a_worker_exits_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    e = make_env(tmp_path)
    e.conf.write_text(e.conf.read_text() + "\nworkers 2\n")
    srv = e.server().started()
    try:
        wait_until(lambda: len(workers_of(srv.proc.pid)) == 1, what="one worker process")
        worker = workers_of(srv.proc.pid)[0]
        srv.proc.kill()
        srv.wait_exit()
        wait_until(lambda: not alive(worker), timeout=10, what="the orphaned worker to exit")
    finally:
        srv.close()
