"""SMTP inbound throughput: pymaddy into storage.imapsql (fsync on) beside the anchors.

Postfix's `smtp-source` sends N messages to u1@example.test over S concurrent
sessions, for S in (20, 1) and message sizes of 4 KB and 100 KB. The same
cells are run, in the same invocation, against the anchors of
`../shared/anchors/` (by invoking their `smtp_load.py`):

  postfix   Postfix -> LMTP -> Dovecot maildir, timed until every message is a file
  aiosmtpd  a bare aiosmtpd that writes and fsyncs each message before its 250

pymaddy runs as the real server (`python -m pymaddy -config CONF run`) with a
generated config in a fresh temporary directory per run; every message is
committed to the SQLite index (`synchronous=FULL`) and its blob fsynced before
the 250 reply, so the time smtp-source takes is the end-to-end time. After each
run the `messages` table is counted; peak RSS is the server's VmHWM; the server's
CPU time per message (user+sys, /proc/PID/stat) is shown per run and kept in --json.

Targets (issue): pymaddy >= 2x the Postfix->Dovecot rate, >= the bare aiosmtpd
rate, peak RSS <= 80 MB.

    python3 bench/smtp_bench.py [--messages N] [--repeat R] [--quick] [--no-anchors]

Prereqs for the anchors (root, Debian): `bash ../shared/anchors/postfix-dovecot-setup.sh start`
and a venv with aiosmtpd at /tmp/anchor-venv (see ../shared/anchors/README.md). Loopback only;
every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"
SMTP_LOAD = ANCHORS / "smtp_load.py"
RCPT = "u1@example.test"
SENDER = "a@example.test"
TARGET_POSTFIX_RATIO = 2.0
TARGET_AIOSMTPD_RATIO = 1.0
TARGET_RSS_MB = 80.0

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
    deliver_to &local_mailboxes
}}
"""


@dataclass
class Cell:
    sessions: int
    size: int
    messages: int

    @property
    def label(self) -> str:
        return f"-s {self.sessions}, {self.size // 1024} KB, -m {self.messages}"


@dataclass
class Run:
    msg_s: float
    rss_mb: float = 0.0
    ok: bool = True
    note: str = ""
    cpu_ms: float = 0.0  # server CPU time (user+sys) per message, pymaddy only


@dataclass
class Result:
    cell: Cell
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def median(self, target: str) -> float | None:
        rs = [r.msg_s for r in self.runs.get(target, []) if r.ok]
        return statistics.median(rs) if rs else None

    def peak_rss(self, target: str) -> float | None:
        rs = [r.rss_mb for r in self.runs.get(target, []) if r.ok]
        return max(rs) if rs else None


class PymaddyServer(PymaddyProcess):
    """The real server in a fresh temp dir (benchlib.PymaddyProcess), optionally under py-spy."""

    def __init__(self, tmp: Path, port: int, profile: Path | None = None) -> None:
        conf = tmp / "maddy.conf"
        conf.write_text(CONFIG.format(tmp=tmp, port=port))
        super().__init__(conf, tmp)
        self.port = port
        self.spy: subprocess.Popen[bytes] | None = None
        self.cli("imap-acct", "create", RCPT, timeout=60)
        self.start()
        if profile is not None:
            py_spy = shutil.which("py-spy") or "/tmp/anchor-venv/bin/py-spy"
            self.spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw",
                 "--output", str(profile), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)

    def stored(self) -> int:
        db = self.tmp / "state" / "imapsql.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            n: int = con.execute("SELECT count(*) FROM messages").fetchone()[0]
            return n
        finally:
            con.close()

    def close(self) -> None:
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait()
        super().close()


def smtp_source(cell: Cell, port: int, timeout: float) -> tuple[float, str]:
    cmd = ["smtp-source", "-s", str(cell.sessions), "-m", str(cell.messages), "-l", str(cell.size),
           "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        err = "" if cp.returncode == 0 else f"smtp-source rc={cp.returncode}: {(cp.stderr or cp.stdout)[-200:]}"
    except subprocess.TimeoutExpired:
        err = f"smtp-source timed out after {timeout:.0f} s"
    return time.monotonic() - t0, err


def run_pymaddy(cell: Cell, timeout: float, profile: Path | None = None) -> Run:
    tmp = Path(tempfile.mkdtemp(prefix="pymaddy-smtp-bench-"))
    try:
        srv = PymaddyServer(tmp, free_port(), profile)
        try:
            cpu0 = cpu_seconds(srv.pid)
            dt, err = smtp_source(cell, srv.port, timeout)
            cpu = cpu_seconds(srv.pid) - cpu0
            rss = vm_kib(srv.pid, "VmHWM") / 1024
            # smtp-source only ends after the last 250, which pymaddy sends after the commit
            stored = srv.stored()
        finally:
            srv.close()
        ok = not err and stored == cell.messages
        note = err or ("" if ok else f"stored {stored} of {cell.messages}")
        return Run(cell.messages / dt, rss, ok, note, cpu * 1000 / cell.messages)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_anchor(target: str, cell: Cell, timeout: float) -> Run:
    cmd = [sys.executable, str(SMTP_LOAD), "--target", target, "-s", str(cell.sessions),
           "-m", str(cell.messages), "-l", str(cell.size), "--timeout", str(timeout)]
    # Output goes to files, not pipes: smtp_load.py (re)starts Postfix and Dovecot, whose daemons
    # inherit its stdout/stderr and would keep a pipe open (and us waiting for EOF) for ever.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            cp = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                timeout=2 * timeout + 120, check=False)
        except subprocess.TimeoutExpired:
            return Run(0.0, ok=False, note="smtp_load.py timed out")
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if cp.returncode != 0 or not lines:
        return Run(0.0, ok=False, note=f"smtp_load.py rc={cp.returncode}: {stderr[-300:]}")
    rec = json.loads(lines[-1])
    ok = rec.get("source_rc") == 0 and rec.get("delivered") == cell.messages
    note = "" if ok else f"source_rc={rec.get('source_rc')} delivered={rec.get('delivered')}"
    return Run(float(rec["e2e_msg_s"]), rec.get("hwm_sum_kib", 0) / 1024, ok, note)


def anchors_ready() -> str:
    """Empty if the anchors can run, else why not."""
    if not SMTP_LOAD.is_file():
        return f"{SMTP_LOAD} not found"
    if not shutil.which("postfix") or not Path("/etc/dovecot/anchor.conf").is_file():
        return f"Postfix/Dovecot anchor not set up: bash {ANCHORS}/postfix-dovecot-setup.sh start"
    if not Path(os.environ.get("ANCHOR_VENV_PY", "/tmp/anchor-venv/bin/python")).exists():
        return "no aiosmtpd venv at /tmp/anchor-venv (see ../shared/anchors/README.md)"
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-m", type=int, default=2000, help="messages per 4 KB run (default 2000)")
    ap.add_argument("--messages-large", type=int, default=None,
                    help="messages per 100 KB run (default: half of --messages)")
    ap.add_argument("--repeat", "-r", type=int, default=1, help="runs per cell; the median is reported")
    ap.add_argument("--quick", action="store_true", help="small run: 300 messages (100 at 100 KB), 1 repeat")
    ap.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the Postfix->Dovecot and aiosmtpd anchors (default on)")
    ap.add_argument("--timeout", type=float, default=300, help="bound per smtp-source run, seconds")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy raw (collapsed) profile of pymaddy per cell (first repeat), to FILE-sS-SIZEk.EXT; "
                         "profiling slows the server, so its figures are not comparable")
    ap.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.messages_large, args.repeat = 300, 100, 1
    large = args.messages_large if args.messages_large is not None else max(1, args.messages // 2)
    if not shutil.which("smtp-source"):
        print("smtp-source not found: apt-get install postfix (or run the anchors' setup script)", file=sys.stderr)
        return 2
    targets = ["pymaddy"]
    if args.anchors:
        why = anchors_ready()
        if why:
            print(f"anchors skipped: {why}", file=sys.stderr)
        else:
            targets += ["postfix", "aiosmtpd"]

    cells = [Cell(20, 4096, args.messages), Cell(1, 4096, args.messages),
             Cell(20, 102400, large), Cell(1, 102400, large)]
    results = [Result(c) for c in cells]
    for rep in range(args.repeat):
        for res in results:
            for t in targets:
                prof = None
                if args.profile is not None and rep == 0:
                    c = res.cell
                    prof = args.profile.with_name(f"{args.profile.stem}-s{c.sessions}-{c.size // 1024}k"
                                                  f"{args.profile.suffix}")
                if t == "pymaddy":
                    r = run_pymaddy(res.cell, args.timeout, prof)
                else:
                    r = run_anchor(t, res.cell, args.timeout)
                res.runs.setdefault(t, []).append(r)
                status = "ok" if r.ok else f"FAILED ({r.note})"
                print(f"rep {rep + 1}/{args.repeat} {t:9} {res.cell.label:28} {r.msg_s:8.1f} msg/s "
                      f"peak RSS {r.rss_mb:6.1f} MB"
                      + (f" CPU {r.cpu_ms:.2f} ms/msg" if r.cpu_ms else "") + f" {status}", file=sys.stderr, flush=True)

    print(f"\nSMTP inbound, msg/s (median of {args.repeat}); pymaddy into storage.imapsql, fsync on; "
          f"{os.cpu_count()} CPUs")
    head = "| cell | pymaddy | postfix→dovecot | aiosmtpd+fsync | pymaddy/postfix | pymaddy/aiosmtpd " \
           "| pymaddy peak RSS | verdict |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    all_pass = complete = True
    for res in results:
        p, pf, ai = res.median("pymaddy"), res.median("postfix"), res.median("aiosmtpd")
        rss = res.peak_rss("pymaddy")
        r_pf = p / pf if p is not None and pf else None
        r_ai = p / ai if p is not None and ai else None
        fails = []
        if p is None:
            fails.append("pymaddy run failed")
        if r_pf is not None and r_pf < TARGET_POSTFIX_RATIO:
            fails.append(f"< {TARGET_POSTFIX_RATIO:g}x postfix")
        if r_ai is not None and r_ai < TARGET_AIOSMTPD_RATIO:
            fails.append("< aiosmtpd")
        if rss is not None and rss > TARGET_RSS_MB:
            fails.append(f"RSS > {TARGET_RSS_MB:g} MB")
        all_pass &= not fails
        if fails:
            verdict = "FAIL: " + ", ".join(fails)
        elif r_pf is None or r_ai is None:
            verdict = "n/a (no anchor figure)"
            complete = False
        else:
            verdict = "PASS"
        print(f"| {res.cell.label} | {fmt(p)} | {fmt(pf)} | {fmt(ai)} | {fmt(r_pf, '.2f')} | {fmt(r_ai, '.2f')} "
              f"| {fmt(rss, '.1f')} MB | {verdict} |")
    overall = "FAIL" if not all_pass else ("PASS" if complete else "INCOMPLETE (anchors missing)")
    anchors_rss = {t: max((res.peak_rss(t) or 0) for res in results) for t in targets if t != "pymaddy"}
    if anchors_rss:
        print("anchor peak memory (sum of per-process VmHWM): "
              + ", ".join(f"{t} {v:.0f} MB" for t, v in anchors_rss.items()))
    print(f"targets: >= {TARGET_POSTFIX_RATIO:g}x postfix→dovecot, >= {TARGET_AIOSMTPD_RATIO:g}x aiosmtpd, "
          f"<= {TARGET_RSS_MB:g} MB RSS — overall {overall}")
    if args.json:
        args.json.write_text(json.dumps([
            {"sessions": r.cell.sessions, "size": r.cell.size, "messages": r.cell.messages,
             "runs": {t: [vars(x) for x in rs] for t, rs in r.runs.items()}} for r in results], indent=1))
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
