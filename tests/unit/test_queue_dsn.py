"""DSNs as target.queue writes them parse as RFC 3464 / RFC 6522 reports (spec §E)."""

from __future__ import annotations

import email
import email.message
import email.policy

from pymaddy.mail.message import Header
from pymaddy.queue import dsn


def parts(msg: email.message.Message) -> list[email.message.Message]:
    """The sub-parts of a multipart (or message/*) part, typed."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, email.message.Message)]


def _report(utf8: bool = False, action: str = dsn.FAILED, rcpts: int = 2) -> email.message.Message:
    h = Header()
    h.add("From", "alice@example.org")
    h.add("Subject", "the original")
    infos = [
        dsn.RcptInfo(f"r{i}@example.net", action, (5, 1, 1) if action == dsn.FAILED else (4, 4, 2),
                     dsn.Diagnostic(550 if action == dsn.FAILED else 451, (5, 1, 1) if action == dsn.FAILED
                                    else (4, 4, 2), f"no such user\r\nline {i}"))
        for i in range(rcpts)
    ]
    mta = dsn.MTAInfo("mx.example.org", received_from_mta="client.example.org", x_sender="alice@example.org",
                      x_message_id="0a1b2c3d", arrival=1700000000.0, last_attempt=1700000900.0)
    env = dsn.Envelope("<feedf00d@example.org>", "MAILER-DAEMON@example.org", "alice@example.org")
    header, body = dsn.generate(utf8, env, mta, infos, h, now=1700001000.0)
    return email.message_from_bytes(header.to_bytes() + b"\r\n" + body, policy=email.policy.compat32)


def test_failed_dsn_is_a_delivery_status_report() -> None:
    msg = _report()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [k for k, _ in msg.items()] == ["Date", "Message-Id", "Content-Transfer-Encoding", "Content-Type",
                                          "MIME-Version", "Auto-Submitted", "To", "From", "Subject"]
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["From"] == "MAILER-DAEMON@example.org"
    assert msg["Message-Id"] == "<feedf00d@example.org>"
    text, status, original = parts(msg)
    assert text.get_content_type() == "text/plain"
    body = str(text.get_payload())
    assert "This is the mail delivery system at mx.example.org." in body
    assert "Message ID: 0a1b2c3d" in body
    assert "Arrival: 2023-11-14 22:13:20 +0000 UTC" in body
    assert "Delivery to r1@example.net failed with error: SMTP error 550: no such user" in body
    assert status.get_content_type() == "message/delivery-status"
    groups = parts(status)
    assert len(groups) == 3  # per-message fields, then one group per recipient
    assert groups[0]["Reporting-MTA"] == "dns; mx.example.org"
    assert groups[0]["Received-From-MTA"] == "dns; client.example.org"
    assert groups[0]["X-Maddy-Sender"] == "rfc822; alice@example.org"
    assert groups[0]["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert groups[1]["Final-Recipient"] == "rfc822; r0@example.net"
    assert groups[1]["Action"] == "failed"
    assert groups[1]["Status"] == "5.1.1"
    assert groups[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user  line 0"  # CR LF made spaces
    assert original.get_content_type() == "message/rfc822-headers"
    [fields] = parts(original)
    assert fields["Subject"] == "the original"


def test_smtputf8_dsn_uses_global_types() -> None:
    msg = _report(utf8=True, rcpts=1)
    _, status, original = parts(msg)
    assert status.get_content_type() == "message/global-delivery-status"
    assert original.get_content_type() == "message/global-headers"
    assert "Final-Recipient: utf8; r0@example.net" in status.as_string()


def test_delayed_dsn() -> None:
    msg = _report(action=dsn.DELAYED, rcpts=1)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, status, _ = parts(msg)
    assert "is delayed with error" in str(text.get_payload())
    assert "Action: delayed" in status.as_string()
    assert "Status: 4.4.2" in status.as_string()
