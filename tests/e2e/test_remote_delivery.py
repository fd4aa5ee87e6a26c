"""End to end: target.remote delivering to MX hosts on loopback (spec §B.3, RFC 5321 §5, RFC 8461, RFC 7672).

The world: tests/dnsserver.py answers for every domain (`-debug.dnsoverride`),
a test CA signs the MX and MTA-STS certificates (the sender trusts it through
SSL_CERT_FILE), an HTTPS server on NET.5:443 publishes MTA-STS policies, and the
receiving MX hosts are one pymaddy process with three smtp endpoints on
distinct loopback addresses — NET.2 without TLS, NET.3 with a CA-signed
certificate for mx1.tls.test, NET.4 with a certificate no CA vouches for
(DANE) — plus Debian's Postfix on NET.6. All listen on the same port, which
the sending instance is told with `-debug.smtpport`. Each receiving endpoint
files everything into its own account, so a test sees which MX got the mail.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dnsserver import DNSServer
from tests.e2e.harness import Server, free_port, wait_until
from tests.e2e.scenario_helpers import MailEnv, Stored
from tests.httpsserver import HTTPSServer
from tests.testca import CA, tlsa_data

pytestmark = pytest.mark.e2e

# a /24 of loopback of our own, so parallel test runs of other files do not collide
NET = f"127.86.{os.getpid() % 250 + 1}."

CONFIG_A = """
hostname mx.sender.test
state_dir {tmp}/a/state
runtime_dir {tmp}/a/run
tls off

target.remote outbound {{
    mx_auth {{
        mtasts
        dane
    }}
}}

target.remote strict {{
    force_ipv4 yes
    mx_auth {{
        dane
        local_policy {{
            min_tls_level authenticated
        }}
    }}
}}

target.remote sourced {{
    local_ip {net}7
}}

target.remote limited {{
    limits {{
        destination rate 1 60s
    }}
}}

smtp tcp://127.0.0.1:{a_smtp} {{
    destination tls.test dane.test danebad.test v4only.test untrusted.test {{
        deliver_to &strict
    }}
    destination sourced.test {{
        deliver_to &sourced
    }}
    destination limited.test {{
        deliver_to &limited
    }}
    destination quarantine.test {{
        check {{
            command sh -c "exit 2"
        }}
        deliver_to &outbound
    }}
    default_destination {{
        deliver_to &outbound
    }}
}}
"""

CONFIG_R = """
hostname mx.receiver.test
state_dir {tmp}/r/state
runtime_dir {tmp}/r/run
tls off

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

smtp tcp://{net}2:{port} {{
    tls off
    max_message_size 2K
    modify {{
        replace_rcpt regexp ".*" "plain@receiver.test"
    }}
    deliver_to &local_mailboxes
}}

smtp tcp://{net}3:{port} {{
    tls file {tmp}/mx1.crt {tmp}/mx1.key
    modify {{
        replace_rcpt regexp ".*" "tls@receiver.test"
    }}
    deliver_to &local_mailboxes
}}

{v6_endpoint}
smtp tcp://{net}4:{port} {{
    tls file {tmp}/dane.crt {tmp}/dane.key
    modify {{
        replace_rcpt regexp ".*" "dane@receiver.test"
    }}
    deliver_to &local_mailboxes
}}
"""

V6_ENDPOINT = """
smtp tcp://[::1]:{port} {{
    tls file {tmp}/mx1.crt {tmp}/mx1.key
    modify {{
        replace_rcpt regexp ".*" "v6@receiver.test"
    }}
    deliver_to &local_mailboxes
}}
"""


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


POSTFIX_MAIN = """
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
myhostname = mx.postfix.test
mydestination =
inet_interfaces = all
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
virtual_mailbox_domains = postfix.test
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = texthash:{d}/conf/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
default_transport = error
relay_transport = error
local_transport = error
alias_maps =
alias_database =
maillog_file_prefixes = /tmp
maillog_file = {d}/maillog
syslog_name = pymaddy-test-postfix
"""

POSTFIX_SERVICES = """\
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A private Postfix instance (own config, queue and mail directories) as the MX of postfix.test."""

    def __init__(self, addr: str) -> None:
        # not under pytest's tmp_path: that is 0700 root-only, and Postfix's daemons run as `postfix`
        d = self.d = Path(tempfile.mkdtemp(prefix="pymaddy-postfix-"))
        d.chmod(0o755)
        for sub in ("conf", "queue", "data", "mail"):
            (d / sub).mkdir(parents=True)
        shutil.chown(d / "data", "postfix")
        shutil.chown(d / "mail", "nobody")
        (d / "conf" / "main.cf").write_text(POSTFIX_MAIN.format(d=d))
        (d / "conf" / "master.cf").write_text(f"{addr} inet n - n - - smtpd\n" + POSTFIX_SERVICES)
        (d / "conf" / "vmailbox").write_text("u@postfix.test u/\n")

    def _cmd(self, what: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.d / "conf"), what], capture_output=True, text=True, timeout=60, check=False
        )

    def start(self) -> None:
        r = self._cmd("start")
        log = self.d / "maillog"
        assert r.returncode == 0, r.stderr + r.stdout + (log.read_text() if log.exists() else "")

    def stop(self) -> None:
        self._cmd("stop")
        shutil.rmtree(self.d, ignore_errors=True)

    def delivered(self) -> list[bytes]:
        new = self.d / "mail" / "u" / "new"
        return [p.read_bytes() for p in new.iterdir()] if new.exists() else []


@dataclass
class World:
    tmp: Path
    a_smtp: int
    sender: Server
    receiver: Server
    r: MailEnv
    https: HTTPSServer
    postfix: Postfix | None
    ipv6: bool


def _zone(dns: DNSServer, ca: CA, dane_leaf_tlsa: bytes) -> None:
    n = NET
    for name, rdtype, value in [
        ("plain.test", "MX", "10 mx.plain.test."),
        ("mx.plain.test", "A", n + "2"),
        ("tls.test", "MX", "10 mx1.tls.test."),
        ("mx1.tls.test", "A", n + "3"),
        ("sts.test", "MX", "10 mx1.tls.test."),
        ("mta-sts.sts.test", "A", n + "5"),
        ("stsbad.test", "MX", "10 mx1.tls.test."),
        ("mta-sts.stsbad.test", "A", n + "5"),
        ("dane.test", "MX", "10 mx.dane.test."),
        ("mx.dane.test", "A", n + "4"),
        ("_25._tcp.mx.dane.test", "TLSA", "3 1 1 " + dane_leaf_tlsa.hex()),
        ("danebad.test", "MX", "10 mx.danebad.test."),
        ("mx.danebad.test", "A", n + "4"),
        ("_25._tcp.mx.danebad.test", "TLSA", "3 1 1 " + "00" * 32),
        ("nullmx.test", "MX", "0 ."),
        ("v6.test", "MX", "10 mx.v6.test."),
        ("v4only.test", "MX", "10 mx.v6.test."),
        ("mx.v6.test", "A", n + "3"),
        ("mx.v6.test", "AAAA", "::1"),
        ("ststest.test", "MX", "10 mx1.tls.test."),
        ("mta-sts.ststest.test", "A", n + "5"),
        ("untrusted.test", "MX", "10 mx.untrusted.test."),
        ("mx.untrusted.test", "A", n + "4"),
        ("sourced.test", "MX", "10 mx.plain.test."),
        ("limited.test", "MX", "10 mx.plain.test."),
        ("quarantine.test", "MX", "10 mx.plain.test."),
        ("implicit.test", "A", n + "2"),
        ("fallback.test", "MX", "10 mx-dead.fallback.test."),
        ("fallback.test", "MX", "20 mx.plain.test."),
        ("mx-dead.fallback.test", "A", n + "9"),
        ("postfix.test", "MX", "10 mx.postfix.test."),
        ("mx.postfix.test", "A", n + "6"),
    ]:
        dns.add(name, rdtype, value)
    dns.add_txt("_mta-sts.sts.test", "v=STSv1; id=20261124;")
    dns.add_txt("_mta-sts.stsbad.test", "v=STSv1; id=20261124;")
    dns.add_txt("_mta-sts.ststest.test", "v=STSv1; id=1;")
    dns.authenticate("dane.test")
    dns.authenticate("danebad.test")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("remote")
    for d in ("a", "r"):
        (tmp / d).mkdir()
    ca = CA()
    (tmp / "ca.pem").write_bytes(ca.pem)
    ca.issue("mx1.tls.test", "mx.v6.test").write(tmp, "mx1")
    sts_cert, sts_key = ca.issue("mta-sts.sts.test", "mta-sts.stsbad.test", "mta-sts.ststest.test").write(tmp, "sts")
    dane_leaf = CA("nobody trusts this").issue("mx.dane.test", "mx.danebad.test")
    dane_leaf.write(tmp, "dane")
    port = free_port()
    a_smtp = free_port()
    conf_a, conf_r = tmp / "a" / "maddy.conf", tmp / "r" / "maddy.conf"
    conf_a.write_text(CONFIG_A.format(tmp=tmp, a_smtp=a_smtp, net=NET))
    v6 = V6_ENDPOINT.format(tmp=tmp, port=port) if _ipv6_loopback() else ""
    conf_r.write_text(CONFIG_R.format(tmp=tmp, net=NET, port=port, v6_endpoint=v6))
    r = MailEnv(tmp / "r", conf_r)
    for acct in ("plain@receiver.test", "tls@receiver.test", "dane@receiver.test", "v6@receiver.test"):
        res = r.cli("imap-acct", "create", acct)
        assert res.returncode == 0, res.stderr
    dns = DNSServer()
    _zone(dns, ca, tlsa_data(dane_leaf.cert, 1, 1))
    https = HTTPSServer(sts_cert, sts_key, NET + "5", 443)
    https.policy("sts.test", "version: STSv1\nmode: enforce\nmx: *.tls.test\nmax_age: 86400\n")
    https.policy("stsbad.test", "version: STSv1\nmode: enforce\nmx: mx.elsewhere.test\nmax_age: 86400\n")
    https.policy("ststest.test", "version: STSv1\nmode: testing\nmx: mx.elsewhere.test\nmax_age: 86400\n")
    postfix: Postfix | None = None
    servers: list[Server] = []
    with dns, https:
        try:
            if shutil.which("postfix") is not None and os.geteuid() == 0:
                postfix = Postfix(f"{NET}6:{port}")
                postfix.start()
            args = ("-debug.dnsoverride", dns.override, "-debug.smtpport", str(port))
            receiver = Server(conf_r, args=args)
            servers.append(receiver)
            sender = Server(conf_a, args=args, env={"SSL_CERT_FILE": str(tmp / "ca.pem")})
            servers.append(sender)
            receiver.started(timeout=30)
            sender.started(timeout=30)
            yield World(tmp, a_smtp, sender, receiver, r, https, postfix, bool(v6))
        finally:
            for s in servers:
                s.close()
            if postfix is not None:
                postfix.stop()


def _msg(subject: str, to: str = "u@example.test", pad: int = 0) -> bytes:
    text = f"From: a@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello {subject}\r\n"
    return (text + ("x" * 70 + "\r\n") * pad).encode()


def send(w: World, rcpts: list[str], subject: str, pad: int = 0) -> dict[str, tuple[int, bytes]]:
    """Send one message; returns the refused recipients (code, text)."""
    with smtplib.SMTP("127.0.0.1", w.a_smtp, timeout=60) as s:
        try:
            return s.sendmail("a@sender.test", rcpts, _msg(subject, ", ".join(rcpts), pad))
        except smtplib.SMTPRecipientsRefused as e:
            return dict(e.recipients)


def rcpt_reply(w: World, rcpt: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", w.a_smtp, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        code, text = s.rcpt(rcpt)
        return code, text.decode()


def arrived(w: World, subject: str, count: int = 1) -> list[Stored]:
    found: list[Stored] = []

    def check() -> bool:
        found[:] = [s for s in w.r.stored() if f"Subject: {subject}\r\n".encode() in s.data]
        return len(found) >= count

    try:
        wait_until(check, timeout=20, what=f"message {subject}")
    except AssertionError as e:
        raise AssertionError(f"{e}\nsender:\n{w.sender.output}\nreceiver:\n{w.receiver.output}") from None
    return found


def received_with(s: Stored) -> str:
    head = s.data.partition(b"\r\n\r\n")[0].decode()
    first = head.split("Received:", 1)[1]
    return "ESMTPS" if " with ESMTPS" in first.split("\r\n\t")[0] + first else "ESMTP"


# -- MX selection ----------------------------------------------------------------------------------


def test_plain_mx_without_starttls(world: World) -> None:
    assert send(world, ["u@plain.test"], "plain") == {}
    [got] = arrived(world, "plain")
    assert got.account == "plain@receiver.test"
    assert b"with ESMTP " in got.data or b"with ESMTP;" in got.data


def test_no_mx_means_the_domain_itself(world: World) -> None:
    assert send(world, ["u@implicit.test"], "implicit") == {}
    [got] = arrived(world, "implicit")
    assert got.account == "plain@receiver.test"


def test_null_mx_refuses_the_domain(world: World) -> None:
    code, text = rcpt_reply(world, "u@nullmx.test")
    assert code == 556 and text.startswith("5.1.10 Domain does not accept email (null MX)"), text


def test_unreachable_first_mx_falls_back_to_the_second(world: World) -> None:
    assert send(world, ["u@fallback.test"], "fallback") == {}
    [got] = arrived(world, "fallback")
    assert got.account == "plain@receiver.test"
    world.sender.wait_for("cannot use MX")
    [line] = [ln for ln in world.sender.output.splitlines() if "cannot use MX" in ln and "fallback.test" in ln]
    assert "mx-dead.fallback.test" in line and f"dial tcp {NET}9:" in line and "connection refused" in line


def test_ip_literals_are_refused(world: World) -> None:
    code, text = rcpt_reply(world, f"u@[{NET}2]")
    assert code == 550 and "5.1.1 IP address literals are not supported" in text, text


def test_quarantined_messages_are_not_sent_out(world: World) -> None:
    """A check quarantined the message (check.command exit 2 at the body stage): target.remote
    refuses to carry it off-site."""
    with smtplib.SMTP("127.0.0.1", world.a_smtp, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        assert s.rcpt("u@quarantine.test")[0] == 250
        code, text = s.data(_msg("quarantined"))
    assert code == 550 and text.startswith(b"5.7.0 Refusing to deliver quarantined message"), text


# -- TLS --------------------------------------------------------------------------------------------


def test_starttls_with_a_verified_certificate(world: World) -> None:
    """tls.test goes through `strict` (local_policy min_tls_level authenticated): it only arrives
    when the certificate of mx1.tls.test verified against the CA."""
    assert send(world, ["u@tls.test"], "verified") == {}
    [got] = arrived(world, "verified")
    assert got.account == "tls@receiver.test"
    assert b" with ESMTPS" in got.data


def test_mta_sts_enforce_with_a_matching_mx(world: World) -> None:
    assert send(world, ["u@sts.test"], "sts-ok") == {}
    [got] = arrived(world, "sts-ok")
    assert got.account == "tls@receiver.test"
    assert world.https.fetched("sts.test") >= 1
    assert (world.tmp / "a" / "state" / "mtasts_cache" / "sts.test").exists()  # the fs cache


def test_mta_sts_enforce_with_a_mismatching_mx(world: World) -> None:
    code, text = rcpt_reply(world, "u@stsbad.test")
    assert code == 550, text
    assert "No usable MXs, last err: Failed to establish the MX record authenticity (MTA-STS)" in text


def test_dane_ee_match_authenticates_an_untrusted_certificate(world: World) -> None:
    assert send(world, ["u@dane.test"], "dane-ok") == {}
    [got] = arrived(world, "dane-ok")
    assert got.account == "dane@receiver.test"
    assert b" with ESMTPS" in got.data


def test_dane_ee_mismatch_refuses_the_mx(world: World) -> None:
    code, text = rcpt_reply(world, "u@danebad.test")
    assert code == 550, text
    assert "No usable MXs, last err: No matching TLSA records" in text


def test_mta_sts_testing_mode_only_logs_a_mismatch(world: World) -> None:
    assert send(world, ["u@ststest.test"], "sts-testing") == {}
    [got] = arrived(world, "sts-testing")
    assert got.account == "tls@receiver.test"
    world.sender.wait_for("MX does not match published non-enforced MTA-STS policy")


def test_local_policy_refuses_unauthenticated_tls_temporarily(world: World) -> None:
    """mx.untrusted.test offers STARTTLS with a certificate no CA signed and no DANE record:
    TLS level *encrypted*, below `min_tls_level authenticated` — a temporary failure."""
    code, text = rcpt_reply(world, "u@untrusted.test")
    assert code == 451, text
    assert "No usable MXs, last err: TLS it not available or unauthenticated but required" in text


def test_requiretls_needs_authenticated_tls_and_an_authenticated_mx(world: World) -> None:
    """RFC 8689 §4.2.1: REQUIRETLS mail only goes to an MX matched by MTA-STS (or DNSSEC) over
    verified TLS."""
    with smtplib.SMTP("127.0.0.1", world.a_smtp, timeout=60) as s:
        s.ehlo("client.test")
        assert s.mail("a@sender.test", ["REQUIRETLS"])[0] == 250
        plain = s.rcpt("u@plain.test")
        verified_only = s.rcpt("u@tls.test")
        assert s.rcpt("u@sts.test")[0] == 250
        code, text = s.data(_msg("requiretls"))
    assert plain[0] == 550 and plain[1].startswith(b"5.7.30 TLS it not available or unauthenticated"), plain
    assert verified_only[0] == 550, verified_only
    assert verified_only[1].startswith(b"5.7.30 Failed to establish the MX record authenticity (REQUIRETLS)")
    assert code == 250, text
    [got] = arrived(world, "requiretls")
    assert got.account == "tls@receiver.test"


# -- address families and source address ----------------------------------------------------------


def test_ipv6_is_tried_first(world: World) -> None:
    if not world.ipv6:
        pytest.skip("no IPv6 loopback on this machine")
    assert send(world, ["u@v6.test"], "via-v6") == {}
    [got] = arrived(world, "via-v6")
    assert got.account == "v6@receiver.test"


def test_force_ipv4_uses_only_a_records(world: World) -> None:
    assert send(world, ["u@v4only.test"], "via-v4") == {}
    [got] = arrived(world, "via-v4")
    assert got.account == "tls@receiver.test"


def test_local_ip_is_the_source_address(world: World) -> None:
    assert send(world, ["u@sourced.test"], "sourced") == {}
    arrived(world, "sourced")
    assert any("incoming message" in ln and f'"src_ip":"{NET}7:' in ln for ln in world.receiver.output.splitlines()), (
        world.receiver.output
    )


# -- fan-out and reuse --------------------------------------------------------------------------


def test_one_message_to_two_domains(world: World) -> None:
    assert send(world, ["u@plain.test", "v@sts.test"], "fanout") == {}
    got = arrived(world, "fanout", count=2)
    assert sorted(s.account for s in got) == ["plain@receiver.test", "tls@receiver.test"]


def test_one_domain_failing_at_data_is_a_partial_failure(world: World) -> None:
    """The plain MX refuses messages over 2 KiB at DATA (552, taken as 452 per RFC 5321
    §4.5.3.1.10); the other domain's copy is delivered all the same."""
    with smtplib.SMTP("127.0.0.1", world.a_smtp, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        assert s.rcpt("u@plain.test")[0] == 250
        assert s.rcpt("v@sts.test")[0] == 250
        code, text = s.data(_msg("partial", pad=40))
    assert code == 451, text
    assert b"Partial delivery failure, additional attempts may result in duplicates" in text
    [got] = arrived(world, "partial")
    assert got.account == "tls@receiver.test"


def test_limits_apply_per_destination_domain(world: World) -> None:
    """`limits { destination rate 1 60s }`: the second message to the same domain within the
    minute waits its 5 s and is refused as a temporary overload; other domains are unaffected."""
    assert send(world, ["u@limited.test"], "limited-1") == {}
    arrived(world, "limited-1")
    with smtplib.SMTP("127.0.0.1", world.a_smtp, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("u@limited.test")
        if code == 250:  # the limit may bite at RCPT (connection) or at DATA
            code, text = s.data(_msg("limited-2", "u@limited.test"))
    assert (code, text.split(b" (msg ID")[0]) == (451, b"4.4.5 High load, try again later")
    assert send(world, ["u@implicit.test"], "not-limited") == {}
    arrived(world, "not-limited")


def test_second_message_reuses_the_idle_connection(world: World) -> None:
    before = world.sender.count("reusing cached connection")
    assert send(world, ["u@implicit.test"], "reuse-1") == {}
    arrived(world, "reuse-1")
    assert send(world, ["u@implicit.test"], "reuse-2") == {}
    arrived(world, "reuse-2")
    world.sender.wait_for("reusing cached connection", count=before + 1)


# -- a foreign MX ---------------------------------------------------------------------------------


def test_delivery_to_postfix(world: World) -> None:
    if world.postfix is None:
        pytest.skip("postfix is not installed (or we are not root, which a private instance needs)")
    assert send(world, ["u@postfix.test"], "to-postfix") == {}
    pf = world.postfix
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(b"Subject: to-postfix" in m for m in pf.delivered()):
        time.sleep(0.1)
    [got] = [m for m in pf.delivered() if b"Subject: to-postfix" in m]
    assert b"hello to-postfix" in got
    assert b"from mx.sender.test" in got  # Postfix's Received names our EHLO hostname
