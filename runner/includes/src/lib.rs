//! Fetching includes from outside the repository: `include: project` and `component` with git
//! (a bare mirror per project, fetched at most once per load), `remote` over HTTPS (with
//! GitLab's `integrity` check), `template` from a configured directory or project.
//!
//! Everything fetched is kept under the cache directory, by project (mirrors) or by URL
//! (remote files, with their digest), so a later run with `offline` set uses only what is
//! there and says which include is missing. Credentials are never printed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use rave_model::external::{External, Fetched, IncludeSource, IncludedFile};
use rave_repo::Credentials;
use sha2::{Digest, Sha256};

/// Largest remote file accepted (GitLab's limit on a configuration file is 1 MiB; rave's
/// loader allows 4 MiB).
const MAX_REMOTE_BYTES: u64 = 4 * 1024 * 1024;

/// Where `include: template` files come from.
#[derive(Clone, Debug)]
pub enum Templates {
    /// A directory holding the template files (`Jobs/Build.gitlab-ci.yml`, …).
    Dir(PathBuf),
    /// A project on the forge, at a ref (None: its default branch).
    Project {
        project: String,
        reference: Option<String>,
    },
}

pub struct ForgeIncludes {
    /// `https://gitlab.example.com`: projects are `<server_url>/<project>.git`.
    pub server_url: Option<String>,
    /// Where projects' repositories are, when not under `server_url`: `<project_base>/<project>.git`
    /// (`ssh://git@gitlab.example.com:2222`, for a forge reached over SSH).
    pub project_base: Option<String>,
    /// Mirrors and remote files are kept here.
    pub cache_dir: PathBuf,
    pub credentials: Credentials,
    /// Use only the cache.
    pub offline: bool,
    pub templates: Option<Templates>,
    /// For one remote file.
    pub timeout: Duration,
    /// For one git fetch of a project (`$RAVE_INCLUDE_FETCH_TIMEOUT` seconds, default 300).
    pub fetch_timeout: Duration,
    /// Projects fetched during this load (each is fetched once).
    fetched: HashSet<String>,
}

impl ForgeIncludes {
    /// Remove cached mirrors and remote files not used for `older_than` (under `cache_dir`,
    /// or under each project's cache when `cache_dir` holds several, as a server's does).
    /// Returns how many were removed. A removed entry is fetched again when next needed;
    /// `--offline` then cannot use it.
    pub fn prune(cache_dir: &std::path::Path, older_than: std::time::Duration) -> usize {
        let mut n = 0;
        let mut roots = vec![cache_dir.to_path_buf()];
        if let Ok(rd) = std::fs::read_dir(cache_dir) {
            roots.extend(
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("projects").is_dir() || p.join("remote").is_dir()),
            );
        }
        for root in roots {
            for kind in ["projects", "remote"] {
                let Ok(rd) = std::fs::read_dir(root.join(kind)) else {
                    continue;
                };
                for e in rd.flatten() {
                    let old = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > older_than);
                    if !old {
                        continue;
                    }
                    let p = e.path();
                    let gone = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                    if gone.is_ok() {
                        n += 1;
                    }
                }
            }
        }
        n
    }

    pub fn new(server_url: Option<String>, cache_dir: PathBuf) -> ForgeIncludes {
        ForgeIncludes {
            server_url: server_url.map(|u| u.trim_end_matches('/').to_string()),
            project_base: None,
            cache_dir,
            credentials: Credentials::None,
            offline: false,
            templates: None,
            timeout: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(
                std::env::var("RAVE_INCLUDE_FETCH_TIMEOUT")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(300),
            ),
            fetched: HashSet::new(),
        }
    }

    fn safe(name: &str) -> String {
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// The project's mirror, fetched now unless offline; `url` overrides `<server_url>/<project>.git`.
    fn mirror(&mut self, project: &str, url: Option<String>) -> Result<PathBuf, String> {
        let dir = self
            .cache_dir
            .join("projects")
            .join(format!("{}.git", Self::safe(project)));
        touch(&dir);
        if self.offline {
            if !dir.is_dir() {
                return Err(format!(
                    "offline, and project `{project}` was never fetched into {}; run once without --offline",
                    dir.display()
                ));
            }
            return Ok(dir);
        }
        if self.fetched.contains(project) {
            return Ok(dir);
        }
        let url = match url {
            Some(u) => u,
            None => {
                let base = self
                    .project_base
                    .as_deref()
                    .or(self.server_url.as_deref())
                    .ok_or_else(|| {
                    format!(
                        "no forge to fetch project `{project}` from: the `origin` remote names none; pass --server-url"
                    )
                })?;
                format!("{base}/{project}.git")
            }
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // libgit2 has no fetch deadline rave can set without `unsafe`: the fetch runs on its
        // own thread, and a forge that stops answering is given up on with its URL named (the
        // thread ends with the process).
        let (tx, rx) = std::sync::mpsc::channel();
        let (u, creds, d) = (url.clone(), self.credentials.clone(), dir.clone());
        std::thread::spawn(move || {
            let _ = tx.send(rave_repo::fetch_mirror(&u, &creds, &d));
        });
        match rx.recv_timeout(self.fetch_timeout) {
            Ok(r) => r.map_err(|e| format!("cannot fetch {url}: {e}"))?,
            Err(_) => {
                return Err(format!(
                    "fetching {url} did not finish within {} s (RAVE_INCLUDE_FETCH_TIMEOUT); is the forge answering?",
                    self.fetch_timeout.as_secs()
                ));
            }
        }
        self.fetched.insert(project.to_string());
        Ok(dir)
    }

    fn project_file(
        &mut self,
        project: &str,
        reference: Option<&str>,
        file: &str,
        kind: &str,
        location: String,
        url: Option<String>,
    ) -> Result<Fetched, String> {
        let mirror = self.mirror(project, url)?;
        let sha = rave_repo::mirror_resolve(&mirror, reference)
            .map_err(|e| format!("project `{project}`: {e}"))?;
        let text = rave_repo::mirror_file(&mirror, &sha, file)
            .map_err(|e| format!("project `{project}`: {e}"))?
            .ok_or_else(|| {
                format!(
                    "project `{project}` has no file `{file}` at {}",
                    reference.unwrap_or("its default branch")
                )
            })?;
        Ok(Fetched {
            text,
            display: format!("{project}@{}:{file}", &sha[..sha.len().min(12)]),
            origin: IncludedFile {
                kind: kind.into(),
                location,
                resolved: sha.clone(),
            },
            project: Some((project.to_string(), sha)),
        })
    }

    fn remote(&mut self, url: &str, integrity: Option<&str>) -> Result<Fetched, String> {
        let cached = self
            .cache_dir
            .join("remote")
            .join(hex::encode(Sha256::digest(url.as_bytes())));
        touch(&cached);
        let text = if self.offline {
            std::fs::read_to_string(&cached).map_err(|_| {
                format!("offline, and {url} was never fetched; run once without --offline")
            })?
        } else {
            let client = reqwest::blocking::Client::builder()
                .timeout(self.timeout)
                .build()
                .map_err(|e| e.to_string())?;
            let resp = client.get(url).send().map_err(|e| {
                if e.is_timeout() {
                    format!(
                        "fetching {url} timed out after {} s",
                        self.timeout.as_secs()
                    )
                } else {
                    format!("cannot fetch {url}: {e}")
                }
            })?;
            if !resp.status().is_success() {
                return Err(format!("{url} answered {}", resp.status()));
            }
            if resp.content_length().is_some_and(|n| n > MAX_REMOTE_BYTES) {
                return Err(format!("{url} is larger than {MAX_REMOTE_BYTES} bytes"));
            }
            let bytes = resp.bytes().map_err(|e| format!("reading {url}: {e}"))?;
            if bytes.len() as u64 > MAX_REMOTE_BYTES {
                return Err(format!("{url} is larger than {MAX_REMOTE_BYTES} bytes"));
            }
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| format!("{url} is not UTF-8 text"))?;
            if let Some(parent) = cached.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let tmp = cached.with_extension("tmp");
            if std::fs::write(&tmp, &text).is_ok() {
                let _ = std::fs::rename(&tmp, &cached);
            }
            text
        };
        let digest = Sha256::digest(text.as_bytes());
        if let Some(want) = integrity {
            let b64 = want.strip_prefix("sha256-").ok_or_else(|| {
                format!("`integrity: {want}` must be `sha256-` followed by the base64 of the file's SHA-256")
            })?;
            let got = base64::engine::general_purpose::STANDARD.encode(digest);
            if got != b64 {
                return Err(format!(
                    "the file does not match its `integrity`: expected sha256-{b64}, got sha256-{got}"
                ));
            }
        }
        Ok(Fetched {
            text,
            display: url.to_string(),
            origin: IncludedFile {
                kind: "remote".into(),
                location: url.to_string(),
                resolved: format!("sha256:{}", hex::encode(digest)),
            },
            project: None,
        })
    }

    fn template(&mut self, name: &str) -> Result<Fetched, String> {
        match self.templates.clone() {
            None => Err(format!(
                "no templates source is configured for `{name}`: pass --templates-dir DIR (a copy of GitLab's lib/gitlab/ci/templates) or --templates-project GROUP/PROJECT"
            )),
            Some(Templates::Dir(dir)) => {
                if Path::new(name)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!(
                        "template name `{name}` must be a path inside the templates"
                    ));
                }
                let path = dir.join(name);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("no template {} ({e})", path.display()))?;
                let digest = hex::encode(Sha256::digest(text.as_bytes()));
                Ok(Fetched {
                    text,
                    display: format!("template {name}"),
                    origin: IncludedFile {
                        kind: "template".into(),
                        location: name.to_string(),
                        resolved: format!("sha256:{digest}"),
                    },
                    project: None,
                })
            }
            Some(Templates::Project { project, reference }) => self.project_file(
                &project,
                reference.as_deref(),
                name,
                "template",
                name.to_string(),
                None,
            ),
        }
    }

    /// `<host>/<project path>/<name>@<version>`: the project at the version GitLab would pick
    /// (a tag, `~latest`, a partial version `1` / `1.2`, a commit or a branch), and its
    /// `templates/<name>.yml` or `templates/<name>/template.yml`.
    fn component(&mut self, address: &str) -> Result<Fetched, String> {
        let (path, version) = address.rsplit_once('@').ok_or_else(|| {
            format!("component `{address}` needs a version: `{address}@1.0.0`, `@~latest` or `@<commit>`")
        })?;
        let mut parts: Vec<&str> = path.split('/').collect();
        if parts.len() < 3 {
            return Err(format!(
                "component `{address}` must be `<host>/<project path>/<component>@<version>`"
            ));
        }
        let host = parts.remove(0);
        let name = parts.pop().unwrap_or_default().to_string();
        let project = parts.join("/");
        // The component's host: the forge rave fetches from when it is that host, else the
        // host itself over HTTPS.
        let url = match &self.server_url {
            Some(base)
                if base
                    .split("://")
                    .nth(1)
                    .is_some_and(|h| h.trim_end_matches('/') == host) =>
            {
                format!("{base}/{project}.git")
            }
            _ => format!("https://{host}/{project}.git"),
        };
        let mirror = self.mirror(&project, Some(url))?;
        let sha =
            resolve_version(&mirror, version).map_err(|e| format!("component `{address}`: {e}"))?;
        for file in [
            format!("templates/{name}.yml"),
            format!("templates/{name}/template.yml"),
        ] {
            if let Some(text) = rave_repo::mirror_file(&mirror, &sha, &file)
                .map_err(|e| format!("component `{address}`: {e}"))?
            {
                return Ok(Fetched {
                    text,
                    display: format!("{project}@{}:{file}", &sha[..sha.len().min(12)]),
                    origin: IncludedFile {
                        kind: "component".into(),
                        location: address.to_string(),
                        resolved: sha.clone(),
                    },
                    project: Some((project.clone(), sha)),
                });
            }
        }
        Err(format!(
            "component `{address}`: project `{project}` has neither templates/{name}.yml nor templates/{name}/template.yml at {version}"
        ))
    }
}

/// GitLab's component versions: a full commit id; `~latest`, the highest release (no
/// pre-release) tag; a full `X.Y.Z` tag; a partial `X` or `X.Y`, the highest release tag it
/// prefixes; else a branch or any tag by name.
pub fn resolve_version(mirror: &Path, version: &str) -> Result<String, String> {
    let tags = rave_repo::mirror_tags(mirror).map_err(|e| e.to_string())?;
    let releases: Vec<(semver::Version, &str)> = tags
        .iter()
        .filter_map(|(t, sha)| {
            semver::Version::parse(t.trim_start_matches('v'))
                .ok()
                .map(|v| (v, sha.as_str()))
        })
        .collect();
    let highest = |pred: &dyn Fn(&semver::Version) -> bool| {
        releases
            .iter()
            .filter(|(v, _)| v.pre.is_empty() && pred(v))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, sha)| sha.to_string())
    };
    if version == "~latest" {
        return highest(&|_| true).ok_or_else(|| "no release tag (X.Y.Z) for ~latest".into());
    }
    let nums: Vec<u64> = version
        .split('.')
        .map_while(|p| p.parse::<u64>().ok())
        .collect();
    let all_numeric = !version.is_empty() && nums.len() == version.split('.').count();
    if all_numeric && nums.len() < 3 {
        let found = highest(&|v| v.major == nums[0] && (nums.len() < 2 || v.minor == nums[1]));
        return found.ok_or_else(|| format!("no release tag matches version {version}"));
    }
    rave_repo::mirror_resolve(mirror, Some(version)).map_err(|_| {
        format!("version `{version}` is no tag, branch or commit of the component's project")
    })
}

impl IncludeSource for ForgeIncludes {
    fn fetch(&mut self, what: &External) -> Result<Fetched, String> {
        match what {
            External::Project {
                project,
                reference,
                file,
            } => self.project_file(
                project,
                reference.as_deref(),
                file,
                "project",
                what.describe(),
                None,
            ),
            External::Remote { url, integrity } => self.remote(url, integrity.as_deref()),
            External::Template { name } => self.template(name),
            External::Component { address } => self.component(address),
        }
    }
}

/// `https://host[:port]` of a clone URL (`https://host/group/p.git`, `git@host:group/p.git`,
/// `ssh://git@host/group/p.git`), the forge includes are fetched from.
pub fn server_url_of(remote: &str) -> Option<String> {
    if let Some(rest) = remote
        .strip_prefix("https://")
        .or_else(|| remote.strip_prefix("http://"))
    {
        let scheme = if remote.starts_with("https") {
            "https"
        } else {
            "http"
        };
        let host = rest.split('/').next()?;
        let host = host.rsplit('@').next()?;
        return Some(format!("{scheme}://{host}"));
    }
    if let Some(rest) = remote.strip_prefix("ssh://") {
        let host = rest.split('/').next()?.rsplit('@').next()?;
        let host = host.split(':').next()?;
        return Some(format!("https://{host}"));
    }
    // scp-like: git@host:group/project.git
    let (user_host, _) = remote.split_once(':')?;
    if user_host.contains('/') {
        return None;
    }
    Some(format!("https://{}", user_host.rsplit('@').next()?))
}

/// Mark a cache entry as used now (what `prune` goes by).
fn touch(p: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_from_remotes() {
        assert_eq!(
            server_url_of("https://gitlab.example.com/group/app.git").as_deref(),
            Some("https://gitlab.example.com")
        );
        assert_eq!(
            server_url_of("https://oauth2:tok@gitlab.example.com:8443/g/a.git").as_deref(),
            Some("https://gitlab.example.com:8443")
        );
        assert_eq!(
            server_url_of("git@gitlab.example.com:group/app.git").as_deref(),
            Some("https://gitlab.example.com")
        );
        assert_eq!(
            server_url_of("ssh://git@gitlab.example.com:2222/group/app.git").as_deref(),
            Some("https://gitlab.example.com")
        );
        assert_eq!(server_url_of("/srv/git/app.git"), None);
    }
}
