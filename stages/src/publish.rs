//! Publishing a release to a forge's release API: GitLab, Gitea/Forgejo, GitHub.
//!
//! Rerunning a tag's pipeline must not fail or duplicate anything: an existing release is
//! updated in place and assets already attached are left alone. Server errors (5xx) and
//! dropped connections are retried with exponential backoff; client errors are not (they will
//! not get better) and come back with the forge's own message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{Value, json};

use crate::ReleaseError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forge {
    GitLab,
    Gitea,
    GitHub,
}

impl Forge {
    pub fn parse(s: &str) -> Option<Forge> {
        Some(match s {
            "gitlab" => Forge::GitLab,
            "gitea" | "forgejo" => Forge::Gitea,
            "github" => Forge::GitHub,
            _ => return None,
        })
    }
}

/// Where to publish. The token is never printed (Debug masks it).
#[derive(Clone)]
pub struct Target {
    pub forge: Forge,
    /// API base: `https://gitlab.example.com/api/v4`, `https://codeberg.org/api/v1`,
    /// `https://api.github.com`.
    pub api: String,
    /// GitLab: project id or `group/project`; Gitea/GitHub: `owner/repo`.
    pub project: String,
    pub token: String,
    /// First retry delay; doubled each time (4 attempts in all).
    pub backoff: Duration,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Target({:?} {} {} token=[masked])",
            self.forge, self.api, self.project
        )
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub created: bool,
    pub uploaded: Vec<String>,
    pub already_there: Vec<String>,
}

const ATTEMPTS: u32 = 4;

fn fail(what: &str, detail: String) -> ReleaseError {
    ReleaseError::Io(format!("publishing: {what}: {detail}"))
}

/// Send with retries on 5xx and connection errors. `make` builds the request afresh each time.
fn send(
    what: &str,
    backoff: Duration,
    make: &dyn Fn() -> RequestBuilder,
) -> Result<Response, ReleaseError> {
    let mut delay = backoff;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match make().send() {
            Ok(r) if r.status().is_server_error() => {
                last = format!("{} {}", r.status(), r.text().unwrap_or_default());
            }
            Ok(r) => return Ok(r),
            Err(e) => last = e.to_string(),
        }
        if attempt < ATTEMPTS {
            std::thread::sleep(delay);
            delay *= 2;
        }
    }
    Err(fail(
        what,
        format!("gave up after {ATTEMPTS} attempts: {last}"),
    ))
}

fn expect_ok(what: &str, r: Response) -> Result<Value, ReleaseError> {
    let status = r.status();
    let text = r.text().unwrap_or_default();
    if !status.is_success() {
        return Err(fail(what, format!("{status}: {text}")));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The file as a streamed request body, opened afresh for every attempt, never read whole.
fn file_body(p: &Path) -> reqwest::blocking::Body {
    match std::fs::File::open(p) {
        Ok(f) => {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            reqwest::blocking::Body::sized(f, len)
        }
        Err(_) => reqwest::blocking::Body::from(Vec::new()),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Create or update the release for `tag` and attach `assets`.
pub fn publish(
    t: &Target,
    tag: &str,
    name: &str,
    description: &str,
    assets: &[PathBuf],
) -> Result<Report, ReleaseError> {
    let client = Client::builder()
        .user_agent(concat!("rave/", env!("CARGO_PKG_VERSION")))
        .timeout(Duration::from_secs(300))
        .build()
        .map_err(|e| fail("client", e.to_string()))?;
    let api = t.api.trim_end_matches('/');
    let auth = |rb: RequestBuilder| match t.forge {
        Forge::GitLab => rb.header("PRIVATE-TOKEN", &t.token),
        Forge::Gitea => rb.header("Authorization", format!("token {}", t.token)),
        Forge::GitHub => rb
            .header("Authorization", format!("Bearer {}", t.token))
            .header("Accept", "application/vnd.github+json"),
    };
    let mut report = Report::default();
    match t.forge {
        Forge::GitLab => {
            let project = enc(&t.project);
            // Files go to the generic package registry (PUT is idempotent), linked from the release.
            let mut links = Vec::new();
            for a in assets {
                let n = file_name(a);
                let url = format!(
                    "{api}/projects/{project}/packages/generic/release/{}/{}",
                    enc(tag),
                    enc(&n)
                );
                let r = send(&format!("uploading {n}"), t.backoff, &|| {
                    auth(client.put(&url)).body(file_body(a))
                })?;
                expect_ok(&format!("uploading {n}"), r)?;
                report.uploaded.push(n.clone());
                links.push(json!({"name": n, "url": url, "link_type": "package"}));
            }
            let body = json!({"tag_name": tag, "name": name, "description": description, "assets": {"links": links}});
            let url = format!("{api}/projects/{project}/releases");
            let r = send("creating the release", t.backoff, &|| {
                auth(client.post(&url)).json(&body)
            })?;
            if r.status().as_u16() == 409 {
                let url = format!("{api}/projects/{project}/releases/{}", enc(tag));
                let upd = json!({"name": name, "description": description});
                let r = send("updating the release", t.backoff, &|| {
                    auth(client.put(&url)).json(&upd)
                })?;
                expect_ok("updating the release", r)?;
            } else {
                expect_ok("creating the release", r)?;
                report.created = true;
            }
        }
        Forge::Gitea | Forge::GitHub => {
            let base = format!("{api}/repos/{}", t.project);
            let body = json!({"tag_name": tag, "name": name, "body": description});
            let r = send("creating the release", t.backoff, &|| {
                auth(client.post(format!("{base}/releases"))).json(&body)
            })?;
            let exists = matches!(r.status().as_u16(), 409 | 422);
            let release = if exists {
                let r = send("finding the release", t.backoff, &|| {
                    auth(client.get(format!("{base}/releases/tags/{}", enc(tag))))
                })?;
                let found = expect_ok("finding the existing release", r)?;
                let id = found["id"]
                    .as_u64()
                    .ok_or_else(|| fail("finding the release", "no id in the answer".into()))?;
                let patch = json!({"name": name, "body": description});
                let r = send("updating the release", t.backoff, &|| {
                    auth(client.patch(format!("{base}/releases/{id}"))).json(&patch)
                })?;
                expect_ok("updating the release", r)?
            } else {
                report.created = true;
                expect_ok("creating the release", r)?
            };
            let id = release["id"]
                .as_u64()
                .ok_or_else(|| fail("the release", "no id in the answer".into()))?;
            let r = send("listing assets", t.backoff, &|| {
                auth(client.get(format!("{base}/releases/{id}/assets")))
            })?;
            let existing: Vec<String> = expect_ok("listing assets", r)?
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["name"].as_str().map(str::to_string))
                .collect();
            for a in assets {
                let n = file_name(a);
                if existing.contains(&n) {
                    report.already_there.push(n);
                    continue;
                }
                // GitHub names its upload host in `upload_url`; Gitea uploads to the API itself.
                let upload = release["upload_url"]
                    .as_str()
                    .map(|u| u.split('{').next().unwrap_or(u).to_string())
                    .unwrap_or_else(|| format!("{base}/releases/{id}/assets"));
                let url = format!("{upload}?name={}", enc(&n));
                let r = match t.forge {
                    Forge::Gitea => send(&format!("uploading {n}"), t.backoff, &|| {
                        let len = a.metadata().map(|m| m.len()).unwrap_or(0);
                        let part = match std::fs::File::open(a) {
                            Ok(f) => reqwest::blocking::multipart::Part::reader_with_length(f, len),
                            Err(_) => reqwest::blocking::multipart::Part::bytes(Vec::new()),
                        }
                        .file_name(n.clone());
                        auth(client.post(&url)).multipart(
                            reqwest::blocking::multipart::Form::new().part("attachment", part),
                        )
                    })?,
                    _ => send(&format!("uploading {n}"), t.backoff, &|| {
                        auth(client.post(&url))
                            .header("Content-Type", "application/octet-stream")
                            .body(file_body(a))
                    })?,
                };
                expect_ok(&format!("uploading {n}"), r)?;
                report.uploaded.push(n);
            }
        }
    }
    Ok(report)
}
