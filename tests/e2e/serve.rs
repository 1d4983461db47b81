//! `rave serve` against real git repositories: a bare origin the test pushes to, webhook
//! bodies signed exactly as GitHub (HMAC-SHA256 of the body) and GitLab (shared token) sign
//! them, the real binary on a loopback port, and `kill -9` recovery.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::*;

const SECRET: &str = "hook-secret-1234";
pub(crate) const ADMIN: &str = "admin-token-5678";
pub(crate) const READER: &str = "read-token-9012";

pub(crate) struct Server {
    child: Child,
    pub(crate) url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `rave serve` on a free loopback port; returns once it listens.
pub(crate) fn start(data: &Path, config: &Path) -> Server {
    start_env(data, config, &[])
}

/// A work repository and the bare origin the server fetches from.
pub(crate) struct Origin {
    _dir: tempfile::TempDir,
    pub(crate) work: PathBuf,
    bare: PathBuf,
}

impl Origin {
    pub(crate) fn new(files: &[(&str, &str)]) -> Origin {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let bare = dir.path().join("origin.git");
        std::fs::create_dir_all(&work).unwrap();
        for (p, c) in files {
            std::fs::write(work.join(p), c).unwrap();
        }
        sh(
            dir.path(),
            "git init -q --bare origin.git && cd work && git init -q -b main . && git add -A && git commit -qm init && git remote add origin ../origin.git && git push -q origin main",
        );
        Origin {
            _dir: dir,
            work,
            bare,
        }
    }

    /// Commit (files written, `rm` removed) and push; returns the new sha.
    fn commit(&self, files: &[(&str, &str)], rm: &[&str]) -> String {
        for (p, c) in files {
            std::fs::write(self.work.join(p), c).unwrap();
        }
        for p in rm {
            std::fs::remove_file(self.work.join(p)).unwrap();
        }
        sh(
            &self.work,
            "git add -A && git commit -qm change && git push -q origin main",
        );
        self.head()
    }

    fn head(&self) -> String {
        let o = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&self.work)
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }
}

pub(crate) fn config(dir: &Path, origin: &Origin, extra: &str) -> PathBuf {
    let path = dir.join("rave.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nrate_limit_per_sec = 1000\nmax_body_bytes = 65536\n{extra}\n\n[[projects]]\nname = \"team/app\"\nclone_url = \"{}\"\nsecret = \"{SECRET}\"\n\n[[tokens]]\nname = \"ops\"\ntoken = \"{ADMIN}\"\nscope = \"admin\"\n\n[[tokens]]\nname = \"dash\"\ntoken = \"{READER}\"\nscope = \"read\"\n",
            origin.bare.display()
        ),
    )
    .unwrap();
    path
}

pub(crate) fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn github_push(s: &Server, delivery: &str, r: &str, sha: &str) -> reqwest::blocking::Response {
    github_push_to(s, "team/app", delivery, r, sha)
}

/// A push to `team/app` the server accepted (202): its pipeline's id.
fn queued(s: &Server, delivery: &str, r: &str, sha: &str) -> i64 {
    let resp = github_push(s, delivery, r, sha);
    assert_eq!(resp.status(), 202);
    resp.json::<Value>().unwrap()["pipeline_id"]
        .as_i64()
        .unwrap()
}

/// A push delivery for `project`, signed as GitHub signs it.
fn github_push_to(
    s: &Server,
    project: &str,
    delivery: &str,
    r: &str,
    sha: &str,
) -> reqwest::blocking::Response {
    let body = json!({"ref": r, "after": sha, "deleted": sha.starts_with("0000"), "repository": {"full_name": project}}).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    client()
        .post(format!("{}/hooks/github", s.url))
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", delivery)
        .header("X-Hub-Signature-256", sig)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .unwrap()
}

pub(crate) fn get(s: &Server, path: &str, token: &str) -> Value {
    let r = client()
        .get(format!("{}{path}", s.url))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "GET {path}: {}", r.status());
    r.json().unwrap()
}

fn post(s: &Server, path: &str, token: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", s.url))
        .bearer_auth(token)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

/// `POST /api/pipelines` with an admin token; returns the new pipeline's id.
pub(crate) fn api_pipeline(s: &Server, body: Value) -> i64 {
    let r = client()
        .post(format!("{}/api/pipelines", s.url))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().unwrap()["pipeline_id"].as_i64().unwrap()
}

/// Wait for a pipeline to end; returns it with its jobs.
pub(crate) fn finished(s: &Server, id: i64) -> Value {
    wait_until(&format!("pipeline {id} never finished"), 120, || {
        let v = get(s, &format!("/api/pipelines/{id}"), READER);
        !matches!(v["pipeline"]["status"].as_str(), Some("queued" | "running"))
    });
    get(s, &format!("/api/pipelines/{id}"), READER)
}

pub(crate) fn text(s: &Server, path: &str) -> String {
    client()
        .get(format!("{}{path}", s.url))
        .bearer_auth(READER)
        .send()
        .unwrap()
        .text()
        .unwrap()
}

const PIPELINE: &str = "stages: [build, test, release]
build:
  stage: build
  script:
    - echo \"built $CI_COMMIT_SHA on $CI_COMMIT_REF_NAME\"
    - mkdir -p out && echo \"artifact-of-$CI_COMMIT_SHA\" > out/app.txt
  artifacts: {paths: [out/]}
test:
  stage: test
  script: [cat out/app.txt]
release:
  stage: release
  rules: [{if: $CI_COMMIT_TAG}]
  script: [echo \"releasing $CI_COMMIT_TAG\"]
";

#[test]
fn push_and_tag_webhooks_run_pipelines_at_the_pushed_commit() {
    let origin = Origin::new(&[(".gitlab-ci.yml", PIPELINE)]);
    let a = origin.head();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);

    // Forged, unsigned and oversized deliveries are refused before anything is stored.
    let forged = client()
        .post(format!("{}/hooks/github", s.url))
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", format!("sha256={}", "0".repeat(64)))
        .body(
            json!({"ref": "refs/heads/main", "after": a, "repository": {"full_name": "team/app"}})
                .to_string(),
        )
        .send()
        .unwrap();
    assert_eq!(forged.status(), 401);
    // The same answer as for an unknown project: the detail is only in the server's log.
    assert!(
        forged
            .text()
            .unwrap()
            .contains("not signed for a project of this server")
    );
    let huge = client()
        .post(format!("{}/hooks/github", s.url))
        .header("X-GitHub-Event", "push")
        .body(vec![b'x'; 200_000])
        .send()
        .unwrap();
    assert_eq!(huge.status(), 413);

    let id = queued(&s, "delivery-1", "refs/heads/main", &a);
    // The branch moves on before the pipeline checks out: it still runs exactly `a`.
    let b = origin.commit(&[("later.txt", "later\n")], &[]);
    let again = github_push(&s, "delivery-1", "refs/heads/main", &a);
    assert_eq!(again.status(), 200);
    let again: Value = again.json().unwrap();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["pipeline_id"], id);

    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(v["pipeline"]["sha"], a);
    let build = job(&v, "build");
    assert_eq!(build["status"], "success");
    assert!(build["memory_limit_bytes"].as_i64().unwrap() > 0);
    // `release` is only in tag pipelines.
    assert!(
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["name"] != "release"),
        "{v:#}"
    );
    let build_id = build["id"].as_i64().unwrap();
    // The checkout is pruned once the run is over; what the API serves stays.
    let checkout = data.path().join(format!("data/pipelines/{id}/src"));
    assert!(!checkout.join(".gitlab-ci.yml").exists());
    assert!(!checkout.join(".rave/runs/1/src").exists());
    assert!(checkout.join(".rave/runs/1/summary.json").exists());
    let log = text(&s, &format!("/api/jobs/{build_id}/log"));
    assert!(log.contains(&format!("built {a} on main")), "{log}");

    // One artifact file, with a byte range, and the whole set as an archive.
    let part = client()
        .get(format!(
            "{}/api/jobs/{build_id}/artifacts/out/app.txt",
            s.url
        ))
        .bearer_auth(READER)
        .header("Range", "bytes=0-7")
        .send()
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.text().unwrap(), "artifact");
    let tar = client()
        .get(format!("{}/api/jobs/{build_id}/artifacts", s.url))
        .bearer_auth(READER)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let listing = data.path().join("a.tar");
    std::fs::write(&listing, &tar).unwrap();
    let out = Command::new("tar")
        .arg("-tf")
        .arg(&listing)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("out/app.txt"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let escape = client()
        .get(format!(
            "{}/api/jobs/{build_id}/artifacts/..%2F..%2Fsummary.json",
            s.url
        ))
        .bearer_auth(READER)
        .send()
        .unwrap();
    assert!(
        escape.status() == 400 || escape.status() == 404,
        "{}",
        escape.status()
    );

    // A tag push (GitLab's way of signing: the shared token) runs the release pipeline.
    sh(&origin.work, "git tag v1.0 && git push -q origin v1.0");
    let body = json!({"object_kind": "tag_push", "ref": "refs/tags/v1.0", "after": b, "checkout_sha": b, "project": {"path_with_namespace": "team/app"}}).to_string();
    let bad = client()
        .post(format!("{}/hooks/gitlab", s.url))
        .header("X-Gitlab-Event", "Tag Push Hook")
        .header("X-Gitlab-Token", "wrong")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(bad.status(), 401);
    let r = client()
        .post(format!("{}/hooks/gitlab", s.url))
        .header("X-Gitlab-Event", "Tag Push Hook")
        .header("X-Gitlab-Event-UUID", "gl-1")
        .header("X-Gitlab-Token", SECRET)
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let tag_id = r.json::<Value>().unwrap()["pipeline_id"].as_i64().unwrap();
    let v = finished(&s, tag_id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(v["pipeline"]["tag"], "v1.0");
    let release = job(&v, "release");
    assert_eq!(release["status"], "success", "{v:#}");
    let log = text(&s, &format!("/api/jobs/{}/log", release["id"]));
    assert!(log.contains("releasing v1.0"), "{log}");

    // A branch deletion starts nothing.
    let r = github_push(&s, "delivery-del", "refs/heads/gone", &"0".repeat(40));
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["pipeline_id"], Value::Null);

    // A ping (GitHub sends one when the hook is made) is answered and starts nothing.
    let ping = json!({"zen": "Keep it logically awesome.", "hook_id": 1}).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(ping.as_bytes());
    let r = client()
        .post(format!("{}/hooks/github?project=team/app", s.url))
        .header("X-GitHub-Event", "ping")
        .header("X-GitHub-Delivery", "ping-1")
        .header(
            "X-Hub-Signature-256",
            format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
        )
        .body(ping)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["message"], "pong");

    // Tokens: none → 401, read-only → 403 on a write, admin → rerun of one job.
    let r = client()
        .get(format!("{}/api/pipelines", s.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let (code, _) = post(&s, &format!("/api/pipelines/{id}/rerun?job=test"), READER);
    assert_eq!(code, 403);
    // One job retried inside its pipeline: its next attempt.
    let (code, v) = post(&s, &format!("/api/pipelines/{id}/rerun?job=test"), ADMIN);
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["pipeline_id"], id);
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(job(&v, "test")["attempts"], 2, "{v:#}");
    // The whole pipeline again: a new pipeline at the same commit.
    let (code, v) = post(&s, &format!("/api/pipelines/{id}/rerun"), ADMIN);
    assert_eq!(code, 201, "{v}");
    let rerun = v["pipeline_id"].as_i64().unwrap();
    let v = finished(&s, rerun);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(v["pipeline"]["sha"], a, "a rerun runs the same commit");
    assert_eq!(v["pipeline"]["rerun_of"], id);
    assert_eq!(job(&v, "test")["status"], "success");

    // The CLI clients, against the same server.
    let env = [("RAVE_SERVER", s.url.as_str()), ("RAVE_TOKEN", READER)];
    let shown = rave_env(data.path(), &["pipelines", &id.to_string()], &env);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert!(
        shown.stdout.contains("build") && shown.stdout.contains("success"),
        "{}",
        shown.stdout
    );
    let out = data.path().join("app.txt");
    let dl = rave_env(
        data.path(),
        &[
            "artifacts",
            "download",
            &build_id.to_string(),
            "out/app.txt",
            "-o",
            out.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(dl.code, 0, "{}", dl.stderr);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("artifact-of-{a}\n")
    );
    let logs = rave_env(data.path(), &["logs", &build_id.to_string()], &env);
    assert!(
        logs.stdout.contains(&format!("built {a}")),
        "{}",
        logs.stdout
    );
    let refused = rave_env(data.path(), &["rerun", &id.to_string(), "--failed"], &env);
    assert_eq!(refused.code, 2);
    assert!(
        refused.stderr.contains("403") && refused.stderr.contains("admin token"),
        "{}",
        refused.stderr
    );

    let list = get(&s, "/api/pipelines", READER);
    assert_eq!(list["pipelines"].as_array().unwrap().len(), 3);
    let metrics = text(&s, "/metrics");
    for line in [
        "webhook_requests_total{forge=\"github\",code=\"202\"} 1",
        "webhook_requests_total{forge=\"github\",code=\"401\"} 1",
        "webhook_deduplicated_total 1",
        "rave_pipelines{project=\"team/app\",status=\"success\"} 3",
        "rave_queue_depth 0",
    ] {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }
}

#[test]
fn kill_9_loses_no_acknowledged_delivery_and_fails_the_running_job() {
    let origin = Origin::new(&[
        (
            ".gitlab-ci.yml",
            "work:\n  script:\n    - if test -f slow; then echo STARTED; sleep 6061; fi\n    - echo quick\n",
        ),
        ("slow", "1\n"),
    ]);
    let a = origin.head();
    let b = origin.commit(&[], &["slow"]);
    let data = tempfile::tempdir().unwrap();
    // One pipeline at a time: the second delivery is still queued when the server dies.
    let cfg = config(data.path(), &origin, "max_pipelines = 1");
    let dd = data.path().join("data");
    let s = start(&dd, &cfg);
    let first = queued(&s, "k-1", "refs/heads/main", &a);
    // Follow the log while the job runs: lines arrive as they are written.
    wait_until("the slow job never started", 60, || {
        let v = get(&s, &format!("/api/pipelines/{first}"), READER);
        v["jobs"]
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["status"] == "running"))
    });
    let v = get(&s, &format!("/api/pipelines/{first}"), READER);
    let job_id = job(&v, "work")["id"].as_i64().unwrap();
    let mut follow = client()
        .get(format!("{}/api/jobs/{job_id}/log?follow=1", s.url))
        .bearer_auth(READER)
        .send()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("STARTED") {
        let n = follow.read(&mut buf).unwrap();
        assert!(n > 0, "the followed log ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // A second delivery is acknowledged while the first pipeline runs.
    let second = queued(&s, "k-2", "refs/heads/main", &b);

    let mut s = s;
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    drop(s);
    let s = start(&dd, &cfg);
    // The interrupted pipeline is failed, its job named a runner error, its process gone.
    let v = get(&s, &format!("/api/pipelines/{first}"), READER);
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    assert_eq!(job(&v, "work")["failure_reason"], "runner_error", "{v:#}");
    let sleeping = Command::new("pgrep")
        .args(["-f", "sleep 6061"])
        .output()
        .unwrap();
    assert!(
        sleeping.stdout.is_empty(),
        "the job outlived the restart: {}",
        String::from_utf8_lossy(&sleeping.stdout)
    );
    // The delivery acknowledged before the kill runs after the restart.
    let v = finished(&s, second);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(v["pipeline"]["sha"], b);
    let log = text(&s, &format!("/api/jobs/{}/log", job(&v, "work")["id"]));
    assert!(log.contains("quick"), "{log}");
}

#[test]
fn too_many_requests_from_one_source_get_429() {
    let origin = Origin::new(&[(".gitlab-ci.yml", PIPELINE)]);
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("rave.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nrate_limit_per_sec = 5\n[[projects]]\nname = \"team/app\"\nclone_url = \"{}\"\nsecret = \"{SECRET}\"\n",
            origin.bare.display()
        ),
    )
    .unwrap();
    let s = start(&data.path().join("data"), &cfg);
    let codes: Vec<u16> = (0..30)
        .map(|_| {
            client()
                .get(format!("{}/healthz", s.url))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(codes[0], 200);
    assert!(codes.contains(&429), "{codes:?}");
    let r = client().get(format!("{}/healthz", s.url)).send().unwrap();
    if r.status() == 429 {
        assert_eq!(r.headers()["retry-after"], "1");
    }
}

/// A real sshd on a loopback port (Debian's openssh-server; ./x test installs it).
struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sshd(dir: &Path) -> Sshd {
    assert!(
        Path::new("/usr/sbin/sshd").exists(),
        "sshd is required (./x test installs openssh-server)"
    );
    sh(
        dir,
        "ssh-keygen -q -t ed25519 -N '' -f host_key && ssh-keygen -q -t ed25519 -N '' -f client_key && cp client_key.pub authorized_keys && chmod 600 authorized_keys client_key && mkdir -p /run/sshd",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    std::fs::write(
        dir.join("sshd_config"),
        format!("Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\n"),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("sshd never listened", 20, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Sshd { child, port }
}

#[test]
fn fetches_over_ssh_with_the_projects_key_and_a_pinned_host_key() {
    let origin = Origin::new(&[(".gitlab-ci.yml", PIPELINE)]);
    let a = origin.head();
    let data = tempfile::tempdir().unwrap();
    let ssh = sshd(data.path());
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let host_pub = std::fs::read_to_string(data.path().join("host_key.pub")).unwrap();
    let port = ssh.port;
    std::fs::write(
        data.path().join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}"),
    )
    .unwrap();
    // Another host's key: what a man in the middle would present.
    sh(data.path(), "ssh-keygen -q -t ed25519 -N '' -f other_key");
    let other_pub = std::fs::read_to_string(data.path().join("other_key.pub")).unwrap();
    std::fs::write(
        data.path().join("wrong_hosts"),
        format!("[127.0.0.1]:{port} {other_pub}"),
    )
    .unwrap();
    let d = data.path().display();
    let url = format!("ssh://{user}@127.0.0.1:{port}{}", origin.bare.display());
    let cfg = data.path().join("rave.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nrate_limit_per_sec = 1000\n\n[[projects]]\nname = \"team/app\"\nclone_url = \"{url}\"\nsecret = \"{SECRET}\"\nssh_key = \"{d}/client_key\"\nssh_known_hosts = \"{d}/known_hosts\"\n\n[[projects]]\nname = \"team/spoofed\"\nclone_url = \"{url}\"\nsecret = \"{SECRET}\"\nssh_key = \"{d}/client_key\"\nssh_known_hosts = \"{d}/wrong_hosts\"\n\n[[tokens]]\nname = \"ops\"\ntoken = \"{READER}\"\nscope = \"read\"\n"
        ),
    )
    .unwrap();
    let s = start(&data.path().join("data"), &cfg);
    let id = queued(&s, "ssh-1", "refs/heads/main", &a);
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(v["pipeline"]["sha"], a);

    // The same repository behind a host key that is not the pinned one: refused.
    let r = github_push_to(&s, "team/spoofed", "ssh-2", "refs/heads/main", &a);
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().unwrap()["pipeline_id"].as_i64().unwrap();
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    let err = v["pipeline"]["error"].as_str().unwrap();
    assert!(err.contains("not the one pinned"), "{err}");
}

#[test]
fn fetches_over_http_with_the_projects_token() {
    let origin = Origin::new(&[(".gitlab-ci.yml", PIPELINE)]);
    let a = origin.head();
    let root = origin.bare.parent().unwrap().to_path_buf();
    // git's own smart-HTTP backend behind basic auth: the token is the password.
    let mut git_http = Command::new("python3")
        .arg(fixtures().join("servers/git_http.py"))
        .arg(&root)
        .arg("deploy-token-42")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(git_http.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("rave.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[projects]]\nname = \"team/app\"\nclone_url = \"http://127.0.0.1:{port}/origin.git\"\nsecret = \"{SECRET}\"\ntoken_env = \"APP_TOKEN\"\n\n[[projects]]\nname = \"team/nokey\"\nclone_url = \"http://127.0.0.1:{port}/origin.git\"\nsecret = \"{SECRET}\"\n\n[[tokens]]\nname = \"ops\"\ntoken = \"{READER}\"\nscope = \"read\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(rave_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .env("APP_TOKEN", "deploy-token-42")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let s = Server {
        child,
        url: format!(
            "http://{}",
            line.trim().strip_prefix("listening on ").unwrap()
        ),
    };
    let id = queued(&s, "http-1", "refs/heads/main", &a);
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");

    // Without a token the forge refuses, and the pipeline says why.
    let r = github_push_to(&s, "team/nokey", "http-2", "refs/heads/main", &a);
    let id = r.json::<Value>().unwrap()["pipeline_id"].as_i64().unwrap();
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    let err = v["pipeline"]["error"].as_str().unwrap();
    assert!(
        err.contains("none are configured for this project"),
        "{err}"
    );

    // A pipeline whose jobs come from another project on the same forge: fetched with the
    // project's token, which its jobs never see.
    let ci = tempfile::tempdir().unwrap();
    std::fs::write(
        ci.path().join("jobs.yml"),
        "from-ci:\n  script:\n    - echo \"from the ci project\"\n    - test -z \"$RAVE_INCLUDE_TOKEN\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("team")).unwrap();
    sh(
        ci.path(),
        &format!(
            "git init -q -b main . && git add -A && git commit -qm ci && git clone -q --bare . {}",
            root.join("team/ci.git").display()
        ),
    );
    let b = origin.commit(
        &[(
            ".gitlab-ci.yml",
            "include:\n  - project: team/ci\n    file: jobs.yml\nown:\n  script: [echo own]\n",
        )],
        &[],
    );
    let id = queued(&s, "http-3", "refs/heads/main", &b);
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(job(&v, "from-ci")["status"], "success", "{v:#}");
    let _ = git_http.kill();
    let _ = git_http.wait();
}

#[test]
fn api_runs_a_ref_plays_manual_jobs_reruns_failures_and_cancels() {
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        "stages: [build, deploy, check]\nbuild:\n  stage: build\n  script:\n    - if test -f slow; then echo SLOW; sleep 6062; fi\n    - echo built\ndeploy:\n  stage: deploy\n  when: manual\n  script: [echo deployed]\nflaky:\n  stage: check\n  needs: []\n  script: ['echo \"checking, attempt $CI_RETRY_ATTEMPT\"', exit 3]\n",
    )]);
    sh(
        &origin.work,
        "git checkout -q -b slow && touch slow && git add slow && git commit -qm slow && git push -q origin slow && git checkout -q main",
    );
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let run = |body: Value| -> i64 { api_pipeline(&s, body) };

    // Run a ref: the server resolves it to its commit now.
    let id = run(json!({"project": "team/app", "ref": "main"}));
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["sha"], origin.head());
    assert_eq!(v["pipeline"]["source"], "api");
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    assert_eq!(job(&v, "build")["status"], "success");
    assert_eq!(job(&v, "flaky")["exit_code"], 3);
    let deploy = job(&v, "deploy");
    assert_eq!(deploy["status"], "manual", "{v:#}");

    // Play the manual job inside its pipeline (as GitLab does): it runs, at the same commit;
    // nothing else runs again.
    let (code, p) = post(&s, &format!("/api/jobs/{}/play", deploy["id"]), ADMIN);
    assert_eq!(code, 202, "{p}");
    assert_eq!(p["pipeline_id"], id, "played inside its pipeline");
    let played = finished(&s, id);
    assert_eq!(job(&played, "deploy")["status"], "success", "{played:#}");
    assert_eq!(job(&played, "deploy")["id"], deploy["id"], "the same job");
    assert_eq!(
        job(&played, "build")["started_at"],
        job(&v, "build")["started_at"]
    );
    assert_eq!(job(&played, "flaky")["status"], "failed");
    assert_eq!(played["pipeline"]["status"], "failed", "flaky still failed");
    let (code, _) = post(
        &s,
        &format!("/api/jobs/{}/play", job(&v, "build")["id"]),
        ADMIN,
    );
    assert_eq!(code, 409, "only manual jobs are played");

    // Retry the failed jobs inside the pipeline: flaky's next attempt; the rest keep theirs.
    let (code, r) = post(&s, &format!("/api/pipelines/{id}/rerun?failed=1"), ADMIN);
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["jobs"], json!(["flaky"]));
    assert_eq!(r["pipeline_id"], id);
    let again = finished(&s, id);
    assert_eq!(job(&again, "flaky")["exit_code"], 3);
    assert_eq!(job(&again, "flaky")["attempts"], 2, "{again:#}");
    assert_eq!(job(&again, "build")["status"], "success", "{again:#}");
    assert_eq!(
        job(&again, "build")["started_at"],
        job(&v, "build")["started_at"]
    );
    assert_eq!(job(&again, "deploy")["status"], "success", "{again:#}");
    let log = text(&s, &format!("/api/jobs/{}/log", job(&again, "build")["id"]));
    assert!(
        log.contains("built"),
        "the carried job's log is still served: {log}"
    );
    let log = text(&s, &format!("/api/jobs/{}/log", job(&again, "flaky")["id"]));
    assert!(
        log.contains("checking, attempt 1"),
        "the retried job's row serves its new attempt's log: {log}"
    );

    // Cancel a running pipeline: its job is stopped, nothing keeps running.
    let slow = run(json!({"project": "team/app", "ref": "slow"}));
    wait_until("the slow job never started", 60, || {
        get(&s, &format!("/api/pipelines/{slow}"), READER)["jobs"]
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["status"] == "running"))
    });
    let (code, _) = post(&s, &format!("/api/pipelines/{slow}/cancel"), ADMIN);
    assert_eq!(code, 202);
    let v = finished(&s, slow);
    assert_eq!(v["pipeline"]["status"], "canceled", "{v:#}");
    assert_eq!(job(&v, "build")["status"], "canceled", "{v:#}");
    let sleeping = Command::new("pgrep")
        .args(["-f", "sleep 6062"])
        .output()
        .unwrap();
    assert!(sleeping.stdout.is_empty(), "the canceled job still runs");
    let (code, _) = post(&s, &format!("/api/pipelines/{slow}/cancel"), ADMIN);
    assert_eq!(code, 409, "a finished pipeline cannot be canceled");
}

#[test]
fn a_stopped_server_cancels_its_running_pipeline_and_keeps_the_queue() {
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        "work:\n  script: [echo STARTED, sleep 6063]\n  after_script: [echo cleaned-up]\n",
    )]);
    let a = origin.head();
    let data = tempfile::tempdir().unwrap();
    // One pipeline at a time, so the second stays queued.
    let cfg = config(data.path(), &origin, "max_pipelines = 1");
    let dd = data.path().join("data");
    let mut s = start(&dd, &cfg);
    let first = github_push(&s, "stop-1", "refs/heads/main", &a)
        .json::<Value>()
        .unwrap()["pipeline_id"]
        .as_i64()
        .unwrap();
    wait_until("the job never started", 60, || {
        get(&s, &format!("/api/pipelines/{first}"), READER)["jobs"]
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["status"] == "running"))
    });
    let queued = github_push(&s, "stop-2", "refs/heads/main", &a)
        .json::<Value>()
        .unwrap()["pipeline_id"]
        .as_i64()
        .unwrap();
    // SIGTERM, as systemd stops a service: the server stops the run it has going and exits.
    let pid = rustix::process::Pid::from_raw(s.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    drop(s);
    let sleeping = Command::new("pgrep")
        .args(["-f", "sleep 6063"])
        .output()
        .unwrap();
    assert!(sleeping.stdout.is_empty(), "the job outlived the server");
    let s = start(&dd, &cfg);
    let v = get(&s, &format!("/api/pipelines/{first}"), READER);
    assert_eq!(v["pipeline"]["status"], "canceled", "{v:#}");
    assert_eq!(job(&v, "work")["status"], "canceled", "{v:#}");
    let log = text(&s, &format!("/api/jobs/{}/log", job(&v, "work")["id"]));
    assert!(log.contains("cleaned-up"), "after_script ran: {log}");
    // The pipeline that was only queued runs after the restart (and is canceled by hand).
    wait_until("the queued pipeline never started", 60, || {
        get(&s, &format!("/api/pipelines/{queued}"), READER)["pipeline"]["status"] == "running"
    });
    let (code, _) = post(&s, &format!("/api/pipelines/{queued}/cancel"), ADMIN);
    assert_eq!(code, 202);
    assert_eq!(finished(&s, queued)["pipeline"]["status"], "canceled");
}

/// Start `rave serve` with extra environment (the server's own secrets); returns once it
/// listens on a free loopback port.
fn start_env(data: &Path, config: &Path, env: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(rave_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start rave serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("rave serve said {line:?}"))
        .to_string();
    Server {
        child,
        url: format!("http://{addr}"),
    }
}

/// A job on `rave serve` sees its variables, the project's CI/CD variables (protected ones only
/// on protected refs, masked ones masked, file ones as a private file, raw ones unexpanded) and
/// nothing of the server's environment: not the admin token, not the webhook secret, not any
/// other variable the server was started with.
#[test]
fn jobs_see_project_variables_and_none_of_the_servers_secrets() {
    const SERVER_ONLY: &str = "server-only-value-31337";
    const API_KEY: &str = "api-key-value-4242-abcd";
    const ADMIN_ENV: &str = "admin-token-from-env-777";
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        r#"dump:
  script:
    - env | sort > env.txt
    - echo "the key is $API_KEY"
    - test "$DEPLOY_URL" = https://deploy.example
    - test "$(cat "$CONFIG_FILE")" = file-content
    - test "$RAW_VAR" = 'a$HOME'
    - echo "sign=${SIGN:-absent}"
  artifacts: {paths: [env.txt]}
"#,
    )]);
    sh(
        &origin.work,
        "git checkout -q -b feature && git push -q origin feature && git checkout -q main",
    );
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let mut text_cfg = std::fs::read_to_string(&cfg).unwrap();
    text_cfg = text_cfg.replace(
        "[[tokens]]\nname = \"ops\"",
        r#"[[projects.variables]]
name = "DEPLOY_URL"
value = "https://deploy.example"

[[projects.variables]]
name = "API_KEY"
value_env = "APP_API_KEY"
masked = true

[[projects.variables]]
name = "SIGN"
value = "protected-signing-value"
protected = true

[[projects.variables]]
name = "CONFIG_FILE"
value = "file-content"
file = true

[[projects.variables]]
name = "RAW_VAR"
value = "a$HOME"
raw = true

[[tokens]]
name = "env-admin"
token_env = "RAVE_ADMIN_TOKEN"
scope = "admin"

[[tokens]]
name = "ops""#,
    );
    std::fs::write(&cfg, text_cfg).unwrap();
    let s = start_env(
        &data.path().join("data"),
        &cfg,
        &[
            ("SERVER_ONLY_SECRET", SERVER_ONLY),
            ("APP_API_KEY", API_KEY),
            ("RAVE_ADMIN_TOKEN", ADMIN_ENV),
        ],
    );

    // The API lists the variables without their values.
    let listed = get(&s, "/api/projects/team/app/variables", ADMIN);
    let listed_text = listed.to_string();
    assert!(listed_text.contains("\"API_KEY\"") && listed_text.contains("\"masked\":true"));
    assert!(!listed_text.contains(API_KEY) && !listed_text.contains("file-content"));

    for (delivery, branch) in [("sec-main", "main"), ("sec-feature", "feature")] {
        let r = github_push(
            &s,
            delivery,
            &format!("refs/heads/{branch}"),
            &origin.head(),
        );
        assert_eq!(r.status(), 202);
        let id = r.json::<Value>().unwrap()["pipeline_id"].as_i64().unwrap();
        let v = finished(&s, id);
        assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
        let dump = job(&v, "dump");
        let env = text(&s, &format!("/api/jobs/{}/artifacts/env.txt", dump["id"]));
        assert!(env.contains("DEPLOY_URL=https://deploy.example"), "{env}");
        assert!(env.contains("CI_PROJECT_NAME="), "{env}");
        for secret in [
            SERVER_ONLY,
            ADMIN_ENV,
            ADMIN,
            SECRET,
            "SERVER_ONLY_SECRET",
            "APP_API_KEY",
        ] {
            assert!(!env.contains(secret), "the job saw `{secret}`:\n{env}");
        }
        let log = text(&s, &format!("/api/jobs/{}/log", dump["id"]));
        assert!(log.contains("the key is [MASKED]"), "{log}");
        assert!(!log.contains(API_KEY), "{log}");
        let has_sign = env.contains("SIGN=protected-signing-value");
        assert_eq!(
            has_sign,
            branch == "main",
            "protected variable on {branch}:\n{env}"
        );
        // Four downloads of the job's artifacts at once each get the whole, same archive.
        let url = format!("{}/api/jobs/{}/artifacts", s.url, dump["id"]);
        let tars: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        client()
                            .get(&url)
                            .bearer_auth(READER)
                            .send()
                            .unwrap()
                            .bytes()
                            .unwrap()
                            .to_vec()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for t in &tars {
            assert_eq!(t, &tars[0], "parallel downloads differ");
            let listing = String::from_utf8_lossy(t);
            assert!(listing.contains("env.txt"), "no env.txt in the archive");
        }
    }
}

/// A pipeline whose checkout cannot be written (a full disk) ends `failed` at once with the
/// cause, never `running` until a restart; the server keeps answering.
#[test]
fn a_full_disk_fails_the_pipeline_with_its_cause() {
    // A small tmpfs as the data dir: the repository's checkout does not fit in it. Needs root
    // (mount), which CI has.
    let data = tempfile::tempdir().unwrap();
    let mnt = data.path().join("data");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(st.success(), "mounting a tmpfs needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    // 4 MiB that do not compress: bigger than the whole tmpfs once checked out.
    let big: String = (0..(4 << 20) / 64)
        .map(|i| format!("{:064x}", (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    let origin = Origin::new(&[
        (".gitlab-ci.yml", "job:\n  script: [echo hi]\n"),
        ("big.txt", &big),
    ]);
    let cfg = config(data.path(), &origin, "");
    let s = start(&mnt, &cfg);
    let id = queued(&s, "full-1", "refs/heads/main", &origin.head());
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    let err = v["pipeline"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("No space left") || err.contains("space"),
        "the cause is named: {err}"
    );
    assert_eq!(text(&s, "/healthz"), "ok\n");
}

/// Idle and slow clients are dropped (headers must arrive within 10 s), the server keeps
/// answering meanwhile, and a stop finishes within its bound even with a client stuck halfway
/// through its headers.
#[test]
fn idle_and_slow_clients_cannot_hold_the_server() {
    use std::io::Write;
    let origin = Origin::new(&[(".gitlab-ci.yml", "job:\n  script: [echo hi]\n")]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let mut s = start(&data.path().join("data"), &cfg);
    let addr = s.url.trim_start_matches("http://").to_string();
    let idle = std::net::TcpStream::connect(&addr).unwrap();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // The server still answers others.
    assert_eq!(text(&s, "/healthz"), "ok\n");
    // Both are closed by the server after the header timeout (read returns 0 or an error).
    let started = std::time::Instant::now();
    for mut c in [idle, slow.try_clone().unwrap()] {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 256];
        let n = match c.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the connection is still open after 30 s")
            }
            Err(_) => 0, // reset by the server: closed
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            n == 0 || text.starts_with("HTTP/1.1 408"),
            "expected the connection closed, got {text:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "closed by the server"
    );

    // A client stuck halfway through its headers does not hold up a stop.
    let mut stuck = std::net::TcpStream::connect(&addr).unwrap();
    stuck.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let pid = rustix::process::Pid::from_raw(s.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let stopping = std::time::Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(30),
            "rave serve did not stop within 30 s with a stuck client"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(stuck);
}

/// An unknown project and a wrong signature get the same answer (no project enumeration), and a
/// crafted hook path never reaches `/metrics` as text.
#[test]
fn refusals_reveal_nothing_and_crafted_paths_stay_out_of_metrics() {
    let origin = Origin::new(&[(".gitlab-ci.yml", "job:\n  script: [echo hi]\n")]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let unknown = github_push_to(
        &s,
        "team/secret-project",
        "d1",
        "refs/heads/main",
        &origin.head(),
    );
    let body = json!({"ref": "refs/heads/main", "after": origin.head(), "repository": {"full_name": "team/app"}}).to_string();
    let forged = client()
        .post(format!("{}/hooks/github", s.url))
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", "d2")
        .header("X-Hub-Signature-256", format!("sha256={}", "0".repeat(64)))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(unknown.status(), 401);
    assert_eq!(forged.status(), 401);
    assert_eq!(unknown.text().unwrap(), forged.text().unwrap());

    let crafted = client()
        .post(format!(
            "{}/hooks/github%22%7D%201%0Arave_oom_kills_total%20999%0Aevil%7Bx%3D%22",
            s.url
        ))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(crafted.status(), 404);
    let metrics = text(&s, "/metrics");
    assert!(
        !metrics.contains("evil") && !metrics.contains("rave_oom_kills_total 999"),
        "{metrics}"
    );
    assert!(
        metrics.contains("webhook_requests_total{forge=\"unknown\",code=\"404\"} 1"),
        "{metrics}"
    );
}

/// `POST /api/pipelines` passes values for the pipeline file's `spec: inputs`; a required
/// input that is missing fails the pipeline with the cause.
#[test]
fn the_api_passes_inputs_to_the_pipeline() {
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        "spec:\n  inputs:\n    target: {options: [eu, us]}\n---\ndeploy:\n  script:\n    - test \"$[[ inputs.target ]]\" = eu\n",
    )]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let run = |body: Value| -> Value { finished(&s, api_pipeline(&s, body)) };
    let v = run(json!({"project": "team/app", "ref": "main", "inputs": {"target": "eu"}}));
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(v["pipeline"]["inputs"]["target"], "eu");
    let v = run(json!({"project": "team/app", "ref": "main"}));
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    assert!(
        v["pipeline"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("input `target` is required"),
        "{v:#}"
    );
}

/// A trigger job's child pipeline shows on the server: its jobs under the trigger job.
#[test]
fn child_pipelines_show_under_their_trigger_job_on_the_server() {
    let origin = Origin::new(&[
        (
            ".gitlab-ci.yml",
            "parent-job:\n  script: [echo parent]\nrun-child:\n  trigger:\n    include: child.yml\n    strategy: depend\n",
        ),
        ("child.yml", "child-job:\n  script: [echo from-child]\n"),
    ]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let id = queued(&s, "child-1", "refs/heads/main", &origin.head());
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(job(&v, "run-child")["status"], "success", "{v:#}");
    assert_eq!(
        job(&v, "run-child » child-job")["status"],
        "success",
        "{v:#}"
    );
}

/// `GET /api/events` streams status changes as Server-Sent Events while pipelines run.
#[test]
fn the_events_stream_tells_status_changes_as_they_happen() {
    let origin = Origin::new(&[(".gitlab-ci.yml", "only-job:\n  script: [echo hi]\n")]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let refused = client()
        .get(format!("{}/api/events", s.url))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 401);
    let mut stream = client()
        .get(format!("{}/api/events", s.url))
        .bearer_auth(READER)
        .send()
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let r = github_push(&s, "events-1", "refs/heads/main", &origin.head());
    assert_eq!(r.status(), 202);
    // Read until the pipeline's end is told (bounded by the client's timeout).
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // The pipeline's own event has no job.
    while !seen.contains("\"job\":null,\"status\":\"success\"") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("event: job"), "{seen}");
    assert!(seen.contains("\"job\":\"only-job\""), "{seen}");
    assert!(seen.contains("event: pipeline"), "{seen}");
}

/// The server keeps each project's workspaces, caches and reuse records across pipelines (each
/// pipeline is a fresh checkout), and keeps a protected branch's caches apart.
#[test]
fn caches_and_reuse_outlive_the_checkout_and_protected_refs_keep_their_own() {
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        r#"deps:
  cache: {key: deps, paths: [vendor/]}
  script:
    - echo "cache-$(test -f vendor/seen && echo HIT || echo MISS) git-$(git rev-parse --short HEAD)"
    - mkdir -p vendor && touch vendor/seen
same:
  variables: {RAVE_REUSE: "1"}
  script: [echo work]
"#,
    )]);
    sh(
        &origin.work,
        "git checkout -q -b feature && git push -q origin feature && git checkout -q main",
    );
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let text_cfg = std::fs::read_to_string(&cfg).unwrap().replace(
        "[[tokens]]\nname = \"ops\"",
        "protected_branches = [\"main\"]\n\n[[tokens]]\nname = \"ops\"",
    );
    std::fs::write(&cfg, text_cfg).unwrap();
    let s = start(&data.path().join("data"), &cfg);
    let run = |r: &str| {
        finished(
            &s,
            api_pipeline(&s, json!({"project": "team/app", "ref": r})),
        )
    };
    let log_of = |v: &Value, name: &str| text(&s, &format!("/api/jobs/{}/log", job(v, name)["id"]));
    let first = run("main");
    assert_eq!(first["pipeline"]["status"], "success", "{first:#}");
    assert!(
        log_of(&first, "deps").contains("cache-MISS git-"),
        "{}",
        log_of(&first, "deps")
    );
    let second = run("main");
    let log = log_of(&second, "deps");
    assert!(log.contains("cache-HIT"), "{log}");
    assert!(
        log_of(&second, "same").contains("Reused"),
        "{}",
        log_of(&second, "same")
    );
    // An unprotected branch does not see the protected branch's cache.
    let feature = run("feature");
    assert!(
        log_of(&feature, "deps").contains("cache-MISS"),
        "{}",
        log_of(&feature, "deps")
    );
    let state = data.path().join("data/workspaces");
    let project = std::fs::read_dir(&state)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let list = rave(
        data.path(),
        &["cache", "list", "--state-dir", project.to_str().unwrap()],
    );
    assert!(list.stdout.contains("deps-protected"), "{}", list.stdout);
    assert!(
        list.stdout.contains("deps-non_protected"),
        "{}",
        list.stdout
    );
}

/// `rave pipelines new`, `rave retry`, `rave play` and `rave cancel` against a real server.
#[test]
fn retry_play_and_cancel_from_the_command_line() {
    let flag = tempfile::tempdir().unwrap();
    let pass = flag.path().join("pass");
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        &format!(
            "flaky:\n  script: ['test -e {}']\ndeploy:\n  when: manual\n  script: [echo deployed]\nwait:\n  when: manual\n  script: [sleep 30]\n",
            pass.display()
        ),
    )]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--server", &s.url, "--token", ADMIN]);
        rave(data.path(), &all)
    };
    let r = cli(&["pipelines", "new", "--project", "team/app", "--ref", "main"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let p1: i64 = r
        .stdout
        .split('#')
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let v = finished(&s, p1);
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    assert_eq!(v["pipeline"]["source"], "api");
    std::fs::write(&pass, "").unwrap();
    let r = cli(&["retry", &p1.to_string()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "pipeline #{p1} queued again to run flaky inside it"
        )),
        "{}",
        r.stdout
    );
    let v2 = finished(&s, p1);
    assert_eq!(v2["pipeline"]["status"], "success", "{v2:#}");
    assert_eq!(job(&v2, "flaky")["attempts"], 2);
    let deploy = job(&v, "deploy")["id"].as_i64().unwrap();
    let r = cli(&["play", &deploy.to_string()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!("pipeline #{p1} ")),
        "{}",
        r.stdout
    );
    let v3 = finished(&s, p1);
    assert_eq!(job(&v3, "deploy")["status"], "success", "{v3:#}");
    assert_eq!(job(&v3, "flaky")["attempts"], 2, "not run again");
    // A running pipeline is canceled; a finished one says why not.
    let p4 = api_pipeline(
        &s,
        json!({"project": "team/app", "ref": "main", "jobs": ["wait"]}),
    );
    // Cancel once its job runs (a pipeline still checking out is a different path).
    wait_until("the job never started", 30, || {
        get(&s, &format!("/api/pipelines/{p4}"), READER)["jobs"]
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["status"] == "running"))
    });
    let r = cli(&["cancel", &p4.to_string()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(finished(&s, p4)["pipeline"]["status"], "canceled");
    // Canceled as soon as it runs (checking out, or `rave run` still starting): canceled too,
    // never failed.
    let p5 = api_pipeline(
        &s,
        json!({"project": "team/app", "ref": "main", "jobs": ["wait"]}),
    );
    wait_until("never running", 30, || {
        get(&s, &format!("/api/pipelines/{p5}"), READER)["pipeline"]["status"] == "running"
    });
    let r = cli(&["cancel", &p5.to_string()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(finished(&s, p5)["pipeline"]["status"], "canceled");
    let r = cli(&["cancel", &p1.to_string()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("the server answered 409"), "{}", r.stderr);
}

/// Three pushes at once under one host budget of 1 GiB, each a pipeline whose job needs
/// 384 MiB: two run together (one pipeline at a time would run one), the third waits for
/// room though `max_pipelines` would let its pipeline start, and the budget view says so.
/// When the first two end, the third runs; all three succeed.
#[test]
fn pipelines_run_at_once_and_share_one_host_budget() {
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        &format!(
            "hold:\n  variables: {{RAVE_MEMORY: 384M}}\n  script:\n    - echo holding\n    - while [ ! -e {} ]; do sleep 0.1; done\n",
            open.display()
        ),
    )]);
    let a = origin.head();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(
        data.path(),
        &origin,
        "memory = \"1G\"\ncpus = \"2\"\njobs = 4\nmax_pipelines = 4",
    );
    let s = start(&data.path().join("data"), &cfg);
    let ids: Vec<i64> = (0..3)
        .map(|i| {
            github_push(&s, &format!("share-{i}"), "refs/heads/main", &a)
                .json::<Value>()
                .unwrap()["pipeline_id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let running_jobs = || {
        ids.iter()
            .filter(|id| {
                job(&get(&s, &format!("/api/pipelines/{id}"), READER), "hold")["status"]
                    == "running"
            })
            .count()
    };
    wait_until("two jobs never ran together", 120, || {
        let b = get(&s, "/api/budget", READER);
        b["running_jobs"] == 2 && b["waiting_jobs"] == 1
    });
    let b = get(&s, "/api/budget", READER);
    assert_eq!(b["held_bytes"], 768 * 1024 * 1024, "{b:#}");
    assert_eq!(b["memory_budget_bytes"], 1024 * 1024 * 1024, "{b:#}");
    assert_eq!(
        b["share"]["pipelines"].as_array().unwrap().len(),
        3,
        "{b:#}"
    );
    for id in &ids {
        assert_eq!(
            get(&s, &format!("/api/pipelines/{id}"), READER)["pipeline"]["status"],
            "running",
            "every pipeline has started: {id}"
        );
    }
    // A while later, still two: the third waits for room, not for its turn.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(running_jobs(), 2);
    std::fs::write(&open, "").unwrap();
    for id in &ids {
        let v = finished(&s, *id);
        assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    }
    let b = get(&s, "/api/budget", READER);
    assert_eq!(b["held_bytes"], 0, "{b:#}");
    assert_eq!(b["running_jobs"], 0, "{b:#}");
}

/// A job larger than the whole host budget fails with why, instead of waiting forever.
#[test]
fn a_job_larger_than_the_host_budget_fails_with_why() {
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        // The pipeline's own profile allows 6 GiB; the server's budget (the safe profile,
        // 3 GiB) cannot hold a 4 GiB job.
        ".rave:\n  profile: big\n  profiles:\n    big: {memory: 6G, cpus: 2, jobs: 2, nix_cores: 2, nix_max_jobs: 1}\nbig:\n  variables: {RAVE_MEMORY: 4G}\n  script: [echo never]\n",
    )]);
    let a = origin.head();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let id = github_push(&s, "too-big", "refs/heads/main", &a)
        .json::<Value>()
        .unwrap()["pipeline_id"]
        .as_i64()
        .unwrap();
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    let note = job(&v, "big")["note"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(note.contains("server's whole budget"), "{v:#}");
}

/// `kill -9` while two pipelines run at once: after the restart (`on_restart = "requeue"`)
/// both run again from the start and succeed, and no job of the killed runs is left.
#[test]
fn kill_9_with_pipelines_running_at_once_requeues_them_all() {
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        &format!(
            "hold:\n  variables: {{RAVE_MEMORY: 256M}}\n  script:\n    - while [ ! -e {} ]; do sleep 0.1; done; echo done-6064\n",
            open.display()
        ),
    )]);
    let a = origin.head();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "on_restart = \"requeue\"");
    let dd = data.path().join("data");
    let s = start(&dd, &cfg);
    let ids: Vec<i64> = (0..2)
        .map(|i| {
            github_push(&s, &format!("k9-{i}"), "refs/heads/main", &a)
                .json::<Value>()
                .unwrap()["pipeline_id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    wait_until("the two jobs never ran together", 120, || {
        get(&s, "/api/budget", READER)["running_jobs"] == 2
    });
    let mut s = s;
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(s);
    let s = start(&dd, &cfg);
    let left = Command::new("pgrep")
        .args(["-f", &open.display().to_string()])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "a job outlived the restart: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    std::fs::write(&open, "").unwrap();
    for id in ids {
        let v = finished(&s, id);
        assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    }
}

/// A pipeline started through the API with pipeline variables (taken literally, above the
/// project's), and one of its jobs canceled alone, as GitLab cancels a job: the job stops
/// (its after_script runs), the job that needs it is skipped, the other one finishes, and the
/// pipeline ends canceled. A variable name that is not one is refused.
#[test]
fn api_pipeline_variables_and_canceling_one_job() {
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        "stages: [build, deploy]\nwork:\n  stage: build\n  script: [echo \"greeting=$GREETING\", echo STARTED, sleep 6065]\n  after_script: [echo cleaned-up]\nother:\n  stage: build\n  script: [echo \"greeting=$GREETING\", sleep 1]\nafter:\n  stage: deploy\n  needs: [work]\n  script: [echo never]\n",
    )]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    let r = client()
        .post(format!("{}/api/pipelines", s.url))
        .bearer_auth(ADMIN)
        .json(&json!({"project": "team/app", "ref": "main", "variables": {"BAD NAME": "x"}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let id = api_pipeline(
        &s,
        json!({"project": "team/app", "ref": "main", "variables": {"GREETING": "hi $HOME"}}),
    );
    wait_until("work never started", 60, || {
        get(&s, &format!("/api/pipelines/{id}"), READER)["jobs"]
            .as_array()
            .is_some_and(|j| {
                j.iter()
                    .any(|j| j["name"] == "work" && j["status"] == "running")
            })
    });
    let v = get(&s, &format!("/api/pipelines/{id}"), READER);
    let work = job(&v, "work")["id"].as_i64().unwrap();
    wait_until("work never printed", 30, || {
        text(&s, &format!("/api/jobs/{work}/log")).contains("STARTED")
    });
    let (code, r) = post(&s, &format!("/api/jobs/{work}/cancel"), READER);
    assert_eq!(code, 403, "{r}");
    let (code, r) = post(&s, &format!("/api/jobs/{work}/cancel"), ADMIN);
    assert_eq!(code, 202, "{r}");
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "canceled", "{v:#}");
    assert_eq!(job(&v, "work")["status"], "canceled", "{v:#}");
    assert_eq!(job(&v, "other")["status"], "success", "{v:#}");
    assert_eq!(job(&v, "after")["status"], "skipped", "{v:#}");
    let log = text(&s, &format!("/api/jobs/{work}/log"));
    assert!(log.contains("cleaned-up"), "after_script ran: {log}");
    assert!(log.contains("greeting=hi $HOME"), "taken literally: {log}");
    let sleeping = Command::new("pgrep")
        .args(["-f", "sleep 6065"])
        .output()
        .unwrap();
    assert!(sleeping.stdout.is_empty(), "the canceled job still runs");
    let (code, _) = post(&s, &format!("/api/jobs/{work}/cancel"), ADMIN);
    assert_eq!(code, 409, "a finished job cannot be canceled");
}

/// `include: project` from a forge reached over SSH: fetched with the project's key and its
/// pinned host key, from `include_base`; the included job runs.
#[test]
fn includes_come_over_ssh_with_the_projects_key() {
    let data = tempfile::tempdir().unwrap();
    let ssh = sshd(data.path());
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let port = ssh.port;
    let host_pub = std::fs::read_to_string(data.path().join("host_key.pub")).unwrap();
    std::fs::write(
        data.path().join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}"),
    )
    .unwrap();
    // The shared templates, as a project on the forge: <forge>/team/templates.git.
    let forge = data.path().join("forge");
    std::fs::create_dir_all(forge.join("team")).unwrap();
    sh(
        &forge,
        "git init -q --bare team/templates.git && mkdir t && cd t && git init -q -b main . && printf 'from-template:\\n  script: [echo from the shared template]\\n' > build.yml && git add -A && git -c user.name=t -c user.email=t@t commit -qm t && git push -q ../team/templates.git main",
    );
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        "include:\n  - project: team/templates\n    file: build.yml\nown:\n  script: [echo own]\n",
    )]);
    let a = origin.head();
    let d = data.path().display();
    let url = format!("ssh://{user}@127.0.0.1:{port}{}", origin.bare.display());
    let cfg = data.path().join("rave.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nrate_limit_per_sec = 1000\n\n[[projects]]\nname = \"team/app\"\nclone_url = \"{url}\"\nsecret = \"{SECRET}\"\nssh_key = \"{d}/client_key\"\nssh_known_hosts = \"{d}/known_hosts\"\ninclude_base = \"ssh://{user}@127.0.0.1:{port}{d}/forge\"\n\n[[tokens]]\nname = \"ops\"\ntoken = \"{READER}\"\nscope = \"read\"\n"
        ),
    )
    .unwrap();
    let s = start(&data.path().join("data"), &cfg);
    let id = queued(&s, "ssh-include-1", "refs/heads/main", &a);
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    let included = job(&v, "from-template");
    assert_eq!(included["status"], "success", "{v:#}");
    let log = text(&s, &format!("/api/jobs/{}/log", included["id"]));
    assert!(log.contains("from the shared template"), "{log}");
}

/// Multi-project pipelines: a `trigger: project` job makes the server start that project's
/// pipeline (source `pipeline`) with the job's variables; with `strategy: depend` the job
/// takes the downstream pipeline's result, without it the job succeeds once the pipeline
/// exists. A project the server does not know, or one that does not accept triggers from the
/// upstream (`triggered_by`), fails the job with why; a plain `rave run` says such jobs run on
/// `rave serve`.
#[test]
fn trigger_project_starts_the_downstream_pipeline_on_the_server() {
    let lib = Origin::new(&[(
        ".gitlab-ci.yml",
        "check:\n  script:\n    - echo \"version=$VERSION\"\n    - test \"$VERSION\" != broken\n",
    )]);
    let app = Origin::new(&[(
        ".gitlab-ci.yml",
        "variables: {VERSION: \"1.2\"}\nstages: [build, deploy]\nbuild:\n  stage: build\n  script: [echo built]\nrelease-lib:\n  stage: deploy\n  trigger:\n    project: team/lib\n    strategy: depend\nnotify-lib:\n  stage: deploy\n  variables: {VERSION: broken}\n  trigger: team/lib\nunknown:\n  stage: deploy\n  trigger: {project: team/nowhere}\n  allow_failure: true\nclosed:\n  stage: deploy\n  trigger: {project: team/closed}\n  allow_failure: true\n",
    )]);
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("rave.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nrate_limit_per_sec = 1000\n\n[[projects]]\nname = \"team/app\"\nclone_url = \"{}\"\nsecret = \"{SECRET}\"\n\n[[projects]]\nname = \"team/lib\"\nclone_url = \"{}\"\nsecret = \"{SECRET}\"\ntriggered_by = [\"team/app\"]\n\n[[projects]]\nname = \"team/closed\"\nclone_url = \"{}\"\nsecret = \"{SECRET}\"\ntriggered_by = [\"team/other\"]\n\n[[tokens]]\nname = \"ops\"\ntoken = \"{ADMIN}\"\nscope = \"admin\"\n\n[[tokens]]\nname = \"dash\"\ntoken = \"{READER}\"\nscope = \"read\"\n",
            app.bare.display(),
            lib.bare.display(),
            lib.bare.display()
        ),
    )
    .unwrap();
    let s = start(&data.path().join("data"), &cfg);
    let id = api_pipeline(&s, json!({"project": "team/app", "ref": "main"}));
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    let depend = job(&v, "release-lib");
    assert_eq!(depend["status"], "success", "{v:#}");
    let note = depend["note"].as_str().unwrap_or_default().to_string();
    assert!(
        note.contains("downstream pipeline #") && note.contains("team/lib"),
        "{note}"
    );
    assert_eq!(
        job(&v, "notify-lib")["status"],
        "success",
        "not awaited: {v:#}"
    );
    let unknown = job(&v, "unknown");
    assert_eq!(unknown["status"], "warning", "{v:#}");
    assert!(
        unknown["note"]
            .as_str()
            .unwrap_or_default()
            .contains("`team/nowhere` is not configured on this rave serve"),
        "{v:#}"
    );
    // A project that does not list the upstream among `triggered_by` runs nothing for it.
    let closed = job(&v, "closed");
    assert_eq!(closed["status"], "warning", "{v:#}");
    assert!(
        closed["note"].as_str().unwrap_or_default().contains(
            "project `team/closed` does not accept pipelines triggered by `team/app`: add `triggered_by = [\"team/app\"]`"
        ),
        "{v:#}"
    );
    let none = get(&s, "/api/pipelines?project=team/closed", READER);
    assert_eq!(none["pipelines"].as_array().unwrap().len(), 0, "{none:#}");
    // The downstream pipelines: source `pipeline`, the job's variables.
    let list = get(&s, "/api/pipelines?project=team/lib", READER);
    let downstream: Vec<i64> = list["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(downstream.len(), 2, "{list:#}");
    let mut logs = Vec::new();
    for d in &downstream {
        let p = finished(&s, *d);
        assert_eq!(p["pipeline"]["source"], "pipeline");
        logs.push(text(
            &s,
            &format!("/api/jobs/{}/log", job(&p, "check")["id"]),
        ));
    }
    assert!(logs.iter().any(|l| l.contains("version=1.2")), "{logs:?}");
    assert!(
        logs.iter().any(|l| l.contains("version=broken")),
        "{logs:?}"
    );

    // strategy: depend takes a failed downstream pipeline's result.
    let failing = api_pipeline(
        &s,
        json!({"project": "team/app", "ref": "main", "variables": {"VERSION": "broken"}}),
    );
    let v = finished(&s, failing);
    assert_eq!(v["pipeline"]["status"], "failed", "{v:#}");
    let depend = job(&v, "release-lib");
    assert_eq!(depend["failure_reason"], "downstream_failed", "{v:#}");
    assert!(
        depend["note"]
            .as_str()
            .unwrap_or_default()
            .contains("ended failed"),
        "{v:#}"
    );

    // Without a server, the job says where such jobs run.
    let r = rave(&app.work, &["run", "--json", "release-lib"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    assert!(
        job(&v, "release-lib")["note"]
            .as_str()
            .unwrap_or_default()
            .contains("multi-project pipelines run on `rave serve`"),
        "{v:#}"
    );
}

/// On the server a checkout's `origin` is the project's URL, not the server's mirror: jobs
/// see it, and a submodule with a relative URL is fetched next to the project.
#[test]
fn server_checkouts_point_origin_at_the_project_and_fetch_submodules() {
    let d = tempfile::tempdir().unwrap();
    sh(
        d.path(),
        "git init -q --bare lib.git && git -C lib.git symbolic-ref HEAD refs/heads/main \
         && git init -q -b main libwork && cd libwork && echo 'from the submodule' > lib.txt \
         && git add -A && git -c user.name=t -c user.email=t@t commit -qm lib && git push -q ../lib.git main \
         && cd .. && git init -q --bare app.git && git -C app.git symbolic-ref HEAD refs/heads/main \
         && git init -q -b main app && cd app && git remote add origin ../app.git \
         && git -c protocol.file.allow=always submodule add -q ../lib.git vendor/lib \
         && printf 'job:\\n  variables: {GIT_SUBMODULE_STRATEGY: normal}\\n  script:\\n    - git remote get-url origin\\n    - cat vendor/lib/lib.txt\\n' > .gitlab-ci.yml \
         && git add -A && git -c user.name=t -c user.email=t@t commit -qm app && git push -q origin main",
    );
    let bare = d.path().join("app.git");
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("rave.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nrate_limit_per_sec = 1000\n\n[[projects]]\nname = \"team/app\"\nclone_url = \"{}\"\nsecret = \"{SECRET}\"\n\n[[tokens]]\nname = \"ops\"\ntoken = \"{ADMIN}\"\nscope = \"admin\"\n\n[[tokens]]\nname = \"dash\"\ntoken = \"{READER}\"\nscope = \"read\"\n",
            bare.display()
        ),
    )
    .unwrap();
    let s = start(&data.path().join("data"), &cfg);
    let id = api_pipeline(&s, json!({"project": "team/app", "ref": "main"}));
    let v = finished(&s, id);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    let log = text(&s, &format!("/api/jobs/{}/log", job(&v, "job")["id"]));
    assert!(
        log.contains(&bare.display().to_string()),
        "origin is the project: {log}"
    );
    assert!(!log.contains("mirrors"), "not the server's mirror: {log}");
    assert!(log.contains("from the submodule"), "{log}");
}
