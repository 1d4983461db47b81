#!/usr/bin/env python3
"""rave serve benchmarks: webhook intake and webhook-to-first-job latency, on a real bare git
repository and the real binary on a loopback port. Timings are reported, never asserted.

Usage: bench/serve.py [--rave PATH] [--deliveries N] [--dup-every K] [--clients C] [--pushes P]

intake   N GitHub push deliveries (HMAC-signed), every K-th one a re-send of an earlier
         delivery id, from C concurrent keep-alive clients. Reports deliveries/s and checks in
         the database that every acknowledged new delivery made exactly one pipeline and every
         re-send none (no delivery lost, none doubled).
latency  P pushes one after another, each waited for: time from sending the webhook to the
         first job's start (as the job's own started_at records it), p50 / p99, and to the
         pipeline's end.
together two pushes of a pipeline whose jobs (a chain of three, 2 s each) each need a third
         of the server's budget: the time until both end, against one push alone, with
         pipelines at once (the default) and with `max_pipelines = 1` (one at a time).
history  100,000 pipelines in the store (and one with 500 jobs): p50 / p99 of the pipelines
         API, the web UI's list pages (first page, a filtered deep page) and the 500-job
         pipeline page, rendered by the server.

No other CI runner here takes webhooks (gitlab-ci-local and make have no server), so these are
absolute numbers, not ratios.
"""

import argparse
import concurrent.futures
import hashlib
import hmac
import http.client
import json
import os
import sqlite3
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"bench-secret"
TOKEN = "bench-token"


def sh(cmd, cwd=None):
    subprocess.run(cmd, shell=True, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def setup(tmp, pipeline="build:\n  script: [echo built]\n", server=""):
    work, bare = tmp / "work", tmp / "origin.git"
    work.mkdir()
    (work / ".gitlab-ci.yml").write_text(pipeline)
    sh("git init -q --bare origin.git", cwd=tmp)
    sh("git init -q -b main . && git add -A && git -c user.name=b -c user.email=b@b commit -qm init "
       "&& git push -q ../origin.git main", cwd=work)
    sha = subprocess.run("git rev-parse HEAD", shell=True, cwd=work, capture_output=True,
                         text=True).stdout.strip()
    cfg = tmp / "rave.toml"
    cfg.write_text(f"""[server]
rate_limit_per_sec = 1000000
{server}
[[projects]]
name = "bench/app"
clone_url = "{bare}"
secret = "{SECRET.decode()}"
[[tokens]]
name = "bench"
token = "{TOKEN}"
scope = "admin"
""")
    return cfg, sha


def start(rave, data, cfg):
    p = subprocess.Popen([rave, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data),
                          "--config", str(cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline().strip()
    host, port = line.removeprefix("listening on ").rsplit(":", 1)
    return p, host, int(port)


def stop(proc, tmp):
    """kill -9 the server, then what it left running under `tmp`: a killed server's `rave run`s
    go on until its next start stops them (crash recovery), and nothing restarts it here."""
    proc.kill()
    proc.wait()
    root = str(Path(tmp).resolve())
    for _ in range(100):
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/cwd").startswith(root):
                    left.append(int(pid))
            except OSError:
                continue
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        time.sleep(0.05)


def body_for(sha):
    return json.dumps({"ref": "refs/heads/main", "after": sha,
                       "repository": {"full_name": "bench/app"}}).encode()


def send(conn, body, delivery):
    sig = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    conn.request("POST", "/hooks/github", body=body, headers={
        "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": sig, "Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    return r.status, json.loads(data or b"null")


def intake(rave, args):
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        cfg, sha = setup(tmp)
        proc, host, port = start(rave, tmp / "data", cfg)
        try:
            ids = []
            for i in range(args.deliveries):
                if args.dup_every and i % args.dup_every == args.dup_every - 1 and i > 0:
                    ids.append(ids[i // 2])  # a forge re-sending an earlier delivery
                else:
                    ids.append(f"d-{i}")
            chunks = [ids[c::args.clients] for c in range(args.clients)]
            body = body_for(sha)

            def worker(chunk):
                conn = http.client.HTTPConnection(host, port, timeout=30)
                out = []
                for d in chunk:
                    out.append((d,) + send(conn, body, d))
                conn.close()
                return out

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as ex:
                results = [r for rs in ex.map(worker, chunks) for r in rs]
            took = time.perf_counter() - t0
        finally:
            stop(proc, tmp)
        codes = {}
        for _, code, _ in results:
            codes[code] = codes.get(code, 0) + 1
        acked_new = {d for d, code, _ in results if code == 202}
        unique = len(set(ids))
        db = sqlite3.connect(tmp / "data" / "rave.db")
        deliveries = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        pipelines = db.execute("SELECT COUNT(*) FROM pipelines").fetchone()[0]
        print(f"intake: {len(ids)} deliveries ({unique} distinct ids) from {args.clients} clients "
              f"in {took:.2f} s = {len(ids) / took:.0f} deliveries/s; answers {codes}")
        lost = len(acked_new) - pipelines
        print(f"        stored after kill -9: {deliveries} deliveries, {pipelines} pipelines; "
              f"acknowledged-new {len(acked_new)} -> lost {max(lost, 0)}, doubled {max(-lost, 0)}")


def parse_time(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def latency(rave, args):
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        cfg, sha = setup(tmp)
        proc, host, port = start(rave, tmp / "data", cfg)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        first, whole = [], []
        try:
            for i in range(args.pushes):
                sent = time.time()
                code, v = send(conn, body_for(sha), f"lat-{i}")
                assert code == 202, (code, v)
                pid = v["pipeline_id"]
                while True:
                    conn.request("GET", f"/api/pipelines/{pid}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
                    p = json.loads(conn.getresponse().read())
                    if p["pipeline"]["status"] not in ("queued", "running"):
                        break
                    time.sleep(0.005)
                done = time.time()
                started = [parse_time(j["started_at"]) for j in p["jobs"] if j["started_at"]]
                first.append(min(started) - sent)
                whole.append(done - sent)
        finally:
            stop(proc, tmp)

        def q(xs, p):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
        print(f"latency: {args.pushes} pushes, webhook -> first job started: "
              f"p50 {q(first, 0.5) * 1000:.0f} ms, p99 {q(first, 0.99) * 1000:.0f} ms; "
              f"-> pipeline finished: p50 {q(whole, 0.5) * 1000:.0f} ms, "
              f"p99 {q(whole, 0.99) * 1000:.0f} ms (mean {statistics.mean(whole) * 1000:.0f} ms)")


def history(rave, args):
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        cfg, sha = setup(tmp)
        proc, host, port = start(rave, tmp / "data", cfg)
        try:
            db = sqlite3.connect(tmp / "data" / "rave.db", timeout=30)
            statuses = ["success", "failed", "success", "canceled", "success"]
            rows = [(f"team/app{i % 5}", "main", sha, "push", statuses[i % 5],
                     "2026-11-30T05:00:00.000Z", "2026-11-30T05:00:00.100Z",
                     "2026-11-30T05:00:09.300Z") for i in range(args.history)]
            db.executemany("INSERT INTO pipelines (project, ref, sha, source, status, created_at,"
                           " started_at, finished_at) VALUES (?,?,?,?,?,?,?,?)", rows)
            big = db.execute("INSERT INTO pipelines (project, ref, sha, source, status, created_at)"
                             " VALUES ('team/app0','main',?,'push','success',"
                             "'2026-11-30T05:00:00.000Z')", (sha,)).lastrowid
            db.executemany("INSERT INTO jobs (pipeline_id, idx, name, stage, status, duration_ms,"
                           " peak_memory_bytes, memory_limit_bytes, needs) VALUES (?,?,?,?,?,?,?,?,?)",
                           [(big, i, f"job {i}", f"stage{i // 50}", "success", 1200, 2 << 20, 512 << 20,
                             json.dumps([i - 50] if i >= 50 else [])) for i in range(500)])
            db.commit()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("POST", "/ui/login", body=f"token={TOKEN}&next=/ui/pipelines",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            r = conn.getresponse()
            r.read()
            cookie = r.getheader("Set-Cookie").split(";")[0]

            def timed(path, headers, n=200):
                out = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    conn.request("GET", path, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 200, (path, resp.status)
                    out.append(time.perf_counter() - t0)
                out.sort()
                return out[len(out) // 2] * 1000, out[int(len(out) * 0.99) - 1] * 1000

            api = {"Authorization": f"Bearer {TOKEN}"}
            ui = {"Cookie": cookie}
            for name, path, h in [
                ("API  /api/pipelines", "/api/pipelines", api),
                ("API  /api/pipelines?project=team/app3", "/api/pipelines?project=team/app3", api),
                ("API  /api/budget (the UI's budget line)", "/api/budget", api),
                ("API  /metrics (a Prometheus scrape)", "/metrics", api),
                ("page /ui/pipelines", "/ui/pipelines", ui),
                ("page /ui/pipelines?project=team/app3&status=failed&page=200",
                 "/ui/pipelines?project=team/app3&status=failed&page=200", ui),
                (f"page /ui/pipelines/{big} (500 jobs)", f"/ui/pipelines/{big}", ui),
            ]:
                p50, p99 = timed(path, h)
                print(f"history: {args.history} pipelines; {name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        finally:
            stop(proc, tmp)


# A chain of three jobs, each a third of the safe profile's 3 GiB and one of its two CPUs.
CHAIN = "".join(
    f"{name}:\n  stage: {stage}\n  variables: {{RAVE_MEMORY: 1G, RAVE_CPUS: '1'}}\n"
    f"  script: [sleep 2]\n"
    for name, stage in [("build", "build"), ("test", "test"), ("deploy", "deploy")])


def together(rave, args):
    def timed(pushes, server):
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            cfg, sha = setup(tmp, CHAIN, server)
            proc, host, port = start(rave, tmp / "data", cfg)
            conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                t0 = time.time()
                ids = []
                for i in range(pushes):
                    code, v = send(conn, body_for(sha), f"together-{i}")
                    assert code == 202, (code, v)
                    ids.append(v["pipeline_id"])
                for pid in ids:
                    while True:
                        conn.request("GET", f"/api/pipelines/{pid}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
                        p = json.loads(conn.getresponse().read())
                        if p["pipeline"]["status"] not in ("queued", "running"):
                            assert p["pipeline"]["status"] == "success", p
                            break
                        time.sleep(0.01)
                return time.time() - t0
            finally:
                stop(proc, tmp)

    one = timed(1, "")
    both = timed(2, "")
    serial = timed(2, "max_pipelines = 1")
    print(f"together: one push {one:.2f} s; two pushes at once {both:.2f} s = {both / one:.2f}x "
          f"one; one pipeline at a time {serial:.2f} s = {serial / one:.2f}x one")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rave", default=str(ROOT / "target" / "release" / "rave"))
    ap.add_argument("--deliveries", type=int, default=2000)
    ap.add_argument("--dup-every", type=int, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--pushes", type=int, default=30)
    ap.add_argument("--history", type=int, default=100_000)
    ap.add_argument("--only", choices=["intake", "latency", "together", "history"])
    args = ap.parse_args()
    if not os.path.exists(args.rave):
        print("building rave (release) ...")
        subprocess.run("cargo build --release -q -p rave", shell=True, cwd=ROOT, check=True)
    for name, f in [("intake", intake), ("latency", latency), ("together", together),
                    ("history", history)]:
        if args.only in (None, name):
            f(args.rave, args)


if __name__ == "__main__":
    main()
