"""The smtp / submission / lmtp endpoints against a real server process (spec §B.1, §D.2, §J).

One server with several endpoints serves most tests (module fixture); the
clients are raw sockets (exact bytes), Python's smtplib, and swaks / msmtp
when installed.
"""

from __future__ import annotations

import base64
import re
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import Server, free_port

pytestmark = pytest.mark.e2e

MSGID = r" \(msg ID = [0-9a-f]{8}\)"
FAIL2BAN = Path("/work/shared/fixtures/maddy-upstream/dist/fail2ban/filter.d/maddy-auth.conf")
PASSWORD_HASH = "bcrypt:$2b$04$8IV3lUonL0DwDNWMXC3.ae4meXvaFDTjkJFq/ioi0gQqcLw5dKunO"  # "secret"


class Client:
    """A raw SMTP client: send exact bytes, read exact replies."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 10.0) -> None:
        src = (source, 0) if source else None
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=src)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed; pending: " + repr(self.buf))
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def reply(self) -> list[str]:
        lines = [self._line()]
        while len(lines[-1]) >= 4 and lines[-1][3] == "-":
            lines.append(self._line())
        return lines

    def cmd(self, line: str) -> str:
        self.send(line + "\r\n")
        return self.reply()[-1]

    def closed(self) -> bool:
        try:
            self.sock.settimeout(3)
            return self.sock.recv(1) == b""
        except (ConnectionError, TimeoutError):
            return True

    def starttls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()


def hello(port: int, name: str = "client.test", lmtp: bool = False) -> Client:
    c = Client(port)
    c.reply()
    c.send(f"{'LHLO' if lmtp else 'EHLO'} {name}\r\n")
    c.reply()
    return c


@dataclass
class Ports:
    basic: int
    route: int
    lmtp: int
    sub: int
    sub_dummy: int
    sub_map: int
    metrics: int
    small: int
    limit: int
    proxy: int
    untrusted: int
    tls: int


CONFIG = """
hostname mx.maddy.test
tls off

smtp tcp://127.0.0.1:{p.basic} {{
    deliver_to dummy
}}

smtp tcp://127.0.0.1:{p.route} {{
    source blocked.test {{ reject 550 5.7.1 "Sender blocked" }}
    source vip@route.test {{
        destination only-vip.test {{ deliver_to dummy }}
        default_destination {{ reject 551 5.7.1 "VIP only goes to only-vip.test" }}
    }}
    default_source {{
        destination rejected.test {{ reject 541 5.1.1 "No such domain" }}
        destination ok.test {{ deliver_to dummy }}
        destination rr.test {{
            reroute {{
                destination inner@rr.test {{ deliver_to dummy }}
                default_destination {{ reject 550 5.1.2 "Rerouted and rejected" }}
            }}
        }}
        destination only-vip.test {{ reject 553 5.7.1 "Not for you" }}
        destination viapipe.test {{ deliver_to &local_routing }}
        default_destination {{ reject }}
    }}
}}

msgpipeline local_routing {{
    destination a@viapipe.test {{ deliver_to dummy }}
    default_destination {{ reject 550 5.1.1 "Unknown via pipeline" }}
}}

lmtp tcp://127.0.0.1:{p.lmtp} {{
    destination bad.test {{ reject 550 5.1.1 "Unknown user" }}
    default_destination {{ deliver_to dummy }}
}}

submission tcp://127.0.0.1:{p.sub} {{
    auth pass_table static {{
        entry "user@maddy.test" "{hash}"
    }}
    sasl_login yes
    deliver_to dummy
}}

submission tcp://127.0.0.1:{p.sub_map} {{
    auth_map email_localpart
    auth pass_table static {{
        entry "user" "{hash}"
    }}
    deliver_to dummy
}}

openmetrics tcp://127.0.0.1:{p.metrics}

submission tcp://127.0.0.1:{p.sub_dummy} {{
    auth dummy
    deliver_to dummy
}}

smtp tcp://127.0.0.1:{p.small} {{
    max_message_size 4K
    max_header_size 1K
    max_recipients 2
    max_received 2
    smtp_max_line_length 300
    read_timeout 1s
    buffer fs
    deliver_to dummy
}}

smtp tcp://127.0.0.1:{p.limit} {{
    limits {{
        all concurrency 1
    }}
    defer_sender_reject no
    deliver_to dummy
}}

smtp tcp://127.0.0.1:{p.proxy} {{
    proxy_protocol {{
        trust 127.0.0.1
        tls off
    }}
    deliver_to dummy
}}

smtp tcp://127.0.0.1:{p.untrusted} {{
    proxy_protocol {{
        trust 10.9.9.9
        tls off
    }}
    deliver_to dummy
}}

smtp tcp://127.0.0.1:{p.tls} {{
    tls self_signed
    check {{
        require_tls
    }}
    deliver_to dummy
}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Ports]]:
    tmp = tmp_path_factory.mktemp("smtp")
    ports = Ports(*(free_port() for _ in range(12)))
    conf = tmp / "maddy.conf"
    conf.write_text(f"state_dir {tmp}/state\nruntime_dir {tmp}/run\n" + CONFIG.format(p=ports, hash=PASSWORD_HASH))
    srv = Server(conf)
    try:
        srv.started(timeout=20)
        yield srv, ports
    finally:
        srv.close()


# -- greeting & basics ------------------------------------------------------------------------


def test_basic_ehlo_lines_exactly(server: tuple[Server, Ports]) -> None:
    """maddy's TestBasic."""
    _, p = server
    with Client(p.basic) as c:
        assert c.reply() == ["220 mx.maddy.test ESMTP Service Ready"]
        c.send("EHLO localhost\r\n")
        assert c.reply() == [
            "250-Hello localhost",
            "250-PIPELINING",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250-CHUNKING",
            "250-SMTPUTF8",
            "250-SIZE 33554432",
            "250 LIMITS RCPTMAX=20000",
        ]
        assert c.cmd("HELO localhost") == "250 2.0.0 Hello localhost"
        assert c.cmd("NOOP") == "250 2.0.0 I have successfully done nothing"
        assert c.cmd("VRFY postmaster") == "252 2.5.0 Cannot VRFY user, but will accept message"
        assert c.cmd("RSET") == "250 2.0.0 Session reset"
        assert c.cmd("LHLO x") == "500 5.5.1 This is not a LMTP server"
        assert c.cmd("STARTTLS") == "502 5.5.1 TLS not supported"
        # `tls off` forces plaintext auth on; with no provider the PLAIN exchange still starts
        assert c.cmd("AUTH PLAIN") == "334 "
        assert c.cmd("*") == "501 5.0.0 Negotiation cancelled"
        assert c.cmd("QUIT") == "221 2.0.0 Bye"


def test_full_transaction_smtplib(server: tuple[Server, Ports]) -> None:
    srv, p = server
    with smtplib.SMTP("127.0.0.1", p.basic, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("sender@client.test") == (250, b"2.0.0 Roger, accepting mail from <sender@client.test>")
        assert s.rcpt("rcpt@maddy.test") == (250, b"2.0.0 I'll make sure <rcpt@maddy.test> gets this")
        code, msg = s.data(b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n")
        assert (code, msg) == (250, b"2.0.0 OK: queued")
    srv.wait_for('smtp: accepted\t{"msg_id":')


def test_order_errors(server: tuple[Server, Ports]) -> None:
    _, p = server
    with Client(p.basic) as c:
        c.reply()
        assert c.cmd("MAIL FROM:<a@b.test>") == "502 5.5.1 Please introduce yourself first."
        c.cmd("EHLO x")
        assert c.cmd("RCPT TO:<a@b.test>") == "502 5.5.1 Missing MAIL FROM command."
        assert c.cmd("DATA") == "502 5.5.1 Missing RCPT TO command."
        assert c.cmd("DATA x") == "501 5.5.4 DATA command should not have any arguments"
        assert c.cmd("MAIL FROM a@b.test") == "501 5.5.2 Was expecting MAIL arg syntax of FROM:<address>"
        assert c.cmd("MAIL FROM:<a b@c>") == "501 5.5.2 Was expecting MAIL arg syntax of FROM:<address>"
        assert c.cmd("MAIL FROM:<a@b.test> A=B=C") == "501 5.5.4 Unable to parse MAIL ESMTP parameters"
        assert c.cmd("MAIL FROM:<a@b.test> RET=FULL") == "504 5.5.4 RET is not implemented"
        assert c.cmd("MAIL FROM:<a@b.test> FOO=BAR") == "500 5.5.4 Unknown MAIL FROM argument"
        assert c.cmd("MAIL FROM:<a@b.test> SIZE=x") == "501 5.5.4 Unable to parse SIZE as an integer"
        assert c.cmd("MAIL FROM:<a@b.test> SIZE=99999999999") == "501 5.5.4 Unable to parse SIZE as an integer"
        assert c.cmd("MAIL FROM:<a@b.test> SIZE=40000000") == "552 5.3.4 Max message size exceeded"
        assert c.cmd("MAIL FROM:<a@b.test> BODY=BINARYMIME") == "504 5.5.4 BINARYMIME is not implemented"
        assert c.cmd("MAIL FROM:<a@b.test> BODY=9BIT") == "501 5.5.4 Unknown BODY value"
        assert c.cmd("MAIL FROM:<a@b.test> BODY=8BITMIME SMTPUTF8") == "250 2.0.0 Roger, accepting mail from <a@b.test>"
        assert c.cmd("MAIL FROM:<a@b.test>") == "503 5.5.1 Error: nested MAIL command"
        assert c.cmd("DATA") == "502 5.5.1 Missing RCPT TO command."
        assert c.cmd("RCPT TO:<>") == "501 5.5.2 Was expecting RCPT arg syntax of TO:<address>"
        assert c.cmd("RCPT TO:<x@y.test> NOTIFY=NEVER") == "504 5.5.4 NOTIFY is not implemented"
        assert c.cmd("HELP") == "502 5.5.1 HELP command not implemented"
    # protocol errors: the 4th in a session ends it (go-smtp's errThreshold)
    with hello(p.basic) as c:
        assert c.cmd("FOOB bar") == "500 5.5.2 Syntax errors, FOOB command unrecognized"
        assert c.cmd("FOOBAR") == "501 5.5.2 Bad command"
        assert c.cmd("") == "500 5.5.2 Error: bad syntax"
        c.send("XY\r\n")
        assert c.reply() == ["501 5.5.2 Bad command"]
        assert c.reply() == ["500 5.5.1 Too many errors. Quiting now"]
        assert c.closed()
    with hello(p.basic) as c:
        assert c.cmd("MAIL\x00 FROM:<a@b>") == "501 5.5.2 Bad command"


def test_non_ascii_without_smtputf8(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.basic) as c:
        assert re.fullmatch("250 .*", c.cmd("MAIL FROM:<é@b.test>"))  # defer_sender_reject: the error comes at RCPT
        assert re.fullmatch("550 5.6.7 SMTPUTF8 is required for non-ASCII senders" + MSGID, c.cmd("RCPT TO:<a@b.test>"))
        c.cmd("RSET")
        c.cmd("MAIL FROM:<a@b.test>")
        assert re.fullmatch(
            "553 5.6.7 SMTPUTF8 is required for non-ASCII recipients" + MSGID, c.cmd("RCPT TO:<ü@b.test>")
        )
        c.cmd("RSET")
        c.cmd("MAIL FROM:<a@b.test> SMTPUTF8")
        assert c.cmd("RCPT TO:<ü@b.test>").startswith("250 ")


# -- routing ----------------------------------------------------------------------------------


def test_routing_matrix(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.route) as c:
        c.cmd("MAIL FROM:<someone@src.test>")
        assert c.cmd("RCPT TO:<a@ok.test>").startswith("250 ")
        assert re.fullmatch("541 5.1.1 No such domain" + MSGID, c.cmd("RCPT TO:<a@rejected.test>"))
        assert re.fullmatch("554 5.7.0 Message rejected due to a local policy" + MSGID, c.cmd("RCPT TO:<a@x.test>"))
        assert c.cmd("RCPT TO:<inner@RR.test>").startswith("250 ")
        assert re.fullmatch("550 5.1.2 Rerouted and rejected" + MSGID, c.cmd("RCPT TO:<outer@rr.test>"))
        assert re.fullmatch("553 5.7.1 Not for you" + MSGID, c.cmd("RCPT TO:<a@only-vip.test>"))
        assert c.cmd("RCPT TO:<a@viapipe.test>").startswith("250 ")  # through `msgpipeline local_routing`
        assert re.fullmatch("550 5.1.1 Unknown via pipeline" + MSGID, c.cmd("RCPT TO:<b@viapipe.test>"))
        assert c.cmd("DATA") == "354 Go ahead. End your data with <CR><LF>.<CR><LF>"
        c.send("Subject: x\r\n\r\nhello\r\n.\r\n")
        assert c.reply() == ["250 2.0.0 OK: queued"]
        # the exact-address source rule
        c.cmd("MAIL FROM:<vip@route.test>")
        assert c.cmd("RCPT TO:<a@only-vip.test>").startswith("250 ")
        assert re.fullmatch("551 5.7.1 VIP only goes to only-vip.test" + MSGID, c.cmd("RCPT TO:<a@ok.test>"))
        c.cmd("RSET")
        # null sender uses default_source
        c.cmd("MAIL FROM:<>")
        assert c.cmd("RCPT TO:<a@ok.test>").startswith("250 ")


def test_defer_sender_reject_repeats_error_at_each_rcpt(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.route) as c:
        assert c.cmd("MAIL FROM:<x@blocked.test>") == "250 2.0.0 Roger, accepting mail from <x@blocked.test>"
        r1, r2 = c.cmd("RCPT TO:<a@ok.test>"), c.cmd("RCPT TO:<b@ok.test>")
        assert re.fullmatch("550 5.7.1 Sender blocked" + MSGID, r1)
        assert r1 == r2


# -- lmtp -------------------------------------------------------------------------------------


def test_lmtp_per_recipient_replies(server: tuple[Server, Ports]) -> None:
    _, p = server
    with Client(p.lmtp) as c:
        assert c.reply() == ["220 mx.maddy.test LMTP Service Ready"]
        assert c.cmd("EHLO x") == "500 5.5.1 This is a LMTP server, use LHLO"
        c.send("LHLO client\r\n")
        assert c.reply()[0] == "250-Hello client"
        c.cmd("MAIL FROM:<s@maddy.test>")
        assert c.cmd("RCPT TO:<to1@maddy.test>").startswith("250 ")
        assert re.fullmatch("550 5.1.1 Unknown user" + MSGID, c.cmd("RCPT TO:<x@bad.test>"))
        assert c.cmd("RCPT TO:<to2@maddy.test>").startswith("250 ")
        assert c.cmd("DATA").startswith("354 ")
        c.send("Subject: x\r\n\r\nhi\r\n.\r\n")
        assert c.reply() == ["250 2.0.0 <to1@maddy.test> OK: queued"]
        assert c.reply() == ["250 2.0.0 <to2@maddy.test> OK: queued"]
    lm = smtplib.LMTP("127.0.0.1", p.lmtp, timeout=10)
    try:
        assert lm.sendmail("s@maddy.test", ["a@maddy.test", "b@maddy.test"], b"Subject: y\r\n\r\nz\r\n") == {}
    finally:
        lm.quit()


# -- submission & auth ------------------------------------------------------------------------


def _plain(authz: str, user: str, pwd: str) -> str:
    return base64.b64encode(f"{authz}\0{user}\0{pwd}".encode()).decode()


def test_submission_requires_auth_and_plain_login(server: tuple[Server, Ports]) -> None:
    srv, p = server
    with Client(p.sub) as c:
        c.reply()
        c.send("EHLO client\r\n")
        caps = c.reply()
        assert "250-AUTH PLAIN LOGIN" in caps
        assert c.cmd("MAIL FROM:<user@maddy.test>") == "502 5.7.0 Please authenticate first"
        # authzid != authcid is refused and logged for fail2ban
        assert c.cmd("AUTH PLAIN " + _plain("other", "user@maddy.test", "x")) == "535 5.7.8 Invalid credentials"
        assert c.cmd("AUTH PLAIN " + _plain("", "user@maddy.test", "secret")) == "235 2.0.0 Authentication succeeded"
        assert c.cmd("AUTH PLAIN " + _plain("", "user@maddy.test", "secret")) == "503 5.5.1 Already authenticated"
        assert c.cmd("MAIL FROM:<user@maddy.test>").startswith("250 ")
        assert c.cmd("RCPT TO:<rcpt@example.org>").startswith("250 ")
        c.cmd("DATA")
        c.send("Subject: no from\r\n\r\nbody\r\n.\r\n")
        assert re.fullmatch("554 5.6.0 Message does not contains a From header field" + MSGID, c.reply()[0])
        c.cmd("MAIL FROM:<user@maddy.test>")
        c.cmd("RCPT TO:<rcpt@example.org>")
        c.cmd("DATA")
        c.send("From: a@b.test, c@d.test\r\n\r\nbody\r\n.\r\n")
        assert re.fullmatch("554 5.6.0 Missing Sender header field" + MSGID, c.reply()[0])
        c.cmd("MAIL FROM:<user@maddy.test>")
        c.cmd("RCPT TO:<rcpt@example.org>")
        c.cmd("DATA")
        c.send("From: User <user@maddy.test>\r\nSubject: ok\r\n\r\nbody\r\n.\r\n")
        assert c.reply() == ["250 2.0.0 OK: queued"]
        for fields, err in [
            ("From: a@b.test\r\nDate: yesterday\r\n", "554 5.0.0 Malformed Date header"),
            ("From: a@b.test\r\nTo: not an address\r\n", "554 5.6.0 Invalid address in To"),
            ("From: a@b.test\r\nSender: x@y.test, z@y.test\r\n", "554 5.6.0 Invalid address in Sender"),
            ("From: <broken\r\n", "554 5.6.0 Invalid address in From"),
        ]:
            c.cmd("MAIL FROM:<user@maddy.test>")
            c.cmd("RCPT TO:<rcpt@example.org>")
            c.cmd("DATA")
            c.send(fields + "\r\nbody\r\n.\r\n")
            assert re.fullmatch(re.escape(err) + MSGID, c.reply()[0])
    with Client(p.sub) as c:
        c.reply()
        c.cmd("EHLO client")
        assert c.cmd("AUTH PLAIN " + _plain("", "user@maddy.test", "wrong")) == "535 5.7.8 Invalid credentials"
        c.send("AUTH LOGIN\r\n")
        assert c.reply() == ["334 VXNlcm5hbWU6"]
        c.send(base64.b64encode(b"User@Maddy.TEST").decode() + "\r\n")  # auth_map_normalize auto
        assert c.reply() == ["334 UGFzc3dvcmQ6"]
        c.send(base64.b64encode(b"secret").decode() + "\r\n")
        assert c.reply() == ["235 2.0.0 Authentication succeeded"]
    with Client(p.sub) as c:
        c.reply()
        c.cmd("EHLO client")
        assert c.cmd("AUTH PLAIN") == "334 "
        assert c.cmd("*") == "501 5.0.0 Negotiation cancelled"
        assert c.cmd("AUTH CRAM-MD5") == "454 4.7.0 unsupported SASL mechanism"
        assert c.cmd("AUTH") == "502 5.5.4 Missing parameter"
        assert c.cmd("AUTH PLAIN " + base64.b64encode(b"no-nuls").decode()) == "454 4.7.0 sasl: invalid response"
        assert c.cmd("AUTH PLAIN !!!") == "454 4.7.0 Invalid base64 data"
    with Client(p.sub_dummy) as c:  # `auth dummy` accepts any password
        c.reply()
        c.send("EHLO client\r\n")
        assert "250-AUTH PLAIN" in c.reply()
        assert c.cmd("AUTH PLAIN " + _plain("", "anyone", "anything")) == "235 2.0.0 Authentication succeeded"
        assert c.cmd("MAIL FROM:<anyone@maddy.test>").startswith("250 ")
    # the fail2ban filter shipped with maddy matches our log line
    srv.wait_for("authentication failed")
    line = next(ln for ln in srv.lines if "authentication failed" in ln)
    regex = re.search(r"failregex\s*=\s*(.*)", FAIL2BAN.read_text()).group(1)  # type: ignore[union-attr]
    regex = regex.replace("<HOST>", r"(?P<host>\S+)")
    m = re.search(regex, line)
    assert m is not None, line
    assert m.group("host") == "127.0.0.1"
    assert '"username":"user@maddy.test"' in line and "no auth. provider accepted creds" in line


def test_auth_map(server: tuple[Server, Ports]) -> None:
    """maddy's TestIMAPEndpointAuthMap, on submission: `user@example.org` logs in as `user`."""
    _, p = server
    with hello(p.sub_map) as c:
        assert c.cmd("AUTH PLAIN " + _plain("", "user@example.org", "secret")) == "235 2.0.0 Authentication succeeded"
    with hello(p.sub_map) as c:
        assert c.cmd("AUTH PLAIN " + _plain("", "user@example.org", "wrong")) == "535 5.7.8 Invalid credentials"
        assert c.cmd("AUTH PLAIN " + _plain("", "nolocalpart", "secret")) == "535 5.7.8 Invalid credentials"


def test_metrics(server: tuple[Server, Ports]) -> None:
    from tests.e2e.harness import get

    _, p = server
    with hello(p.route) as c:
        c.cmd("MAIL FROM:<a@src.test>")
        c.cmd("RCPT TO:<a@rejected.test>")
    status, text = get(p.metrics)
    assert status == 200
    assert re.search(
        r'^maddy_smtp_failed_commands\{module="smtp",command="RCPT",smtp_code="541",smtp_enchcode="5.1.1"\} [1-9]',
        text,
        re.M,
    ), text
    assert re.search(r'^maddy_smtp_started_transactions\{module="smtp"\} [1-9]', text, re.M)


# -- limits of size, count, lines -------------------------------------------------------------


def test_size_header_recipient_received_limits(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.small) as c:
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<1@b.test>")
        c.cmd("RCPT TO:<2@b.test>")
        assert c.cmd("RCPT TO:<3@b.test>") == "452 4.5.3 Maximum limit of 2 recipients reached"
        c.cmd("DATA")
        c.send("Subject: " + "x" * 200 + "\r\n" + ("X-Long: " + "y" * 200 + "\r\n") * 6 + "\r\nbody\r\n.\r\n")
        assert re.fullmatch("552 5.3.4 Message header size exceeds limit" + MSGID, c.reply()[0])
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<1@b.test>")
        c.cmd("DATA")
        c.send("Subject: big\r\n\r\n" + ("z" * 200 + "\r\n") * 30 + ".\r\n")
        assert re.fullmatch("552 5.3.4 Maximum message size exceeded" + MSGID, c.reply()[0])
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<1@b.test>")
        c.cmd("DATA")
        c.send("Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nloop\r\n.\r\n")
        want = "554 5.4.6 Too many Received header fields (3), possible forwarding loop"
        assert re.fullmatch(re.escape(want) + MSGID, c.reply()[0])
        # the session is still usable; `buffer fs` delivers fine
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<1@b.test>")
        c.cmd("DATA")
        c.send("Received: a\r\nSubject: fine\r\n\r\n" + "ok\r\n" * 100 + ".\r\n")
        assert c.reply() == ["250 2.0.0 OK: queued"]


def test_overlong_line_closes(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.small) as c:
        c.send("NOOP " + "a" * 400 + "\r\n")
        assert c.reply() == ["500 5.4.0 Too long line, closing connection"]
        assert c.closed()
    with hello(p.small) as c:  # also inside DATA
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<1@b.test>")
        c.cmd("DATA")
        c.send("Subject: x\r\n\r\n" + "b" * 400 + "\r\n.\r\n")
        assert re.fullmatch("554 5.0.0 Internal server error" + MSGID, c.reply()[0])
        assert c.reply() == ["500 5.4.0 Too long line, closing connection"]
        assert c.closed()
    with hello(p.basic) as c:  # beyond the stream buffer
        c.send("NOOP " + "a" * 200_000 + "\r\n")
        assert c.reply() == ["500 5.4.0 Too long line, closing connection"]


def test_idle_timeout(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.small) as c:
        t0 = time.monotonic()
        assert c.reply() == ["421 4.4.2 Idle timeout, bye bye"]
        assert 0.8 < time.monotonic() - t0 < 3
        assert c.closed()


# -- smuggling, bare LF, garbage --------------------------------------------------------------


@pytest.mark.parametrize(
    "terminator",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\r\n.\r\n", b"\n.\r\r\n"],
    ids=["lf-dot-lf", "crlf-dot-lf", "lf-dot-crlf", "cr-dot-crlf", "crlf-dot-cr", "crcrlf-dot-crlf", "lf-dot-crcrlf"],
)
def test_smuggled_end_of_data_does_not_end_message(server: tuple[Server, Ports], terminator: bytes) -> None:
    """go-smtp 0.21 semantics: only CRLF.CRLF ends DATA; a bare LF is data (accepted, not refused)."""
    srv, p = server
    with hello(p.basic) as c:
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<x@maddy.test>")
        c.cmd("DATA")
        smuggled = b"MAIL FROM:<evil@smuggle.test>\r\nRCPT TO:<victim@maddy.test>\r\nDATA\r\nSubject: smuggled\r\n"
        c.send(b"Subject: legit\r\n\r\nhello" + terminator + smuggled + b"\r\n.\r\n")
        # one message, one reply: nothing after the fake terminator was taken as a command
        assert c.reply() == ["250 2.0.0 OK: queued"]
        assert c.cmd("NOOP") == "250 2.0.0 I have successfully done nothing"
    assert "evil@smuggle.test" not in srv.output


def test_nul_and_garbage_and_pipelining(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.basic) as c:
        c.send(b"\x00\x01\x02\xff\xfe garbage\r\n")
        assert c.reply() == ["501 5.5.2 Bad command"]
        # NUL bytes inside the message are data
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<x@maddy.test>")
        c.cmd("DATA")
        c.send(b"Subject: nul\r\n\r\na\x00b\r\n.\r\n")
        assert c.reply() == ["250 2.0.0 OK: queued"]
        # a pipelined batch gets its replies in order
        c.send("RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@maddy.test>\r\nRCPT TO:<y@maddy.test>\r\nDATA\r\n")
        got = [c.reply()[0][:3] for _ in range(5)]
        assert got == ["250", "250", "250", "250", "354"]
        c.send("Subject: p\r\n\r\nx\r\n.\r\nNOOP\r\nJUNK junk\r\nQUIT\r\n")
        assert c.reply() == ["250 2.0.0 OK: queued"]
        assert c.reply()[0].startswith("250 2.0.0")
        assert c.reply()[0].startswith("500 5.5.2")
        assert c.reply() == ["221 2.0.0 Bye"]


def test_bdat_chunking(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.basic) as c:
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<x@maddy.test>")
        part1 = b"Subject: chunked\r\n\r\n"
        part2 = b"body with\r\n.\r\nno dot handling\r\n"
        c.send(b"BDAT %d\r\n" % len(part1) + part1)
        assert c.reply() == ["250 2.0.0 Continue"]
        c.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
        assert c.reply() == ["250 2.0.0 OK: queued"]
        assert c.cmd("DATA") == "502 5.5.1 Missing RCPT TO command."
        # a chunk refused before the transaction is dropped, never read as commands
        junk = b"MAIL FROM:<evil@smuggle.test>\r\n"
        c.send(b"BDAT %d LAST\r\n" % len(junk) + junk)
        assert c.reply() == ["502 5.5.1 Missing RCPT TO command."]
        assert c.cmd("NOOP").startswith("250 ")
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<x@maddy.test>")
        c.send(b"BDAT 3 NOTLAST\r\nabc")
        assert c.reply() == ["501 5.5.4 Unknown BDAT argument"]
        c.send(b"BDAT 33554433 LAST\r\n")  # larger than max_message_size: refused, the chunk is read away
        c.send(b"x" * 33554433)
        assert c.reply() == ["552 5.3.4 Max message size exceeded"]
        assert c.cmd("RCPT TO:<x@maddy.test>") == "502 5.5.1 Missing MAIL FROM command."
    with hello(p.basic) as c:
        c.send("BDAT x\r\n")
        assert c.reply() == ["501 5.5.4 Malformed size argument"]
        assert c.closed()


# -- limits module ----------------------------------------------------------------------------


def test_concurrency_limit_451_after_wait(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.limit) as c1, hello(p.limit) as c2:
        assert c1.cmd("MAIL FROM:<a@b.test>").startswith("250 ")
        t0 = time.monotonic()
        r = c2.cmd("MAIL FROM:<a@b.test>")
        waited = time.monotonic() - t0
        assert re.fullmatch("451 4.4.5 High load, try again later" + MSGID, r)
        assert 4.5 < waited < 8
        c1.cmd("RSET")  # releases the slot
        assert c2.cmd("MAIL FROM:<a@b.test>").startswith("250 ")


# -- PROXY protocol ---------------------------------------------------------------------------


def _incoming_src(srv: Server, sender: str) -> str:
    srv.wait_for(f'"sender":"{sender}"')
    line = next(ln for ln in srv.lines if f'"sender":"{sender}"' in ln)
    m = re.search(r'"src_ip":"([^"]+)"', line)
    assert m is not None
    return m.group(1)


def test_proxy_protocol_v1_v2_trusted_and_untrusted(server: tuple[Server, Ports]) -> None:
    srv, p = server
    with Client(p.proxy) as c:
        c.send("PROXY TCP4 10.1.2.3 127.0.0.1 4242 25\r\n")
        assert c.reply()[0].startswith("220 ")
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<v1@proxy.test>")
        c.cmd("RCPT TO:<a@b.test>")
    assert _incoming_src(srv, "v1@proxy.test") == "10.1.2.3:4242"
    with Client(p.proxy) as c:
        addr = socket.inet_aton("10.4.5.6") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 5151, 25)
        c.send(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addr)) + addr)
        assert c.reply()[0].startswith("220 ")
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<v2@proxy.test>")
        c.cmd("RCPT TO:<a@b.test>")
    assert _incoming_src(srv, "v2@proxy.test") == "10.4.5.6:5151"
    with Client(p.untrusted) as c:
        c.send("PROXY TCP4 10.1.2.3 127.0.0.1 4242 25\r\n")
        assert c.reply()[0].startswith("220 ")
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<untrusted@proxy.test>")
        c.cmd("RCPT TO:<a@b.test>")
    assert _incoming_src(srv, "untrusted@proxy.test").startswith("127.0.0.1:")
    for bad in (
        b"PROXY TCP4 nonsense\r\n",
        b"PROXY TCP9 1.2.3.4 1.2.3.4 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x00",
    ):
        with Client(p.proxy) as c:
            c.send(bad)
            assert c.closed()
    srv.wait_for("invalid PROXY protocol header", count=3)
    with Client(p.proxy) as c:  # no header at all: served as is (after the header wait)
        c.send("EHLO direct\r\n")
        assert c.reply()[0].startswith("220 ")
        assert c.reply()[0] == "250-Hello direct"


# -- TLS --------------------------------------------------------------------------------------


def test_starttls_and_require_tls(server: tuple[Server, Ports]) -> None:
    """maddy's TestCheckRequireTLS."""
    _, p = server
    with hello(p.tls) as c:
        c.send("EHLO x\r\n")
        caps = c.reply()
        assert "250-STARTTLS" in caps and not any("REQUIRETLS" in x for x in caps)
        c.cmd("MAIL FROM:<a@b.test>")
        assert re.fullmatch("550 5.7.1 TLS conversation required" + MSGID, c.cmd("RCPT TO:<x@maddy.test>"))
        c.cmd("RSET")
        assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        c.starttls()
        assert c.cmd("MAIL FROM:<a@b.test>") == "502 5.5.1 Please introduce yourself first."
        c.send("EHLO x\r\n")
        caps = c.reply()
        assert "250-REQUIRETLS" in caps and "250-STARTTLS" not in caps
        assert c.cmd("MAIL FROM:<a@b.test> REQUIRETLS").startswith("250 ")
        assert c.cmd("RCPT TO:<x@maddy.test>").startswith("250 ")
        c.cmd("DATA")
        c.send("Subject: tls\r\n\r\nx\r\n.\r\n")
        assert c.reply() == ["250 2.0.0 OK: queued"]


def test_starttls_discards_pipelined_plaintext(server: tuple[Server, Ports]) -> None:
    _, p = server
    with hello(p.tls) as c:
        c.send("STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert c.reply() == ["220 2.0.0 Ready to start TLS"]
        c.starttls()
        assert c.cmd("RCPT TO:<x@maddy.test>") == "502 5.5.1 Missing MAIL FROM command."


# -- real clients -----------------------------------------------------------------------------


def test_swaks(server: tuple[Server, Ports]) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    _, p = server
    r = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{p.route}", "--from", "s@src.test", "--to", "a@ok.test", "--pipeline"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 OK: queued" in r.stdout
    r = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{p.route}", "--from", "s@src.test", "--to", "a@rejected.test"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode != 0 and "541 5.1.1 No such domain" in r.stdout
    r = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{p.basic}", "--to", "a@ok.test", "--body", "x\n.\nsmuggle\n"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 0, r.stdout  # swaks sends CRLF and dot-stuffs: fine


def test_msmtp_submission_auth(server: tuple[Server, Ports], tmp_path: Path) -> None:
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp is not installed (apt-get install msmtp)")
    _, p = server
    cmd = [
        "msmtp",
        "--host=127.0.0.1",
        f"--port={p.sub}",
        "--auth=plain",
        "--user=user@maddy.test",
        "--passwordeval=echo secret",
        "--tls=off",
        "--from=user@maddy.test",
        "rcpt@example.org",
    ]
    msg = b"From: user@maddy.test\nTo: rcpt@example.org\nSubject: msmtp\n\nhello\n"
    r = subprocess.run(cmd, input=msg, capture_output=True, timeout=20, check=False)
    assert r.returncode == 0, r.stderr
    bad = [c if not c.startswith("--passwordeval") else "--passwordeval=echo wrong" for c in cmd]
    r = subprocess.run(bad, input=msg, capture_output=True, timeout=20, check=False)
    assert r.returncode != 0 and b"535" in r.stderr, r.stderr


def test_parallel_sessions(server: tuple[Server, Ports]) -> None:
    _, p = server
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", p.basic, timeout=10) as s:
                for j in range(5):
                    s.sendmail(f"s{i}@a.test", [f"r{j}@b.test"], b"Subject: x\r\n\r\nbody\r\n")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
