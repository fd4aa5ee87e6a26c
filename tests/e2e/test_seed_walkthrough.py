"""The seed walkthrough as one scenario: two servers running maddy's own default config.

Both instances run `../shared/fixtures/maddy-upstream/default/maddy.conf` with only what a user
edits changed: the `$(hostname)`/`$(primary_domain)` macros, the certificate paths, the listen
addresses (loopback, free ports; port 25 is `-debug.smtpport`), plus `state_dir`/`runtime_dir`
lines so the test owns its files. Everything else — the submission pipeline with
authorize_sender and DKIM signing, the queue with its bounce pipeline, target.remote with
mx_auth { dane; mtasts; local_policy }, the MX endpoint with `dmarc yes` and
require_mx_record/dkim/spf — is maddy's text.

1. A (example.org, 127.86.7.2) starts for the first time: it creates its DKIM key and writes the
   TXT record to publish, which the test publishes in the loopback DNS zone.
2. alice submits with `msmtp` over STARTTLS on A's submission port: `250 … queued`.
3. A signs, queues, finds example.net's MX in DNS (127.86.7.3) and delivers there over STARTTLS.
4. B (example.net) checks SPF, DKIM and DMARC: all pass; the message lands in bob's INBOX.
5. bob reads it over IMAP with imaplib (STARTTLS) and sees the results.
6. A message to a user B does not know comes back to alice as a DSN (multipart/report).
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.dnsserver import DNSServer
from tests.e2e.harness import ROOT, Server, free_port, wait_until
from tests.e2e.scenario_helpers import MailEnv
from tests.testca import CA

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DEFAULT_CONF = ROOT.parent / "shared" / "fixtures" / "maddy-upstream" / "default" / "maddy.conf"
A_IP, B_IP = "127.86.7.2", "127.86.7.3"
PASSWORD = "seed-walkthrough"


def site_config(tmp: Path, ip: str, domain: str, ports: dict[str, int], *, cert: Path, key: Path) -> str:
    """maddy's default config with the edits its comments ask a user to make, and nothing else."""
    text = DEFAULT_CONF.read_text()
    edits = [
        ("$(hostname) = example.org", f"$(hostname) = mx.{domain}"),
        ("$(primary_domain) = example.org", f"$(primary_domain) = {domain}"),
        ("tls file /etc/maddy/certs/$(hostname)/fullchain.pem /etc/maddy/certs/$(hostname)/privkey.pem",
         f"tls file {cert} {key}"),
        ("smtp tcp://0.0.0.0:25 {", f"smtp tcp://{ip}:{ports['smtp']} {{"),
        ("submission tls://0.0.0.0:465 tcp://0.0.0.0:587 {",
         f"submission tls://{ip}:{ports['submissions']} tcp://{ip}:{ports['submission']} {{"),
        ("imap tls://0.0.0.0:993 tcp://0.0.0.0:143 {",
         f"imap tls://{ip}:{ports['imaps']} tcp://{ip}:{ports['imap']} {{"),
    ]
    for old, new in edits:
        assert text.count(old) == 1, f"the upstream default config changed: {old!r}"
        text = text.replace(old, new)
    return f"state_dir {tmp}/state\nruntime_dir {tmp}/run\n" + text


@dataclass
class World:
    a: MailEnv
    b: MailEnv
    ca: CA
    ca_file: Path
    dns: DNSServer
    servers: dict[str, Server]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not DEFAULT_CONF.exists():
        pytest.skip(f"{DEFAULT_CONF} is not there")
    tmp = tmp_path_factory.mktemp("seed")
    ca = CA("seed walkthrough root")
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.pem)
    smtp_port = free_port()  # every MX listens on this port (-debug.smtpport), on its own address
    dns = DNSServer()
    dns.add("example.org", "MX", "10 mx.example.org.")
    dns.add("mx.example.org", "A", A_IP)
    dns.add("example.net", "MX", "10 mx.example.net.")
    dns.add("mx.example.net", "A", B_IP)
    dns.add_txt("example.org", "v=spf1 ip4:127.0.0.0/8 -all")
    dns.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    dns.add_txt("example.net", "v=spf1 ip4:127.0.0.0/8 -all")
    envs: dict[str, MailEnv] = {}
    for name, ip, domain in (("a", A_IP, "example.org"), ("b", B_IP, "example.net")):
        d = tmp / name
        d.mkdir()
        leaf = ca.issue(f"mx.{domain}", ip)
        cert, key = leaf.write(d, "tls")
        ports = {k: free_port() for k in ("submission", "submissions", "imap", "imaps")}
        ports["smtp"] = smtp_port
        conf = d / "maddy.conf"
        conf.write_text(site_config(d, ip, domain, ports, cert=cert, key=key))
        env = MailEnv(d, conf, ports)
        for user in (f"alice@{domain}", f"bob@{domain}"):
            for cmd in (["creds", "create", "-p", PASSWORD, user], ["imap-acct", "create", user]):
                r = env.cli(*cmd)
                assert r.returncode == 0, f"{name}: {' '.join(cmd)}: {r.stderr}"
        envs[name] = env
    servers: dict[str, Server] = {}
    with dns:
        args = ("-debug.dnsoverride", dns.override, "-debug.smtpport", str(smtp_port))
        try:
            for name in ("b", "a"):
                servers[name] = Server(envs[name].conf, args=args)
                servers[name].started(timeout=30)
            # first start made A's DKIM key; publish the record it printed, as the walkthrough says
            dns_file = envs["a"].state / "dkim_keys" / "example.org_default.dns"
            record = dns_file.read_text().strip()
            dns.add_txt("default._domainkey.example.org", *(record[i : i + 255] for i in range(0, len(record), 255)))
            yield World(envs["a"], envs["b"], ca, ca_file, dns, servers)
        finally:
            for s in servers.values():
                s.close()


def msmtp(world: World, to: str, msg: bytes) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        "msmtp", f"--host={A_IP}", f"--port={world.a.ports['submission']}", "--tls=on", "--tls-starttls=on",
        f"--tls-trust-file={world.ca_file}", "--tls-host-override=mx.example.org", "--auth=plain",
        "--user=alice@example.org",
        f"--passwordeval=echo {PASSWORD}", "--domain=laptop.example.org", "--from=alice@example.org", to,
    ]
    return subprocess.run(cmd, input=msg, capture_output=True, timeout=60, check=False)


def imap_fetch_all(world: World, env: MailEnv, ip: str, user: str) -> list[bytes]:
    ctx = ssl.create_default_context(cafile=str(world.ca_file))
    ctx.check_hostname = False  # the certificate names mx.<domain>; we connect by address
    c = imaplib.IMAP4(ip, env.ports["imap"], timeout=20)
    try:
        c.starttls(ctx)
        c.login(user, PASSWORD)
        c.select("INBOX", readonly=True)
        typ, data = c.uid("SEARCH", "ALL")
        assert typ == "OK"
        out = []
        for uid in data[0].split():
            typ, parts = c.uid("FETCH", uid, "(BODY.PEEK[])")
            assert typ == "OK"
            item = parts[0]
            assert isinstance(item, tuple)
            out.append(item[1])
    except BaseException:
        c.shutdown()
        raise
    c.logout()
    return out


def wait_for_message(world: World, env: MailEnv, ip: str, user: str, mark: str) -> EmailMessage:
    found: list[bytes] = []

    def arrived() -> bool:
        found[:] = [m for m in imap_fetch_all(world, env, ip, user) if mark.encode() in m]
        return bool(found)

    wait_until(arrived, timeout=60, what=f"{mark} in {user}'s INBOX")
    msg = email.message_from_bytes(found[0], policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_first_start_wrote_the_dkim_record_to_publish(world: World) -> None:
    dns_file = world.a.state / "dkim_keys" / "example.org_default.dns"
    assert (world.a.state / "dkim_keys" / "example.org_default.key").exists()
    record = dns_file.read_text().strip()
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+", record), record
    assert "server started" in world.servers["a"].output


def test_msmtp_submission_is_signed_delivered_by_mx_and_passes_at_b(world: World) -> None:
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp is not installed")
    mark = "seed-walkthrough-1"
    msg = (
        "From: Alice <alice@example.org>\nTo: Bob <bob@example.net>\nSubject: hello from A\n"
        f"Message-ID: <{mark}@example.org>\nDate: Tue, 24 Nov 2026 10:00:00 +0000\n\n{mark}\n"
    ).encode()
    r = msmtp(world, "bob@example.net", msg)
    assert r.returncode == 0, r.stderr
    got = wait_for_message(world, world.b, B_IP, "bob@example.net", mark)
    sig = " ".join(got.get_all("DKIM-Signature") or [])
    assert "d=example.org" in sig.replace(" ", "") and "s=default" in sig.replace(" ", "")
    [ar_field] = got.get_all("Authentication-Results") or []
    ar = " ".join(str(ar_field).split())
    assert ar.startswith("mx.example.net;"), ar
    assert "spf=pass" in ar and "dkim=pass header.d=example.org" in ar and ar.endswith(
        "dmarc=pass header.from=example.org"), ar
    received = " ".join(" ".join(str(v).split()) for v in got.get_all("Received") or [])
    assert "by mx.example.net" in received and "with ESMTPS" in received, received  # A → B over STARTTLS
    assert "by mx.example.org" in received  # A's own submission hop


def test_unknown_remote_user_bounces_back_to_the_sender(world: World) -> None:
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp is not installed")
    mark = "seed-walkthrough-bounce"
    msg = (
        "From: alice@example.org\nTo: nobody@example.net\nSubject: to nobody\n"
        f"Message-ID: <{mark}@example.org>\n\n{mark}\n"
    ).encode()
    r = msmtp(world, "nobody@example.net", msg)
    assert r.returncode == 0, r.stderr  # A queued it; B refuses it later
    dsn = wait_for_message(world, world.a, A_IP, "alice@example.org", mark)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert str(dsn["From"]) == "MAILER-DAEMON@example.org"
    parts = list(dsn.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                      "message/rfc822-headers"]
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; nobody@example.net" in status
    assert "Action: failed" in status
    assert re.search(r"Status: 5\.\d+\.\d+", status), status
    # a second, independent DSN parser: GNU Mailman's bounce detector
    from flufl.bounce import scan_message

    assert scan_message(email.message_from_bytes(dsn.as_bytes())) == {b"nobody@example.net"}


def test_mx_down_then_back_is_retried_from_the_queue(world: World) -> None:
    """B is down: A keeps the message in its queue (listed by `pymaddy queue list`); B comes
    back and `pymaddy queue flush` delivers it at once, exactly once."""
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp is not installed")
    world.servers["b"].close()
    mark = "seed-walkthrough-retry"
    msg = (
        "From: alice@example.org\nTo: bob@example.net\nSubject: while B was down\n"
        f"Message-ID: <{mark}@example.org>\n\n{mark}\n"
    ).encode()
    r = msmtp(world, "bob@example.net", msg)
    assert r.returncode == 0, r.stderr
    world.servers["a"].wait_for("connect: connection refused")  # the first attempt failed

    def listed() -> bool:
        out = world.a.cli("queue", "list").stdout
        return "alice@example.org -> bob@example.net" in out

    wait_until(listed, what="the message in A's queue")
    args = ("-debug.dnsoverride", world.dns.override, "-debug.smtpport", str(world.b.ports["smtp"]))
    world.servers["b"] = Server(world.b.conf, args=args).started(timeout=30)
    r2 = world.a.cli("queue", "flush")
    assert r2.returncode == 0 and "scheduled for delivery now" in r2.stdout, (r2.stdout, r2.stderr)
    wait_for_message(world, world.b, B_IP, "bob@example.net", mark)
    wait_until(lambda: "is empty" in world.a.cli("queue", "list").stdout, what="A's queue to empty")
    copies = [m for m in imap_fetch_all(world, world.b, B_IP, "bob@example.net") if mark.encode() in m]
    assert len(copies) == 1
