//! Webhook deliveries from GitLab, GitHub and Gitea/Forgejo: which project, whether it is
//! authentic, and what it asks for.
//!
//! Authenticity: GitLab sends the shared secret itself (`X-Gitlab-Token`); GitHub and
//! Gitea/Forgejo send an HMAC-SHA256 of the body (`X-Hub-Signature-256: sha256=<hex>`,
//! `X-Gitea-Signature: <hex>`). Both are checked in constant time.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forge {
    Gitlab,
    Github,
    Gitea,
}

impl Forge {
    pub fn as_str(self) -> &'static str {
        match self {
            Forge::Gitlab => "gitlab",
            Forge::Github => "github",
            Forge::Gitea => "gitea",
        }
    }
}

/// What a delivery asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A branch push: its pipeline at `sha`.
    Branch { branch: String, sha: String },
    /// A tag push: the release pipeline.
    Tag { tag: String, sha: String },
    /// Nothing to run: a ping, a deletion, an event rave does not act on.
    Nothing(&'static str),
}

#[derive(Debug)]
pub struct Delivery {
    pub id: String,
    pub event: String,
    /// The forge's name for the project (`group/app`), to find it in the config.
    pub project_path: Option<String>,
    pub action: Action,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Is the delivery authentic? `Err` says what is wrong (missing or bad signature).
pub fn verify(forge: Forge, h: &HeaderMap, body: &[u8], secret: &str) -> Result<(), String> {
    match forge {
        Forge::Gitlab => {
            let got = header(h, "x-gitlab-token").ok_or("missing X-Gitlab-Token")?;
            // Compare digests: equal length whatever was sent, so the time says nothing.
            let a = Sha256::digest(got.as_bytes());
            let b = Sha256::digest(secret.as_bytes());
            if bool::from(a.ct_eq(&b)) {
                Ok(())
            } else {
                Err("X-Gitlab-Token does not match the project's secret".into())
            }
        }
        Forge::Github | Forge::Gitea => {
            let (name, sig) = if forge == Forge::Github {
                let v = header(h, "x-hub-signature-256").ok_or("missing X-Hub-Signature-256")?;
                (
                    "X-Hub-Signature-256",
                    v.strip_prefix("sha256=")
                        .ok_or("X-Hub-Signature-256 must start with sha256=")?,
                )
            } else {
                let v = header(h, "x-gitea-signature")
                    .or_else(|| header(h, "x-forgejo-signature"))
                    .or_else(|| {
                        header(h, "x-hub-signature-256").and_then(|v| v.strip_prefix("sha256="))
                    })
                    .ok_or("missing X-Gitea-Signature")?;
                ("X-Gitea-Signature", v)
            };
            let sig = hex::decode(sig.trim()).map_err(|_| format!("{name} is not hex"))?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .map_err(|_| "bad secret".to_string())?;
            mac.update(body);
            // `verify_slice` compares in constant time.
            mac.verify_slice(&sig).map_err(|_| {
                format!("{name} does not match the body signed with the project's secret")
            })
        }
    }
}

#[derive(Deserialize)]
struct GitlabPush {
    object_kind: Option<String>,
    #[serde(rename = "ref")]
    ref_name: Option<String>,
    after: Option<String>,
    checkout_sha: Option<String>,
    project: Option<GitlabProject>,
}

#[derive(Deserialize)]
struct GitlabProject {
    path_with_namespace: Option<String>,
}

#[derive(Deserialize)]
struct GithubPush {
    #[serde(rename = "ref")]
    ref_name: Option<String>,
    after: Option<String>,
    #[serde(default)]
    deleted: bool,
    repository: Option<GithubRepo>,
}

#[derive(Deserialize)]
struct GithubRepo {
    full_name: Option<String>,
}

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

fn push_action(
    ref_name: Option<String>,
    sha: Option<String>,
    deleted: bool,
) -> Result<Action, String> {
    let r = ref_name.ok_or("the push has no `ref`")?;
    let sha = sha.unwrap_or_default();
    if deleted || sha.is_empty() || sha == ZERO_SHA {
        return Ok(Action::Nothing("a deletion starts no pipeline"));
    }
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{sha}` is not a commit sha"));
    }
    if let Some(b) = r.strip_prefix("refs/heads/") {
        Ok(Action::Branch {
            branch: b.to_string(),
            sha,
        })
    } else if let Some(t) = r.strip_prefix("refs/tags/") {
        Ok(Action::Tag {
            tag: t.to_string(),
            sha,
        })
    } else {
        Ok(Action::Nothing("not a branch or tag"))
    }
}

/// Read a delivery. The signature is checked separately (it needs the project's secret).
pub fn parse(forge: Forge, h: &HeaderMap, body: &[u8]) -> Result<Delivery, String> {
    // A delivery without an id is identified by its body: the same body twice is one delivery.
    let fallback_id = || hex::encode(Sha256::digest(body));
    match forge {
        Forge::Gitlab => {
            let event = header(h, "x-gitlab-event")
                .ok_or("missing X-Gitlab-Event")?
                .to_string();
            let id = header(h, "x-gitlab-event-uuid")
                .or_else(|| header(h, "x-gitlab-webhook-uuid"))
                .map(str::to_string)
                .unwrap_or_else(fallback_id);
            let p: GitlabPush = serde_json::from_slice(body)
                .map_err(|e| format!("the body is not a GitLab event: {e}"))?;
            let project_path = p.project.and_then(|p| p.path_with_namespace);
            let action = match (event.as_str(), p.object_kind.as_deref()) {
                ("Push Hook" | "Tag Push Hook" | "System Hook", Some("push" | "tag_push")) => {
                    push_action(p.ref_name, p.checkout_sha.or(p.after), false)?
                }
                _ => Action::Nothing("an event rave does not act on"),
            };
            Ok(Delivery {
                id,
                event,
                project_path,
                action,
            })
        }
        Forge::Github | Forge::Gitea => {
            let (ev, del) = if forge == Forge::Github {
                ("x-github-event", "x-github-delivery")
            } else if header(h, "x-gitea-event").is_some() {
                ("x-gitea-event", "x-gitea-delivery")
            } else {
                ("x-forgejo-event", "x-forgejo-delivery")
            };
            let event = header(h, ev)
                .ok_or_else(|| format!("missing {ev}"))?
                .to_string();
            let id = header(h, del)
                .map(str::to_string)
                .unwrap_or_else(fallback_id);
            if event == "ping" {
                return Ok(Delivery {
                    id,
                    event,
                    project_path: None,
                    action: Action::Nothing("pong"),
                });
            }
            let p: GithubPush = serde_json::from_slice(body)
                .map_err(|e| format!("the body is not a {} event: {e}", forge.as_str()))?;
            let project_path = p.repository.and_then(|r| r.full_name);
            let action = if event == "push" {
                push_action(p.ref_name, p.after, p.deleted)?
            } else {
                Action::Nothing("an event rave does not act on")
            };
            Ok(Delivery {
                id,
                event,
                project_path,
                action,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn github_signatures_are_checked_against_the_body() {
        let body =
            br#"{"ref":"refs/heads/main","after":"0123456789012345678901234567890123456789"}"#;
        let good = headers(&[(
            "x-hub-signature-256",
            &format!("sha256={}", sign("s3cret", body)),
        )]);
        assert!(verify(Forge::Github, &good, body, "s3cret").is_ok());
        assert!(verify(Forge::Github, &good, body, "other").is_err());
        assert!(verify(Forge::Github, &good, b"{}", "s3cret").is_err());
        let missing = verify(Forge::Github, &HeaderMap::new(), body, "s3cret").unwrap_err();
        assert!(missing.contains("missing X-Hub-Signature-256"), "{missing}");
    }

    #[test]
    fn gitea_and_forgejo_sign_with_a_bare_hex_hmac() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = sign("s3cret", body);
        for header in ["x-gitea-signature", "x-forgejo-signature"] {
            let h = headers(&[(header, &sig)]);
            assert!(verify(Forge::Gitea, &h, body, "s3cret").is_ok(), "{header}");
            assert!(verify(Forge::Gitea, &h, body, "nope").is_err(), "{header}");
        }
        let gitlab = headers(&[("x-gitlab-token", "s3cret")]);
        assert!(verify(Forge::Gitlab, &gitlab, body, "s3cret").is_ok());
        assert!(verify(Forge::Gitlab, &gitlab, body, "s3cre").is_err());
    }

    #[test]
    fn pushes_tags_and_deletions() {
        let h = headers(&[("x-github-event", "push"), ("x-github-delivery", "d1")]);
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let d = parse(
            Forge::Github,
            &h,
            format!(r#"{{"ref":"refs/tags/v1.0","after":"{sha}"}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            d.action,
            Action::Tag {
                tag: "v1.0".into(),
                sha: sha.into()
            }
        );
        let d = parse(
            Forge::Github,
            &h,
            format!(r#"{{"ref":"refs/heads/x","after":"{ZERO_SHA}","deleted":true}}"#).as_bytes(),
        )
        .unwrap();
        assert!(matches!(d.action, Action::Nothing(_)));
        let h = headers(&[("x-gitlab-event", "Push Hook")]);
        let d = parse(Forge::Gitlab, &h, format!(r#"{{"object_kind":"push","ref":"refs/heads/main","after":"{sha}","project":{{"path_with_namespace":"g/app"}}}}"#).as_bytes()).unwrap();
        assert_eq!(
            d.action,
            Action::Branch {
                branch: "main".into(),
                sha: sha.into()
            }
        );
        assert_eq!(d.project_path.as_deref(), Some("g/app"));
    }
}
