"""The README's first command: `pymaddy dev` serves the development config with its demo account.

It uses the fixed development ports (10025, 10587, 10465, 10143, 10993, 9749) and `.dev/` in the
checkout, exactly as a developer gets them; the test skips if those ports are taken.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT

PORTS = (10025, 10587, 10465, 10143, 10993, 9749)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not all(_port_free(p) for p in PORTS), reason="a development server already uses the dev ports")
def test_pymaddy_dev_serves_demo_account() -> None:
    shutil.rmtree(ROOT / ".dev", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYMADDY_ALLOW_ROOT", "NOTIFY_SOCKET")}
    env["PYMADDY_WATCH_CONFIG"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymaddy", "dev"],
        cwd="/",  # it finds its checkout by itself
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any(ln.startswith("server started") for ln in lines):
            assert proc.poll() is None, "\n".join(lines)
            assert time.monotonic() < deadline, "\n".join(lines)
            time.sleep(0.05)
        assert "demo account: demo@pymaddy.test / demo" in lines

        # A user sends through submission with STARTTLS and AUTH, to an alias of the demo account.
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", 10587, timeout=10) as c:
            c.starttls(context=tls)
            c.login("demo@pymaddy.test", "demo")
            msg = b"Subject: hi\r\nFrom: demo@pymaddy.test\r\n\r\nhello\r\n"
            refused = c.sendmail("demo@pymaddy.test", ["info@pymaddy.test"], msg)
            assert refused == {}
            # Mail for another domain is signed and queued for MX delivery (no network here: it waits).
            out = b"From: demo@pymaddy.test\r\nSubject: out\r\n\r\nbye\r\n"
            assert c.sendmail("demo@pymaddy.test", ["friend@remote.test"], out) == {}
        # A remote MTA delivers to a sub-address on the MX port.
        with smtplib.SMTP("127.0.0.1", 10025, timeout=10) as c:
            code, _ = c.ehlo("mx.remote.test")
            assert code == 250
            c.sendmail("someone@remote.test", ["demo+news@pymaddy.test"], b"Subject: x\r\n\r\nbody\r\n")
        # Wrong password is refused the way maddy refuses it.
        with smtplib.SMTP("127.0.0.1", 10587, timeout=10) as c:
            c.starttls(context=tls)
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                c.login("demo@pymaddy.test", "wrong")
            assert err.value.smtp_code == 535
        # The demo user reads both messages over IMAPS.
        import imaplib

        with imaplib.IMAP4_SSL("127.0.0.1", 10993, ssl_context=tls, timeout=10) as im:
            im.login("demo@pymaddy.test", "demo")
            typ, data = im.select("INBOX")
            assert typ == "OK" and data == [b"2"]
            typ, found = im.search(None, "SUBJECT", "hi")
            assert found == [b"1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0, "\n".join(lines)
    assert any(ln.startswith("dropped privileges") for ln in lines) or os.geteuid() != 0
    import sqlite3

    db = sqlite3.connect(Path(ROOT, ".dev", "state", "imapsql.db"))
    try:
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
    finally:
        db.close()
    state = Path(ROOT, ".dev", "state")
    assert (state / "dkim_keys" / "pymaddy.test_default.dns").read_text().startswith("v=DKIM1; k=rsa; p=")
    queued = list((state / "remote_queue").glob("*.meta"))
    assert len(queued) == 1 and b"DKIM-Signature:" in queued[0].with_suffix(".header").read_bytes()
    shutil.rmtree(ROOT / ".dev", ignore_errors=True)
