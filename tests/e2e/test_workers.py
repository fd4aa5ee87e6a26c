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

from tests.e2e.harness import Server, free_port, get, wait_until
from tests.e2e.imap_helpers import Transcript, login_from, message
from tests.e2e.scenario_helpers import MailEnv, make_env

pytestmark = pytest.mark.timeout(90)

CONFIG_DECIDES = {"PYMADDY_WORKERS": ""}  # the `workers` lines here, whatever the environment says
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


def start_with_worker(tmp_path: Path, extra: str = "") -> tuple[MailEnv, Server]:
    """The scenario config with `workers 2` (+ `extra`), once the worker serves."""
    e = make_env(tmp_path)
    e.conf.write_text(e.conf.read_text() + "\nworkers 2\n" + extra)
    srv = Server(e.conf, env=CONFIG_DECIDES).started()
    try:
        wait_until(lambda: len(workers_of(srv.proc.pid)) == 1, what="one worker process")
        srv.wait_for("worker started")
    except BaseException:
        srv.close()
        raise
    return e, srv


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[MailEnv, Server]]:
    e, srv = start_with_worker(tmp_path)
    try:
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
    # SMTP too: a message the worker takes is delivered (storage.imapsql, from the worker).
    with stopped(srv.proc.pid), smtplib.SMTP("127.0.0.1", e.ports["mx"], timeout=10) as s:
        s.sendmail("bob@example.net", [USER], message("smtp in the worker", to=USER))
    assert any(b"Subject: smtp in the worker" in m.data for m in e.inbox(USER))


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
    _, srv = env
    worker = workers_of(srv.proc.pid)[0]
    srv.signal(signal.SIGTERM)
    assert srv.wait_exit() == 0
    wait_until(lambda: not alive(worker), what="the worker to exit with the server")


def test_a_worker_exits_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    _, srv = start_with_worker(tmp_path)
    try:
        worker = workers_of(srv.proc.pid)[0]
        srv.proc.kill()
        srv.wait_exit()
        wait_until(lambda: not alive(worker), timeout=10, what="the orphaned worker to exit")
    finally:
        srv.close()


def imap_login(port: int, source: str, user: str, password: str) -> str:
    return login_from(port, source, user, password, tls=True)


def test_failed_logins_count_across_processes_and_reloads(tmp_path: Path) -> None:
    """auth_throttle: failures in the worker lock the address in the supervisor, and a worker
    started by a reload inherits the lockout."""
    e, srv = start_with_worker(tmp_path, "auth_throttle {\n delay_after 100\n ip_failures 3\n}\n")
    try:
        port = e.ports["imaps"]
        with stopped(srv.proc.pid):
            for i in range(3):
                assert imap_login(port, "127.0.0.9", f"nobody{i}@example.org", "x").startswith(
                    "NO [AUTHENTICATIONFAILED]")
        worker = workers_of(srv.proc.pid)[0]
        refused = "NO [UNAVAILABLE] Too many failed logins, try again later"
        with stopped(worker):
            assert imap_login(port, "127.0.0.9", USER, PASSWORD) == refused
            assert imap_login(port, "127.0.0.10", USER, PASSWORD).startswith("OK")
        srv.signal(signal.SIGUSR2)
        srv.wait_for("new server started")
        wait_until(lambda: any(p != worker for p in workers_of(srv.proc.pid)), what="a new worker")
        srv.wait_for("worker started", count=2)
        with stopped(srv.proc.pid):
            assert imap_login(port, "127.0.0.9", USER, PASSWORD) == refused
    finally:
        srv.close()


QUEUE_CONFIG = """
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname mx.example.org
tls off
workers 2

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

target.queue outq {{
    target &local_mailboxes
    autogenerated_msg_domain example.org
}}

smtp tcp://127.0.0.1:{port} {{
    deliver_to &outq
}}
"""


def test_the_worker_hands_queued_messages_to_the_supervisor(tmp_path: Path) -> None:
    """target.queue in a worker commits the entry and hands it over; the supervisor's engine
    delivers it exactly once, and one whose notice was lost is found by the engine's scan."""
    port = free_port()
    conf = tmp_path / "maddy.conf"
    conf.write_text(QUEUE_CONFIG.format(tmp=tmp_path, port=port))
    env = MailEnv(tmp_path, conf, {"mx": port})
    assert env.cli("imap-acct", "create", USER).returncode == 0
    srv = Server(conf, env={**CONFIG_DECIDES, "PYMADDY_QUEUE_RESCAN": "1"}).started()
    try:
        wait_until(lambda: len(workers_of(srv.proc.pid)) == 1, what="one worker process")
        srv.wait_for("worker started")
        with stopped(srv.proc.pid):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("bob@example.net", [USER], message("queued in the worker", to=USER))
            queue_dir = tmp_path / "state" / "outq"
            assert [p.name for p in queue_dir.iterdir() if p.name.endswith(".meta")]  # durable before 250
        wait_until(lambda: len(env.inbox(USER)) == 1, what="the queued message delivered")
        # Notices lost: the worker cannot reach the control socket; the engine's scan finds the entry.
        for sock in (tmp_path / "run").glob("queue-*.sock"):
            sock.rename(sock.with_name("moved-away"))
        worker = workers_of(srv.proc.pid)[0]
        os.kill(worker, signal.SIGKILL)  # its kept-open connection goes with it
        srv.wait_for("worker started", count=2)
        with stopped(srv.proc.pid), smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("bob@example.net", [USER], message("notice lost", to=USER))
        srv.wait_for("could not hand the queued message over")
        wait_until(lambda: len(env.inbox(USER)) == 2, what="the scan to deliver the second message")
        srv.wait_for("picked up a queued message")
        time.sleep(1.5)  # another scan: nothing is delivered twice
        subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in env.inbox(USER))
        assert subjects == [b"notice lost", b"queued in the worker"]
    finally:
        srv.close()


def _completed(port: int) -> float:
    _, text = get(port)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("maddy_smtp_completed_transactions{"))


def test_the_supervisors_metrics_count_the_workers_sessions(tmp_path: Path) -> None:
    """openmetrics (the supervisor) adds the workers' counters, also after a worker is replaced."""
    mport = free_port()
    e, srv = start_with_worker(tmp_path, f"openmetrics tcp://127.0.0.1:{mport}\n")
    try:
        worker = workers_of(srv.proc.pid)[0]
        with stopped(srv.proc.pid):
            for i in range(2):
                with smtplib.SMTP("127.0.0.1", e.ports["mx"], timeout=10) as s:
                    s.sendmail("bob@example.net", [USER], message(f"counted {i}", to=USER))
        with stopped(worker), smtplib.SMTP("127.0.0.1", e.ports["mx"], timeout=10) as s:
            s.sendmail("bob@example.net", [USER], message("counted 2", to=USER))
        assert _completed(mport) == 3  # a scrape asks the worker for its counts there and then
        os.kill(worker, signal.SIGKILL)
        srv.wait_for("worker started", count=2)
        time.sleep(1)
        assert _completed(mport) == 3  # the dead worker's counts are kept, not lost or doubled
    finally:
        srv.close()


def test_a_reload_changes_the_number_of_processes(tmp_path: Path) -> None:
    e, srv = start_with_worker(tmp_path)
    try:
        first = workers_of(srv.proc.pid)[0]
        base = e.conf.read_text()
        e.conf.write_text(base.replace("\nworkers 2\n", "\nworkers 1\n"))
        srv.signal(signal.SIGUSR2)
        srv.wait_for("new server started")
        wait_until(lambda: not alive(first), what="the worker to retire")
        assert workers_of(srv.proc.pid) == []
        with session(e) as t:
            assert t.cmd("SELECT INBOX").ok
        e.conf.write_text(base.replace("\nworkers 2\n", "\nworkers 3\n"))
        srv.signal(signal.SIGUSR2)
        srv.wait_for("new server started", count=2)
        assert len(workers_of(srv.proc.pid)) == 2  # 'server started' waits for them
        with stopped(srv.proc.pid), session(e) as t:
            assert t.cmd("SELECT INBOX").ok
    finally:
        srv.close()


LIMITS_CONFIG = """
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname mx.example.org
tls off
workers 2

smtp tcp://127.0.0.1:{port} {{
    limits {{
        all concurrency 1
        all rate 3 60s
    }}
    defer_sender_reject no
    deliver_to dummy
}}
"""


def test_limits_count_every_process(tmp_path: Path) -> None:
    """`limits` hold across processes: a message in the worker takes the only slot the
    supervisor would give, and a killed worker's slot is let go."""
    port = free_port()
    conf = tmp_path / "maddy.conf"
    conf.write_text(LIMITS_CONFIG.format(tmp=tmp_path, port=port))
    srv = Server(conf, env=CONFIG_DECIDES).started()
    try:
        wait_until(lambda: len(workers_of(srv.proc.pid)) == 1, what="one worker process")
        worker = workers_of(srv.proc.pid)[0]
        with stopped(srv.proc.pid):
            held = smtplib.SMTP("127.0.0.1", port, timeout=30)  # in the worker
            held.ehlo("a.test")
            assert held.mail("a@a.test")[0] == 250  # takes the one concurrency slot
        with stopped(worker), smtplib.SMTP("127.0.0.1", port, timeout=30) as other:  # in the supervisor
            other.ehlo("b.test")
            t0 = time.monotonic()
            code, text = other.mail("b@b.test")
            assert (code, text.split(b" (msg ID")[0]) == (451, b"4.4.5 High load, try again later")
            assert time.monotonic() - t0 > 4.5
        os.kill(worker, signal.SIGKILL)  # its slot goes with it
        held.close()
        srv.wait_for("worker process exited, restarting it")
        wait_until(lambda: workers_of(srv.proc.pid) not in ([], [worker]), what="the new worker")
        with stopped(workers_of(srv.proc.pid)[0]):  # the supervisor, which saw the worker's token go
            for sender in ("c@c.test", "d@d.test"):  # tokens 2 and 3 of `rate 3 60s`
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                    c.ehlo("c.test")
                    assert c.mail(sender)[0] == 250
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.ehlo("e.test")
                assert c.mail("e@e.test")[0] == 451
    finally:
        srv.close()
