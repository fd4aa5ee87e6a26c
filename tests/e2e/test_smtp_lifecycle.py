"""The smtp endpoint and the server life-cycle: reload hand-over, graceful stop mid-DATA, per-IP limits, junk."""

from __future__ import annotations

import random
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.e2e.harness import Server, free_port, running
from tests.e2e.test_smtp import Client, hello

pytestmark = pytest.mark.e2e


def _conf(tmp: Path, body: str) -> Path:
    conf = tmp / "maddy.conf"
    conf.write_text(f"state_dir {tmp}/state\nruntime_dir {tmp}/run\nhostname mx.maddy.test\ntls off\n{body}\n")
    return conf


def test_reload_switches_pipeline_old_session_keeps_old(tmp_path: Path) -> None:
    """maddy's TestSmtpPipelineSwitch."""
    port = free_port()
    conf = _conf(tmp_path, f'smtp tcp://127.0.0.1:{port} {{\n    reject 550 5.7.1 "Old config"\n}}')
    with running(conf) as srv:
        srv.started()
        old = hello(port)
        old.cmd("MAIL FROM:<a@b.test>")
        assert old.cmd("RCPT TO:<x@maddy.test>").startswith("550 5.7.1 Old config")
        conf.write_text(conf.read_text().replace('reject 550 5.7.1 "Old config"', "deliver_to dummy"))
        srv.signal(signal.SIGUSR2)
        srv.wait_for("new server started")
        with hello(port) as new:
            new.cmd("MAIL FROM:<a@b.test>")
            assert new.cmd("RCPT TO:<x@maddy.test>").startswith("250 ")
        old.cmd("RSET")
        old.cmd("MAIL FROM:<a@b.test>")
        assert old.cmd("RCPT TO:<x@maddy.test>").startswith("550 5.7.1 Old config")
        old.close()


def test_stop_lets_a_transfer_finish_and_ends_idle_sessions(tmp_path: Path) -> None:
    port = free_port()
    conf = _conf(tmp_path, f"smtp tcp://127.0.0.1:{port} {{\n    deliver_to dummy\n}}")
    srv = Server(conf)
    try:
        srv.started()
        idle = hello(port)
        busy = hello(port)
        busy.cmd("MAIL FROM:<a@b.test>")
        busy.cmd("RCPT TO:<x@maddy.test>")
        assert busy.cmd("DATA").startswith("354 ")
        busy.send("Subject: in flight\r\n\r\n")
        srv.signal(signal.SIGTERM)
        srv.wait_for("server stopping")
        assert idle.closed()  # idle: ended at once
        busy.send("still sending\r\n.\r\n")
        assert busy.reply() == ["250 2.0.0 OK: queued"]
        assert srv.wait_exit() == 0
        busy.close()
        idle.close()
    finally:
        srv.close()


def test_per_ip_concurrency(tmp_path: Path) -> None:
    """maddy's TestPerIPConcurrency (the 451 after 5 s is covered in test_smtp)."""
    port = free_port()
    conf = _conf(
        tmp_path,
        f"smtp tcp://127.0.0.1:{port} {{\n    limits {{\n        ip concurrency 1\n    }}\n"
        "    defer_sender_reject no\n    deliver_to dummy\n}",
    )
    with running(conf) as srv:
        srv.started()
        try:
            other = Client(port, source="127.0.0.2")
        except OSError as e:  # pragma: no cover - loopback aliases missing
            pytest.skip(f"cannot bind 127.0.0.2: {e}")
        with hello(port) as c1, other as c2:
            c2.reply()
            c2.cmd("EHLO other")
            assert c1.cmd("MAIL FROM:<a@b.test>").startswith("250 ")
            assert c2.cmd("MAIL FROM:<a@b.test>").startswith("250 ")


def test_junk_never_crashes_the_server(tmp_path: Path) -> None:
    port = free_port()
    conf = _conf(
        tmp_path,
        f"smtp tcp://127.0.0.1:{port} {{\n    smtp_max_line_length 1000\n    read_timeout 2s\n    deliver_to dummy\n}}",
    )
    rnd = random.Random(5321)
    verbs = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"AUTH", b"RSET", b"STARTTLS", b"\x00"]
    with running(conf) as srv:
        srv.started()
        for _ in range(40):
            junk = bytearray()
            for _ in range(rnd.randint(1, 12)):
                if rnd.random() < 0.6:
                    junk += rnd.choice(verbs) + bytes(rnd.randint(0, 255) for _ in range(rnd.randint(0, 40)))
                else:
                    junk += bytes(rnd.randint(0, 255) for _ in range(rnd.randint(0, 300)))
                junk += rnd.choice([b"\r\n", b"\n", b"\r", b""])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(bytes(junk))
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                try:
                    while s.recv(65536):
                        pass
                except (ConnectionError, TimeoutError):
                    pass
        # still serving, and no internal errors were logged
        with hello(port) as c:
            assert c.cmd("NOOP").startswith("250 ")
        assert not re.search(r"internal error|Traceback|session failed", srv.output), srv.output


def test_unix_socket_and_implicit_tls_listeners(tmp_path: Path) -> None:
    import ssl

    port = free_port()
    sock_path = tmp_path / "smtp.sock"
    conf = _conf(
        tmp_path,
        f"smtp unix://{sock_path} {{\n    deliver_to dummy\n}}\n"
        f"submission tls://127.0.0.1:{port} {{\n    tls self_signed\n    auth dummy\n    deliver_to dummy\n}}",
    )
    with running(conf) as srv:
        srv.started()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock_path))
            f = s.makefile("rwb")
            assert f.readline() == b"220 mx.maddy.test ESMTP Service Ready\r\n"
            f.write(b"HELO local\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
            f.flush()
            assert [f.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
            f.write(b"Subject: unix\r\n\r\nx\r\n.\r\nQUIT\r\n")
            f.flush()
            assert f.readline() == b"250 2.0.0 OK: queued\r\n"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            f = s.makefile("rwb")
            assert f.readline().startswith(b"220 ")
            f.write(b"EHLO tls\r\n")
            f.flush()
            caps = []
            while True:
                line = f.readline()
                caps.append(line.decode().rstrip())
                if line[3:4] == b" ":
                    break
            assert "250-AUTH PLAIN" in caps and "250-REQUIRETLS" in caps and "250-STARTTLS" not in caps


def test_rate_limit_spreads_transactions(tmp_path: Path) -> None:
    """maddy's TestSMTPFlood_EnvelopeAbort_Ratelimited, shorter: `all rate 10 1s`, 25 transactions."""
    import time

    port = free_port()
    conf = _conf(
        tmp_path,
        f"smtp tcp://127.0.0.1:{port} {{\n    limits {{\n        all rate 10 1s\n    }}\n    deliver_to dummy\n}}",
    )
    with running(conf) as srv:
        srv.started()
        with hello(port) as c:
            t0 = time.monotonic()
            for _ in range(25):
                c.cmd("MAIL FROM:<a@b.test>")
                assert c.cmd("RCPT TO:<x@maddy.test>").startswith("250 ")  # the limit is taken here (deferred)
                c.cmd("RSET")
            elapsed = time.monotonic() - t0
        assert 1.5 < elapsed < 4.5, elapsed
