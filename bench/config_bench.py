"""Config benchmarks: `check-config` process wall time, and compile cost versus config size.

Prints each figure beside its reference: the 150 ms target for a whole
`check-config` process on maddy's default config, the bare interpreter start
(`python -c pass`) that no Python program can beat, and the per-line cost at
several sizes, which must stay flat (linear cost).

    python3 bench/config_bench.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONF = ROOT.parent / "shared" / "fixtures" / "maddy-upstream" / "default" / "maddy.conf"
TARGET_MS = 150.0


def wall_ms(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def generated_config(lines: int) -> str:
    """A realistic config of about `lines` lines: many tables, pipelines and blocks."""
    out = ["hostname mx.example.org", "state_dir /tmp/bench-state", "tls off", ""]
    i = 0
    while len(out) < lines:
        out += [
            f"table.chain rewrites_{i} {{",
            "    optional_step regexp \"(.+)\\+(.+)@(.+)\" \"$1@$3\"",
            "    optional_step static {",
            "        entry postmaster postmaster@example.org",
            f"        entry alias{i}@example.org user{i}@example.org",
            "    }",
            "}",
            f"smtp tcp://127.0.0.{1 + i % 250}:{2000 + i} {{",
            "    limits {",
            "        all rate 20 1s",
            "        ip concurrency 10",
            "    }",
            f"    source_in &rewrites_{i} {{",
            "        deliver_to dummy",
            "    }",
            "    source example.org {",
            "        destination postmaster $(local_domains) {",
            "            modify {",
            f"                replace_rcpt &rewrites_{i}",
            "            }",
            "            deliver_to dummy",
            "        }",
            "        default_destination {",
            "            reject 550 5.1.1 \"User not found\"",
            "        }",
            "    }",
            "    default_source {",
            "        reject",
            "    }",
            "}",
        ]
        i += 1
    return "\n".join(out) + "\n"


def compile_ms(text: str, runs: int) -> tuple[float, int]:
    sys.path.insert(0, str(ROOT))
    from pymaddy.compiler import compile_loaded
    from pymaddy.config.expand import load_text

    samples = []
    errors = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        res = compile_loaded(load_text(text, "bench.conf", {}))
        samples.append((time.perf_counter() - t0) * 1000)
        errors = len(res.errors)
    return statistics.median(samples), errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="0")
    exe = shutil.which("pymaddy", path=str(Path(sys.executable).parent)) or "pymaddy"
    baseline = wall_ms([sys.executable, "-c", "pass"], args.runs, env)
    cfg = wall_ms([exe, "-config", str(DEFAULT_CONF), "check-config"], args.runs, env)
    print(f"python -c pass                         {baseline:7.1f} ms")
    print(f"check-config, maddy default config     {cfg:7.1f} ms   target {TARGET_MS:.0f} ms   "
          f"ratio to target {cfg / TARGET_MS:.2f}   ratio to bare interpreter {cfg / baseline:.2f}")
    print()
    print("compile (parse + expand + validate), in process:")
    per_line = []
    for lines in (1000, 5000, 10000):
        text = generated_config(lines)
        n = text.count("\n")
        ms, errs = compile_ms(text, max(3, args.runs // 3))
        per_line.append(ms / n * 1000)
        print(f"  {n:6d} lines  {ms:8.1f} ms  {ms / n * 1000:6.1f} µs/line  ({errs} errors)")
    print(f"  linearity: µs/line at 10k ÷ at 1k = {per_line[-1] / per_line[0]:.2f} (1.00 = linear)")
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write(generated_config(10000))
    big = wall_ms([exe, "-config", f.name, "check-config"], max(3, args.runs // 3), env)
    os.unlink(f.name)
    print(f"check-config process, 10,000-line config {big:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
