#!/usr/bin/env python3
"""rave benchmarks: the same DAGs run by `rave run`, `make -j2` and gitlab-ci-local, side by
side in one run, printed as ratios. Timings are reported, never asserted.

Usage: bench/bench.py [--only NAME] [--no-gcl] [--rave PATH] [--dir DIR | --fresh-ext4]

Where the benchmark repositories live matters: creating a file costs what the file system
makes it cost, and an ext4 without a journal (as some VMs' root) scans every recently deleted
inode on each create, so a series run right after another one deleted thousands of files is
several times slower. --fresh-ext4 (root) makes them on a new journaled ext4 in a loop file,
as most disks are formatted; --dir DIR under DIR; by default the system's temporary directory.
make and gitlab-ci-local run in the same directories as rave.

Shapes:
  noop-200     200 independent no-op jobs
  chain-50     a chain of 50 no-op jobs
  layered-100  10 layers of 10 jobs, each needing 3 jobs of the layer before
  sleep-40     40 jobs sleeping 0.1-1.0 s in a layered DAG: makespan / lower bound, where
               lower bound = max(critical path, total work / slots)
  logs-4x50MB  4 jobs printing 50 MB each (output to /dev/null); rave's peak RSS
  repo-20k     10 independent no-op jobs in a repository of 20,000 files (80 MB): the cost of
               a job's working directory; first run (cold) and second run (nothing changed),
               and rave's per-job setup time (p50/p95, from its run JSON)
  packing      mixed memory requests under 3 GiB: rave's memory-aware admission against a
               count-only scheduler (slots = budget / largest request), same binary
  learned      12 jobs that really hold 100 MiB-1.5 GiB for 2 s each and state no request,
               under 3 GiB with a flat default of 1.5 GiB and 1 CPU: the first run admits by the
               defaults, the second by what the first measured (memory and CPU); their
               makespans, OOM kills, budget utilisation, and the best packing a simulation of
               the real peaks finds
"""

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "bench" / ".tools"
GCL_VERSION = "4.73.0"


def sh(cmd, cwd=None, env=None, check=True):
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, check=check,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- pipeline shapes
class Job:
    def __init__(self, name, script, needs=None, memory=None, cpus=None, seconds=0.0):
        self.name, self.script, self.needs = name, script, needs
        self.memory, self.cpus, self.seconds = memory, cpus, seconds


def noop_200():
    return [Job(f"j{i}", "true", needs=[]) for i in range(200)]


def chain_50():
    return [Job(f"j{i}", "true", needs=[] if i == 0 else [f"j{i-1}"]) for i in range(50)]


def layered_100():
    rnd = random.Random(7)
    jobs = []
    for layer in range(10):
        for k in range(10):
            needs = [] if layer == 0 else sorted({f"l{layer-1}_{rnd.randrange(10)}" for _ in range(3)})
            jobs.append(Job(f"l{layer}_{k}", "true", needs=needs))
    return jobs


def sleep_40():
    rnd = random.Random(11)
    jobs = []
    for layer in range(5):
        for k in range(8):
            secs = round(rnd.uniform(0.1, 1.0), 2)
            needs = [] if layer == 0 else sorted({f"s{layer-1}_{rnd.randrange(8)}" for _ in range(2)})
            jobs.append(Job(f"s{layer}_{k}", f"sleep {secs}", needs=needs, seconds=secs))
    return jobs


def logs_4():
    script = "head -c 50000000 /dev/zero | tr '\\\\0' x | fold -w 99"
    return [Job(f"log{i}", script, needs=[], memory="256M") for i in range(4)]


def packing():
    jobs = []
    for i in range(4):
        jobs.append(Job(f"big{i}", "sleep 2", needs=[], memory="1536M", cpus="0.25", seconds=2))
    for i in range(12):
        jobs.append(Job(f"small{i}", "sleep 1", needs=[], memory="256M", cpus="0.25", seconds=1))
    return jobs


# Real peaks (MiB) of the `learned` shape: each job holds this much for 2 s.
LEARNED_PEAKS = [100, 150, 200, 250, 300, 350, 400, 600, 800, 1000, 1200, 1500]


def learned_yaml():
    out = [".rave:", "  defaults: {memory: 1536M, cpus: 1}", "stages: [test]", ""]
    for i, mb in enumerate(LEARNED_PEAKS):
        out.append(f"hold{i}:")
        out.append("  stage: test")
        out.append("  needs: []")
        out.append(f"  script: [\"python3 -c 'import time; b = bytearray({mb} << 20); time.sleep(2)'\"]")
    return "\n".join(out) + "\n"


def best_packing(peaks_mib, budget_mib, seconds=2.0):
    """Makespan of equal-length jobs packed by their real peaks: first-fit decreasing into
    waves (all jobs last the same), the best a scheduler that knew the peaks could do."""
    waves = []
    for p in sorted(peaks_mib, reverse=True):
        for w in waves:
            if sum(w) + p <= budget_mib:
                w.append(p)
                break
        else:
            waves.append([p])
    return len(waves) * seconds


def simulate_packing(jobs, budget):
    """Makespan of greedy list scheduling by real peak (largest first that fits), with the
    jobs' measured durations: what a scheduler that knew every job's peak would reach."""
    waiting = sorted(jobs, key=lambda j: -j[0])
    running, t, used = [], 0.0, 0
    while waiting or running:
        started = True
        while started:
            started = False
            for j in list(waiting):
                if used + j[0] <= budget:
                    waiting.remove(j)
                    running.append((t + j[1], j[0]))
                    used += j[0]
                    started = True
        running.sort()
        end, peak = running.pop(0)
        t, used = end, used - peak
    return t


def learned(rave):
    import json
    d = Path(tempfile.mkdtemp(prefix="rave-bench-"))
    (d / ".gitlab-ci.yml").write_text(learned_yaml())
    sh("git init -q -b main . && git add -A && git -c user.name=b -c user.email=b@b commit -qm b", cwd=d)
    runs, measured = [], None
    for _ in range(2):
        t0 = time.monotonic()
        out = subprocess.run(f"{rave} run --json --memory 3G --cpus 2 --jobs 16", shell=True,
                             cwd=d, capture_output=True, text=True)
        took = time.monotonic() - t0
        v = json.loads(out.stdout)
        ooms = sum(1 for j in v["jobs"] if j.get("failure_reason") == "oom_killed")
        runs.append((took, ooms, v["pipeline"].get("budget_utilisation") or 0.0, out.returncode))
        if not measured:
            measured = [((j.get("peak_memory_bytes") or 0) >> 20, (j.get("duration_ms") or 0) / 1000)
                        for j in v["jobs"]]
    shutil.rmtree(d, ignore_errors=True)
    best = simulate_packing(measured, 3072)
    return runs, best


def repo_20k():
    return [Job(f"j{i}", "true", needs=[]) for i in range(10)]


# Shapes whose repository holds many files besides the pipeline.
BIG_REPOS = {"repo-20k": (20000, 4000)}

SHAPES = {
    "noop-200": noop_200,
    "chain-50": chain_50,
    "layered-100": layered_100,
    "sleep-40": sleep_40,
    "logs-4x50MB": logs_4,
    "repo-20k": repo_20k,
}


def gitlab_yaml(jobs):
    out = ["stages: [test]", ""]
    for j in jobs:
        out.append(f"{j.name}:")
        out.append("  stage: test")
        if j.needs is not None:
            out.append(f"  needs: [{', '.join(j.needs)}]")
        vars_ = []
        if j.memory:
            vars_.append(f"RAVE_MEMORY: {j.memory}")
        if j.cpus:
            vars_.append(f"RAVE_CPUS: \"{j.cpus}\"")
        if vars_:
            out.append("  variables: {" + ", ".join(vars_) + "}")
        out.append(f"  script: [\"{j.script}\"]")
    return "\n".join(out) + "\n"


def makefile(jobs):
    names = [j.name for j in jobs]
    out = [".PHONY: all " + " ".join(names), "all: " + " ".join(names)]
    for j in jobs:
        out.append(f"{j.name}: {' '.join(j.needs or [])}")
        out.append(f"\t@{j.script}")
    return "\n".join(out) + "\n"


def repo(jobs, files=0, size=0):
    d = Path(tempfile.mkdtemp(prefix="rave-bench-"))
    rnd = random.Random(5)
    for i in range(files):
        sub = d / "src" / f"m{i % 200:03d}" / f"p{(i // 200) % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.txt").write_bytes(rnd.randbytes(size // 2).hex().encode())
    (d / ".gitlab-ci.yml").write_text(gitlab_yaml(jobs))
    (d / "Makefile").write_text(makefile(jobs))
    sh("git init -q -b main . && git add -A && git -c user.name=b -c user.email=b@b commit -qm b"
       " && git remote add origin https://example.com/bench/bench.git", cwd=d)
    return d


# ---------------------------------------------------------------- runners
def timed(cmd, cwd, env=None):
    """Wall time and peak RSS (KiB) of the command's process tree as wait4 reports it."""
    full_env = dict(os.environ, **(env or {}))
    start = time.monotonic()
    p = subprocess.Popen(cmd, shell=True, cwd=cwd, env=full_env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss, code


def rave_cmd(rave, extra=""):
    return f"{rave} run {extra}"


def ensure_gcl():
    exe = TOOLS / "node_modules" / ".bin" / "gitlab-ci-local"
    if exe.exists():
        return exe
    if not shutil.which("npm"):
        return None
    if not shutil.which("rsync"):
        print("  (gitlab-ci-local needs rsync; install it with apt-get install rsync)")
        return None
    TOOLS.mkdir(parents=True, exist_ok=True)
    print(f"  installing gitlab-ci-local@{GCL_VERSION} into {TOOLS} ...")
    r = subprocess.run(f"npm install --silent --no-audit --no-fund --prefix {TOOLS} gitlab-ci-local@{GCL_VERSION}",
                       shell=True)
    return exe if r.returncode == 0 and exe.exists() else None


def lower_bound(jobs, slots):
    by = {j.name: j for j in jobs}
    memo = {}

    def finish(n):
        if n not in memo:
            j = by[n]
            memo[n] = j.seconds + max((finish(d) for d in (j.needs or [])), default=0.0)
        return memo[n]

    crit = max(finish(j.name) for j in jobs)
    work = sum(j.seconds for j in jobs) / slots
    return max(crit, work)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ap.add_argument("--no-gcl", action="store_true")
    ap.add_argument("--rave", default=str(ROOT / "target" / "release" / "rave"))
    ap.add_argument("--dir", help="make the benchmark repositories under this directory")
    ap.add_argument("--fresh-ext4", action="store_true",
                    help="make them on a new journaled ext4 in a loop file (needs root)")
    args = ap.parse_args()
    if args.fresh_ext4:
        with fresh_ext4() as d:
            tempfile.tempdir = str(d)
            return run(args)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = args.dir
    return run(args)


class fresh_ext4:
    """A new journaled ext4 (mkfs.ext4 defaults) in a sparse loop file, mounted for the run."""

    def __enter__(self):
        self.img = Path(tempfile.mkdtemp(prefix="rave-bench-fs-")) / "fs.img"
        self.mnt = self.img.parent / "mnt"
        self.mnt.mkdir()
        subprocess.run(["truncate", "-s", "8G", str(self.img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(self.img), str(self.mnt)], check=True)
        print(f"benchmark repositories on a fresh journaled ext4 at {self.mnt}")
        return self.mnt

    def __exit__(self, *exc):
        subprocess.run(["umount", "-l", str(self.mnt)])
        shutil.rmtree(self.img.parent, ignore_errors=True)


def run(args):
    rave = args.rave
    if not Path(rave).exists():
        print("building rave (release) ...")
        subprocess.run("cargo build --release -q -p rave", shell=True, cwd=ROOT, check=True)
    gcl = None if args.no_gcl else ensure_gcl()
    rows = []
    # Admission is what is measured, not cgroup bookkeeping: 2 slots and 2 CPUs like make -j2.
    common = "--jobs 2 --cpus 2 --memory 3G"
    for name, shape in SHAPES.items():
        if args.only and args.only != name:
            continue
        jobs = shape()
        d = repo(jobs, *BIG_REPOS.get(name, (0, 0)))
        print(f"{name}: {len(jobs)} jobs in {d}")
        t_make, _, c = timed("make -j2 -s", d)
        assert c == 0, f"make failed on {name}"
        t_rave, rss_rave, c = timed(rave_cmd(rave, common), d)
        assert c == 0, f"rave failed on {name}"
        if name in BIG_REPOS:
            # Nothing changed since: what a developer's second `rave run` costs.
            out = d / "run.json"
            t0 = time.monotonic()
            c = subprocess.run(f"{rave} run {common} --json > {out}", shell=True, cwd=d,
                               stderr=subprocess.DEVNULL).returncode
            t_second = time.monotonic() - t0
            assert c == 0
            import json
            setups = sorted(j.get("setup_ms") or 0 for j in json.loads(out.read_text())["jobs"])
            out.unlink()
        t_gcl = None
        if gcl:
            t_gcl, _, c = timed(f"{gcl} --shell-executor-no-image --concurrency 2 --no-color", d)
            if c != 0:
                print(f"  gitlab-ci-local exited {c}; its output:")
                subprocess.run(f"{gcl} --shell-executor-no-image --concurrency 2 --no-color 2>&1 | tail -5",
                               shell=True, cwd=d)
        row = {"shape": name, "make": t_make, "rave": t_rave, "gcl": t_gcl, "rss_mb": rss_rave / 1024}
        if name in BIG_REPOS:
            row["second"] = t_second
            row["setup"] = (setups[len(setups) // 2], setups[min(len(setups) - 1, int(len(setups) * 0.95))])
            if gcl:
                row["gcl_second"], _, _ = timed(f"{gcl} --shell-executor-no-image --concurrency 2 --no-color", d)
        if name not in BIG_REPOS and name != "sleep-40":
            # The same pipeline again, nothing changed: a developer's next `rave run`, with the
            # jobs' directories and cgroup layout already there.
            row["warm"], _, c = timed(rave_cmd(rave, common), d)
            assert c == 0
        if name == "sleep-40":
            row["bound"] = lower_bound(jobs, 2)
            # A second run in the same repository: rave now weights the critical path by the
            # durations the first run recorded.
            row["learned"], _, c = timed(rave_cmd(rave, common), d)
            assert c == 0
        rows.append(row)
        shutil.rmtree(d, ignore_errors=True)

    if not args.only or args.only == "learned":
        print(f"learned: {len(LEARNED_PEAKS)} jobs holding 100 MiB-1.5 GiB for 2 s, no stated request")
        (first, second), best = learned(rave)
        print(f"  first run (flat default 1.5 GiB, 1 CPU): {first[0]:.2f} s, OOM kills {first[1]}, "
              f"budget utilisation {first[2]:.0%}")
        print(f"  second run (learned):                    {second[0]:.2f} s, OOM kills {second[1]}, "
              f"budget utilisation {second[2]:.0%}")
        print(f"  speed-up {first[0] / second[0]:.2f}x; a simulation packing the real peaks and "
              f"durations (greedy, largest first, not optimal) ends in {best:.1f} s: the second "
              f"run takes {second[0] / best:.2f}x that")

    if not args.only or args.only == "packing":
        jobs = packing()
        d = repo(jobs)
        print(f"packing: {len(jobs)} jobs (4 × 1.5 GiB for 2 s, 12 × 256 MiB for 1 s) under 3 GiB")
        t_mem, _, c = timed(rave_cmd(rave, "--memory 3G --cpus 4 --jobs 16"), d)
        assert c == 0
        # Count-only: the most jobs that can never exceed 3 GiB is 3 GiB / 1.5 GiB = 2.
        t_count, _, c = timed(rave_cmd(rave, "--memory 1T --cpus 4 --jobs 2 --force-budget"), d)
        assert c == 0
        rows.append({"shape": "packing", "mem": t_mem, "count": t_count, "bound": lower_bound(jobs, 16)})
        shutil.rmtree(d, ignore_errors=True)

    print()
    print(f"{'shape':<13} {'make -j2':>9} {'rave':>8} {'gcl':>8} {'rave/make':>10} {'gcl/rave':>9}  notes")
    for r in rows:
        if r["shape"] == "packing":
            print(f"{'packing':<13} {'':>9} {r['mem']:>7.2f}s {'':>8} {'':>10} {'':>9}  "
                  f"count-only {r['count']:.2f}s = {r['count']/r['mem']:.2f}x rave's makespan")
            continue
        gcl_t = f"{r['gcl']:.2f}s" if r["gcl"] else "-"
        ratio_gcl = f"{r['gcl']/r['rave']:.1f}x" if r["gcl"] else "-"
        notes = f"rave peak RSS {r['rss_mb']:.0f} MiB (tree)"
        if "bound" in r:
            notes += f"; makespan/lower bound = {r['rave']/r['bound']:.3f}"
            if r["gcl"]:
                notes += f" (gcl {r['gcl']/r['bound']:.3f})"
            notes += f"; second run {r['learned']/r['bound']:.3f}"
        if "warm" in r:
            notes += (f"; second run {r['warm']:.2f}s = {r['warm']/r['make']:.1f}x make"
                      + (f", gcl {r['gcl']/r['warm']:.1f}x slower" if r["gcl"] else ""))
        if "second" in r:
            notes += (f"; second run {r['second']:.2f}s"
                      + (f" (gcl {r['gcl_second']:.2f}s = {r['gcl_second']/r['second']:.1f}x)" if r.get("gcl_second") else "")
                      + f"; setup p50 {r['setup'][0]} ms, p95 {r['setup'][1]} ms")
        print(f"{r['shape']:<13} {r['make']:>8.2f}s {r['rave']:>7.2f}s {gcl_t:>8} {r['rave']/r['make']:>9.2f}x {ratio_gcl:>9}  {notes}")


if __name__ == "__main__":
    sys.exit(main())
