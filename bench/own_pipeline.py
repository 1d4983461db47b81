#!/usr/bin/env python3
"""rave's own pipeline.yml, run by rave in a fresh clone of this repository: a cold first run,
a second run with nothing changed (caches and RAVE_REUSE), a run after editing a document, and
a run after editing one Rust source file. Prints each run's wall time, its ratio to the first
run, and which jobs ran and which were reused. Timings are reported, never asserted.

Usage: bench/own_pipeline.py [--rave PATH]

Needs what `./x run` installs (cargo, Trivy on PATH, QEMU and a kernel for the VM test); run
`./x run` once first on a new machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(rave, cwd, env):
    t0 = time.monotonic()
    p = subprocess.run([rave, "run", "--json"], cwd=cwd, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    took = time.monotonic() - t0
    doc = json.loads(p.stdout)
    ran = [j["name"] for j in doc["jobs"] if j.get("status") != "skipped" and "reused_from" not in j
           and j.get("started_at")]
    reused = [j["name"] for j in doc["jobs"] if "reused_from" in j]
    return took, doc["pipeline"]["status"], ran, reused


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rave", default=str(ROOT / "target" / "release" / "rave"))
    args = ap.parse_args()
    if not Path(args.rave).exists():
        subprocess.run("cargo build --release -q -p rave", shell=True, cwd=ROOT, check=True)
    tools = ROOT / "tests" / ".tools" / "bin"
    env = dict(os.environ, PATH=f"{tools}:{os.environ.get('PATH', '')}")
    env.pop("SAFE", None)
    with tempfile.TemporaryDirectory(prefix="rave-own-") as d:
        subprocess.run(["git", "clone", "-q", "--local", str(ROOT), d], check=True)
        steps = [
            ("first (cold)", None),
            ("second, nothing changed", None),
            ("after editing docs/cli.md", lambda: open(Path(d) / "docs/cli.md", "a").write("\n")),
            ("after editing runner/cli/src/main.rs",
             lambda: open(Path(d) / "runner/cli/src/main.rs", "a").write("\n// touched\n")),
        ]
        rows = []
        for name, change in steps:
            if change:
                change()
            took, status, ran, reused = run(args.rave, d, env)
            rows.append((name, took, status, ran, reused))
            print(f"{name}: {took:.1f}s {status}; ran {len(ran)}, reused {len(reused)}", flush=True)
        first = rows[0][1]
        print()
        print(f"{'run':<40} {'time':>8} {'÷ first':>8}  ran / reused")
        for name, took, status, ran, reused in rows:
            print(f"{name:<40} {took:>7.1f}s {took / first:>7.1%}  "
                  f"ran: {', '.join(ran) or '-'}; reused: {', '.join(reused) or '-'} ({status})")


if __name__ == "__main__":
    sys.exit(main())
