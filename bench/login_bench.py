"""IMAP login throughput: pymaddy with pass_table (bcrypt cost 10) and with auth.ldap, beside Dovecot on LDAP.

All three run in one invocation against the same OpenLDAP slapd (tests/ldapserver.py: an LLDAP-shaped
directory on a free loopback port, users u1..uN with `mail uN@example.org`):

  pymaddy-table  auth.pass_table over sql_table, passwords made by `creds create` (bcrypt, cost 10,
                 its default)
  pymaddy-ldap   auth.ldap with the seed's shape: `bind plain` admin, base_dn + the uid-or-mail filter
  dovecot-ldap   a private Dovecot instance (not the shared anchor) with `passdb ldap`, `auth_bind = yes`
                 and the same filter: search as the admin, then bind as the user (what auth.ldap does);
                 auth cache off (Dovecot's default), static userdb, maildir under the temp dir

The load: --clients (10) clients, each on its own user, loop `connect, LOGIN, LOGOUT` until --seconds
have passed; logins/s = successful logins / wall time. Meanwhile one more connection, logged in
beforehand, sends NOOP every 20 ms; the p50/p99 of its round trips show whether logins stall the
server's other sessions. The ratio column is pymaddy / Dovecot.

    python3 bench/login_bench.py [--target all|pymaddy-table|pymaddy-ldap|dovecot-ldap]
                                 [--clients N] [--seconds S] [--json FILE]

Needs root (Dovecot's privilege separation), slapd + ldap-utils, dovecot-imapd and dovecot-ldap
(Debian packages). Loopback only; every wait is bounded. Do not run it beside other benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchlib import ROOT, PymaddyProcess, fmt, free_port
from imap_bench import Imap, ImapError, pct, wait_port

sys.path.insert(0, str(ROOT))
from tests.ldapserver import ADMIN_DN, ADMIN_PASSWORD, BASE_DN, LDAPServer

PASSWORD = "login-bench-pw"
FILTER = "(&(|(uid={username})(mail={username}))(objectClass=person))"
TARGETS = ("pymaddy-table", "pymaddy-ldap", "dovecot-ldap")

TABLE_AUTH = """\
auth.pass_table table_authdb {
    table sql_table {
        driver sqlite3
        dsn credentials.db
        table_name passwords
    }
}
"""

LDAP_AUTH = """\
auth.ldap local_authdb {{
    urls {ldap_url}
    bind plain "{admin_dn}" "{admin_pw}"
    base_dn "{base_dn}"
    filter "{filter}"
    starttls off
    connect_timeout 1m
}}
"""

PYMADDY_CONFIG = """\
state_dir {tmp}/state
runtime_dir {tmp}/run
hostname bench.test
tls off
auth_throttle off

{auth_block}
storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

imap tcp://127.0.0.1:{port} {{
    auth &{auth}
    storage &local_mailboxes
    insecure_auth yes
}}
"""

DOVECOT_CONFIG = """\
instance_name = ldapbench
base_dir = {tmp}/base
state_dir = {tmp}/state
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {tmp}/dovecot.log
info_log_path = {tmp}/dovecot-info.log
first_valid_uid = 1
mail_location = maildir:{tmp}/mail/%u
passdb {{
  driver = ldap
  args = {tmp}/dovecot-ldap.conf.ext
}}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home={tmp}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""

DOVECOT_LDAP = """\
uris = {ldap_url}
dn = {admin_dn}
dnpass = {admin_pw}
auth_bind = yes
base = {base_dn}
scope = subtree
pass_filter = {filter}
pass_attrs = uid=user
"""


@dataclass
class Result:
    target: str
    logins: int = 0
    failures: int = 0
    seconds: float = 0.0
    noop_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        return self.logins / self.seconds if self.seconds else None


# -- the servers ------------------------------------------------------------------------------------


class Pymaddy(PymaddyProcess):
    def __init__(self, tmp: Path, ldap: LDAPServer, users: Sequence[str], auth: str) -> None:
        self.port = free_port()
        conf = tmp / "maddy.conf"
        auth_block = TABLE_AUTH if auth == "table_authdb" else LDAP_AUTH.format(
            ldap_url=ldap.url, admin_dn=ADMIN_DN, admin_pw=ADMIN_PASSWORD, base_dn=BASE_DN, filter=FILTER)
        conf.write_text(PYMADDY_CONFIG.format(tmp=tmp, port=self.port, auth_block=auth_block, auth=auth))
        super().__init__(conf, tmp)
        if auth == "table_authdb":
            for u in users:  # `creds create` default: bcrypt at cost 10
                self.cli("creds", "create", "--cfg-block", "table_authdb", "-p", PASSWORD, u)
        self.start()
        if not wait_port(self.port, 10):
            self.close()
            raise RuntimeError("pymaddy did not listen:\n" + self.log_tail())


class Dovecot:
    def __init__(self, tmp: Path, ldap: LDAPServer) -> None:
        self.port = free_port()
        self.tmp = tmp
        os.chmod(tmp, 0o755)  # login and auth processes run as other users
        (tmp / "mail").mkdir()
        shutil.chown(tmp / "mail", "vmail", "vmail")
        fmt_args = dict(tmp=tmp, port=self.port, ldap_url=ldap.url, admin_dn=ADMIN_DN, admin_pw=ADMIN_PASSWORD,
                        base_dn=BASE_DN, filter=FILTER.replace("{username}", "%u"))
        (tmp / "dovecot-ldap.conf.ext").write_text(DOVECOT_LDAP.format(**fmt_args))
        os.chmod(tmp / "dovecot-ldap.conf.ext", 0o600)
        self.conf = tmp / "dovecot.conf"
        self.conf.write_text(DOVECOT_CONFIG.format(**fmt_args))
        # Output to a file, not a pipe: the daemon inherits it and a reader would wait for EOF for ever.
        with open(tmp / "dovecot-start.log", "w") as out:
            r = subprocess.run(["dovecot", "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=30, check=False)
        if r.returncode != 0 or not wait_port(self.port, 15):
            logs = "".join(p.read_text()[-500:] for p in (tmp / "dovecot-start.log", tmp / "dovecot.log")
                           if p.exists())
            self.close()
            raise RuntimeError(f"dovecot did not start: {logs}")

    def close(self) -> None:
        subprocess.run(["doveadm", "-c", str(self.conf), "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
        pidfile = self.tmp / "base" / "master.pid"
        deadline = time.monotonic() + 10
        while pidfile.exists() and time.monotonic() < deadline:  # master gone before the temp dir goes
            time.sleep(0.05)


# -- the load ---------------------------------------------------------------------------------------


async def one_login(port: int, user: str, timeout: float) -> None:
    c = await Imap.connect(port, timeout)
    try:
        await c.ok(b'LOGIN "%s" "%s"' % (user.encode(), PASSWORD.encode()))
        await c.command(b"LOGOUT")
    finally:
        c.close()


async def storm(port: int, users: Sequence[str], seconds: float, timeout: float, res: Result) -> None:
    stop = asyncio.Event()

    async def client(user: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                await one_login(port, user, timeout)
                res.logins += 1
            except (ImapError, OSError, TimeoutError) as e:
                res.failures += 1
                if len(res.errors) < 5:
                    res.errors.append(f"{user}: {e}"[:200])

    async def noop_probe() -> None:
        c = await Imap.connect(port, timeout)
        try:
            await c.ok(b'LOGIN "%s" "%s"' % (users[0].encode(), PASSWORD.encode()))
            while not stop.is_set():
                t0 = time.perf_counter()
                await c.ok(b"NOOP")
                res.noop_ms.append((time.perf_counter() - t0) * 1000)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.02)
        finally:
            c.close()

    probe = asyncio.create_task(noop_probe())
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    deadline = t0 + seconds
    await asyncio.wait_for(asyncio.gather(*(client(u, deadline) for u in users)), seconds + 4 * timeout)
    res.seconds = time.monotonic() - t0
    stop.set()
    await asyncio.wait_for(probe, timeout)


def run_target(name: str, ldap: LDAPServer, users: Sequence[str], args: argparse.Namespace) -> Result:
    res = Result(name)
    with tempfile.TemporaryDirectory(prefix=f"login-bench-{name}-") as d:
        tmp = Path(d)
        server: Pymaddy | Dovecot
        if name == "dovecot-ldap":
            server = Dovecot(tmp, ldap)
        else:
            server = Pymaddy(tmp, ldap, users, "table_authdb" if name == "pymaddy-table" else "local_authdb")
        try:
            asyncio.run(one_login(server.port, users[0], args.timeout))  # warm-up; fails loudly if misconfigured
            asyncio.run(storm(server.port, users, args.seconds, args.timeout, res))
        finally:
            server.close()
    return res


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}"


def report(results: dict[str, Result], clients: int) -> None:
    dove = results.get("dovecot-ldap")
    print(f"\nIMAP LOGIN storm, {clients} clients (connect + LOGIN + LOGOUT), NOOP probe every 20 ms")
    print(f"{'target':<15} {'logins/s':>9} {'fail':>5} {'NOOP p50 ms':>12} {'NOOP p99 ms':>12} {'vs dovecot':>11}")
    for name, r in results.items():
        vs = ratio(r.rate, dove.rate if dove else None) if name != "dovecot-ldap" else "1.00"
        print(f"{name:<15} {fmt(r.rate, '.1f'):>9} {r.failures:>5} {fmt(pct(r.noop_ms, 0.5), '.1f'):>12} "
              f"{fmt(pct(r.noop_ms, 0.99), '.1f'):>12} {vs:>11}")
        for e in r.errors:
            print(f"    error: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--target", choices=("all", *TARGETS), default="all")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=15.0, help="per connect/command")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    targets: Sequence[str] = TARGETS if args.target == "all" else (args.target,)
    users = [f"u{i}" for i in range(1, args.clients + 1)]
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="login-bench-slapd-") as d:
        ldap = LDAPServer(Path(d) / "slapd").start()
        try:
            ldap.add_users(dict.fromkeys(users, PASSWORD))
            for name in targets:
                print(f"running {name} ...", flush=True)
                results[name] = run_target(name, ldap, users, args)
        finally:
            ldap.close()
    report(results, args.clients)
    if args.json:
        args.json.write_text(json.dumps({k: {**asdict(v), "rate": v.rate} for k, v in results.items()}, indent=1))
    return 0 if all(r.logins and not r.failures for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
