"""Inbound SMTP with SPF + DKIM + DMARC checks on versus off, and DKIM sign/verify cost.

The same DKIM-signed 4 KB message (From: and MAIL FROM alice@example.org) is
sent by Postfix's `smtp-source -F FILE` N times to u1@example.test over S
concurrent sessions, for S in (20, 1), into pymaddy with two configs (smtp-source
adds only an empty last line, which DKIM's body canonicalization ignores):

  off  `smtp tcp://… { deliver_to &local_mailboxes }`
  on   the same plus `dmarc yes` and `check { spf; dkim }`

pymaddy runs as the real server (`python -m pymaddy -config CONF run
-debug.dnsoverride 127.0.0.1:PORT`) with a generated config in a fresh temporary
directory per run, into storage.imapsql (fsync on), so the time smtp-source
takes is the end-to-end time. Every DNS query goes to the loopback DNS server of
`tests/dnsserver.py` (in this process), which serves example.org's SPF record
(`v=spf1 ip4:127.0.0.1 -all`), the DKIM keys and `_dmarc` (`p=reject`): the
mail is aligned and must pass all three. After each run the `messages` table is
counted, and after an "on" run one stored message must carry spf=pass,
dkim=pass and dmarc=pass in its Authentication-Results, or the run fails. Peak
RSS is the server's VmHWM; its CPU time per message (user+sys) is shown too, as
are the DNS queries the server made (pymaddy's resolver caches answers).

DKIM signing and verification are also timed in-process with pymaddy's own
`pymaddy.dkim.core.sign`/`verify` on the same 4 KB message for rsa2048 and
ed25519 keys (verification with an in-memory key lookup, so no DNS cost).

Target (issue): the checks cost at most 25% of inbound throughput, i.e. in every
cell msg/s(on) >= 0.75 x msg/s(off).

    python3 bench/auth_bench.py [--messages N] [--repeat R] [--quick] [--algo rsa2048|ed25519]

Needs `smtp-source` (apt-get install postfix). Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import PymaddyProcess, cpu_seconds, fmt, free_port, vm_kib

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pymaddy.dkim.core import SignOptions, sign, verify  # noqa: E402
from pymaddy.dkim.keys import SigningKey, dns_record, generate_key  # noqa: E402
from pymaddy.mail.message import Header  # noqa: E402
from tests.dnsserver import DNSServer  # noqa: E402

RCPT = "u1@example.test"
DOMAIN = "example.org"
SENDER = f"alice@{DOMAIN}"
HELO = "client.example.org"
SIZE = 4096
ALGOS = ("rsa2048", "ed25519")
SIGNED_HEADERS = ["From", "To", "Subject", "Date", "Message-ID"]
TARGET_RATIO = 0.75

CONFIG = """\
hostname mx.example.test
state_dir {tmp}/state
runtime_dir {tmp}/run
tls off

storage.imapsql local_mailboxes {{
    driver sqlite3
    dsn imapsql.db
}}

smtp tcp://127.0.0.1:{port} {{
{checks}    deliver_to &local_mailboxes
}}
"""

CHECKS = """\
    dmarc yes
    check {
        spf
        dkim
    }
"""


def selector(algo: str) -> str:
    return algo.replace("2048", "")  # rsa, ed25519


def message_parts(key: SigningKey, algo: str, size: int = SIZE) -> tuple[bytes, bytes, SignOptions]:
    """The header block (CRLF, without the empty line), body and sign options of a `size`-byte
    message from example.org once signed with `key`."""
    head = (f"From: Alice <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: auth bench\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <auth-bench@{DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n").encode()
    opts = SignOptions(DOMAIN, selector(algo), key, SIGNED_HEADERS, identifier="@" + DOMAIN)
    sig_len = len(sign(Header.parse(head), b"x\r\n", opts))
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 abcdefghijklmnopqrstuvwxyz.\r\n"
    room = max(len(line), size - len(head) - sig_len - 2)
    body = (line * (room // len(line) + 1))[:room - len(line)] + line
    return head, body, opts


def make_message(key: SigningKey, algo: str, size: int = SIZE) -> bytes:
    """A `size`-byte message (CRLF) with a DKIM-Signature by `key` for example.org prepended."""
    head, body, opts = message_parts(key, algo, size)
    return sign(Header.parse(head), body, opts) + head + b"\r\n" + body


@dataclass
class Cell:
    sessions: int
    messages: int

    @property
    def label(self) -> str:
        return f"-s {self.sessions}, {SIZE // 1024} KB, -m {self.messages}"


@dataclass
class Run:
    msg_s: float
    rss_mb: float = 0.0
    ok: bool = True
    note: str = ""
    cpu_ms: float = 0.0  # server CPU time (user+sys) per message
    dns_queries: int = 0


@dataclass
class Result:
    cell: Cell
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def median(self, mode: str) -> float | None:
        rs = [r.msg_s for r in self.runs.get(mode, []) if r.ok]
        return statistics.median(rs) if rs else None

    def median_cpu(self, mode: str) -> float | None:
        rs = [r.cpu_ms for r in self.runs.get(mode, []) if r.ok]
        return statistics.median(rs) if rs else None

    def peak_rss(self, mode: str) -> float | None:
        rs = [r.rss_mb for r in self.runs.get(mode, []) if r.ok]
        return max(rs) if rs else None


class PymaddyServer(PymaddyProcess):
    """The real server in a fresh temp dir (benchlib.PymaddyProcess), one storage account."""

    def __init__(self, tmp: Path, port: int, checks: bool, dns_override: str) -> None:
        conf = tmp / "maddy.conf"
        conf.write_text(CONFIG.format(tmp=tmp, port=port, checks=CHECKS if checks else ""))
        super().__init__(conf, tmp, args=("-debug.dnsoverride", dns_override))
        self.port = port
        self.cli("imap-acct", "create", RCPT, timeout=60)
        self.start()

    def _connect(self) -> sqlite3.Connection:
        db = self.tmp / "state" / "imapsql.db"
        return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)

    def stored(self) -> int:
        con = self._connect()
        try:
            n: int = con.execute("SELECT count(*) FROM messages").fetchone()[0]
            return n
        finally:
            con.close()

    def one_message(self) -> bytes:
        """The first stored message, whole (the prefix holds the header fields pymaddy added)."""
        con = self._connect()
        try:
            row = con.execute("SELECT m.prefix, m.blob_key, b.data FROM messages m "
                              "JOIN blobs b ON b.key = m.blob_key ORDER BY m.uid LIMIT 1").fetchone()
        finally:
            con.close()
        if row is None:
            return b""
        prefix, key, data = row
        rest = bytes(data) if data is not None else (self.tmp / "state" / "messages" / key).read_bytes()
        return bytes(prefix or b"") + rest



def auth_results_ok(msg: bytes) -> str:
    """Empty if the Authentication-Results field says spf, dkim and dmarc passed, else why not."""
    head = msg.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    values = Header.parse(head).get_all("Authentication-Results")
    if not values:
        return "no Authentication-Results field"
    ar = " ".join(values[0].split())
    missing = [k for k in ("spf=pass", "dkim=pass", "dmarc=pass") if k not in ar]
    return f"not {', '.join(missing)}: {ar[:200]}" if missing else ""


def smtp_source(cell: Cell, port: int, msg_file: Path, timeout: float) -> tuple[float, str]:
    cmd = ["smtp-source", "-s", str(cell.sessions), "-m", str(cell.messages), "-F", str(msg_file),
           "-M", HELO, "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        err = "" if cp.returncode == 0 else f"smtp-source rc={cp.returncode}: {(cp.stderr or cp.stdout)[-200:]}"
    except subprocess.TimeoutExpired:
        err = f"smtp-source timed out after {timeout:.0f} s"
    return time.monotonic() - t0, err


def run_pymaddy(cell: Cell, checks: bool, dns: DNSServer, msg_file: Path, timeout: float) -> Run:
    tmp = Path(tempfile.mkdtemp(prefix="pymaddy-auth-bench-"))
    try:
        srv = PymaddyServer(tmp, free_port(), checks, dns.override)
        try:
            q0 = len(dns.log.entries)
            cpu0 = cpu_seconds(srv.pid)
            dt, err = smtp_source(cell, srv.port, msg_file, timeout)
            cpu = cpu_seconds(srv.pid) - cpu0
            queries = len(dns.log.entries) - q0
            rss = vm_kib(srv.pid, "VmHWM") / 1024
            # smtp-source only ends after the last 250, which pymaddy sends after the commit
            stored = srv.stored()
            why = auth_results_ok(srv.one_message()) if checks and stored else ""
        finally:
            srv.close()
        ok = not err and stored == cell.messages and not why
        note = err or (f"stored {stored} of {cell.messages}" if stored != cell.messages else why)
        return Run(cell.messages / dt, rss, ok, note, cpu * 1000 / cell.messages, queries)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Micro:
    algo: str
    sign_ms: float
    verify_ms: float


async def _verify_n(signed: Header, body: bytes, records: dict[str, str], count: int) -> float:
    """Seconds for `count` verify() calls, the key looked up in `records` (no DNS)."""

    async def lookup(name: str) -> list[str]:
        return [records[name.rstrip(".").lower()]]

    t0 = time.perf_counter()
    for _ in range(count):
        [v] = await verify(signed, body, lookup)
        if v.err is not None:
            raise RuntimeError(f"signature did not verify: {v.err}")
    return time.perf_counter() - t0


def micro_dkim(keys: dict[str, SigningKey], records: dict[str, str], n: int) -> list[Micro]:
    """ms per message for sign() and verify() of a 4 KB message, in-process, best of 3 batches of n."""
    out = []
    for algo in ALGOS:
        head, body, opts = message_parts(keys[algo], algo)
        plain = Header.parse(head)
        signed = Header.parse(sign(plain, body, opts) + head)

        sign_best = verify_best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                sign(plain, body, opts)
            sign_best = min(sign_best, time.perf_counter() - t0)
            verify_best = min(verify_best, asyncio.run(_verify_n(signed, body, records, n)))
        out.append(Micro(algo, sign_best * 1000 / n, verify_best * 1000 / n))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-m", type=int, default=2000, help="messages per run (default 2000)")
    ap.add_argument("--repeat", "-r", type=int, default=1, help="runs per cell and mode; the median is reported")
    ap.add_argument("--quick", action="store_true", help="small run: 300 messages, 1 repeat, 100 micro iterations")
    ap.add_argument("--algo", choices=ALGOS, default="rsa2048",
                    help="key that signs the message sent through the server (default rsa2048)")
    ap.add_argument("--micro", type=int, default=500, help="iterations per DKIM sign/verify batch (default 500)")
    ap.add_argument("--timeout", type=float, default=300, help="bound per smtp-source run, seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.repeat, args.micro = 300, 1, 100
    if not shutil.which("smtp-source"):
        print("smtp-source not found: apt-get install postfix", file=sys.stderr)
        return 2

    keys = {a: generate_key(a) for a in ALGOS}
    records = {f"{selector(a)}._domainkey.{DOMAIN}": dns_record(keys[a]) for a in ALGOS}
    dns = DNSServer()
    dns.add_txt(DOMAIN, "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; adkim=r; aspf=r")
    for name, value in records.items():  # an rsa2048 record needs several 255-byte strings
        dns.add_txt(name, *(value[i:i + 255] for i in range(0, len(value), 255)))

    msg = make_message(keys[args.algo], args.algo)
    work = Path(tempfile.mkdtemp(prefix="pymaddy-auth-bench-msg-"))
    # smtp-source -F appends CRLF to every line it reads: give it LF line ends
    msg_file = work / "signed.eml"
    msg_file.write_bytes(msg.replace(b"\r\n", b"\n"))

    cells = [Cell(20, args.messages), Cell(1, args.messages)]
    results = [Result(c) for c in cells]
    modes = ("off", "on")
    try:
        with dns:
            for rep in range(args.repeat):
                for res in results:
                    for mode in modes:
                        r = run_pymaddy(res.cell, mode == "on", dns, msg_file, args.timeout)
                        res.runs.setdefault(mode, []).append(r)
                        status = "ok" if r.ok else f"FAILED ({r.note})"
                        print(f"rep {rep + 1}/{args.repeat} checks {mode:3} {res.cell.label:24} {r.msg_s:8.1f} msg/s "
                              f"peak RSS {r.rss_mb:6.1f} MB CPU {r.cpu_ms:.2f} ms/msg DNS queries {r.dns_queries} "
                              f"{status}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    micro = micro_dkim(keys, records, args.micro)

    print(f"\nSMTP inbound with spf+dkim+dmarc checks off vs on, msg/s (median of {args.repeat}); "
          f"{len(msg)}-byte message DKIM-signed with {args.algo}; pymaddy into storage.imapsql, fsync on; "
          f"{os.cpu_count()} CPUs")
    head = "| cell | checks off | checks on | on/off | CPU ms/msg off → on | peak RSS off / on | verdict |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    all_pass = True
    for res in results:
        off, on = res.median("off"), res.median("on")
        ratio = on / off if on is not None and off else None
        fails = []
        if off is None:
            fails.append("checks-off run failed")
        if on is None:
            fails.append("checks-on run failed")
        if ratio is not None and ratio < TARGET_RATIO:
            fails.append(f"on < {TARGET_RATIO:g} x off")
        all_pass &= not fails
        verdict = "FAIL: " + ", ".join(fails) if fails else "PASS"
        print(f"| {res.cell.label} | {fmt(off)} | {fmt(on)} | {fmt(ratio, '.2f')} "
              f"| {fmt(res.median_cpu('off'), '.2f')} → {fmt(res.median_cpu('on'), '.2f')} "
              f"| {fmt(res.peak_rss('off'), '.1f')} / {fmt(res.peak_rss('on'), '.1f')} MB | {verdict} |")
    print(f"target: checks on >= {TARGET_RATIO:g} x checks off in every cell — overall "
          f"{'PASS' if all_pass else 'FAIL'}")

    print(f"\nDKIM per {len(msg)}-byte message, in-process (pymaddy.dkim.core, best of 3 x {args.micro})")
    mhead = "| key | sign ms/msg | verify ms/msg |"
    print(mhead)
    print("|---" * (mhead.count("|") - 1) + "|")
    for m in micro:
        print(f"| {m.algo} | {m.sign_ms:.3f} | {m.verify_ms:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "algo": args.algo,
            "cells": [{"sessions": r.cell.sessions, "size": SIZE, "messages": r.cell.messages,
                       "runs": {t: [vars(x) for x in rs] for t, rs in r.runs.items()}} for r in results],
            "dkim_micro": [vars(m) for m in micro]}, indent=1))
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
