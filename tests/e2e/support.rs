//! Helpers shared by the end-to-end tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn rave_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rave"))
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn rave(dir: &Path, args: &[&str]) -> Run {
    rave_env(dir, args, &[])
}

pub fn rave_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(rave_bin());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env("NO_COLOR", "1")
        .env_remove("SAFE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().expect("run rave");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn sh(dir: &Path, script: &str) {
    let st = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .status()
        .expect("bash");
    assert!(st.success(), "failed: {script}");
}

/// A temporary git repository holding `files` (path, content), committed on `main`.
pub fn git_repo(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for (p, c) in files {
        let path = d.path().join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, c).expect("write");
    }
    sh(
        d.path(),
        "git init -q -b main . && git add -A && git commit -qm init",
    );
    d
}

/// The lines of a file jobs append to (none when it does not exist yet).
pub fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

/// A request a [`RecordingServer`] received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that answers with `handler` and records every request,
/// standing in for a forge's API (no forge is reachable from the test machine).
pub struct RecordingServer {
    pub url: String,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

type Handler = dyn Fn(&Recorded) -> (u16, String) + Send + Sync;

impl RecordingServer {
    pub fn start(handler: Box<Handler>) -> RecordingServer {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>> = Default::default();
        let log = requests.clone();
        let handler: std::sync::Arc<Handler> = std::sync::Arc::from(handler);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let log = log.clone();
                let handler = handler.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let (method, path) = (
                            parts.next().unwrap_or("").to_string(),
                            parts.next().unwrap_or("").to_string(),
                        );
                        let mut headers = Vec::new();
                        loop {
                            let mut h = String::new();
                            reader.read_line(&mut h).unwrap();
                            let h = h.trim_end().to_string();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                            }
                        }
                        let header =
                            |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                        let mut body = Vec::new();
                        if let Some(len) =
                            header("content-length").and_then(|l| l.parse::<usize>().ok())
                        {
                            body.resize(len, 0);
                            reader.read_exact(&mut body).unwrap();
                        } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked"))
                        {
                            loop {
                                let mut size = String::new();
                                reader.read_line(&mut size).unwrap();
                                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                                let mut chunk = vec![0; n + 2];
                                reader.read_exact(&mut chunk).unwrap();
                                if n == 0 {
                                    break;
                                }
                                body.extend_from_slice(&chunk[..n]);
                            }
                        }
                        let req = Recorded {
                            method,
                            path,
                            headers,
                            body,
                        };
                        let (status, payload) = handler(&req);
                        log.lock().unwrap().push(req);
                        let _ = write!(
                            writer,
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
                            payload.len()
                        );
                    }
                });
            }
        });
        RecordingServer { url, requests }
    }

    pub fn seen(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }
}

/// The entry for job `name` in a `--json` document (run results or a planned graph).
pub fn job<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {v:#}"))
}

/// Start `rave` in the background, output captured.
pub fn spawn_rave(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(rave_bin())
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rave")
}

/// Wait (at most `secs`) until `done` holds; a guard against hangs, not a timing assertion.
pub fn wait_until(what: &str, secs: u64, done: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(t.elapsed().as_secs() < secs, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Does the file exist and contain `needle`?
pub fn file_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
}

/// Ctrl-C to a process.
pub fn interrupt(child: &std::process::Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
}
